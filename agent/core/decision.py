"""The feature-keyed decision table (pure logic, no I/O).

The kernel routes every read itself, from each leg's live state; the agent
only precomputes what the admission model says about each possible state.
The agent daemon and the replay simulator call the same code:

    maker = TableMaker(model, probe_after_ns=..., ttl_ns=...)
    table = maker.build(now_ns, baselines)    # when a leg's baseline or the model changes
    leg, probe = route(table, now_ns, nbytes, inflight, last_lat_ns, last_complete_ns)

The key (kmodule/iobridge_abi.h, core/abi.py): per read and leg,
  size bucket     of the read (abi.SIZE_BUCKET_MAX_BYTES: <=4K, <=16K, <=64K, more),
  in-flight bucket of the leg's bios in flight (0, 1, 2-3, 4-7, 8-15, 16+),
  latency bucket  of the leg's recent latency (of its two newest reads, the
                  lower per read: abi.use_previous) over (the bios
                  ahead of it when it was submitted + 1) (abi.key_latency: a
                  deep queue alone does not look slow), split by edges at REL_LAT_EDGES x its service
                  time per read (LegBaseline.service_us: the low quantile of
                  latency / (bios ahead at queue time + 1), the same
                  normalisation; at queue depth 1 it is the baseline latency).
The edges sit where the model's inputs matter: below 1.5x baseline a read
is plainly fast; the labels of the shipped model call a period slow from
about 10-20x; 32x and more is deep inside a slow period. The model's rows
put the bucket's representative back in the model's unit: that many times
the service time, times (the in-flight representative + 1), over the
baseline latency (key_rows).

build() runs the model at most ONCE (one batched ONNX call), over every key
of every leg whose rows it has not evaluated yet. A row is a read of the
bucket's representative size (BUCKET_SIZE_BYTES) on a leg whose current
and previous queue lengths are the in-flight bucket's representative
(INFLIGHT_REP) and whose last three latencies are the latency bucket's
representative (a steady state), with throughputs derived from them; the
rows depend on the baselines only through bytes_per_read and
per_read_ratio (key_rows), so P(slow) is kept per point of that grid
(grid_point). The baselines (features.BaselineTracker)
are the slow-moving inputs; the fast ones are in the key, so the table
stays right between recomputes.

route() is the reference semantics of bpf/route_policy.bpf.c for one read:
for each healthy leg with a valid table, the expected completion time

    cost = max((inflight + 1) * max(service_ns, key latency), newest latency)
           + penalty_ns[key]

(abi.leg_cost; in the open top latency bucket the penalty grows with the
key latency beyond the latency it was priced at: abi.key_penalty), where
service_ns is the leg's typical service time per read, the key latency its
time per read now (the newest read's latency over the queue it met), and
penalty_ns = the latency's risk (latency_risk: P(slow | key) over P(slow)
at the same key with a fast newest latency) x (what a slow read costs on
the leg - service_ns). Every read queued ahead costs the leg's time per
read now: with the penalty alone, a leg idle after one read delayed by the
host (its newest latency as high as a slow leg's) cost as much as the slow
leg with 3 reads queued, and the slow leg got every read until the idle
leg's probe (46-75 reads in 2 s, VM). The penalty counts once: times the
queue, a healthy leg's jitter at queue depth 16 (a penalty of 6-10 ms from
the shipped model) cost more than an idle leg in a slow period. The lowest cost
wins (exact ties: a random one). A leg with no bio in flight and no
completion for probe_after_ns is probed instead (one read), so an avoided
leg shows its recovery without the agent (abi.probe_wait_ns: the wait is
at least 32x the leg's key latency, so a leg still slow costs little in
probes). With no valid table (agent
stopped or stalled past the expiry) route() returns -1: the module's
built-in default (least in flight) decides.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from . import abi
from . import features as F

REL_LAT_EDGES = (1.5, 2.5, 4.0, 6.0, 10.0, 16.0, 32.0)       # x baseline latency
# A representative of each latency bucket (geometric middle; 64 for the open top).
LAT_REP_REL = (1.0, 1.94, 3.16, 4.9, 7.75, 12.6, 22.6, 64.0)
# A representative bios-in-flight count of each in-flight bucket.
INFLIGHT_REP = (0, 1, 2, 5, 11, 20)
# Size a row stands for in each bucket: the bucket's upper bound, and twice
# the last bound for the open-ended last bucket.
BUCKET_SIZE_BYTES = tuple(abi.SIZE_BUCKET_MAX_BYTES) + (2 * abi.SIZE_BUCKET_MAX_BYTES[-1],)
# What a slow read costs on a leg: the median of its recent reads slower than
# SLOW_READ_REL x its baseline (the shipped model's label threshold) once it
# has SLOW_READ_MIN_COUNT of them, at least SLOW_LAT_FLOOR_REL x its
# baseline, and at least the key's own latency. A median over several slow
# reads, not a high quantile of all reads: on an emulated host a few reads of
# an idle leg take 30x its baseline, and a q0.99 over a few dozen samples
# gave two identical replicas penalties 2x apart (one leg then got 9% of
# the reads while both were fast).
SLOW_READ_REL = 8.0
# The model's rows depend on a leg's baselines only through their product
# (bytes_per_read); it is evaluated on a grid of that product, 16 points per
# octave (4.4% apart, finer than BASELINE_MOVE), and each point's P(slow) is
# kept: a leg that gets faster or slower needs new edges and penalties, not
# a new inference (under emulation on a loaded host one took 0.3-0.7 s).
BYTES_GRID_STEPS = 16
# ... and of the leg's service time over its baseline latency
# (per_read_ratio), 8 points per octave (9% apart).
RATIO_GRID_STEPS = 8
# Points kept (P(slow) and risk per key: 2.3 KB each); least recently used
# go first. 5 octaves of read size alone are 80 points.
MAX_CACHED_POINTS = 512
SLOW_READ_MIN_COUNT = 8
SLOW_LAT_FLOOR_REL = 10.0

# The agent's timing defaults, one definition for the daemon's config and
# the replay simulator (which plays the agent): baselines are sampled every
# tick, the table is rebuilt at most once per recompute period and only when
# a leg's baseline moved by more than BASELINE_MOVE, and an avoided leg idle
# for probe_after gets one read from the kernel.
AGENT_TICK_MS = 250.0
AGENT_RECOMPUTE_MS = 1000.0
AGENT_PROBE_AFTER_MS = 200.0
BASELINE_MOVE = 0.10
_REL_LAT_EDGES = np.array(REL_LAT_EDGES)
# The decision entry's u32 fields (kmodule/iobridge_abi.h): a table's
# values are built within them, so the agent writes them as they are.
U32_MAX = 0xFFFFFFFF
assert len(REL_LAT_EDGES) == abi.NUM_LAT_BUCKETS - 1
assert len(LAT_REP_REL) == abi.NUM_LAT_BUCKETS
assert len(INFLIGHT_REP) == abi.NUM_INFLIGHT_BUCKETS
assert len(BUCKET_SIZE_BYTES) == abi.NUM_SIZE_BUCKETS

# The key components of every key index, in abi.key_index order.
_KEY_SIZE, _KEY_INFLIGHT, _KEY_LAT = (a.reshape(-1) for a in np.meshgrid(
    np.arange(abi.NUM_SIZE_BUCKETS), np.arange(abi.NUM_INFLIGHT_BUCKETS),
    np.arange(abi.NUM_LAT_BUCKETS), indexing="ij"))
KEY_SIZE_BUCKET = _KEY_SIZE     # per key index, its size bucket (core/hedging.py)


@dataclass(frozen=True)
class LegBaseline:
    """A leg's slow-moving state: what its fast reads look like now."""
    lat_us: float          # baseline latency (the model's inputs are relative to it)
    tput: float            # baseline throughput, bytes per us
    slow_lat_us: float     # what a slow read costs on it
    # Service time per read (latency over the bios ahead + 1, low quantile):
    # the cost's per-read term and the unit of the key's latency edges. The
    # baseline latency counts the queue each read waited behind: multiplied
    # by a deep queue again, a fast leg at queue depth 16 on a busy host
    # cost more than an idle leg in a 20 ms slow period (VM). None: lat_us.
    service_us: float | None = None

    def __post_init__(self):
        if self.service_us is None:
            object.__setattr__(self, "service_us", self.lat_us)

    @classmethod
    def of(cls, tracker: F.BaselineTracker) -> "LegBaseline | None":
        """From a leg's BaselineTracker; None while it has too few samples."""
        if not tracker.ready:
            return None
        lat = tracker.latency_us()
        slow = tracker.slow_latency_us(SLOW_READ_REL * lat, SLOW_READ_MIN_COUNT) or 0.0
        service = min(tracker.service_us(), lat) or lat
        return cls(lat, tracker.tput(), max(slow, SLOW_LAT_FLOOR_REL * lat), service)

    def moved(self, other: "LegBaseline | None", rel: float) -> bool:
        """True if `other` differs from this by more than `rel` in any field."""
        if other is None:
            return True
        pairs = ((self.lat_us, other.lat_us), (self.tput, other.tput),
                 (self.slow_lat_us, other.slow_lat_us), (self.service_us, other.service_us))
        return any(abs(a - b) > rel * max(abs(b), 1e-9) for a, b in pairs)


