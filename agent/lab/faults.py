"""Fault injection for experiments and tests: slow periods on one leg.

`SlowPeriods` puts a dm-delay device over a block device and, from a
background thread, alternates normal periods (no delay) with slow periods
(reads delayed by `slow_ms`; writes never delayed), period lengths drawn
from exponential distributions. It records when each period really held, on
CLOCK_MONOTONIC, the clock bpf_ktime_get_ns() reads, so I/O timestamps from
the BPF observers (or fio logs using that clock) can be matched to periods.

How a switch works, per drivers/md/dm-delay.c and dm-ioctl.c (6.1): a
table load stages the new table and a resume swaps it in (the ioctls of
`dmsetup load` and `dmsetup resume`, made directly: kernel/dmioctl.py); resume
suspends the device itself when an inactive table is staged, so no separate
suspend is needed. dm-delay's presuspend hook dispatches every bio
it is still holding at once, so a read caught in a slow->normal switch
completes early, and reads arriving during the swap wait in dm core and then
take the new table. --noflush makes no difference to dm-delay (it only
matters for targets that push bios back to dm core, which dm-delay never
does); the resume skips lockfs so that a filesystem on top is not frozen
and synced at every switch. The "switching" entries of the timeline cover
the resume, when the table in force is uncertain (11-13 ms on average under
TCG with two VMs side by side; with two dmsetup processes it was ~0.5 s).

Side effect to know about when counting I/O: every resume emits a change
uevent, and udev's blkid probe then reads the device (hundreds of extra
reads over a few dozen switches in the test VM). read_count() counts those
too; compare counts only across quiet stretches (after `udevadm settle`).
"""

from __future__ import annotations

import math
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

from ..core.clock import now_ns
from ..core.errors import IobridgeError, UsageError
from ..kernel import blockdev, dmioctl, dmtarget

NORMAL, SLOW, SWITCHING = "normal", "slow", "switching"


def draw_periods(rng: random.Random, normal_mean_s: float, slow_mean_s: float,
                 min_s: float = 0.05, first: str = NORMAL) -> Iterator[tuple[str, float]]:
    """Endless alternating (state, seconds), starting with `first`.

    Each length is min_s plus an exponential draw of mean (mean - min_s), so
    no period is shorter than min_s and the mean is still the one asked for.
    """
    means = {NORMAL: normal_mean_s, SLOW: slow_mean_s}
    if min_s < 0:
        raise UsageError(f"minimum period length must be >= 0, got {min_s}")
    for state, mean in means.items():
        if not mean > min_s:
            raise UsageError(f"mean {state} period ({mean} s) must exceed the minimum "
                             f"period length ({min_s} s)")
    if first not in means:
        raise UsageError(f"first period must be {NORMAL!r} or {SLOW!r}, got {first!r}")
    state = first
    while True:
        yield state, min_s + rng.expovariate(1.0 / (means[state] - min_s))
        state = SLOW if state == NORMAL else NORMAL


def read_count(dev_path: str) -> int:
    """Reads completed by a block device so far (field 0 of its sysfs stat).

    For dm devices this counts the I/O submitted to the dm device itself.
    """
    dev = blockdev.resolve(dev_path)
    stat = blockdev.SYS_CLASS_BLOCK / dev.name / "stat"
    try:
        return int(stat.read_text().split()[0])
    except (OSError, IndexError, ValueError) as err:
        raise IobridgeError(f"cannot read the I/O counters of {dev_path} ({stat}): {err}") from None


def _dmsetup(*args: str) -> str:
    return dmtarget.dmsetup(*args).stdout


