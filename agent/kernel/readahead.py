"""Prefetch actuators on a stock kernel: one place for every way the agent
changes readahead (the prefetch unit, daemon/prefetch.py, decides when).

- per device: `read_ahead_kb` in sysfs. Each open file copied the device's
  value at open time, so files already open keep the old one until they
  are advised NORMAL (which re-copies it).
- per file: a descriptor of the owning process's open file, through
  pidfd_open + pidfd_getfd (Linux 5.6+, ptrace-attach permission; raw
  syscalls: glibc has no wrapper), then posix_fadvise on it. The copy
  shares the owner's struct file, so the advice changes what the owner's
  reads do: SEQUENTIAL (twice the device's readahead), RANDOM (none),
  NORMAL (the device's value again), WILLNEED (read now; the kernel caps
  each call near the readahead size, so large extents go in chunks) and
  DONTNEED (drop clean pages: drop-behind).

A process that exits, or closes or replaces the descriptor, between the
/proc scan and the fadvise is not an error: FileGone says so and the caller
skips that holder. Every other failure is an IobridgeError naming the
device or process and the reason.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import IobridgeError
from . import blockdev
from .cachestat import open_holders

log = logging.getLogger(__name__)

SYS_PIDFD_OPEN = 434      # x86_64 and the generic table alike
SYS_PIDFD_GETFD = 438
SYSFS_BLOCK = Path("/sys/dev/block")
MAX_READ_AHEAD_KB = 1 << 20
# A file's holders found by a /proc scan serve this long before the next
# scan for it (a holder that is gone is dropped at once: FileGone). The scan
# stats every descriptor of every process: 17-24% of the prefetch agent's
# samples when it ran each window. A process that opens an already known
# file meanwhile gets its advice up to this much later.
HOLDERS_MAX_AGE_S = 10.0
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

ADVICE = {"normal": os.POSIX_FADV_NORMAL, "sequential": os.POSIX_FADV_SEQUENTIAL,
          "random": os.POSIX_FADV_RANDOM}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class FileGone(Exception):
    """The process exited or no longer has that file at that descriptor."""


def _syscall(nr: int, *args) -> int:
    rc = _libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc


def pidfd_open(pid: int) -> int:
    if hasattr(os, "pidfd_open"):
        return os.pidfd_open(pid)
    return _syscall(SYS_PIDFD_OPEN, pid, 0)


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    return _syscall(SYS_PIDFD_GETFD, pidfd, target_fd, 0)


def borrow_fd(pid: int, fd: int, key: tuple[int, int] | None = None) -> int:
    """A duplicate (in this process) of process `pid`'s descriptor `fd`;
    with `key` (dev, inode), checked to still be that file. The caller
    closes it. Raises FileGone when the process or descriptor is gone or
    now holds another file, IobridgeError when it may not be taken."""
    try:
        pidfd = pidfd_open(pid)
    except OSError as err:
        if err.errno == errno.ESRCH:
            raise FileGone(f"process {pid} has exited") from None
        raise IobridgeError(f"cannot open process {pid} (pidfd_open): {err.strerror}") from None
    try:
        try:
            dup = pidfd_getfd(pidfd, fd)
        except OSError as err:
            if err.errno in (errno.ESRCH, errno.EBADF):
                raise FileGone(f"process {pid} has exited or closed fd {fd}") from None
            if err.errno == errno.EPERM:
                raise IobridgeError(f"may not take process {pid}'s fd {fd} (pidfd_getfd: "
                                    "needs ptrace-attach permission)",
                                    "run the agent as root") from None
            raise IobridgeError(f"cannot take process {pid}'s fd {fd} (pidfd_getfd): "
                                f"{err.strerror}") from None
    finally:
        os.close(pidfd)
    if key is not None:
        st = os.fstat(dup)
        if (blockdev.kdev(os.major(st.st_dev), os.minor(st.st_dev)), st.st_ino) != tuple(key):
            os.close(dup)
            raise FileGone(f"process {pid}'s fd {fd} now holds another file")
    return dup


@dataclass(frozen=True)
class Holder:
    """One open descriptor of a file: process `pid`, descriptor `fd`."""
    pid: int
    fd: int
    path: str


class Actuators:
    """The real actuators. The prefetch unit calls only these methods (the
    host tests replace the object to check --shadow touches nothing)."""

    def __init__(self, sysfs: Path | None = None, proc: Path = Path("/proc")):
        self.sysfs, self.proc = sysfs or SYSFS_BLOCK, proc
        self.me = os.getpid()
        self._holders: dict = {}     # (dev, ino) -> (monotonic time of its scan, [Holder])

    # -- per device ------------------------------------------------------
    def ra_path(self, dev: int) -> Path | None:
        """The read_ahead_kb file of a device (a partition's is its disk's);
        None for a file system without a block device (tmpfs, ...)."""
        major, minor = blockdev.kdev_split(dev)
        base = self.sysfs / f"{major}:{minor}"
        for q in (base / "queue", base / ".." / "queue"):
            if (q / "read_ahead_kb").exists():
                return q / "read_ahead_kb"
        return None

    def read_ahead_kb(self, dev: int) -> int | None:
        path = self.ra_path(dev)
        if path is None:
            return None
        try:
            return int(path.read_text())
        except FileNotFoundError:
            return None            # gone since
        except (OSError, ValueError) as err:
            raise IobridgeError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") \
                from None

    def set_read_ahead_kb(self, dev: int, kb: int) -> None:
        label = "%d:%d" % blockdev.kdev_split(dev)
        if not 0 <= kb <= MAX_READ_AHEAD_KB:
            raise IobridgeError(f"read_ahead_kb {kb} for device {label} is out of range "
                                f"(0 to {MAX_READ_AHEAD_KB})")
        path = self.ra_path(dev)
        if path is None:
            raise IobridgeError(f"device {label} is gone (no {self.sysfs}/{label}/queue/"
                                "read_ahead_kb)")
        try:
            path.write_text(f"{int(kb)}\n")
        except FileNotFoundError:
            raise IobridgeError(f"device {label} is gone (no {path})") from None
        except OSError as err:
            raise IobridgeError(f"cannot set read_ahead_kb of device {label} ({path}): "
                                f"{err.strerror}") from None

    # -- per file ----------------------------------------------------------
    def holders(self, keys) -> dict:
        """{(dev, ino): [Holder, ...]} of the files in `keys` that some other
        process has open: from one /proc scan for all of them when any has
        no holders found in the last HOLDERS_MAX_AGE_S, else from that scan."""
        want = set(keys)
        now = time.monotonic()
        if any(now - self._holders.get(k, (-1e18, None))[0] > HOLDERS_MAX_AGE_S for k in want):
            self._holders = {k: v for k, v in self._holders.items()
                             if now - v[0] <= HOLDERS_MAX_AGE_S and k not in want}
            found: dict = {}
            for key, pid, fd, path in open_holders(want, self.proc, skip_pid=self.me):
                found.setdefault(key, []).append(Holder(pid, fd, path))
            # a file nobody holds is looked for again next time
            self._holders.update((k, (now, hs)) for k, hs in found.items())
        return {k: list(self._holders[k][1]) for k in want if k in self._holders}

    def _borrow(self, pid: int, fd: int, key) -> int:
        """borrow_fd, and a holder found gone leaves the holders' cache."""
        try:
            return borrow_fd(pid, fd, key)
        except FileGone:
            if key in self._holders:
                left = [h for h in self._holders[key][1] if (h.pid, h.fd) != (pid, fd)]
                if left:
                    self._holders[key] = (self._holders[key][0], left)
                else:
                    del self._holders[key]
            raise

    def fadvise(self, pid: int, fd: int, key, advice: int, offset: int = 0,
                length: int = 0) -> None:
        """posix_fadvise on process `pid`'s descriptor `fd` (checked to hold
        `key`). Raises FileGone if the process or descriptor went away."""
        dup = self._borrow(pid, fd, key)
        try:
            os.posix_fadvise(dup, offset, length, advice)
        except OSError as err:
            raise IobridgeError(f"fadvise on process {pid}'s fd {fd}: {err.strerror}") from None
        finally:
            os.close(dup)

    def advise(self, pid: int, fd: int, key, advice: str, ahead_pages: int = 0) -> None:
        """fadvise `advice` on process `pid`'s descriptor `fd`. For RANDOM
        with `ahead_pages`, the cached pages from the file position on (up to
        that many) are dropped too: FMODE_RANDOM only changes what a miss
        does (page_cache_sync_ra), while a scan already under way keeps
        hitting the PG_readahead mark of its window and page_cache_async_ra
        opens the next one, which carries the next mark (6.1 and later
        check only ra_pages there). Dropping the prefetched pages ahead ends
        that chain: the next read misses and reads only what it asks for."""
        dup = self._borrow(pid, fd, key)
        try:
            os.posix_fadvise(dup, 0, 0, ADVICE[advice])
            if advice == "random" and ahead_pages > 0:
                pos = os.lseek(dup, 0, os.SEEK_CUR)      # the owner's: one struct file
                os.posix_fadvise(dup, pos // PAGE * PAGE, ahead_pages * PAGE,
                                 os.POSIX_FADV_DONTNEED)
        except OSError as err:
            raise IobridgeError(f"fadvise {advice.upper()} on process {pid}'s fd {fd}: "
                                f"{err.strerror}") from None
        finally:
            os.close(dup)

    def willneed(self, pid: int, fd: int, key, start_page: int, pages: int,
                 chunk_pages: int) -> int:
        """WILLNEED over [start_page, start_page + pages) in chunks of
        `chunk_pages` (the kernel reads at most about the readahead size per
        call). One descriptor for all chunks. Returns the calls made."""
        dup = self._borrow(pid, fd, key)
        calls = 0
        try:
            chunk = max(1, chunk_pages)
            for first in range(start_page, start_page + pages, chunk):
                n = min(chunk, start_page + pages - first)
                os.posix_fadvise(dup, first * PAGE, n * PAGE, os.POSIX_FADV_WILLNEED)
                calls += 1
        except OSError as err:
            raise IobridgeError(f"fadvise WILLNEED on process {pid}'s fd {fd}: "
                                f"{err.strerror}") from None
        finally:
            os.close(dup)
        return calls

    def dontneed(self, pid: int, fd: int, key, start_page: int, pages: int) -> None:
        self.fadvise(pid, fd, key, os.POSIX_FADV_DONTNEED, start_page * PAGE, pages * PAGE)
