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
  hedged-learned  least in-flight, with learned hedge deadlines per leg and
              key (core/hedging.py: a quantile of the leg's recent fast
              reads of the size bucket, at a level set by the model's
              P(slow) for the key), published with the keyed table
  table-hedged  the table's routing and the same learned deadlines; a hedge
              goes to the leg the table's rule picks among the others
  linnos      LinnOS-style per-I/O prediction: 31 digitised inputs (current
              queue length, 4 previous queue lengths, 4 previous absolute
              latencies in us: LinnOS's own encoding), 31->256->2 MLP,
              per-I/O latency labels; one inference per read
  heimdall    Heimdall-style per-I/O prediction: the 12 schema-v2 features
              of this exact read on each leg (latency and throughput history
              relative to the leg's baseline), one inference per read
  table       the feature-keyed decision table (core/decision.py): the
              model runs once over every key of every leg (TableMaker.build)
              when a leg's baseline moved by more than 10% (or at the first
              baselines), at most once per recompute_ns; every read is
              routed by decision.route() from the legs' live in-flight
              count and newest completion, as the kernel does

The learned policies share one routing rule, decision.route()'s (the
kernel program's): per leg the expected completion time

    cost = max((inflight + 1) * max(service_ns, key latency), newest latency)
           + penalty_ns   (abi.leg_cost)

lowest cost wins (exact ties at random, seeded), and an idle leg with no
completion for probe_after_ns gets the read as a probe; no usable state
(no baseline yet, no table in force) -> the module default, least in
flight. They differ only in where penalty_ns comes from:

  table       penalty_ns[key] of the keyed table: the latency's risk
              (decision.latency_risk: P(slow) of the key's representative
              state (size bucket, in-flight bucket, latency bucket) over
              P(slow) with a fast latency) x (what a slow read costs -
              service), as decision.py
  heimdall,   the same formula with this read's own P(slow) on the leg and
  linnos      its actual newest latency instead of the bucket's
              representative (per read, a one-key table handed to the same
              route(); see _per_io_penalty_ns). They price P(slow) in
              full (one inference per read, not two), so "heimdall vs
              table" also includes the table's latency-risk correction.

so "heimdall vs table" isolates what bucketing the state costs (or saves),
and "linnos vs heimdall" what the feature set does. The decision threshold
of a model plays no part in routing (only P(slow) does).

Each learned policy keeps per leg a features.BaselineTracker (the leg's
baseline: service estimate, throughput scale, slow-read cost) fed from the
completions it sees. Like the agent, which samples each leg's newest
completions from the kernel, it adds at each read (its "check") at most
HISTORY (3) newest completions per leg since the previous check, from the
leg's prev_lat/prev_tput (reads and writes alike: the kernel's history is
the leg's). As the agent does every tick, the baselines are re-read from
the trackers (decision.LegBaseline.of) at most once per tick_ns (the
agent's tick, default 250 ms), for the legs with new samples; the table is
rebuilt only then. A leg whose tracker is not ready yet borrows the
baseline of the ready leg with the lowest latency (replicas are usually the
same kind of device); without that, a leg that gets no reads (low load,
least in flight sends ties to leg 0; a read-only trace) would never get a
baseline and the learned policies would never route to it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

import numpy as np

from ..core import abi
from ..core import decision as D
from ..core import features as F
from ..core import hedging as H
from ..core.decision import (KeyedTable, LegBaseline, TableMaker, least_inflight, route,
                             target_baselines)

POLICY_NAMES = ("primary", "random", "roundrobin", "leastinflight", "hedged",
                "linnos", "heimdall", "table", "hedged-learned", "table-hedged")
LEARNED = ("linnos", "heimdall", "table", "hedged-learned", "table-hedged")
# The policies that take the heimdall model (the keyed table's P(slow)).
TABLE_MODEL = ("heimdall", "table", "hedged-learned", "table-hedged")
HEDGING = ("hedged", "hedged-learned", "table-hedged")

LINNOS_HISTORY = 4
LINNOS_QLEN_DIGITS = 3
LINNOS_LAT_DIGITS = 4
LINNOS_WIDTH = LINNOS_QLEN_DIGITS * (1 + LINNOS_HISTORY) + LINNOS_LAT_DIGITS * LINNOS_HISTORY

# The agent's defaults (core/decision.py, as daemon/config.py uses them): an
# avoided leg idle this long gets one read; the leg baselines are sampled
# once per tick; a table is recomputed at most this often.
PROBE_AFTER_NS = int(D.AGENT_PROBE_AFTER_MS * 1e6)
TICK_NS = int(D.AGENT_TICK_MS * 1e6)
RECOMPUTE_NS = int(D.AGENT_RECOMPUTE_MS * 1e6)
BASELINE_MOVE_REL = D.BASELINE_MOVE   # rebuild the table when a leg's baseline moved this much
SAMPLES_PER_CHECK = F.HISTORY  # newest completions per leg the agent reads per check
NEVER = 1 << 62


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
    hedges = False          # gives reads hedge deadlines (hedge_deadline_ns)

    def reset(self, nlegs: int, seed: int) -> None:
        self.nlegs = nlegs

    def choose(self, now: int, nbytes: int, legs) -> int:
        raise NotImplementedError

    def hedge_deadline_ns(self, now: int, nbytes: int, legs, leg: int) -> int:
        """For a read just routed to `leg` (legs as at routing): how long
        after its issue it gets a duplicate if still pending; 0 = never."""
        return 0

    # Learned deadlines hedge only to a leg whose recent read took less than
    # the read has waited (the target's iob_hedge_futile(); simulate()
    # applies it); a fixed deadline hedges plainly, as the target's own
    # hedge_us option.
    skips_futile_hedges = False

    def hedge_leg(self, now: int, nbytes: int, legs, primary: int,
                  exclude: frozenset = frozenset()) -> int:
        """The leg a hedge of a read pending on `primary` goes to: the least
        in-flight other leg not in `exclude`, lowest index on ties (the
        module default's rule, which the target uses for every hedge); -1
        if there is none."""
        return min((li for li in range(len(legs)) if li != primary and li not in exclude),
                   key=lambda li: (legs[li].qlen, li), default=-1)

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
    hedges = True

    def __init__(self, deadline_ns: int, percentile: float):
        self.hedge_ns = int(deadline_ns)
        self.percentile = percentile

    def hedge_deadline_ns(self, now, nbytes, legs, leg):
        return self.hedge_ns

    def stats(self):
        return {"deadline_us": self.hedge_ns / 1000.0, "percentile": self.percentile}


class LegBaselines:
    """Per-leg BaselineTrackers fed as the agent feeds them (module doc)."""

    def __init__(self, nlegs: int, tick_ns: int = TICK_NS):
        if tick_ns <= 0:
            raise ValueError("tick_ns must be positive")
        self.tick_ns = int(tick_ns)
        self.trackers = [F.BaselineTracker() for _ in range(nlegs)]
        self.seen = [0] * nlegs            # leg.completed at the previous check
        self._own: list[LegBaseline | None] = [None] * nlegs
        self._read_at = [0] * nlegs        # tracker.n when _own was read
        self._last_read_ns: int | None = None
        self.samples = 0                   # completions added, all legs
        self.changed = False               # a leg's baseline was re-read since cleared

    def observe(self, legs, now: int) -> None:
        """Add each leg's newest completions since the previous call (at most
        SAMPLES_PER_CHECK per leg, oldest first); re-read the baselines of
        legs with new samples if a tick passed since the last re-read."""
        for i, leg in enumerate(legs):
            new = leg.completed - self.seen[i]
            if new <= 0:
                continue
            self.seen[i] = leg.completed
            k = min(new, SAMPLES_PER_CHECK)
            newest = range(k - 1, -1, -1)
            self.trackers[i].add([leg.prev_lat[j] for j in newest],
                                 [leg.prev_tput[j] for j in newest],
                                 [leg.prev_lat[j] / (leg.prev_lat_qlen[j] + 1) for j in newest])
            self.samples += k
        if self._last_read_ns is not None and now - self._last_read_ns < self.tick_ns:
            return
        self._last_read_ns = now
        for i, tr in enumerate(self.trackers):
            if tr.ready and tr.n != self._read_at[i]:
                self._own[i] = LegBaseline.of(tr)
                self._read_at[i] = tr.n
                self.changed = True

    def own(self) -> list[LegBaseline | None]:
        """Each leg's own baseline (None: too few samples yet)."""
        return list(self._own)

    def current(self) -> tuple[list[LegBaseline | None], list[bool]]:
        """(baseline per leg, borrowed per leg): a leg without its own
        baseline borrows the lowest-latency ready leg's; all None while no
        leg is ready."""
        return target_baselines(self._own)


class _OneKeyTable(KeyedTable):
    """A table with one key per leg (the per-I/O policies' penalty for THIS
    read), routed by the same decision.route()."""

    def key_of(self, leg, nbytes, inflight, last_lat_ns, last_lat_qlen=0):
        return 0


def _per_io_penalty_ns(p_slow: float, base: LegBaseline, last_lat_ns: int) -> int:
    """decision.penalties_ns for one read's own state: P(slow) x (what a slow
    read costs - service), the slow cost being at least the leg's newest
    latency (the keyed table uses its latency bucket's representative)."""
    slow_us = max(last_lat_ns / 1000.0, base.slow_lat_us)
    extra_ns = max(slow_us - base.service_us, 0.0) * 1000.0
    return int(min(max(round(float(p_slow) * extra_ns), 0), abi.PENALTY_MAX_NS))


class _Learned(Policy):
    """Shared by the learned policies: baselines, the cost rule, counters."""

    def __init__(self, model, probe_after_ns: int = PROBE_AFTER_NS, tick_ns: int = TICK_NS):
        if probe_after_ns < 0:
            raise ValueError("probe_after_ns must be >= 0 (0 = no probing)")
        if tick_ns <= 0:
            raise ValueError("tick_ns must be positive")
        self.model = model
        self.probe_after_ns = int(probe_after_ns)
        self.tick_ns = int(tick_ns)

    def reset(self, nlegs, seed):
        super().reset(nlegs, seed)
        self.rng = np.random.default_rng(seed)
        self.base = LegBaselines(nlegs, self.tick_ns)
        self.calls = 0          # inferences (per-I/O: one per read; table: rebuilds)
        self.reads = 0
        self.defaults = 0       # reads left to the module default
        self.probes = 0

    def _route(self, table, now, nbytes, legs) -> int:
        self.reads += 1
        inflight = [leg.qlen for leg in legs]
        leg, probe = route(table, now, nbytes, inflight, [lg.last_lat_ns for lg in legs],
                           [lg.last_complete_ns for lg in legs], rng=self.rng,
                           last_lat_qlen=[lg.last_lat_qlen for lg in legs])
        if leg < 0:
            self.defaults += 1
            return least_inflight(inflight)
        self.probes += probe
        return leg

    def stats(self):
        n = max(self.reads, 1)
        return {"inference_calls": self.calls, "default_routed_reads": self.defaults,
                "probes": self.probes, "probe_after_us": self.probe_after_ns / 1000,
                "tick_us": self.tick_ns / 1000,
                # reads routed by the policy's rule, not the module default
                "routed_fraction": round((self.reads - self.defaults) / n, 6),
                "baseline_samples": self.base.samples}


class _PerIoPredictor(_Learned):
    """A policy that runs its model once per read over every leg."""

    def rows(self, nbytes, legs, bases) -> np.ndarray:
        raise NotImplementedError

    def choose(self, now, nbytes, legs):
        self.base.observe(legs, now)
        bases, _ = self.base.current()
        table = None
        if bases[0] is not None:       # all legs have one (own or borrowed)
            self.calls += 1
            p = np.asarray(self.model.p_slow(self.rows(nbytes, legs, bases)), dtype=np.float64)
            n = len(legs)
            pen = np.array([[_per_io_penalty_ns(p[i], bases[i], legs[i].last_lat_ns)]
                            for i in range(n)], dtype=np.int64)
            service = np.array([int(round(b.service_us * 1000)) for b in bases], dtype=np.int64)
            table = _OneKeyTable(np.ones(n, dtype=bool), p[:, None].astype(np.float32), pen,
                                 np.zeros((n, abi.NUM_LAT_BUCKETS - 1), dtype=np.int64),
                                 service, self.probe_after_ns, now, now, now + 1, bases)
        return self._route(table, now, nbytes, legs)


class Heimdall(_PerIoPredictor):
    """Schema-v2 rows: history relative to each leg's baseline (module doc)."""
    name = "heimdall"

    def rows(self, nbytes, legs, bases):
        x = np.zeros((len(legs), F.NUM_FEATURES), dtype=np.float32)
        for i, leg in enumerate(legs):
            q, pq, pl, pt = leg.state()
            x[i, F.COL_SIZE] = nbytes
            x[i, F.COL_QLEN] = q
            x[i, F.COLS_PREV_QLEN] = pq
            x[i, F.COLS_PREV_LAT] = F.relative(pl, bases[i].lat_us)
            x[i, F.COLS_PREV_TPUT] = F.relative(pt, bases[i].tput)
        return x


class LinnOS(_PerIoPredictor):
    """LinnOS's own absolute encoding; the baselines only give the cost rule
    its service estimate and slow-read cost."""
    name = "linnos"

    def rows(self, nbytes, legs, bases):
        q = np.array([leg.qlen for leg in legs])
        pq = np.array([list(leg.prev_qlen) for leg in legs], dtype=np.float64)
        pl = np.array([list(leg.prev_lat) for leg in legs], dtype=np.float64)
        return linnos_rows(q, pq, pl)


class Table(_Learned):
    """The feature-keyed decision table, built as the agent builds it.

    At each read: feed the baselines; when they were re-read (at most once
    per tick_ns, the agent's tick), rebuild the table with TableMaker.build
    if every leg has a baseline (own or borrowed) and one of them moved by
    more than move_rel since the newest table was built (or there is no
    table yet), at most once per recompute_ns. A table built at t is visible from t + staleness_ns (the
    time the agent takes to recompute and publish); until then the previous
    one stays in force. ttl_ns=None: the live agent keeps the table in force
    (it extends the expiry every tick); ttl_ns given: a table expires ttl_ns
    after it became visible and is not kept alive (an agent that publishes
    only when it rebuilds: reads between expiry and the next build go to
    the module default)."""
    name = "table"

    def __init__(self, model, recompute_ns: int = RECOMPUTE_NS, staleness_ns: int = 0,
                 ttl_ns: int | None = None, probe_after_ns: int = PROBE_AFTER_NS,
                 move_rel: float = BASELINE_MOVE_REL, tick_ns: int = TICK_NS):
        super().__init__(model, probe_after_ns, tick_ns)
        if recompute_ns <= 0:
            raise ValueError("recompute_ns must be positive")
        if ttl_ns is not None and ttl_ns <= 0:
            raise ValueError("ttl_ns must be positive")
        self.recompute_ns = int(recompute_ns)
        self.staleness_ns = int(staleness_ns)
        self.ttl_ns = None if ttl_ns is None else int(ttl_ns)
        self.move_rel = float(move_rel)
        self.maker = TableMaker(model, ttl_ns=self.ttl_ns or NEVER,
                                staleness_ns=self.staleness_ns, probe_after_ns=self.probe_after_ns)

    def reset(self, nlegs, seed):
        super().reset(nlegs, seed)
        # tables built but possibly not yet visible (staleness), oldest first
        self.tables: deque[KeyedTable] = deque()
        self.built: list[LegBaseline | None] | None = None   # baselines of the newest build
        self.last_build = None
        self.borrowed = [False] * nlegs
        self.no_table = 0       # default-routed reads with no table in force
        self.rebuilds = 0       # tables built (each runs the model only for new rows)
        self.maker.calls = 0

    def visible(self, now: int) -> KeyedTable | None:
        """The table in force at `now`: the newest one visible by then (each
        publication replaces the previous table)."""
        q = self.tables
        while len(q) > 1 and q[1].valid_from_ns <= now:
            q.popleft()
        return q[0] if q and q[0].valid_from_ns <= now else None

    def _maybe_rebuild(self, now: int) -> None:
        if self.last_build is not None and now - self.last_build < self.recompute_ns:
            return
        if self.built is not None and not self.base.changed:
            return
        bases, borrowed = self.base.current()
        self.base.changed = False
        if bases[0] is None:
            return
        if self.built is not None and borrowed == self.borrowed and not any(
                b.moved(o, self.move_rel) for b, o in zip(bases, self.built)):
            return
        self.tables.append(self.maker.build(now, bases))
        self.rebuilds += 1
        self.built, self.borrowed, self.last_build = bases, borrowed, now

    def choose(self, now, nbytes, legs):
        self.base.observe(legs, now)
        self._maybe_rebuild(now)
        table = self.visible(now)
        if table is None or not now < table.expiry_ns:
            self.no_table += 1
        return self._route(table, now, nbytes, legs)

    def key_summary(self, table: KeyedTable | None = None) -> dict | None:
        """P(slow) and penalty per latency bucket, for size bucket 0 (<= 4K)
        and in-flight buckets 0 and 1, of the newest table (compact)."""
        table = table or (self.tables[-1] if self.tables else None)
        if table is None:
            return None
        legs = []
        for i, b in enumerate(table.baselines):
            if b is None:
                legs.append(None)
                continue
            per = {}
            for fb in (0, 1):
                ks = [abi.key_index(0, fb, lb) for lb in range(abi.NUM_LAT_BUCKETS)]
                per[f"inflight_bucket_{fb}"] = {
                    "p_slow": [round(float(table.p_slow[i, k]), 4) for k in ks],
                    "penalty_us": [round(int(table.penalty_ns[i, k]) / 1000, 1) for k in ks]}
            legs.append({"baseline": {"lat_us": round(b.lat_us, 2), "tput": round(b.tput, 2),
                                      "slow_lat_us": round(b.slow_lat_us, 1),
                                      "service_us": round(b.service_us, 2)},
                         "borrowed_baseline": bool(self.borrowed[i]),
                         "service_us": int(table.service_ns[i]) / 1000,
                         "lat_edges_us": [round(int(e) / 1000, 1) for e in table.lat_edges_ns[i]],
                         **per})
        return {"computed_at_s": table.computed_ns / 1e9, "size_bucket": 0,
                "lat_bucket_rel_edges": list(D.REL_LAT_EDGES),
                "lat_bucket_rel_reps": list(D.LAT_REP_REL), "legs": legs}

    def stats(self):
        self.calls = self.maker.calls
        return {**super().stats(), "rebuilds": self.rebuilds,
                "recompute_us": self.recompute_ns / 1000,
                "staleness_us": self.staleness_ns / 1000,
                "ttl_us": None if self.ttl_ns is None else self.ttl_ns / 1000,
                "no_valid_table_reads": self.no_table,
                "keys": self.key_summary()}


class TableHedged(Table):
    """The keyed table's routing, and hedge deadlines per leg and key
    published with it (core/hedging.py), as the agent is to publish them.

    Per read, the policy samples each leg's newest read completions (at most
    SAMPLES_PER_CHECK per leg, as it samples the baselines). The deadlines
    are recomputed from those samples and the newest table's P(slow) with
    every table build and otherwise at most once per recompute_ns (when
    there are new samples); each is published as a copy of the newest
    table, in force staleness_ns later. A read's deadline is that of the
    key it was routed with in the table in force; no table in force, no
    hedge."""
    name = "table-hedged"
    hedges = True
    skips_futile_hedges = True

    def __init__(self, model, *args, worth: float = H.HEDGE_WORTH, **kw):
        super().__init__(model, *args, **kw)
        H.hedge_level(0.0, worth)       # checks worth
        self.worth = float(worth)

    def reset(self, nlegs, seed):
        super().reset(nlegs, seed)
        self.samples = [H.ReadSamples() for _ in range(nlegs)]
        self.reads_seen = [0] * nlegs
        self.new_samples = False
        self.last_deadlines: int | None = None
        self.deadline_updates = 0

    def _observe_reads(self, legs) -> None:
        for i, leg in enumerate(legs):
            new = leg.reads_completed - self.reads_seen[i]
            if new <= 0:
                continue
            self.reads_seen[i] = leg.reads_completed
            for lat_ns, nb in reversed(list(leg.recent_reads)[:min(new, SAMPLES_PER_CHECK)]):
                self.samples[i].add(lat_ns / 1000.0, nb)
            self.new_samples = True

    def _deadlines(self, table: KeyedTable) -> np.ndarray:
        return H.target_deadlines(self.samples, table.p_slow, table.valid, self.worth)[0]

    def _maybe_rebuild(self, now):
        built = self.rebuilds
        super()._maybe_rebuild(now)
        if not self.tables:
            return
        fresh = self.rebuilds != built         # a table built now, not visible yet
        if not fresh and (not self.new_samples or now - self.last_deadlines < self.recompute_ns):
            return
        newest = self.tables[-1]
        dl = self._deadlines(newest)
        self.new_samples, self.last_deadlines = False, now
        self.deadline_updates += 1
        if fresh:
            self.tables[-1] = replace(newest, hedge_us=dl)
        else:
            vis = now + self.staleness_ns
            self.tables.append(replace(newest, hedge_us=dl, computed_ns=now, valid_from_ns=vis,
                                       expiry_ns=vis + (self.ttl_ns or NEVER)))

    def choose(self, now, nbytes, legs):
        self._observe_reads(legs)
        return super().choose(now, nbytes, legs)

    def hedge_deadline_ns(self, now, nbytes, legs, leg):
        table = self.visible(now)
        if table is None or not now < table.expiry_ns:
            return 0
        lg = legs[leg]
        return table.hedge_deadline_ns(leg, nbytes, lg.qlen, lg.last_lat_ns, lg.last_lat_qlen)

    def deadline_summary(self) -> dict | None:
        """The newest published deadlines (us), compact: per leg, for each
        size bucket the deadline of an idle leg with a fast newest read, and
        the range over all keys."""
        table = next((t for t in reversed(self.tables) if t.hedge_us is not None), None)
        if table is None:
            return None
        idle_fast = [abi.key_index(sb, 0, 0) for sb in range(abi.NUM_SIZE_BUCKETS)]
        legs = []
        for i in range(len(table)):
            d = table.hedge_us[i]
            legs.append(None if not table.valid[i] else {
                "idle_fast_by_size_us": [int(d[k]) for k in idle_fast],
                "min_us": int(d[d > 0].min()) if (d > 0).any() else 0,
                "max_us": int(d.max()), "never_keys": int((d == 0).sum()),
                "read_samples": self.samples[i].n})
        return {"computed_at_s": table.computed_ns / 1e9, "legs": legs}

    def stats(self):
        return {**super().stats(), "hedge_worth": self.worth,
                "deadline_updates": self.deadline_updates, "deadlines": self.deadline_summary()}


class HedgedLearned(TableHedged):
    """Least in flight (the module default) routes; the keyed table is kept
    only for its learned hedge deadlines, and a hedge goes to the least
    in-flight other leg."""
    name = "hedged-learned"

    def choose(self, now, nbytes, legs):
        self._observe_reads(legs)
        self.base.observe(legs, now)
        self._maybe_rebuild(now)
        self.reads += 1
        return least_inflight([leg.qlen for leg in legs])

    def stats(self):
        st = super().stats()
        for k in ("default_routed_reads", "probes", "probe_after_us", "routed_fraction",
                  "no_valid_table_reads"):
            st.pop(k, None)
        return st
