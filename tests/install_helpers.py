"""Build iobridge's wheel and install it into a fresh venv outside the
checkout, for the install tests (tests/test_install.py on the host,
tests/vm/test_install.py in the VM).

The wheel is built (no network, no build isolation: setuptools comes from
the project's venv) from a copy of the checkout's files in a temporary
directory, so the build's own by-products (build/, *.egg-info) stay out of
the checkout other people work in. The venv is made as the README says
(`python3 -m venv --system-site-packages`, for BCC from python3-bpfcc) and
the wheel goes in with --no-deps; its dependencies (numpy, onnxruntime,
onnx, psutil) are not re-downloaded but taken from the project's venv,
whose site-packages a .pth file appends to the new venv's path (after the
new venv's own site-packages, so `import iobridge` finds the installed
package, and no .pth of the project's venv runs, so its editable finder
for the checkout is not installed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
# What the installed package must carry (paths under iobridge/_data/).
DATA_FILES = ("bpf/observer.bpf.c", "bpf/route_policy.bpf.c", "bpf/iobridge_bpf.h",
              "kmodule/iobridge_abi.h",
              "models/admission-default.onnx", "models/admission-default.card.json")
# What it must not: kernel module sources and build products.
NOT_SHIPPED = ("kmodule/dm-iobridge.c", "kmodule/dm-iobridge.ko", "kmodule/Makefile",
               "kmodule/Kbuild", "kmodule/iobridge_trace.h")


def run(cmd: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout, **kw)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


# Not copied for the build: version control, venvs, build by-products.
SKIP = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache",
        ".scratch", "*.o", "*.ko", "*.mod*", ".*.cmd")


def copy_sources(dest: Path) -> Path:
    """The checkout, as the wheel build reads it, copied to dest."""
    shutil.copytree(CHECKOUT, dest, ignore=shutil.ignore_patterns(*SKIP), symlinks=True)
    return dest


def build_wheel(work: Path) -> Path:
    """iobridge's wheel, built from a copy of the checkout; returns its path."""
    src = copy_sources(work / "src")
    dist = work / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "--quiet", "--wheel-dir", dist, src])
    wheels = list(dist.glob("iobridge-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


@dataclass
class Venv:
    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def iobridge(self) -> Path:
        return self.root / "bin" / "iobridge"

    @property
    def site_packages(self) -> Path:
        return self.root / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / \
            "site-packages"

    @property
    def package(self) -> Path:
        """The installed iobridge package."""
        return self.site_packages / "iobridge"

    def env(self) -> dict:
        """The environment to run it with: nothing pointing at the checkout."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
        env["PATH"] = f"{self.root / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        return env


def install(wheel: Path, where: Path) -> Venv:
    """A fresh venv at `where` with the wheel installed (see the module doc)."""
    venv = Venv(where)
    # --without-pip: ensurepip would take ~20 s; the project venv's pip
    # installs into it with --python.
    run([SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", "--without-pip", where])
    run([sys.executable, "-m", "pip", "--python", venv.python, "install", "--no-deps",
         "--no-index", "--quiet", wheel])
    deps = sysconfig.get_paths()["purelib"]
    (venv.site_packages / "_iobridge_test_deps.pth").write_text(f"{deps}\n")
    return venv


def where_is_iobridge(venv: Venv, cwd: Path) -> dict:
    """Where the venv's python imports iobridge and its data files from."""
    code = ("import json, iobridge\n"
            "from iobridge.core import resources\n"
            "from iobridge.kernel import bpf\n"
            "from iobridge.daemon import config\n"
            "print(json.dumps({'package': iobridge.__file__,\n"
            "  'checkout': str(resources.checkout_root()),\n"
            "  'bpf': str(bpf.source_path('observer')), 'abi_header': str(bpf.abi_header()),\n"
            "  'default_model': str(config.DEFAULT_MODEL)}))\n")
    return json.loads(run([venv.python, "-c", code], cwd=cwd, env=venv.env()).stdout)
