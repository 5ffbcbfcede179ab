"""The replay simulator: a trace's arrivals through N replica legs.

The trace's arrivals (issue times, sizes, reads and writes) drive N legs of
the device model (devmodel.py), or the per-leg latencies of a trace recorded
on replica legs. Reads go to the leg a policy chooses; writes go to every leg
(mirroring) and feed each leg's garbage-collection busy periods; flush,
discard and other operations are ignored. Policies decide per read, from
the legs' live state (policies.py; a learned policy that models the agent
keeps its own clock: it sees time through the reads). A hedging policy
also gives each read a deadline (0 = none): a read still pending then gets
one duplicate on the other leg the policy picks, the first completion
wins, and with a budget the target's token bucket (core/hedging.py) may
refuse it. Writes are never hedged. `iobridge replay`
(replay.py) builds the policies and reports; training (train.py) records
per-I/O features through it.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

import numpy as np

from ..core import hedging as H
from ..core.errors import IobridgeError
from . import policies as P
from .devmodel import DeviceParams, Leg, RecordedLeg
from .progress import Progress
from .trace import OP_READ, OP_WRITE, Trace, _normalise_batch


@dataclass
class SimResult:
    read_lat_ns: np.ndarray
    read_issue_ns: np.ndarray
    sent: list[int]
    extra_ios: int
    seconds: float
    records: Trace | None = None
    policy_stats: dict = field(default_factory=dict)
    hedging: dict | None = None     # hedging policies: hedge_stats()


def hedge_stats(budget_fraction: float | None, reads: int, due: int, extra: int,
                refused: int, won: int, futile: int = 0) -> dict:
    """What a hedging policy's report says about its extra reads. futile:
    deadlines passed with no other leg whose recent read was faster than the
    wait (Policy.skips_futile_hedges), so no hedge and no token."""
    return {"budget": budget_fraction, "bucket_hedges": None if budget_fraction is None
            else H.BUCKET_HEDGES, "deadlines_passed": due, "extra_reads": extra,
            "extra_per_read": round(extra / reads, 6) if reads else 0.0,
            "refused_by_budget": refused, "won": won, "futile": futile}


def recorded_timelines(trace: Trace, nlegs: int) -> list[dict]:
    """Per-leg (issue_ns, latency_ns) timelines for reads and writes of a
    trace recorded on replica legs; an error if a leg or kind is missing."""
    if not trace.has_latency:
        raise IobridgeError("--latency trace: the trace has I/Os without measured latency")
    out = []
    for li in range(nlegs):
        tl = {}
        for is_write, opc in ((False, OP_READ), (True, OP_WRITE)):
            m = (trace["leg"] == li) & (trace["op"] == opc)
            if not m.any():
                if is_write:        # a read-only trace: writes never happen
                    tl[True] = (np.zeros(1, np.int64), np.zeros(1, np.int64))
                    continue
                raise IobridgeError(f"--latency trace: the trace has no recorded reads on "
                                    f"leg {li}", "use --legs up to the number of recorded "
                                    "legs, or --latency model")
            idx = np.flatnonzero(m)
            idx = idx[np.argsort(trace["issue_ns"][idx], kind="stable")]
            tl[is_write] = (trace["issue_ns"][idx].astype(np.int64),
                            trace["latency_ns"][idx].astype(np.int64))
        out.append(tl)
    return out


def arrivals_of_recorded(trace: Trace) -> Trace:
    """Arrivals of a trace recorded under the iobridge target: every read
    once, and each mirrored write once (its copy on the lowest leg)."""
    legs = trace["leg"][trace["leg"] >= 0]
    if len(legs) == 0:
        return trace
    first = int(legs.min())
    keep = (trace["op"] != OP_WRITE) | (trace["leg"] == first) | (trace["leg"] < 0)
    return trace.take(np.flatnonzero(keep))


def simulate(trace: Trace, nlegs: int, policy: P.Policy, params: DeviceParams,
             seed: int = 0, record: bool = False, progress: Progress | None = None,
             label: str = "", timelines: list[dict] | None = None,
             hedge_budget: float | None = None) -> SimResult:
    """Replay `trace` (sorted by issue time) against `nlegs` fresh legs:
    modelled ones, or with `timelines` legs replaying recorded latencies.
    hedge_budget: the target's budget fraction for a hedging policy's extra
    reads (None: unlimited)."""
    t0 = time.perf_counter()
    issue = trace["issue_ns"].astype(np.int64)
    op = trace["op"]
    nbytes = trace["bytes"].astype(np.int64)
    n = len(issue)
    start = int(issue[0]) if n else 0
    if timelines is not None:
        legs = [RecordedLeg(params, seed * 1009 + li, start, timelines[li])
                for li in range(nlegs)]
    else:
        legs = [Leg(params, seed * 1009 + li, start) for li in range(nlegs)]
    policy.reset(nlegs, seed)
    is_read = op == OP_READ
    nreads = int(is_read.sum())
    read_lat = np.zeros(nreads, dtype=np.int64)
    read_issue = issue[is_read].copy()
    sent = [0] * nlegs
    extra = 0
    hedges = policy.hedges and nlegs > 1
    budget = H.HedgeBudget(hedge_budget) if hedges and hedge_budget is not None else None
    due = won = futile = 0
    skip_futile = policy.skips_futile_hedges
    hq: list = []
    rec = {"issue_ns": [], "complete_ns": [], "qlen": [], "leg": [], "bytes": [], "op": []} if record else None
    rid = 0
    issue_l = issue.tolist(); op_l = op.tolist(); nb_l = nbytes.tolist()

    def log(t, done, q, leg, nb, o):
        rec["issue_ns"].append(t); rec["complete_ns"].append(done); rec["qlen"].append(q)
        rec["leg"].append(leg); rec["bytes"].append(nb); rec["op"].append(o)

    def run_hedge(item):
        nonlocal extra, won, futile
        h, r, pl, pdone, arr, nb = item
        for leg in legs:
            leg.advance(h)
        # the leg first, then the token (the target's order)
        excl = frozenset(li for li, leg in enumerate(legs)
                         if leg.last_lat_ns >= h - arr) if skip_futile else frozenset()
        d = policy.hedge_leg(h, nb, legs, pl, excl)
        if d < 0:
            futile += 1
            return          # no leg worth it: the read waits for its own leg
        if budget is not None and not budget.try_hedge():
            return          # refused: the read waits for its own leg
        ddone, q = legs[d].submit(h, nb, False)
        if rec is not None:
            log(h, ddone, q, d, nb, OP_READ)
        sent[d] += 1
        extra += 1
        won += ddone < pdone
        read_lat[r] = min(pdone, ddone) - arr

    every = max(n // 200, 1)
    for i in range(n):
        t = issue_l[i]
        while hq and hq[0][0] <= t:
            run_hedge(heapq.heappop(hq))
        for leg in legs:
            leg.advance(t)
        o = op_l[i]
        nb = nb_l[i]
        if o == OP_READ:
            li = policy.choose(t, nb, legs)
            # the deadline of the state the read was routed in
            dl = policy.hedge_deadline_ns(t, nb, legs, li) if hedges else 0
            if budget is not None:
                budget.on_read()
            done, q = legs[li].submit(t, nb, False)
            if rec is not None:
                log(t, done, q, li, nb, o)
            sent[li] += 1
            read_lat[rid] = done - t
            if dl > 0 and done - t > dl:
                due += 1
                heapq.heappush(hq, (t + dl, rid, li, done, t, nb))
            rid += 1
        elif o == OP_WRITE:
            for li, leg in enumerate(legs):
                done, q = leg.submit(t, nb, True)
                if rec is not None:
                    log(t, done, q, li, nb, o)
        if progress is not None and i % every == 0:
            progress.update(label, i, n)
    while hq:
        run_hedge(heapq.heappop(hq))
    if progress is not None:
        progress.update(label, n, n)
    records = None
    if rec is not None:
        cols = _normalise_batch(rec)
        cols["latency_ns"] = cols["complete_ns"] - cols["issue_ns"]
        cols["device"] = np.array([f"leg{x}" for x in cols["leg"]], dtype=object)
        records = Trace(cols, {"source": "replay", "legs": nlegs, "policy": policy.name,
                               "device_model": params.as_dict(), "seed": seed}).sorted()
    hedging = None
    if policy.hedges:
        hedging = hedge_stats(hedge_budget, nreads, due, extra,
                              budget.refused if budget is not None else 0, won, futile)
    return SimResult(read_lat, read_issue, sent, extra, time.perf_counter() - t0, records,
                     policy.stats(), hedging)


def latency_stats(lat_ns: np.ndarray) -> dict:
    us = np.asarray(lat_ns, dtype=np.float64) / 1000.0
    if len(us) == 0:
        return {"reads": 0}
    return {"reads": int(len(us)), "mean_us": float(us.mean()),
            "p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99)),
            "p999_us": float(np.percentile(us, 99.9)), "max_us": float(us.max())}
