"""Replica device latency model for the offline simulator.

Each leg is an SSD modelled as `channels` parallel FCFS service units
(internal parallelism: channels x dies), a per-request service time, and
busy periods (garbage collection and other background work) during which
part of the requests wait for the busy dies.

Service time = base latency + size / bandwidth:

  read_base_us  = 80   4 KiB random read at QD1 on datacenter TLC NVMe SSDs
                       is 77-90 us (Intel P4510 / Samsung PM983 data sheets;
                       NAND page read tR is 50-90 us for TLC).
  write_base_us = 20   writes are acknowledged from the drive's DRAM/SLC
                       buffer: ~18-25 us at QD1 (same data sheets).
  read_mbps     = 2000 sequential read bandwidth of a PCIe 3 x4 drive,
  write_mbps    = 1000 and its sustained write bandwidth.
  channels      = 8    random-read IOPS of such drives keep growing up to
                       QD 8-32; 8 units make queueing appear at moderate
                       concurrency without modelling the FTL.

Busy periods, drawn independently per leg (so replicas are slow at
different times, the situation admission control exploits):

  gc_every_write_mb = 64  a GC busy period starts each time the leg has
                       absorbed this much written data: once the free-block
                       pool is at its watermark, reclaim work is
                       proportional to write volume.
  gc_median_ms = 8, gc_sigma = 0.8, clipped to [1, 80] ms: a GC cycle
                       erases blocks (TLC tBERS 3-10 ms) and copies valid
                       pages (tPROG 0.5-2 ms each); "The Tail at Store"
                       (Hao et al., FAST'16) and LinnOS (Hao et al.,
                       OSDI'20) report SSD slowdowns of several ms to tens
                       of ms from such internal activity.
  bg_per_s = 0.5       background busy periods (wear levelling, read
                       refresh, SLC-cache flush) as a Poisson process, so
                       read-only traces also see slow periods.
  block_frac = 0.5     GC runs on part of the dies; a request arriving in a
                       busy period waits for its end with this probability.

All randomness comes from a per-leg seeded generator, and busy periods
depend only on the trace's writes and time, never on the routing policy,
so every policy meets the same device behaviour.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

from ..core import abi


@dataclass(frozen=True)
class DeviceParams:
    read_base_us: float = 80.0
    write_base_us: float = 20.0
    read_mbps: float = 2000.0
    write_mbps: float = 1000.0
    channels: int = 8
    gc_every_write_mb: float = 64.0
    gc_median_ms: float = 8.0
    gc_sigma: float = 0.8
    gc_min_ms: float = 1.0
    gc_max_ms: float = 80.0
    bg_per_s: float = 0.5
    block_frac: float = 0.5

    def as_dict(self) -> dict:
        return asdict(self)


HISTORY = 3
KEEP = 4      # history kept per leg (LinnOS uses 4, Heimdall 3)


class Leg:
    """One simulated replica: service units, in-flight I/Os, feature history.

    Besides the feature history (prev_qlen / prev_lat / prev_tput, newest
    first; prev_lat_qlen: the queue at issue of the prev_lat I/Os, as the
    kernel keeps it since ABI 4), a leg keeps what the kernel keeps per leg for the decision
    table's key: last_lat_ns and last_lat_qlen (of its two newest completions,
    the one abi.use_previous picks), last_complete_ns of its newest completion
    (0 = none yet) and the count of completions retired (`completed`), all
    updated by advance() as completions retire; and, for learned hedge
    deadlines, its newest read completions (recent_reads: (latency ns,
    bytes), newest first) and their count (reads_completed)."""

    def __init__(self, params: DeviceParams, seed: int, start_ns: int = 0):
        self.p = params
        self.rng = np.random.default_rng(seed)
        # separate stream for "does this request hit the busy dies", so that
        # busy-period timing is identical whatever the routing
        self.hit_rng = np.random.default_rng(seed + 7919)
        self.free = [start_ns] * params.channels       # service unit free times
        heapq.heapify(self.free)
        # (complete ns, lat us, tput bytes/us, lat ns, queue at issue,
        # is write, bytes), a heap by completion
        self.inflight: list[tuple[int, float, float, int, int, bool, int]] = []
        self.prev_qlen: deque = deque([0] * KEEP, maxlen=KEEP)
        self.prev_lat_qlen: deque = deque([0] * KEEP, maxlen=KEEP)
        self.prev_lat: deque = deque([0.0] * KEEP, maxlen=KEEP)
        self.prev_tput: deque = deque([0.0] * KEEP, maxlen=KEEP)
        # what the kernel keeps per leg for the decision table's key: the two
        # newest completions' (latency ns, queue at issue), newest first
        self.recent: list[tuple[int, int]] = [(0, 0), (0, 0)]
        self.last_complete_ns = 0     # the newest completion's time (0 = none yet)
        self.completed = 0            # completions retired so far
        self.recent_reads: deque = deque(maxlen=KEEP)
        self.reads_completed = 0
        self.written = 0.0
        self.busy: list[tuple[int, int]] = []          # recent busy periods
        self.next_bg = start_ns + self._exp_gap()
        self.now = start_ns

    def _exp_gap(self) -> int:
        if self.p.bg_per_s <= 0:
            return 1 << 62
        return int(self.rng.exponential(1e9 / self.p.bg_per_s))

    def _gc_duration(self) -> int:
        ms = self.p.gc_median_ms * math.exp(self.p.gc_sigma * self.rng.standard_normal())
        return int(min(max(ms, self.p.gc_min_ms), self.p.gc_max_ms) * 1e6)

    def _start_busy(self, t: int) -> None:
        d = self._gc_duration()
        if self.busy and self.busy[-1][1] > t:      # extend an ongoing period
            s, e = self.busy[-1]
            self.busy[-1] = (s, max(e, t) + d)
        else:
            self.busy.append((t, t + d))
            if len(self.busy) > 8:
                del self.busy[0]

    def advance(self, now: int) -> None:
        """Move the leg's clock to `now`: retire completions, start
        background busy periods that began before `now`."""
        while self.next_bg <= now:
            self._start_busy(self.next_bg)
            self.next_bg += max(self._exp_gap(), 1)
        inf = self.inflight
        while inf and inf[0][0] <= now:
            done, lat, tput, lat_ns, q, is_write, nb = heapq.heappop(inf)
            self.prev_lat.appendleft(lat)
            self.prev_lat_qlen.appendleft(q)
            self.prev_tput.appendleft(tput)
            self.recent = [(lat_ns, q), self.recent[0]]
            self.last_complete_ns = done
            self.completed += 1
            if not is_write:
                self.recent_reads.appendleft((lat_ns, nb))
                self.reads_completed += 1
        self.now = now

    def _recent(self) -> tuple[int, int]:
        """(latency ns, queue at issue) the kernel hands the routing for
        this leg: of the two newest completions, abi.use_previous's pick."""
        (lat, q), (plat, pq) = self.recent
        return (plat, pq) if abi.use_previous(lat, q, plat, pq) else (lat, q)

    @property
    def last_lat_ns(self) -> int:
        return self._recent()[0]

    @property
    def last_lat_qlen(self) -> int:
        return self._recent()[1]

    @property
    def qlen(self) -> int:
        return len(self.inflight)

    def busy_until(self, t: int) -> int:
        for s, e in reversed(self.busy):
            if s <= t < e:
                return e
        return 0

    def submit(self, now: int, nbytes: int, is_write: bool) -> tuple[int, int]:
        """Issue an I/O at `now` (call advance(now) first). Returns
        (completion time ns, queue length at issue)."""
        p = self.p
        q = len(self.inflight)
        self.prev_qlen.appendleft(q)
        if is_write:
            svc_us = p.write_base_us + nbytes / p.write_mbps
        else:
            svc_us = p.read_base_us + nbytes / p.read_mbps
        start = max(now, heapq.heappop(self.free))
        be = self.busy_until(start)
        if be and self.hit_rng.random() < p.block_frac:
            start = be
        done = start + int(svc_us * 1000)
        heapq.heappush(self.free, done)
        lat_us = (done - now) / 1000.0
        heapq.heappush(self.inflight, (done, lat_us, nbytes / lat_us, done - now, q,
                                       bool(is_write), nbytes))
        if is_write:
            self.written += nbytes
            thr = p.gc_every_write_mb * 1e6
            while self.written >= thr:
                self.written -= thr
                self._start_busy(now)
        return done, q

    def state(self) -> tuple[int, tuple, tuple, tuple]:
        """(queue_len, prev 3 qlens, prev 3 latencies us, prev 3 throughputs
        bytes/us), newest first: absolute values, as the kernel keeps them."""
        h = HISTORY
        return (len(self.inflight), tuple(self.prev_qlen)[:h], tuple(self.prev_lat)[:h],
                tuple(self.prev_tput)[:h])


class RecordedLeg(Leg):
    """A leg whose service latency comes from a recorded trace.

    A request sent to this leg at time t takes the latency that the recorded
    trace measured for the most recent I/O of the same kind (read or write)
    issued to this leg at or before t (the first one before any), i.e. the
    device's own latency timeline replaces the model; in-flight counts and
    feature history are kept as for a modelled leg.
    """

    def __init__(self, params: DeviceParams, seed: int, start_ns: int,
                 timelines: dict[bool, tuple[np.ndarray, np.ndarray]]):
        p = DeviceParams(**{**params.as_dict(), "bg_per_s": 0.0})
        super().__init__(p, seed, start_ns)
        self.timelines = timelines

    def submit(self, now: int, nbytes: int, is_write: bool) -> tuple[int, int]:
        q = len(self.inflight)
        self.prev_qlen.appendleft(q)
        t_issue, lat = self.timelines[bool(is_write)]
        i = int(np.searchsorted(t_issue, now, side="right")) - 1
        done = now + int(lat[max(i, 0)])
        lat_us = max((done - now) / 1000.0, 1e-3)
        heapq.heappush(self.inflight, (done, lat_us, nbytes / lat_us, done - now, q,
                                       bool(is_write), nbytes))
        return done, q
