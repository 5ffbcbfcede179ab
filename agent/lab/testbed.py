"""Test devices inside the VM, for the demo, benchmarks and experiments:
the module, null_blk devices through configfs, and a small command runner.
Only ever used inside the test VM (they load modules and make block devices).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from ..core import abi, resources
from ..core.errors import IobridgeError
from ..kernel import dmtarget

CONFIGFS_NULLB = Path("/sys/kernel/config/nullb")


def sh(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise IobridgeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return proc


def module_ko(release: str | None = None) -> Path:
    """The module built for `release` (default: the running kernel's),
    rebuilt first if missing or older than its sources: kmodule/Makefile
    knows that (its rule depends on them; nothing runs when up to date) and
    builds one object per kernel, in kmodule/build/RELEASE/."""
    release = release or os.uname().release
    kdir = resources.require_checkout("loading the module") / "kmodule"
    sh(["make", "-s", "-C", str(kdir), f"RELEASES={release}"])
    return kdir / "build" / release / "dm-iobridge.ko"


def ensure_module() -> None:
    """Load dm_mod and the iobridge module (building it if needed)."""
    sh(["modprobe", "dm_mod"])
    if not Path(f"/sys/module/{abi.MODULE_NAME}").exists():
        sh(["insmod", str(module_ko())])
    dmtarget.check_module_version()


def make_nullb(name: str, size_mb: int = 1024, **params) -> str:
    """Create and power on null_blk device /dev/NAME with configfs params."""
    if not CONFIGFS_NULLB.is_dir():
        sh(["modprobe", "null_blk", "nr_devices=0"])
    d = CONFIGFS_NULLB / name
    d.mkdir()
    for key, value in {"size": size_mb, **params}.items():
        (d / key).write_text(f"{value}\n")
    (d / "power").write_text("1\n")
    dev = f"/dev/{name}"
    for _ in range(100):
        if os.path.exists(dev):
            return dev
        time.sleep(0.05)
    raise IobridgeError(f"null_blk device {dev} did not appear")


def remove_nullb(name: str) -> None:
    d = CONFIGFS_NULLB / name
    if d.is_dir():
        (d / "power").write_text("0\n")
        d.rmdir()
