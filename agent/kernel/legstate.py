"""Per-leg admission feature state, read from the BPF observer.

bpf/observer.bpf.c keeps one struct iobridge_leg_features per leg device in
the BPF_F_MMAPABLE array `leg_features`, at bio level (block_bio_queue /
block_bio_complete), for the devices the agent lists in the `leg_slots`
hash (kernel dev_t -> slot). This module assigns the slots and reads the
records through a shared mapping, without a syscall per read.

The history fields (prev_*, last_complete_ns) are guarded by the record's
sequence counter (see kmodule/iobridge_abi.h): a copy taken while seq was
odd, or across a change of seq, is retried. The counters are atomic on
their own. Reading relies on x86's load ordering (loads are not reordered
with older loads), so the agent runs on x86-64 only for now.

Units: latency in microseconds, throughput in MB/s = bytes per
microsecond, history newest first, 0 where there is none. The agent turns
them into each leg's baseline (core/features.BaselineTracker).
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass

import numpy as np

from ..core import abi
from ..core.errors import IobridgeError

SLOTS_MAP = b"leg_slots"
FEATURES_MAP = b"leg_features"
TRACKING_MAP = b"leg_tracking"
STARTS_MAP = b"bio_starts"
LEG_DTYPE = np.dtype(abi.LegFeatures)
DEFAULT_MAX_RETRIES = 8
# Every field but seq: a freed record is cleared without touching seq, which
# a BPF writer may hold (odd) at that moment and will release with +1.
_CLEARED = tuple(n for n in LEG_DTYPE.names if n != "seq")


def consistent_copy(buf, rows, max_retries: int = DEFAULT_MAX_RETRIES, between=None):
    """Copy records `rows` out of `buf` (the raw array: the mmap, or any
    writable buffer of LEG_DTYPE records) under the seq scheme.

    Per row: read seq, copy the record's bytes, read seq again; rows whose
    seq was odd or changed are copied again, at most `max_retries` more
    times, the others are done. Returns (records, stable, retries):
    `records` a LEG_DTYPE array in the order of `rows`, `stable[i]` False
    for a row that never gave a clean copy (its last copy is returned),
    `retries` the row copies repeated. `between(attempt, row)` runs between
    the copy and the second seq read (a test hook standing in for a writer).

    One short window per row rather than one numpy fancy-index copy of all
    rows: measured in the test VM under 37k record updates/s, a row window
    (~19 us per attempt there) was clean first time 94% of the time, a
    one-row numpy fancy-index window 26-52%.
    """
    size = LEG_DTYPE.itemsize
    stride = size // 4                         # seq: first u32 of each record
    rows = [int(r) for r in rows]
    raw: list[bytes] = [b""] * len(rows)
    stable = np.zeros(len(rows), dtype=bool)
    todo = list(range(len(rows)))
    retries = 0
    with memoryview(buf) as whole, whole.cast("I") as words:
        for attempt in range(max_retries + 1):
            if attempt:
                retries += len(todo)
            again = []
            for i in todo:
                row = rows[i]
                first = words[row * stride]
                raw[i] = buf[row * size:(row + 1) * size]
                if between is not None:
                    between(attempt, row)
                if first & 1 or words[row * stride] != first:
                    again.append(i)
                else:
                    stable[i] = True
            todo = again
            if not todo:
                break
    records = np.frombuffer(b"".join(raw), dtype=LEG_DTYPE) if rows else \
        np.zeros(0, dtype=LEG_DTYPE)
    return records, stable, retries


def samples_since(completed, stable, lat_ns, nbytes, qlen,
                  seen_completed) -> list[tuple[list, list, list]]:
    """Per row (leg), the (latencies us, throughputs, per-read latencies us)
    of its completions since a reader saw `seen_completed` of them: at most
    the HISTORY newest the record holds; none for a row without a consistent
    copy. A per-read latency is the latency over (the bios ahead of it at
    queue time + 1): what one read adds to a leg's queue. Plain Python over
    lists: the agent runs it every tick, and under emulation each numpy call
    on arrays this small costs ~0.1 ms."""
    out = []
    for done, ok, lats, sizes, qs, seen in zip(completed, stable, lat_ns, nbytes, qlen,
                                               seen_completed):
        k = min(max(int(done) - int(seen), 0), abi.HISTORY) if ok else 0
        rows = [(la / 1e3, b, q) for la, b, q in zip(lats[:k], sizes[:k], qs[:k]) if la > 0]
        out.append(([la for la, _, _ in rows], [b / la for la, b, _ in rows],
                    [la / (q + 1) for la, _, q in rows]))
    return out


@dataclass
class LegSnapshot:
    """Feature state of the requested slots at one instant, one row each."""

    slots: np.ndarray              # int
    seq: np.ndarray                # the records' sequence counters (even when stable)
    dev: np.ndarray                # kernel dev_t, 0 = free slot
    inflight: np.ndarray
    issued: np.ndarray
    completed: np.ndarray
    contended: np.ndarray          # history updates the kernel skipped
    last_complete_ns: np.ndarray   # ktime_get_ns (CLOCK_MONOTONIC), 0 = never
    prev_lat_us: np.ndarray        # float [n, HISTORY], newest first
    prev_bytes: np.ndarray         # [n, HISTORY]
    prev_qlen: np.ndarray          # [n, HISTORY]: of the last queued bios
    prev_lat_qlen: np.ndarray      # [n, HISTORY]: of the bios of prev_lat_us
    prev_tput_mbps: np.ndarray     # float [n, HISTORY]: bytes / latency_us
    stable: np.ndarray             # bool: the history copy is consistent
    retries: int                   # row copies repeated to get it

    @classmethod
    def from_records(cls, slots, rec: np.ndarray, stable: np.ndarray,
                     retries: int) -> "LegSnapshot":
        lat_us = rec["prev_lat_ns"].astype(np.float64) / 1e3
        nbytes = rec["prev_bytes"].astype(np.int64)
        tput = np.divide(nbytes, lat_us, out=np.zeros(lat_us.shape), where=lat_us > 0)
        return cls(np.asarray(slots, dtype=np.int64), rec["seq"].astype(np.int64),
                   rec["dev"].astype(np.int64),
                   rec["inflight"].astype(np.int64), rec["issued"].astype(np.int64),
                   rec["completed"].astype(np.int64), rec["contended"].astype(np.int64),
                   rec["last_complete_ns"].astype(np.int64), lat_us, nbytes,
                   rec["prev_qlen"].astype(np.int64), rec["prev_lat_qlen"].astype(np.int64),
                   tput, stable, retries)

    def __len__(self) -> int:
        return len(self.slots)

    def new_samples(self, seen_completed: np.ndarray) -> list[tuple[np.ndarray, ...]]:
        """Per row, samples_since() as arrays: (latency us, throughput,
        per-read latency us) of the completions since a reader last saw
        `seen_completed` of them."""
        lat_ns = np.rint(self.prev_lat_us * 1e3).astype(np.int64).tolist()
        return [tuple(np.array(v) for v in row) for row in samples_since(
            self.completed.tolist(), self.stable.tolist(), lat_ns, self.prev_bytes.tolist(),
            self.prev_lat_qlen.tolist(), np.asarray(seen_completed).tolist())]

    def idle_ns(self, now_ns: int) -> list[int | None]:
        """Time since each leg's newest completion (None: never completed);
        `now_ns` on CLOCK_MONOTONIC, the clock of the kernel's ktime_get_ns()."""
        return [None if last <= 0 else max(now_ns - int(last), 0)
                for last in self.last_complete_ns]


