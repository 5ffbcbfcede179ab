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

pyroute2's uevent socket delivers them. pyroute2 keeps its socket and event
loop per thread (threading.local), so the thread that binds the socket must
be the one that reads it: a socket bound on the main thread and read on
another reads a second, unbound socket that never receives anything (why an
earlier version's discovery loop made no listing). DmEvents therefore owns a
listener thread that opens, binds and reads, and hands the consumer a flag.
"""

from __future__ import annotations

import asyncio
import errno
import glob
import logging
import threading
import time
from pathlib import Path

from ..core.errors import IobridgeError


# After the first relevant event, wait this long for the rest of the burst
# (dmsetup create sends add, then change on resume) and list once.
SETTLE_S = 0.05
# Longest single wait, so a stop request is seen this fast.
WAIT_SLICE_S = 1.0
# The listener thread reports its socket open (or the error) within this:
# importing pyroute2 takes ~7 s of CPU in the emulated test VM.
OPEN_TIMEOUT_S = 120.0
# After a read error (ENOBUFS: events were lost), pause before reading on.
ERROR_PAUSE_S = 0.1


def dm_names() -> set[str]:
    """Names of the dm devices present now (sysfs, no dmsetup)."""
    names = set()
    for path in glob.glob("/sys/block/dm-*/dm/name"):
        try:
            names.add(Path(path).read_text().strip())
        except OSError:
            pass      # removed meanwhile
    return names


def is_relevant(event: dict, ignore_names: set[str]) -> bool:
    """Does this uevent (its properties) say the target list may have changed?"""
    if event.get("SUBSYSTEM") != "block" or not str(event.get("DEVNAME", "")).startswith("dm-"):
        return False
    if event.get("ACTION") == "change" and event.get("DM_NAME") in ignore_names:
        return False
    return True


class DmEvents:
    """Relevant dm uevents, read by a listener thread of its own.

    start() starts it; wait_open() raises IobridgeError where the socket
    cannot be opened and bound; wait() is for the consumer (the discovery
    loop), which sets `ignore` to the dm names whose "change" does not
    concern it.
    """

    def __init__(self):
        self.ignore: set[str] = set()  # replaced whole by the consumer
        self.broken: str | None = None  # why the listener ended early, if it did
        self._pending = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._open_error: str | None = None
        self._open_hint = ("the agent finds its targets by dm uevents; a service sandbox "
                           "must allow AF_NETLINK")
        self._opened = threading.Event()

    @property
    def listening(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the listener; it imports pyroute2 (~0.1 s of CPU on a host,
        seconds under emulation) and opens its socket while the caller goes
        on. wait_open() says how that went."""
        self._thread = threading.Thread(target=self._run, name="uevents", daemon=True)
        self._thread.start()

    def wait_open(self, timeout_s: float = OPEN_TIMEOUT_S) -> None:
        """Raise IobridgeError if the socket could not be opened and bound."""
        if not self._opened.wait(timeout_s):
            self.close()
            raise IobridgeError(f"the kernel's uevent socket did not open within {timeout_s:g} s")
        if self._open_error is not None:
            self._thread.join()
            raise IobridgeError(f"cannot open the kernel's uevent socket: {self._open_error}",
                                self._open_hint)

    def _run(self) -> None:
        try:
            asyncio.run(self._listen())
        except Exception as err:   # noqa: BLE001 (the thread must say why it ended)
            if self._opened.is_set():
                self.broken = f"{type(err).__name__}: {err}"
            else:                  # pyroute2 missing or broken: a start error
                self._open_error = f"{type(err).__name__}: {err}"
                self._open_hint = "pyroute2 0.9 or later is needed: reinstall iobridge"
        finally:
            self._opened.set()
            self._pending.set()     # a consumer waiting on a dead listener lists now

    async def _listen(self) -> None:
        # Imported here: pyroute2's import is slow and only the agent needs it.
        from pyroute2.netlink.uevent import MONITOR_GROUP_KERNEL, AsyncUeventSocket  # noqa: PLC0415
        # Its debug lines (several per read, one per idle second) would
        # bury the agent's own at -vv, which sets DEBUG for every logger.
        logging.getLogger("pyroute2").setLevel(logging.WARNING)
        try:
            sock = AsyncUeventSocket()
            await sock.bind(groups=MONITOR_GROUP_KERNEL)   # not udev's rebroadcast
        except OSError as err:
            self._open_error = err.strerror or str(err)
            return
        self._opened.set()

        async def one_datagram():
            return [msg async for msg in sock.get()]

        try:
            while not self._stop.is_set():
                try:
                    msgs = await asyncio.wait_for(one_datagram(), WAIT_SLICE_S)
                except asyncio.TimeoutError:
                    continue
                except Exception as err:   # noqa: BLE001 (pyroute2 raises its own types)
                    code = getattr(err, "code", None) or getattr(err, "errno", None)
                    if code in (errno.ECONNRESET, errno.EBADF):
                        self.broken = f"uevent socket closed ({err})"
                        return
                    self._pending.set()     # overrun (ENOBUFS): events were dropped, so list
                    await asyncio.sleep(ERROR_PAUSE_S)
                    continue
                ignore = self.ignore
                if any(is_relevant(dict(msg), ignore) for msg in msgs):
                    self._pending.set()
        finally:
            sock.close()

    def wait(self, timeout_s: float, stop: threading.Event) -> bool:
        """Block up to `timeout_s` (or until `stop` is set) for a relevant
        event; True if one came, after SETTLE_S for the rest of its burst.
        Events that arrive while the caller lists set the flag again."""
        deadline = time.monotonic() + timeout_s
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._pending.wait(min(left, WAIT_SLICE_S)):
                if stop.is_set() or not self.listening:
                    return False
                stop.wait(SETTLE_S)
                self._pending.clear()
                return True
        return False

    def close(self) -> None:
        self._stop.set()
        self._pending.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=WAIT_SLICE_S + 2)
