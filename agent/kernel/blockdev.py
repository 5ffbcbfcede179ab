"""Block device names and numbers, as sysfs and the kernel's BPF side see them.

BPF programs see the kernel's dev_t encoding (major << 20 | minor), which is
not the user-space one (os.makedev).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import IobridgeError

MINORBITS = 20
SYS_CLASS_BLOCK = Path("/sys/class/block")


def kdev(major: int, minor: int) -> int:
    return (major << MINORBITS) | minor


def kdev_split(dev: int) -> tuple[int, int]:
    return dev >> MINORBITS, dev & ((1 << MINORBITS) - 1)


@dataclass(frozen=True)
class BlockDev:
    name: str
    major: int
    minor: int

    @property
    def kdev(self) -> int:
        return kdev(self.major, self.minor)


def _read_dev(sysdir: Path) -> tuple[int, int]:
    major, minor = (sysdir / "dev").read_text().strip().split(":")
    return int(major), int(minor)


def resolve(spec: str, sysfs: Path = SYS_CLASS_BLOCK) -> BlockDev:
    """A block device from a name (nullb0), a path (/dev/nullb0, /dev/mapper/x)
    or MAJ:MIN; an error that names the input when there is no such device."""
    spec = spec.strip()
    if not spec:
        raise IobridgeError("empty device name", "give a name such as sda, a /dev path or MAJ:MIN")
    if ":" in spec and all(p.isdigit() for p in spec.split(":", 1)):
        major, minor = (int(p) for p in spec.split(":", 1))
        for entry in sysfs.iterdir() if sysfs.is_dir() else ():
            try:
                if _read_dev(entry) == (major, minor):
                    return BlockDev(entry.name, major, minor)
            except OSError:
                continue
        raise IobridgeError(f"no block device with number {spec}", "lsblk lists the devices")
    name = spec
    if spec.startswith("/"):
        try:
            st = os.stat(spec)
        except FileNotFoundError:
            raise IobridgeError(f"no such device: {spec}", "lsblk lists the devices") from None
        if not stat.S_ISBLK(st.st_mode):
            raise IobridgeError(f"{spec} is not a block device")
        return resolve(f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}", sysfs)
    if not (sysfs / name / "dev").exists():
        raise IobridgeError(f"no block device named {name!r}", "lsblk lists the devices")
    major, minor = _read_dev(sysfs / name)
    return BlockDev(name, major, minor)


def name_of(kernel_dev: int) -> str:
    """sysfs name of a kernel dev_t, or MAJ:MIN if it has gone away."""
    major, minor = kdev_split(kernel_dev)
    link = Path("/sys/dev/block") / f"{major}:{minor}"
    try:
        return os.path.basename(os.readlink(link))
    except OSError:
        return f"{major}:{minor}"