class LegFeatureMap:
    """The observer's leg slots and feature records, mapped into this process.

    `bpf` is a loaded BCC BPF object of bpf/observer.bpf.c. close() (or the
    observer's close()) unmaps before the program's maps go away.
    """

    def __init__(self, bpf, max_retries: int = DEFAULT_MAX_RETRIES):
        self.max_retries = max_retries
        self.retries = 0          # row copies repeated, since creation
        self.unstable = 0         # rows returned without a consistent copy
        try:
            self._slots_map = bpf[SLOTS_MAP]
            self._tracking = bpf[TRACKING_MAP]
            self._starts = bpf[STARTS_MAP]
            table = bpf[FEATURES_MAP]
            self._features_fd = table.map_fd
        except KeyError as err:
            raise IobridgeError("the loaded observer has no leg feature maps",
                                "bpf/observer.bpf.c is older than ABI 2") from err
        if ctypes.sizeof(table.Leaf) != LEG_DTYPE.itemsize:
            raise IobridgeError(
                f"ABI mismatch: the observer's leg record is {ctypes.sizeof(table.Leaf)} "
                f"bytes, the agent's is {LEG_DTYPE.itemsize}")
        length = abi.MAX_LEG_SLOTS * LEG_DTYPE.itemsize   # a multiple of 8: no padding
        length = (length + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            self._mm = mmap.mmap(table.map_fd, length, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as err:
            raise IobridgeError(f"cannot mmap the leg feature table: {err.strerror}",
                                "the map must be created with BPF_F_MMAPABLE") from err
        self._table = np.frombuffer(self._mm, dtype=LEG_DTYPE, count=abi.MAX_LEG_SLOTS)
        # Start from what the kernel side holds (normally nothing).
        self._slots: dict[int, int] = {int(k.value): int(v.value)
                                       for k, v in self._slots_map.items()}

    # -- slots ---------------------------------------------------------
    @property
    def slots(self) -> dict[int, int]:
        """dev_t -> slot of the devices tracked now."""
        return dict(self._slots)

    def assign(self, devs: list[int]) -> dict[int, int]:
        """Track exactly `devs` (kernel dev_t values) from now on.

        Devices already tracked keep their slot and counters; the others are
        freed (untracked, record cleared); new ones get a cleared free slot.
        Returns dev_t -> slot.
        """
        self._check_open()
        wanted = list(dict.fromkeys(int(d) for d in devs))
        for d in wanted:
            if not 0 < d < 1 << 32:
                raise IobridgeError(f"not a kernel dev_t: {d}",
                                    "pass BlockDev.kdev (major << 20 | minor)")
        if len(wanted) > abi.MAX_LEG_SLOTS:
            raise IobridgeError(f"{len(wanted)} leg devices requested, at most "
                                f"{abi.MAX_LEG_SLOTS} can be tracked")
        keys, leaves = self._slots_map.Key, self._slots_map.Leaf
        if wanted:   # request completions walk their bios only while this is set
            self._set_tracking(max(len(wanted), len(self._slots)))
        freed = set()
        for dev in [d for d in self._slots if d not in wanted]:
            slot = self._slots.pop(dev)
            # Unpublish first: the kernel stops starting bios on it, and
            # bios already in flight see dev change and leave it alone.
            try:
                del self._slots_map[keys(dev)]
            except KeyError:
                pass
            self._clear(slot)
            freed.add(dev)
        if freed:
            self._forget_starts(freed)
        used = set(self._slots.values())
        free = (s for s in range(abi.MAX_LEG_SLOTS) if s not in used)
        for dev in wanted:
            if dev in self._slots:
                continue
            slot = next(free)
            self._clear(slot)
            self._table["dev"][slot] = dev   # before publishing: BPF checks it
            self._slots_map[keys(dev)] = leaves(slot)
            self._slots[dev] = slot
        self._set_tracking(len(self._slots))
        return self.slots

    def _set_tracking(self, n: int) -> None:
        self._tracking[self._tracking.Key(0)] = self._tracking.Leaf(n)

    def _forget_starts(self, devs: set[int]) -> None:
        """Drop the kernel's start records of bios in flight on freed devices:
        left behind, one could be matched to a later bio at the same address
        once its device is tracked again."""
        stale = [k for k, v in self._starts.items() if int(v.dev) in devs]
        for k in stale:
            try:
                del self._starts[k]
            except KeyError:   # completed meanwhile
                pass

    def _clear(self, slot: int) -> None:
        rec = self._table[slot:slot + 1]
        for name in _CLEARED:
            rec[name] = 0

    def map_fds(self) -> dict[str, int]:
        """File descriptors worth pinning (name -> fd)."""
        return {FEATURES_MAP.decode(): self._features_fd}

    # -- reading -------------------------------------------------------
    def read(self, slots=None) -> LegSnapshot:
        """A consistent snapshot of `slots` (default: every assigned slot,
        in slot order)."""
        self._check_open()
        if slots is None:
            slots = sorted(self._slots.values())
        slots = np.asarray(list(slots), dtype=np.intp)
        if len(slots) and (slots.min() < 0 or slots.max() >= abi.MAX_LEG_SLOTS):
            raise IobridgeError(f"leg slot out of range 0..{abi.MAX_LEG_SLOTS - 1}: "
                                f"{slots.tolist()}")
        rec, stable, retries = consistent_copy(self._mm, slots, self.max_retries)
        self.retries += retries
        self.unstable += int((~stable).sum())
        return LegSnapshot.from_records(slots, rec, stable, retries)

    def new_samples(self, slots, seen_completed) -> tuple[list, list]:
        """(samples_since per slot, completed per slot): what
        read(slots).new_samples(seen) gives, as lists, without the rest of
        a snapshot (the agent's tick)."""
        self._check_open()
        rec, stable, retries = consistent_copy(self._mm, slots, self.max_retries)
        self.retries += retries
        self.unstable += len(stable) - int(stable.sum())
        completed = rec["completed"].tolist()
        return samples_since(completed, stable.tolist(), rec["prev_lat_ns"].tolist(),
                             rec["prev_bytes"].tolist(), rec["prev_lat_qlen"].tolist(),
                             seen_completed), completed

    def completed(self, slots) -> np.ndarray:
        """Bios completed per slot: a cheap test for "nothing new" (an
        atomic counter; no seq needed)."""
        return self._table["completed"][slots].copy()

    def read_devs(self, devs: list[int]) -> LegSnapshot:
        """read() for these dev_t values, in this order (each must be assigned)."""
        missing = [d for d in devs if d not in self._slots]
        if missing:
            raise IobridgeError(f"leg devices not assigned a slot: {missing}",
                                "call assign() with them first")
        return self.read([self._slots[d] for d in devs])

    def _check_open(self) -> None:
        if self._table is None:
            raise IobridgeError("the leg feature map is closed")

    def close(self) -> None:
        """Drop the mapping (the numpy view first: mmap refuses to close
        while a buffer export exists)."""
        self._table = None
        if getattr(self, "_mm", None) is not None:
            self._mm.close()
            self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