def borrow_missing(own: Sequence[LegBaseline | None]) -> tuple[list, list[bool]]:
    """(baseline per leg, borrowed per leg): a leg without its own baseline
    borrows the lowest-latency ready leg's, because a leg left out of the
    table gets no reads and so would never get samples of its own (its
    replicas hold the same data and are usually alike; its first reads then
    give it its own). All None while no leg is ready."""
    ready = [b for b in own if b is not None]
    if not ready or len(ready) == len(own):
        return list(own), [False] * len(own)
    lend = min(ready, key=lambda b: b.lat_us)
    return [b if b is not None else lend for b in own], [b is None for b in own]


def target_baselines(own: Sequence[LegBaseline | None]) -> tuple[list, list[bool]]:
    """The baselines the table of one target's legs is built from: each
    leg's own (borrow_missing fills the missing ones), with the slow-read
    cost shared: the highest of the legs'.

    Shared, because a slow read's cost is the fault's, not the leg's: with
    its own, a leg that happened to have slow periods carried a larger
    penalty at every key, also while fast, and got 3% of the reads at QD1 and
    16% at QD16 with both legs fast (measured in the VM), halving IOPS at
    QD16. Shared, the legs' costs differ only by their live state and
    service estimate, which is what the kernel should act on."""
    bases, borrowed = borrow_missing(own)
    ready = [b for b in bases if b is not None]
    if not ready:
        return bases, borrowed
    slow = max(b.slow_lat_us for b in ready)
    return [None if b is None else replace(b, slow_lat_us=max(slow, b.slow_lat_us))
            for b in bases], borrowed


