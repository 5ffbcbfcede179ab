"""Device-mapper changes as the kernel announces them (uevents).

The agent lists its targets when a uevent says a dm device may have
changed, so a new or removed target is seen at once, plus a slow periodic
listing as a safety net (a dropped uevent, a table swapped from another
target type to iobridge). Polling instead cost a core's 9-13% in the test VM
when each listing ran `dmsetup status` (~150 ms of CPU per process there);
listings are ioctls now (kernel/dmioctl.py), but polling fast enough to see
a target at once would still wake the agent for nothing.

Relevant: "add" and "remove" of any dm device; "change" (dm sends one on
every resume, with DM_NAME) unless it names a device known not to be a
managed target, such as a dm-delay leg reloaded by a fault schedule.
A netlink socket on the kernel's uevent broadcast group delivers them.
"""

from __future__ import annotations

import glob
import select
import socket
import time
from pathlib import Path

NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1          # the kernel's broadcast (udev's rebroadcast is group 2)
# After the first relevant event, wait this long for the rest of the burst
# (dmsetup create sends add, then change on resume) and list once.
SETTLE_S = 0.05
# Longest single wait, so a stop request is seen this fast.
WAIT_SLICE_S = 1.0


def dm_names() -> set[str]:
    """Names of the dm devices present now (sysfs, no dmsetup)."""
    names = set()
    for path in glob.glob("/sys/block/dm-*/dm/name"):
        try:
            names.add(Path(path).read_text().strip())
        except OSError:
            pass      # removed meanwhile
    return names


def parse(data: bytes) -> dict:
    """A kernel uevent datagram: "ACTION@DEVPATH\\0KEY=VALUE\\0..."."""
    out = {}
    for field in data.split(b"\0")[1:]:
        key, sep, value = field.partition(b"=")
        if sep:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def is_relevant(event: dict, ignore_names: set[str]) -> bool:
    """Does this uevent (its properties) say the target list may have changed?"""
    if event.get("SUBSYSTEM") != "block" or not str(event.get("DEVNAME", "")).startswith("dm-"):
        return False
    if event.get("ACTION") == "change" and event.get("DM_NAME") in ignore_names:
        return False
    return True


class DmEvents:
    """Wait for dm uevents. open() returns False (and sets `error`) where
    the socket cannot be had; the caller then polls."""

    def __init__(self):
        self.sock = None
        self.error: str | None = None
        self.seen = 0          # relevant events received

    def open(self) -> bool:
        # A plain netlink socket: with pyroute2's UeventSocket the test VM's
        # discovery loop made no listing in 40 s (cause not found).
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_KOBJECT_UEVENT)
            sock.bind((0, KERNEL_GROUP))
            sock.setblocking(False)
        except OSError as err:
            self.error = f"cannot open the uevent socket: {err.strerror or err}"
            return False
        self.sock = sock
        return True

    def _read(self, ignore_names: set[str]) -> bool:
        hits = 0
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError:
                return True       # overrun (ENOBUFS): events were lost, so list
            hits += is_relevant(parse(data), ignore_names)
        self.seen += hits
        return hits > 0

    def wait(self, timeout_s: float, ignore_names: set[str], stop=None) -> bool:
        """Block up to `timeout_s` (or until `stop`, a threading.Event, is
        set) for a relevant event; True if one came, after draining what
        follows it within SETTLE_S."""
        deadline = time.monotonic() + timeout_s
        while stop is None or not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([self.sock], [], [], min(left, WAIT_SLICE_S))
            if ready and self._read(ignore_names):
                settle = time.monotonic() + SETTLE_S
                while (left := settle - time.monotonic()) > 0:
                    if select.select([self.sock], [], [], left)[0]:
                        self._read(ignore_names)
                return True
        return False

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
