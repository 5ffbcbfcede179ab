"""Pinned BPF objects under one bpffs directory (default /sys/fs/bpf/iobridge).

The agent pins its maps there (mode 0600) so that `iobridge status` and
bpftool can read them and a restarted agent can find what a killed one left
behind. Only the agent writes here; at start it removes leftovers of a
previous agent (logged with that agent's pid when known), and a clean stop
removes exactly what it pinned.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

from ..core.errors import IobridgeError

log = logging.getLogger(__name__)


def _is_bpffs(path: Path) -> bool:
    """Whether the mount holding `path` is a BPF filesystem."""
    import psutil  # noqa: PLC0415
    mounts = [(p.mountpoint, p.fstype) for p in psutil.disk_partitions(all=True)]
    inside = [(m, t) for m, t in mounts if (str(path) + "/").startswith(m.rstrip("/") + "/")]
    return bool(inside) and max(inside, key=lambda mt: len(mt[0]))[1] == "bpf"


class Pins:
    """The agent's pin directory."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.created: list[Path] = []

    def prepare(self) -> list[str]:
        """Create the directory (0700) and remove a previous agent's pins.
        Returns the names removed."""
        if not _is_bpffs(self.dir.parent if not self.dir.exists() else self.dir):
            raise IobridgeError(f"{self.dir.parent} is not a BPF filesystem (bpffs)",
                                "mount it: mount -t bpf bpf /sys/fs/bpf")
        removed = []
        if self.dir.exists():
            for entry in sorted(self.dir.iterdir()):
                entry.unlink()
                removed.append(entry.name)
        else:
            self.dir.mkdir(mode=0o700)
        if removed:
            log.warning("removed pins left by a previous agent in %s: %s",
                        self.dir, ", ".join(removed))
        return removed

    def pin(self, name: str, fd: int) -> Path:
        import bcc  # noqa: PLC0415 (only where BPF is in use)
        path = self.dir / name
        rc = bcc.libbcc.lib.bpf_obj_pin(fd, str(path).encode())
        if rc != 0:   # libbcc returns -errno, or -1 with errno set
            err = -rc if rc < -1 else (ctypes.get_errno() or 1)
            raise IobridgeError(f"cannot pin {name} at {path}: {os.strerror(err)}")
        os.chmod(path, 0o600)
        self.created.append(path)
        return path

    def remove(self) -> None:
        """Unpin what this agent pinned and the directory if it is empty."""
        for path in self.created:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        self.created.clear()
        try:
            self.dir.rmdir()
        except OSError:
            pass   # not empty (someone else's pin) or already gone: leave it