def lat_edges_ns(base: LegBaseline | np.ndarray) -> np.ndarray:
    """The leg's latency bucket edges in ns (what the kernel compares with);
    or, given service times in us [legs, 1], every leg's at once."""
    service_us = base.service_us if isinstance(base, LegBaseline) else base
    return np.minimum(np.rint(_REL_LAT_EDGES * service_us * 1000), U32_MAX).astype(np.int64)


def bytes_per_read(base: LegBaseline) -> float:
    """The one baseline-dependent input of the model's rows: baseline
    latency x baseline throughput (bytes; about the typical read size)."""
    return base.lat_us * base.tput


def _on_grid(x: float, steps: int) -> float:
    """x > 0 rounded to the grid of `steps` points per octave (inf stays inf)."""
    if x == math.inf:
        return x
    return math.exp2(round(math.log2(x) * steps) / steps)


def _point(nbytes: float, ratio: float) -> tuple[float, float]:
    """One leg's grid point (grid_points). Plain Python on floats: a table of
    8 legs costs a dozen numpy calls less per recompute (bench tick)."""
    b = _on_grid(nbytes, BYTES_GRID_STEPS) if nbytes > 0 else 0.0
    r = min(_on_grid(ratio, RATIO_GRID_STEPS), 1.0) if ratio > 0 else 1.0
    return b, r


