"""The tick-based admission decision table (pure logic, no I/O).

The agent daemon and the replay simulator call the same code:

    maker = DecisionMaker(model, ttl_ns=..., staleness_ns=...)
    table = maker.decide(now_ns, leg_states)     # once per tick
    leg = route(table, now_ns, size_bucket(nbytes), inflight)   # per read

decide() builds one feature row for every (leg, size bucket) pair: a read
(io_type 0) of the bucket's representative size (BUCKET_SIZE_BYTES) with
the leg's current queue length and history, runs ONE batched ONNX call, and
returns entries {admit, score = P(slow), expiry}. A table computed from the
state at time T becomes visible at T + staleness_ns (the time to read the
state, infer and publish) and expires at T + staleness_ns + ttl_ns.

route() is the reference semantics of the kernel policy program
(bpf/route_policy.bpf.c) for one read: among legs whose entry is valid
(published and unexpired) and says admit, pick the least in-flight one
(ties: lower P(slow), i.e. higher kernel score, then lower index); if every
valid entry says avoid, pick the lowest P(slow) (ties: fewer in flight,
then lower index): the model still ranks the legs, and the module default
would ignore that; with no valid table (the agent stopped or stalled)
return -1: the module's built-in default (least in-flight) decides.

The kernel table holds an integer score where higher is better:
kernel_score() maps P(slow) onto it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import features as F
from .abi import NUM_SIZE_BUCKETS, SIZE_BUCKET_MAX_BYTES

# Size a row stands for in each bucket: the bucket's upper bound, and twice
# the last bound for the open-ended last bucket.
BUCKET_SIZE_BYTES = tuple(SIZE_BUCKET_MAX_BYTES) + (2 * SIZE_BUCKET_MAX_BYTES[-1],)
assert len(BUCKET_SIZE_BYTES) == NUM_SIZE_BUCKETS


@dataclass(frozen=True)
class LegState:
    """Feature state of one leg, as the BPF observer keeps it."""
    queue_len: int
    prev_qlen: Sequence[float]       # 3 values, latest first
    prev_lat_us: Sequence[float]     # 3 values, latest completion first
    prev_tput_mbps: Sequence[float]  # 3 values
    idle_ns: int | None = None       # since the newest completion; None = never


@dataclass
class DecisionTable:
    admit: np.ndarray      # bool [legs, buckets]
    score: np.ndarray      # float32 [legs, buckets], P(slow)
    valid_from_ns: int
    expiry_ns: int
    probe: np.ndarray | None = None   # bool [legs]: admitted to refresh its history


@dataclass
class LegArrays:
    """The feature state of n legs as arrays (what the agent reads per tick)."""
    queue_len: np.ndarray        # [n]
    prev_qlen: np.ndarray        # [n, HISTORY], latest first
    prev_lat_us: np.ndarray      # [n, HISTORY]
    prev_tput_mbps: np.ndarray   # [n, HISTORY]
    idle_ns: np.ndarray          # [n] float, nan = never completed

    @classmethod
    def from_states(cls, states: Sequence[LegState]) -> "LegArrays":
        return cls(np.array([s.queue_len for s in states], dtype=np.float64),
                   np.array([s.prev_qlen for s in states], dtype=np.float64).reshape(-1, F.HISTORY),
                   np.array([s.prev_lat_us for s in states], dtype=np.float64).reshape(-1, F.HISTORY),
                   np.array([s.prev_tput_mbps for s in states], dtype=np.float64).reshape(-1, F.HISTORY),
                   np.array([np.nan if s.idle_ns is None else s.idle_ns for s in states],
                            dtype=np.float64))

    def __len__(self) -> int:
        return len(self.queue_len)


_BUCKET_SIZES = np.array(BUCKET_SIZE_BYTES, dtype=np.float32)


def feature_rows(legs: Sequence[LegState] | LegArrays) -> np.ndarray:
    """Rows [legs * buckets, NUM_FEATURES], leg-major: for each leg, a read
    (io_type 0) of each bucket's representative size."""
    a = legs if isinstance(legs, LegArrays) else LegArrays.from_states(legs)
    x = np.zeros((len(a) * NUM_SIZE_BUCKETS, F.NUM_FEATURES), dtype=np.float32)
    x[:, F.COL_QLEN] = np.repeat(a.queue_len, NUM_SIZE_BUCKETS)
    x[:, F.COLS_PREV_QLEN] = np.repeat(a.prev_qlen, NUM_SIZE_BUCKETS, axis=0)
    x[:, F.COLS_PREV_LAT] = np.repeat(a.prev_lat_us, NUM_SIZE_BUCKETS, axis=0)
    x[:, F.COLS_PREV_TPUT] = np.repeat(a.prev_tput_mbps, NUM_SIZE_BUCKETS, axis=0)
    x[:, F.COL_SIZE] = np.tile(_BUCKET_SIZES, len(a))
    return x


