"""iobridge as an operator installs it, for the install tests: the wheel,
built from the checkout, in a fresh venv outside the checkout.

- The wheel is built by pip with the project's build backend (no network,
  no build isolation: setuptools comes from the running venv) from a scratch
  copy of the checkout, so the build's by-products (build/, *.egg-info)
  stay out of the checkout other people work in.
- The venv is made as the README's install section says
  (`python3 -m venv --system-site-packages`, which lets it see BCC from
  python3-bpfcc) and the wheel goes in with `--no-deps`. Its dependencies
  (numpy, onnxruntime, onnx, psutil) are not downloaded again: a .pth file
  appends the running venv's site-packages to the new venv's path, after
  its own site-packages, so `import iobridge` finds the installed package.
  (A path in a .pth file is added without running that directory's own .pth
  files, so the project venv's editable finder for the checkout stays out.)

`iobridge vm test` prepares one such venv on the host before it boots the VM
(prepare_for_vm) and names it to the guest in $IOBRIDGE_VM_INSTALLED: under
emulation pip alone takes minutes to start, and the venv's paths are the
same inside the guest (the directory is shared at the same path).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from ..core import resources
from ..core.errors import IobridgeError

SYSTEM_PYTHON = "/usr/bin/python3"
# Not copied for the build: version control, venvs, build by-products.
SKIP = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache",
        ".scratch", "*.o", "*.ko", "*.mod", "*.mod.c", ".*.cmd")
ENV_VAR = "IOBRIDGE_VM_INSTALLED"


def _run(cmd: list, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    cmd = [str(c) for c in cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if proc.returncode != 0:
        raise IobridgeError(f"{' '.join(cmd)} exited {proc.returncode}: "
                            f"{(proc.stdout + proc.stderr).strip()[-3000:]}")
    return proc


def build_wheel(work: Path) -> Path:
    """The checkout's wheel, built in work/ from a copy of it; returns its path."""
    root = resources.require_checkout("building the wheel")
    src = work / "src"
    shutil.copytree(root, src, ignore=shutil.ignore_patterns(*SKIP), symlinks=True)
    dist = work / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "--quiet", "--wheel-dir", dist, src])
    wheels = list(dist.glob("iobridge-*.whl"))
    if len(wheels) != 1:
        raise IobridgeError(f"the build left {len(wheels)} iobridge wheels in {dist}")
    return wheels[0]


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
        """An environment to run it in: no variable pointing at the checkout,
        the venv's bin first on PATH."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
        env["PATH"] = f"{self.root / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        return env

    def where(self, cwd: Path) -> dict:
        """Where this venv's python takes iobridge and its data files from."""
        code = ("import json, iobridge\n"
                "from iobridge.core import resources\n"
                "from iobridge.kernel import bpf\n"
                "from iobridge.daemon import config\n"
                "print(json.dumps({'package': iobridge.__file__,\n"
                "  'checkout': str(resources.checkout_root()),\n"
                "  'bpf': str(bpf.source_path('observer')), 'abi_header': str(bpf.abi_header()),\n"
                "  'default_model': str(config.DEFAULT_MODEL)}))\n")
        return json.loads(_run([self.python, "-c", code], cwd=cwd, env=self.env()).stdout)


def make_venv(wheel: Path, where: Path) -> Venv:
    """A fresh venv at `where` with the wheel installed (see the module doc)."""
    venv = Venv(where)
    # --without-pip: ensurepip takes ~20 s; the running venv's pip installs
    # into it with --python.
    _run([SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", "--without-pip", where])
    _run([sys.executable, "-m", "pip", "--python", venv.python, "install", "--no-deps",
          "--no-index", "--quiet", wheel])
    deps = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    (venv.site_packages / "_iobridge_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    return venv


def prepare_for_vm(shared: Path) -> str:
    """Build the wheel and install it into shared/installed/venv, for the
    VM's install test; returns the environment assignment that names it to
    the guest. Never raises: a failure is written to shared/installed/error
    and reported by the test that needs the venv."""
    work = shared / "installed"
    work.mkdir()
    t0 = time.monotonic()
    try:
        make_venv(build_wheel(work), work / "venv")
        (work / "seconds").write_text(f"{time.monotonic() - t0:.1f}\n")
    except (IobridgeError, OSError, subprocess.SubprocessError) as err:
        (work / "error").write_text(f"preparing the installed venv on the host failed: {err}\n")
    return f"{ENV_VAR}={work}"


def from_vm_host() -> Venv | None:
    """Inside the VM: the venv prepare_for_vm made on the host, or None when
    the guest was not started by `iobridge vm test`. Raises with the
    host's error when the preparation failed."""
    where = os.environ.get(ENV_VAR)
    if not where:
        return None
    error = Path(where) / "error"
    if error.exists():
        raise IobridgeError(error.read_text().strip())
    return Venv(Path(where) / "venv")