def _ratio(lat_us: float, service_us: float) -> float:
    """per_read_ratio() of plain floats (1 where the latency is 0)."""
    return min(service_us / lat_us, 1.0) if lat_us > 0 else 1.0


def grid_points(nbytes: np.ndarray, ratio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """bytes_per_read() and per_read_ratio() of many legs, rounded to the grid
    the model is evaluated on: BYTES_GRID_STEPS points per octave (0 stays 0:
    no throughput known) and RATIO_GRID_STEPS (at most 1; 0 or less: 1)."""
    nbytes, ratio = np.broadcast_arrays(np.asarray(nbytes, dtype=np.float64),
                                        np.asarray(ratio, dtype=np.float64))
    pts = [_point(b, r) for b, r in zip(nbytes.ravel().tolist(), ratio.ravel().tolist())]
    b = np.array([pt[0] for pt in pts], dtype=np.float64).reshape(nbytes.shape)
    r = np.array([pt[1] for pt in pts], dtype=np.float64).reshape(nbytes.shape)
    return b, r


def bytes_grid_point(nbytes: float) -> float:
    """bytes_per_read() rounded to the grid (grid_points)."""
    return _point(float(nbytes), 1.0)[0]


def per_read_ratio(base: LegBaseline) -> float:
    """The leg's service time per read over its baseline latency (1 at queue
    depth 1; at a deep queue each read's latency counts the queue ahead)."""
    return _ratio(float(base.lat_us), float(base.service_us))


def grid_point(base: LegBaseline) -> tuple[float, float]:
    """The point of the grid the model is evaluated on for this leg."""
    return _point(float(bytes_per_read(base)), per_read_ratio(base))


def key_rows(base: LegBaseline | tuple[float, float]) -> np.ndarray:
    """Model inputs [KEYS_PER_LEG, NUM_FEATURES] for every key of one leg
    (a LegBaseline, or its grid_point()).

    A key's latency is per read: the newest read's latency over (the bios
    ahead of it + 1), bucketed in units of the service time per read. The
    model's latency inputs are raw latencies relative to the baseline
    latency, so a row's latency is the bucket's representative x the
    service time x (the in-flight representative + 1), over the baseline
    latency (per_read_ratio x that). (Before, rows put it at the
    representative x the baseline latency: at queue depth 4, where the
    service time is half the baseline latency, an idle leg's ordinary read
    read as twice the baseline to the model, cost 4 reads of penalty, and
    the other leg took 85% of the reads, VM.) Every input is relative to the
    baseline except the throughput ratio, size / (row latency x baseline
    latency) / baseline throughput, which needs only the product of the two
    baselines: so a leg's rows, and what the model says about them, change
    when that product or the ratio does, not when the leg merely gets faster
    or slower."""
    nbytes, ratio = ((bytes_per_read(base), per_read_ratio(base)) if isinstance(base, LegBaseline)
                     else base)
    x = np.zeros((abi.KEYS_PER_LEG, F.NUM_FEATURES), dtype=np.float32)
    size = np.array(BUCKET_SIZE_BYTES, dtype=np.float64)[_KEY_SIZE]
    qlen = np.array(INFLIGHT_REP, dtype=np.float64)[_KEY_INFLIGHT]
    lat_rel = np.array(LAT_REP_REL)[_KEY_LAT] * ratio * (qlen + 1)
    # throughput of such a read, over the leg's baseline throughput
    tput_rel = F.relative(size / lat_rel, nbytes)
    x[:, F.COL_IO_TYPE] = 0.0
    x[:, F.COL_SIZE] = size
    x[:, F.COL_QLEN] = qlen
    x[:, F.COLS_PREV_QLEN] = qlen[:, None]
    x[:, F.COLS_PREV_LAT] = lat_rel[:, None]
    x[:, F.COLS_PREV_TPUT] = tput_rel[:, None]
    return x


def latency_risk(p_slow: np.ndarray) -> np.ndarray:
    """Per key: how much the leg's newest latency raises P(slow), i.e.
    P(slow | key) over P(slow) at the same size and in-flight buckets with a
    fast newest latency (latency bucket 0), at least 0.

    The queue a leg holds is the router's own doing and the cost rule
    already prices it ((inflight + 1) x ...); the model, trained where slow
    periods build queues, also gives a plainly fast leg with 8-15 reads in
    flight P(slow) 0.15 (shipped model). Priced in full, that made a fast leg
    at queue depth 16 look dearer than an idle leg whose newest read took
    20 ms, and the slow leg held 2-3 reads all through its slow periods
    (1.1% of the reads at QD16, VM: the p99 of the slow leg)."""
    p = np.asarray(p_slow, dtype=np.float64)
    grid = p.reshape(*p.shape[:-1], abi.NUM_SIZE_BUCKETS, abi.NUM_INFLIGHT_BUCKETS,
                     abi.NUM_LAT_BUCKETS)
    return np.clip(grid - grid[..., :1], 0.0, 1.0).reshape(p.shape)


_LAT_REP = np.array(LAT_REP_REL)
# A leg's keys as [size and in-flight buckets, latency buckets] (abi.key_index
# puts the latency bucket last): a key's penalty scales with its latency bucket.
_KEYS_BY_LAT = (abi.KEYS_PER_LEG // abi.NUM_LAT_BUCKETS, abi.NUM_LAT_BUCKETS)


def _extra_ns(service_us: np.ndarray, slow_lat_us: np.ndarray) -> np.ndarray:
    """[legs, NUM_LAT_BUCKETS]: what a slow read costs beyond the service
    time at each latency bucket, ns (service_us, slow_lat_us: [legs, 1])."""
    extra = np.maximum(np.maximum(_LAT_REP * service_us, slow_lat_us) - service_us, 0.0)
    extra *= 1000.0
    return extra


def _penalties_ns(p_slow: np.ndarray, service_us, slow_lat_us) -> np.ndarray:
    """penalties_ns for [legs, KEYS] at once (service_us, slow_lat_us: [legs, 1])."""
    extra = _extra_ns(np.asarray(service_us, dtype=np.float64), slow_lat_us)
    p = np.asarray(p_slow, dtype=np.float64)
    pen = p.reshape(*p.shape[:-1], *_KEYS_BY_LAT) * extra[..., None, :]
    np.rint(pen, out=pen)
    np.clip(pen, 0, abi.PENALTY_MAX_NS, out=pen)
    return pen.astype(np.int64).reshape(p.shape)


def penalties_ns(p_slow: np.ndarray, base: LegBaseline) -> np.ndarray:
    """penalty_ns per key: P(slow) x (what a slow read costs - service), the
    slow read's cost being at least the key's own latency."""
    return _penalties_ns(p_slow, np.array([base.service_us]), np.array([base.slow_lat_us]))


@dataclass
class KeyedTable:
    """The decision table of one set of legs (one target, or the replay's legs)."""
    valid: np.ndarray            # bool [legs]: has an entry (a baseline)
    p_slow: np.ndarray           # float32 [legs, KEYS_PER_LEG]
    penalty_ns: np.ndarray       # int64 [legs, KEYS_PER_LEG]
    lat_edges_ns: np.ndarray     # int64 [legs, NUM_LAT_BUCKETS - 1]
    service_ns: np.ndarray       # int64 [legs]
    probe_after_ns: int          # 0 = no probing
    computed_ns: int
    valid_from_ns: int
    expiry_ns: int
    baselines: list = field(default_factory=list)   # LegBaseline | None per leg
    # int64 [legs]: the latency the top latency bucket's penalties are priced
    # at (abi.key_penalty scales them beyond it); None: no scaling
    top_lat_ns: np.ndarray | None = None
    # uint32 [legs, KEYS_PER_LEG]: hedge deadline per key, whole us, 0 = never
    # (core/hedging.py); None: this table hedges nothing
    hedge_us: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.valid)

    def cost(self, leg: int, nbytes: int, inflight: int, last_lat_ns: int,
             last_lat_qlen: int = 0) -> int:
        """The leg's expected completion time for this read, ns (the kernel's
        rule, abi.leg_cost: (inflight + 1) x its time per read now + the
        key's penalty)."""
        lat = abi.key_latency(last_lat_ns, last_lat_qlen)
        pen = int(self.penalty_ns[leg, self.key_of(leg, nbytes, inflight, last_lat_ns,
                                                   last_lat_qlen)])
        if self.top_lat_ns is not None:
            pen = abi.key_penalty(pen, int(self.top_lat_ns[leg]),
                                  abi.lat_bucket(self.lat_edges_ns[leg], lat), lat)
        return abi.leg_cost(inflight, int(self.service_ns[leg]), last_lat_ns, lat, pen)

    def hedge_deadline_ns(self, leg: int, nbytes: int, inflight: int, last_lat_ns: int,
                          last_lat_qlen: int = 0) -> int:
        """The hedge deadline of a read routed to `leg` in this state, ns
        after its issue (0 = never hedge)."""
        if self.hedge_us is None or not self.valid[leg]:
            return 0
        return int(self.hedge_us[leg, self.key_of(leg, nbytes, inflight, last_lat_ns,
                                                  last_lat_qlen)]) * 1000

    def key_of(self, leg: int, nbytes: int, inflight: int, last_lat_ns: int,
               last_lat_qlen: int = 0) -> int:
        lat = abi.key_latency(last_lat_ns, last_lat_qlen)
        return abi.key_index(abi.size_bucket(nbytes), abi.inflight_bucket(inflight),
                             abi.lat_bucket(self.lat_edges_ns[leg], lat))

    def avoided(self, threshold: float) -> np.ndarray:
        """bool [legs, KEYS]: keys whose P(slow) reaches the model's threshold."""
        return self.p_slow >= threshold


class TableMaker:
    """Builds KeyedTables with one batched inference. `model` has
    p_slow(rows) -> array and a `threshold`."""

    def __init__(self, model, ttl_ns: int = 1_000_000_000, staleness_ns: int = 0,
                 threshold: float | None = None, probe_after_ns: int = 0):
        if ttl_ns <= 0:
            raise ValueError("ttl_ns must be positive")
        if staleness_ns < 0:
            raise ValueError("staleness_ns must be >= 0")
        if probe_after_ns < 0:
            raise ValueError("probe_after_ns must be >= 0 (0 = no probing)")
        self.model = model
        self.ttl_ns = int(ttl_ns)
        self.staleness_ns = int(staleness_ns)
        self.threshold = float(model.threshold if threshold is None else threshold)
        self.probe_after_ns = int(probe_after_ns)
        self.calls = 0              # batched inferences run
        # (P(slow), latency_risk) per key, by grid point, least recently
        # used first: the model is run only for a point not kept (a new
        # model gets a new TableMaker).
        self._points: OrderedDict[tuple[float, float], tuple[np.ndarray, np.ndarray]] = \
            OrderedDict()

    def _infer(self, points: Sequence[tuple[float, float]]) -> None:
        """Run the model once over every key of the points not kept yet; the
        least recently used points make room for them."""
        kept = self._points
        todo = []
        for pt in points:
            if pt in kept:
                kept.move_to_end(pt)
            elif pt not in todo:
                todo.append(pt)
        if not todo:
            return
        rows = np.concatenate([key_rows(pt) for pt in todo])
        probs = np.asarray(self.model.p_slow(rows), dtype=np.float32)
        self.calls += 1
        probs = probs.reshape(len(todo), abi.KEYS_PER_LEG)
        for pt, pp, risk in zip(todo, probs, latency_risk(probs)):
            kept[pt] = (pp, risk)
        while len(kept) > max(MAX_CACHED_POINTS, len(points)):
            kept.popitem(last=False)

    def build(self, now_ns: int, baselines: Sequence[LegBaseline | None],
              infer: bool = True) -> KeyedTable | None:
        """The table of these legs (None: no baseline, no entry). Every leg
        at once in numpy: a recompute with the model's answers kept costs
        about 100 us of CPU with 8 legs (iobridge bench tick). infer=False: None
        instead of running the model for a point not kept."""
        # As few numpy calls as the arithmetic allows: under the agent's
        # tick each one starts in cold caches (several us; bench tick).
        n = len(baselines)
        idx = [i for i, b in enumerate(baselines) if b is not None]
        ready = [baselines[i] for i in idx]
        valid = np.zeros(n, dtype=bool)
        valid[idx] = True
        if not ready:
            visible = now_ns + self.staleness_ns
            return KeyedTable(valid, np.zeros((n, abi.KEYS_PER_LEG), dtype=np.float32),
                              np.zeros((n, abi.KEYS_PER_LEG), dtype=np.int64),
                              np.zeros((n, abi.NUM_LAT_BUCKETS - 1), dtype=np.int64),
                              np.zeros(n, dtype=np.int64), self.probe_after_ns, now_ns,
                              visible, visible + self.ttl_ns, list(baselines),
                              np.zeros(n, dtype=np.int64))
        points = [_point(float(b.lat_us * b.tput), _ratio(float(b.lat_us), float(b.service_us)))
                  for b in ready]
        if not infer and not all(pt in self._points for pt in points):
            return None
        self._infer(points)
        kept = [self._points[pt] for pt in points]
        svc, slow = np.array([(b.service_us, b.slow_lat_us) for b in ready],
                             dtype=np.float64).T[:, :, None]
        p = np.array([pp for pp, _ in kept], dtype=np.float32)
        pen = _penalties_ns(np.array([risk for _, risk in kept]), svc, slow)
        edges = lat_edges_ns(svc)
        svc, slow = svc[:, 0], slow[:, 0]
        service = np.minimum(np.rint(svc * 1000), U32_MAX).astype(np.int64)
        top = np.minimum(np.rint(np.maximum(LAT_REP_REL[-1] * svc, slow) * 1000),
                         abi.PENALTY_MAX_NS).astype(np.int64)
        if len(ready) < n:          # legs without a baseline: zeros, no entry
            def spread(a):
                out = np.zeros((n, *a.shape[1:]), dtype=a.dtype)
                out[idx] = a
                return out
            p, pen, edges, service, top = map(spread, (p, pen, edges, service, top))
        visible = now_ns + self.staleness_ns
        return KeyedTable(valid, p, pen, edges, service, self.probe_after_ns, now_ns,
                          visible, visible + self.ttl_ns, list(baselines), top)


def route(table: KeyedTable | None, now_ns: int, nbytes: int, inflight: Sequence[int],
          last_lat_ns: Sequence[int], last_complete_ns: Sequence[int],
          healthy: Sequence[bool] | None = None, rng=None,
          last_lat_qlen: Sequence[int] | None = None) -> tuple[int, bool]:
    """(leg, probe) for one read, or (-1, False) for the module default (see
    the module doc). `rng` (numpy Generator) breaks exact ties at random, as
    the kernel does; without it the lowest index wins. last_lat_qlen: the
    bios ahead of each leg's newest completion when it was submitted (None:
    none ahead, as at queue depth 1)."""
    if table is None or not (table.valid_from_ns <= now_ns < table.expiry_ns):
        return -1, False
    best, best_cost, ties = -1, 0, 0
    probe = -1
    for leg in range(len(table)):
        if not table.valid[leg] or (healthy is not None and not healthy[leg]):
            continue
        qlen = 0 if last_lat_qlen is None else last_lat_qlen[leg]
        if (probe < 0 and table.probe_after_ns and inflight[leg] == 0
                and now_ns - last_complete_ns[leg]
                >= abi.probe_wait_ns(table.probe_after_ns,
                                     abi.key_latency(last_lat_ns[leg], qlen))):
            probe = leg
        cost = table.cost(leg, nbytes, inflight[leg], last_lat_ns[leg], qlen)
        if best < 0 or cost < best_cost:
            best, best_cost, ties = leg, cost, 1
        elif cost == best_cost:
            ties += 1
            if rng is not None and rng.integers(ties) == 0:
                best = leg
    if probe >= 0 and probe != best:
        return probe, True
    return best, False


def least_inflight(inflight: Sequence[int]) -> int:
    """The module's built-in default: least in-flight, lowest index on ties."""
    return int(np.argmin(np.asarray(inflight)))