class SlowPeriods:
    """Alternating normal/slow periods on a dm-delay device NAME over `dev`.

    Use as a context manager (creates the device and starts the periods;
    on exit stops them and removes the device), or call create(), start(),
    stop(), remove() yourself. `path` is the device to run I/O against.
    """

    def __init__(self, dev: str, name: str, slow_ms: int, normal_mean_s: float,
                 slow_mean_s: float, seed: int = 0, min_s: float = 0.05):
        if not (isinstance(slow_ms, int) and slow_ms > 0):
            raise UsageError(f"slow_ms must be a positive whole number of ms, got {slow_ms!r}")
        if not os.path.exists(dev):
            raise IobridgeError(f"no such device: {dev}", "lsblk lists the block devices")
        self.dev = dev
        self.name = name
        self.path = f"/dev/mapper/{name}"
        self.slow_ms = slow_ms
        self._means = (normal_mean_s, slow_mean_s, min_s)
        self._periods = draw_periods(random.Random(seed), normal_mean_s, slow_mean_s, min_s)
        self.timeline: list[tuple[int, int, str]] = []
        self._sectors: int | None = None
        self._created = False
        self._state = NORMAL
        self._state_since = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        # Draw the first period now: bad parameters raise here, not in the thread.
        self._next = next(self._periods)

    # ------------------------------------------------------------ tables

    def _spec(self, read_ms: int) -> dmioctl.TargetLine:
        # Reads go to dev with read_ms; writes and flushes to dev with 0.
        return dmioctl.TargetLine(0, self._sectors, "delay",
                                  f"{self.dev} 0 {read_ms} {self.dev} 0 0")

    def _table(self, read_ms: int) -> str:
        spec = self._spec(read_ms)
        return f"{spec.start} {spec.length} {spec.target_type} {spec.params}"

    def create(self) -> str:
        """Create the delay device with no delay; returns its path."""
        bdev = blockdev.resolve(self.dev)   # clear error if dev is not a block device
        size = blockdev.SYS_CLASS_BLOCK / bdev.name / "size"
        self._sectors = int(size.read_text())   # always in 512-byte sectors
        if self._sectors == 0:
            raise IobridgeError(f"{self.dev} has size 0")
        if Path(self.path).exists():
            raise IobridgeError(f"{self.path} already exists",
                                f"remove it with 'dmsetup remove {self.name}'")
        _dmsetup("create", self.name, "--table", self._table(0))
        self._created = True
        _dmsetup("mknodes", self.name)
        return self.path

    def _switch(self, state: str) -> None:
        """Reload the table for `state`, closing the current period."""
        # Loading only stages the table; the old one stays in force until
        # the resume, so only the resume is the uncertain window.
        # By ioctl, not dmsetup: two dmsetup processes per switch (130-200 ms
        # of CPU each under emulation), about two switches a second, took
        # CPU from the workload being measured and set its tail.
        dmioctl.load(self.name, [self._spec(self.slow_ms if state == SLOW else 0)])
        t0 = now_ns()
        dmioctl.resume(self.name, skip_lockfs=True)
        t1 = now_ns()
        with self._lock:
            self.timeline.append((self._state_since, t0, self._state))
            self.timeline.append((t0, t1, SWITCHING))
            self._state, self._state_since = state, t1

    # ------------------------------------------------------------ thread

    def start(self) -> None:
        if self._thread is not None:
            raise IobridgeError("slow periods already started")
        if not self._created:
            self.create()
        self._stop.clear()
        self._state, self._state_since = NORMAL, now_ns()
        self._thread = threading.Thread(target=self._run, name=f"slow-periods-{self.name}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            state, seconds = self._next
            while True:
                if state != self._state:
                    self._switch(state)
                if self._stop.wait(seconds):
                    return
                state, seconds = next(self._periods)
                self._next = (state, seconds)
        except BaseException as err:   # reported by stop()
            self._error = err

    def restart(self, seed: int) -> None:
        """Start over with the schedule of `seed` and an empty timeline, so
        that runs compared side by side meet the same slow periods."""
        self.stop()
        normal_mean_s, slow_mean_s, min_s = self._means
        self._periods = draw_periods(random.Random(seed), normal_mean_s, slow_mean_s, min_s)
        self._next = next(self._periods)
        with self._lock:
            self.timeline = []
        self.start()

    def stop(self) -> None:
        """End the periods, leave the device with no delay, close the timeline.

        Raises the error that ended the thread early, if any.
        """
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        if self._state == SLOW:
            self._switch(NORMAL)
        with self._lock:
            self.timeline.append((self._state_since, now_ns(), self._state))
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, IobridgeError):
                raise err
            raise IobridgeError(f"slow-period thread for {self.name} failed: {err!r}") from err

    def remove(self) -> None:
        """Stop if running and remove the delay device."""
        try:
            self.stop()
        finally:
            if self._created:
                _dmsetup("remove", "--retry", self.name)
                self._created = False

    def __enter__(self) -> SlowPeriods:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ------------------------------------------------------------ queries

    def _entries(self) -> list[tuple[int, int, str]]:
        with self._lock:
            entries = list(self.timeline)
            if self._thread is not None:   # the open period, up to now
                entries.append((self._state_since, now_ns(), self._state))
        return entries

    def state_at(self, ts_ns: int) -> str | None:
        """NORMAL, SLOW or SWITCHING at CLOCK_MONOTONIC ts_ns; None outside the run."""
        for start, end, state in self._entries():
            if start <= ts_ns < end:
                return state
        return None

    def state_over(self, t0_ns: int, t1_ns: int) -> str | None:
        """NORMAL or SLOW if that one period covers all of [t0_ns, t1_ns];
        None if the span meets a switch or lies outside the run."""
        for start, end, state in self._entries():
            if start <= t0_ns and t1_ns < end:
                return state if state != SWITCHING else None
        return None

    def in_slow(self, ts_ns: int) -> bool:
        """True if reads submitted at ts_ns certainly met the slow table."""
        return self.state_at(ts_ns) == SLOW

    def slow_fraction(self) -> float:
        """Share of the recorded time spent in slow periods."""
        entries = self._entries()
        total = sum(end - start for start, end, _ in entries)
        slow = sum(end - start for start, end, state in entries if state == SLOW)
        return slow / total if total else math.nan
