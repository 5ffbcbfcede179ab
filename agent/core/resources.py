"""The one way to find iobridge's data files: BPF sources, the ABI header
and the shipped models.

In a checkout they are the top-level folders bpf/, kmodule/ and models/ (the
one copy in the repository). An installed wheel carries them as package
data under iobridge/_data/ (pyproject.toml maps the same folders there at
build time), found with importlib.resources. The checkout wins when the
package runs from one (editable install or PYTHONPATH), so a developer's
edits are what runs.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from .errors import IobridgeError

# iobridge/core/resources.py -> the folder holding the iobridge package
_PACKAGE_DIR = Path(__file__).resolve().parent.parent
_CHECKOUT = _PACKAGE_DIR.parent          # agent/ -> the repository root
DATA_FOLDERS = ("bpf", "kmodule", "models")


def checkout_root() -> Path | None:
    """The repository root when running from a checkout, else None."""
    if (_CHECKOUT / "kmodule" / "iobridge_abi.h").is_file() and (_CHECKOUT / "pyproject.toml").is_file():
        return _CHECKOUT
    return None


def data_dir(folder: str) -> Path:
    """The directory of one data folder (bpf, kmodule or models)."""
    if folder not in DATA_FOLDERS:
        raise ValueError(f"unknown data folder {folder!r}")
    root = checkout_root()
    if root is not None:
        return root / folder
    installed = importlib.resources.files("iobridge") / "_data" / folder
    path = Path(str(installed))
    if not path.is_dir():
        raise IobridgeError(f"iobridge's data folder {folder}/ is missing from the installed package "
                            f"(looked in {path})",
                            "reinstall iobridge from a wheel built with pyproject.toml")
    return path


def require_checkout(what: str) -> Path:
    """The repository root, for development tools that need the whole tree."""
    root = checkout_root()
    if root is None:
        raise IobridgeError(f"{what} needs an iobridge source checkout (the VM harness, kmodule "
                            "sources and tests are not part of the installed package)",
                            "run it from a clone of the repository")
    return root