class DecisionMaker:
    """Turns per-leg feature state into a decision table with one batched
    inference. `model` has p_slow(rows) -> array and a `threshold`."""

    def __init__(self, model, ttl_ns: int = 10_000_000, staleness_ns: int = 0,
                 threshold: float | None = None, probe_after_ns: int | None = None):
        if ttl_ns <= 0:
            raise ValueError("ttl_ns must be positive")
        if staleness_ns < 0:
            raise ValueError("staleness_ns must be >= 0")
        if probe_after_ns is not None and probe_after_ns <= 0:
            raise ValueError("probe_after_ns must be positive")
        self.model = model
        self.ttl_ns = int(ttl_ns)
        self.staleness_ns = int(staleness_ns)
        self.threshold = float(model.threshold if threshold is None else threshold)
        self.probe_after_ns = probe_after_ns
        self.calls = 0

    def decide(self, now_ns: int, states: Sequence[LegState] | LegArrays) -> DecisionTable:
        legs = states if isinstance(states, LegArrays) else LegArrays.from_states(states)
        p = self.model.p_slow(feature_rows(legs))
        self.calls += 1
        score = np.asarray(p, dtype=np.float32).reshape(len(legs), NUM_SIZE_BUCKETS)
        admit = score < self.threshold
        valid = now_ns + self.staleness_ns
        probe = self._probes(legs)
        if probe.any():
            # An avoided leg gets no reads, so its history would stay slow
            # forever: after probe_after_ns without a completion it is
            # admitted with the best score, so that one read refreshes it.
            admit[probe] = True
            score[probe] = 0.0
        return DecisionTable(admit, score, valid, valid + self.ttl_ns, probe)

    def _probes(self, legs: LegArrays) -> np.ndarray:
        if self.probe_after_ns is None:
            return np.zeros(len(legs), dtype=bool)
        with np.errstate(invalid="ignore"):
            return legs.idle_ns >= self.probe_after_ns   # nan (never) -> False


def route(table: DecisionTable | None, now_ns: int, bucket: int,
          inflight: Sequence[int]) -> int:
    """Leg for one read, or -1 for the module default (see module doc)."""
    if table is None or not (table.valid_from_ns <= now_ns < table.expiry_ns):
        return -1
    adm = table.admit[:, bucket]
    sc = table.score[:, bucket]
    legs = np.flatnonzero(adm)
    if len(legs):
        return int(min(legs, key=lambda leg: (inflight[leg], float(sc[leg]), int(leg))))
    return int(min(range(len(sc)), key=lambda leg: (float(sc[leg]), inflight[leg], leg)))


KERNEL_SCORE_SCALE = 1_000_000


def kernel_scores(p_slow: np.ndarray) -> np.ndarray:
    """The decision entries' integer scores (higher is better) for P(slow)."""
    return np.rint((1.0 - np.clip(p_slow, 0.0, 1.0)) * KERNEL_SCORE_SCALE).astype(np.int32)


def kernel_score(p_slow: float) -> int:
    """kernel_scores() for one value."""
    return int(kernel_scores(np.float64(p_slow)))


def least_inflight(inflight: Sequence[int]) -> int:
    """The module's built-in default: least in-flight, lowest index on ties."""
    return int(np.argmin(np.asarray(inflight)))
