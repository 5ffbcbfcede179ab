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
(ties: lower P(slow), i.e. higher kernel score, then lower index); if no
valid entry admits (all avoid, or the agent stopped or stalled), return -1:
the module's built-in default (least in-flight) decides.

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


@dataclass
class DecisionTable:
    admit: np.ndarray      # bool [legs, buckets]
    score: np.ndarray      # float32 [legs, buckets], P(slow)
    valid_from_ns: int
    expiry_ns: int


def feature_rows(states: Sequence[LegState]) -> np.ndarray:
    """Rows [legs * buckets, NUM_FEATURES], leg-major."""
    nl = len(states)
    x = np.zeros((nl * NUM_SIZE_BUCKETS, F.NUM_FEATURES), dtype=np.float32)
    for li, s in enumerate(states):
        r = slice(li * NUM_SIZE_BUCKETS, (li + 1) * NUM_SIZE_BUCKETS)
        x[r, F.COL_QLEN] = s.queue_len
        x[r, F.COLS_PREV_QLEN] = s.prev_qlen
        x[r, F.COLS_PREV_LAT] = s.prev_lat_us
        x[r, F.COLS_PREV_TPUT] = s.prev_tput_mbps
        x[r, F.COL_SIZE] = BUCKET_SIZE_BYTES
    return x


class DecisionMaker:
    """Turns per-leg feature state into a decision table with one batched
    inference. `model` has p_slow(rows) -> array and a `threshold`."""

    def __init__(self, model, ttl_ns: int = 10_000_000, staleness_ns: int = 0,
                 threshold: float | None = None):
        if ttl_ns <= 0:
            raise ValueError("ttl_ns must be positive")
        if staleness_ns < 0:
            raise ValueError("staleness_ns must be >= 0")
        self.model = model
        self.ttl_ns = int(ttl_ns)
        self.staleness_ns = int(staleness_ns)
        self.threshold = float(model.threshold if threshold is None else threshold)
        self.calls = 0

    def decide(self, now_ns: int, states: Sequence[LegState]) -> DecisionTable:
        p = self.model.p_slow(feature_rows(states))
        self.calls += 1
        score = np.asarray(p, dtype=np.float32).reshape(len(states), NUM_SIZE_BUCKETS)
        valid = now_ns + self.staleness_ns
        return DecisionTable(score < self.threshold, score, valid, valid + self.ttl_ns)


def route(table: DecisionTable | None, now_ns: int, bucket: int,
          inflight: Sequence[int]) -> int:
    """Leg for one read, or -1 for the module default (see module doc)."""
    if table is None or not (table.valid_from_ns <= now_ns < table.expiry_ns):
        return -1
    adm = table.admit[:, bucket]
    sc = table.score[:, bucket]
    best, key = -1, None
    for leg in np.flatnonzero(adm):
        k = (inflight[leg], float(sc[leg]), int(leg))
        if key is None or k < key:
            best, key = int(leg), k
    return best


KERNEL_SCORE_SCALE = 1_000_000


def kernel_score(p_slow: float) -> int:
    """The decision entry's integer score (higher is better) for P(slow)."""
    return int(round((1.0 - min(max(float(p_slow), 0.0), 1.0)) * KERNEL_SCORE_SCALE))


def least_inflight(inflight: Sequence[int]) -> int:
    """The module's built-in default: least in-flight, lowest index on ties."""
    return int(np.argmin(np.asarray(inflight)))
