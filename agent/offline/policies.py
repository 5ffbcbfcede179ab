"""Read-routing policies for the replay simulator.

Every policy answers choose(now_ns, nbytes, legs) -> leg index for one read
(writes always go to every leg). `legs` are devmodel.Leg objects already
advanced to `now_ns`.

  primary     always leg 0
  random      uniform over legs (seeded)
  roundrobin  legs in turn
  leastinflight  fewest in-flight I/Os, lowest index on ties: the module's
              built-in default (md raid1 does the same for SSDs)
  hedged      least in-flight, and a duplicate to the next least in-flight
              leg if the read has not completed after a deadline (a
              percentile of read latency measured on the training part);
              the first completion wins, the duplicate is extra I/O
  linnos      LinnOS-style per-I/O prediction: 31 digitised inputs (current
              queue length, 4 previous queue lengths, 4 previous
              latencies), 31->256->2 MLP, per-I/O latency labels
  heimdall    Heimdall-style per-I/O prediction: the 12 schema features of
              this exact read on each leg, one inference per read
  table       the agent's tick-based decision table (decision.py): one
              batched inference per tick over (leg, size bucket), routed by
              decision.route(); tick period, staleness and TTL are parameters

Predictor policies share decision.route()'s rule, the kernel program's: least
in-flight among legs predicted fast; when none is, the module default (least
in-flight over all legs).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from ..core import features as F
from ..core.abi import size_bucket
from ..core.decision import DecisionMaker, DecisionTable, LegState, least_inflight, route

POLICY_NAMES = ("primary", "random", "roundrobin", "leastinflight", "hedged",
                "linnos", "heimdall", "table")
LEARNED = ("linnos", "heimdall", "table")

LINNOS_HISTORY = 4
LINNOS_QLEN_DIGITS = 3
LINNOS_LAT_DIGITS = 4
LINNOS_WIDTH = LINNOS_QLEN_DIGITS * (1 + LINNOS_HISTORY) + LINNOS_LAT_DIGITS * LINNOS_HISTORY


def _digits(v: np.ndarray, nd: int) -> np.ndarray:
    """[n] non-negative values -> [n, nd] decimal digits, most significant
    first, values clipped to 10**nd - 1 (LinnOS's input encoding)."""
    v = np.clip(np.asarray(v, dtype=np.float64), 0, 10 ** nd - 1).astype(np.int64)
    return np.stack([(v // 10 ** (nd - 1 - i)) % 10 for i in range(nd)], axis=1)


def linnos_rows(qlen: np.ndarray, prev_qlen: np.ndarray, prev_lat_us: np.ndarray) -> np.ndarray:
    """qlen [n], prev_qlen [n,4], prev_lat_us [n,4] -> float32 [n, 31]."""
    parts = [_digits(qlen, LINNOS_QLEN_DIGITS)]
    parts += [_digits(prev_qlen[:, j], LINNOS_QLEN_DIGITS) for j in range(LINNOS_HISTORY)]
    parts += [_digits(prev_lat_us[:, j], LINNOS_LAT_DIGITS) for j in range(LINNOS_HISTORY)]
    return np.concatenate(parts, axis=1).astype(np.float32)


class Policy:
    name = "?"
    hedge_ns: int | None = None

    def reset(self, nlegs: int, seed: int) -> None:
        self.nlegs = nlegs

    def choose(self, now: int, nbytes: int, legs) -> int:
        raise NotImplementedError

    def tick_times(self, read_times: np.ndarray) -> np.ndarray:
        return np.zeros(0, dtype=np.int64)

    def on_tick(self, t: int, legs) -> None:
        pass

    def stats(self) -> dict:
        return {}


class Primary(Policy):
    name = "primary"

    def choose(self, now, nbytes, legs):
        return 0


class Random(Policy):
    name = "random"

    def reset(self, nlegs, seed):
        super().reset(nlegs, seed)
        self.rng = np.random.default_rng(seed)
        self._buf, self._i = self.rng.integers(0, nlegs, 4096), 0

    def choose(self, now, nbytes, legs):
        if self._i == len(self._buf):
            self._buf, self._i = self.rng.integers(0, self.nlegs, 4096), 0
        self._i += 1
        return int(self._buf[self._i - 1])


class RoundRobin(Policy):
    name = "roundrobin"

    def reset(self, nlegs, seed):
        super().reset(nlegs, seed)
        self.next = 0

    def choose(self, now, nbytes, legs):
        leg = self.next
        self.next = (leg + 1) % self.nlegs
        return leg


class LeastInflight(Policy):
    name = "leastinflight"

    def choose(self, now, nbytes, legs):
        return least_inflight([leg.qlen for leg in legs])


class Hedged(LeastInflight):
    name = "hedged"

    def __init__(self, deadline_ns: int, percentile: float):
        self.hedge_ns = int(deadline_ns)
        self.percentile = percentile

    def stats(self):
        return {"deadline_us": self.hedge_ns / 1000.0, "percentile": self.percentile}


def _route_scores(p: np.ndarray, threshold: float, legs) -> int:
    inflight = [leg.qlen for leg in legs]
    t = DecisionTable(admit=(p < threshold)[:, None], score=p[:, None].astype(np.float32),
                      valid_from_ns=0, expiry_ns=1 << 62)
    leg = route(t, 0, 0, inflight)
    return leg if leg >= 0 else least_inflight(inflight)


class _PerIoPredictor(Policy):
    """A policy that runs its model once per read (counted in `calls`)."""

    def __init__(self, model):
        self.model = model

    def reset(self, nlegs, seed):
        super().reset(nlegs, seed)
        self.calls = 0

    def stats(self):
        return {"inference_calls": self.calls}


class Heimdall(_PerIoPredictor):
    name = "heimdall"

    def choose(self, now, nbytes, legs):
        x = np.zeros((len(legs), F.NUM_FEATURES), dtype=np.float32)
        for i, leg in enumerate(legs):
            q, pq, pl, pt = leg.state()
            x[i, F.COL_SIZE] = nbytes
            x[i, F.COL_QLEN] = q
            x[i, F.COLS_PREV_QLEN] = pq
            x[i, F.COLS_PREV_LAT] = pl
            x[i, F.COLS_PREV_TPUT] = pt
        self.calls += 1
        return _route_scores(self.model.p_slow(x), self.model.threshold, legs)


class LinnOS(_PerIoPredictor):
    name = "linnos"

    def choose(self, now, nbytes, legs):
        q = np.array([leg.qlen for leg in legs])
        pq = np.array([list(leg.prev_qlen) for leg in legs], dtype=np.float64)
        pl = np.array([list(leg.prev_lat) for leg in legs], dtype=np.float64)
        self.calls += 1
        return _route_scores(self.model.p_slow(linnos_rows(q, pq, pl)), self.model.threshold, legs)


class Table(Policy):
    """The agent's decision table, recomputed every tick_ns."""
    name = "table"

    def __init__(self, model, tick_ns: int = 1_000_000, staleness_ns: int = 0,
                 ttl_ns: int | None = None):
        if tick_ns <= 0:
            raise ValueError("tick must be positive")
        self.tick_ns = int(tick_ns)
        self.staleness_ns = int(staleness_ns)
        self.ttl_ns = int(ttl_ns if ttl_ns is not None else 10 * tick_ns)
        self.maker = DecisionMaker(model, ttl_ns=self.ttl_ns, staleness_ns=self.staleness_ns)

    def reset(self, nlegs, seed):
        super().reset(nlegs, seed)
        # tables computed but possibly not yet visible (staleness), oldest first
        self.tables: deque[DecisionTable] = deque()
        self.defaults = 0      # reads left to the module default (all avoid, or no table)
        self.no_table = 0      # of those, reads with no valid table in force
        self.maker.calls = 0

    def tick_times(self, read_times):
        # Only the latest tick whose table is visible at a read matters (each
        # tick's table replaces the previous one), so simulate just those.
        t = (np.asarray(read_times, dtype=np.int64) - self.staleness_ns) // self.tick_ns * self.tick_ns
        return np.unique(t)

    def on_tick(self, t, legs):
        states = [LegState(*leg.state()) for leg in legs]
        self.tables.append(self.maker.decide(t, states))

    def visible(self, now: int) -> DecisionTable | None:
        """The table in force at `now`: the latest one published by then
        (each publication replaces the previous table)."""
        q = self.tables
        while len(q) > 1 and q[1].valid_from_ns <= now:
            q.popleft()
        return q[0] if q else None

    def choose(self, now, nbytes, legs):
        inflight = [leg.qlen for leg in legs]
        table = self.visible(now)
        if table is None or not table.valid_from_ns <= now < table.expiry_ns:
            self.no_table += 1
        leg = route(table, now, size_bucket(nbytes), inflight)
        if leg < 0:
            self.defaults += 1
            leg = least_inflight(inflight)
        return leg

    def stats(self):
        return {"tick_us": self.tick_ns / 1000, "staleness_us": self.staleness_ns / 1000,
                "ttl_us": self.ttl_ns / 1000, "inference_calls": self.maker.calls,
                "default_routed_reads": self.defaults, "no_valid_table_reads": self.no_table}
