"""Host tests: the target's hedge budget and the learned hedge deadlines
(core/hedging.py), and hedging in the replay simulator (issue 12, item 3)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iobridge import cli
from iobridge.core import abi
from iobridge.core import hedging as H
from iobridge.core.decision import KEY_SIZE_BUCKET
from iobridge.core.errors import UsageError
from iobridge.offline import policies as P
from iobridge.offline.devmodel import DeviceParams
from iobridge.offline.replay import format_table, run_replay
from iobridge.offline.simulate import simulate
from iobridge.offline.trace import OP_READ, OP_WRITE, Trace, _normalise_batch, write_trace


# ------------------------------------------------------------------ budget

@settings(max_examples=300, deadline=None)
@given(fraction=st.floats(0.0, 1.0), capacity=st.integers(1, 32),
       events=st.lists(st.booleans(), max_size=1500))
def test_the_budget_never_lets_more_hedges_through_than_it_earned(fraction, capacity, events):
    """True = a read, False = a hedge falling due. Over the whole run and
    over every stretch of it, hedges <= fraction x reads + capacity (and,
    the bucket starting empty, <= fraction x reads since the start)."""
    b = H.HedgeBudget(fraction, capacity)
    reads, spent = [0], [0]          # prefix counts after each event
    for is_read in events:
        if is_read:
            b.on_read()
        else:
            b.try_hedge()
        reads.append(b.reads)
        spent.append(b.spent)
    assert b.spent + b.refused == events.count(False)
    assert b.spent <= fraction * b.reads + 1e-9
    r, s = np.array(reads), np.array(spent)
    # every window (i, j]: hedges in it <= fraction x reads in it + capacity
    ds = s[None, :] - s[:, None]
    dr = r[None, :] - r[:, None]
    later = np.triu(np.ones_like(ds, dtype=bool))      # j >= i
    assert (ds <= fraction * dr + capacity + 1e-9)[later].all()


def test_budget_edges():
    b = H.HedgeBudget(0.0)
    for _ in range(10_000):
        b.on_read()
    assert not b.try_hedge() and b.refused == 1          # 0: never hedge
    b = H.HedgeBudget(1.0, capacity=2)
    for _ in range(10):
        b.on_read()
    assert [b.try_hedge() for _ in range(3)] == [True, True, False]   # capped at 2
    b = H.HedgeBudget(0.05)
    for _ in range(19):
        b.on_read()
    assert not b.try_hedge()          # 19 x 5% < one hedge
    b.on_read()
    assert b.try_hedge()              # the 20th read completes it
    for bad in (-0.1, 1.5, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="hedge budget must be a fraction from 0 to 1"):
            H.HedgeBudget(bad)
    with pytest.raises(ValueError, match="capacity"):
        H.HedgeBudget(0.05, 0)


# --------------------------------------------------------------- deadlines

def test_hedge_level_follows_p_slow():
    p = np.array([0.0, 1e-4, 0.01, 0.1, 0.3, 0.5, 0.9, 1.0])
    lv = H.hedge_level(p, 0.5)
    assert lv[0] == H.MAX_LEVEL and lv[-1] == 0.0
    assert (np.diff(lv) <= 0).all()               # likelier slow: hedge earlier
    assert lv[2] == pytest.approx(1 - 0.01 / 0.99)
    assert (H.hedge_level(p[:-2], 0.9) >= lv[:-2]).all()   # a higher bar waits longer
    with pytest.raises(ValueError, match="worth"):
        H.hedge_level(0.1, 1.0)


def test_deadlines_cover_the_largest_read_of_each_size_bucket():
    """8K reads with a few 16K ones among them (the device model: 80 us +
    size / 2 GB/s): the (4K, 16K] bucket's deadline is at least a fast 16K
    read's latency, so no fast read of the bucket is hedged."""
    rng = np.random.default_rng(1)
    nb = np.where(rng.random(1000) < 0.005, 16384, 8192)
    nb[:3] = [4096, 65536, 69632]
    lat = 80 + nb / 2000
    d = H.deadlines_us(lat, nb, np.zeros(abi.KEYS_PER_LEG))
    per_size = [int(d[KEY_SIZE_BUCKET == sb][0]) for sb in range(abi.NUM_SIZE_BUCKETS)]
    assert per_size == [int(np.ceil(80 + x / 2000)) for x in (4096, 16384, 65536, 69632)]
    assert (d >= 1).all()


def test_deadlines_come_earlier_for_keys_the_model_calls_slow():
    rng = np.random.default_rng(2)
    lat = 80 + rng.gamma(2.0, 5.0, 2000)            # jitter: a spread of fast latencies
    nb = np.full(2000, 4096)
    p = np.zeros(abi.KEYS_PER_LEG)
    p[abi.key_index(0, 1, 0)] = 0.2
    p[abi.key_index(0, 0, 7)] = 0.9
    d = H.deadlines_us(lat, nb, p)
    calm, risky, slow = (int(d[abi.key_index(0, *k)]) for k in ((0, 0), (1, 0), (0, 7)))
    assert slow < risky < calm
    assert calm >= np.quantile(lat, 0.99) and slow <= np.ceil(lat.min())


def test_too_few_samples_mean_never_hedge():
    d = H.deadlines_us(np.full(H.MIN_SAMPLES - 1, 80.0), np.full(H.MIN_SAMPLES - 1, 4096),
                       np.zeros(abi.KEYS_PER_LEG))
    assert d.dtype == np.uint32 and (d == 0).all()
    with pytest.raises(ValueError, match="p_slow"):
        H.deadlines_us(np.full(100, 80.0), np.full(100, 4096), np.zeros(3))


def test_read_samples_keep_fast_reads():
    s = H.ReadSamples(window=100)
    for i in range(120):
        s.add(100.0 if i % 10 else 5000.0, 4096)      # every 10th read slow
    lat, nb = s.fast()
    assert s.n == 120 and len(s.held()[0]) == 100
    assert len(lat) == 90 and (lat == 100.0).all() and (nb == 4096).all()


# ------------------------------------------------------ hedging in simulate

def _trace(n: int, gap_ns: int = 200_000, writes_every: int = 0, seed: int = 0) -> Trace:
    rng = np.random.default_rng(seed)
    op = np.zeros(n, dtype=np.int64)
    if writes_every:
        op[::writes_every] = OP_WRITE
    return Trace(_normalise_batch({"issue_ns": np.arange(n, dtype=np.int64) * gap_ns,
                                   "bytes": rng.choice([4096, 65536], n), "op": op}),
                 {"source": "synthetic"})


class _HedgeAll(P.LeastInflight):
    """Every read gets a deadline of `ns`; counts the calls."""
    name = "hedge-all"
    hedges = True

    def __init__(self, ns: int):
        self.ns, self.calls = ns, 0

    def hedge_deadline_ns(self, now, nbytes, legs, leg):
        self.calls += 1
        return self.ns


BUSY = DeviceParams(bg_per_s=100.0, gc_every_write_mb=1.0)      # slow often


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fraction=st.floats(0.0, 1.0), n=st.integers(1, 1500), seed=st.integers(0, 1000))
def test_simulated_extra_reads_stay_within_the_budget(fraction, n, seed):
    tr = _trace(n, gap_ns=20_000, writes_every=3, seed=seed)
    r = simulate(tr, 2, _HedgeAll(1_000), BUSY, seed=seed, hedge_budget=fraction)
    h = r.hedging
    reads = int((tr["op"] == OP_READ).sum())
    assert h["extra_reads"] == r.extra_ios <= fraction * reads + H.BUCKET_HEDGES
    assert h["extra_reads"] + h["refused_by_budget"] == h["deadlines_passed"] <= reads
    assert h["won"] <= h["extra_reads"] and h["budget"] == fraction
    assert sum(r.sent) == reads + r.extra_ios


def test_deadline_zero_never_hedges_and_writes_are_never_hedged():
    tr = _trace(3000, gap_ns=20_000, writes_every=2)
    reads = int((tr["op"] == OP_READ).sum())
    pol = _HedgeAll(0)
    r = simulate(tr, 2, pol, BUSY, hedge_budget=1.0)
    assert r.extra_ios == 0 and r.hedging["deadlines_passed"] == 0
    # a 1 ns deadline: asked once per read, never for a write; every read
    # still pending gets its duplicate (budget 100%: one token per read)
    pol = _HedgeAll(1)
    r = simulate(tr, 2, pol, BUSY, hedge_budget=None)
    assert pol.calls == reads
    assert r.extra_ios == r.hedging["deadlines_passed"] == reads
    assert sum(r.sent) == 2 * reads
    # writes only: nothing to hedge
    w = _trace(500, writes_every=1)
    r = simulate(w, 2, _HedgeAll(1), BUSY, hedge_budget=None)
    assert r.extra_ios == 0 and r.sent == [0, 0]


def test_a_table_with_zero_deadlines_hedges_nothing():
    from iobridge.core.decision import LegBaseline, TableMaker

    class M:
        threshold = 0.5

        def p_slow(self, rows):
            return np.full(len(rows), 0.01)

    base = LegBaseline(80.0, 50.0, 800.0)
    t = TableMaker(M()).build(0, [base, base])
    assert t.hedge_deadline_ns(0, 4096, 0, 80_000) == 0          # no deadlines published
    t.hedge_us = np.zeros((2, abi.KEYS_PER_LEG), dtype=np.uint32)
    assert t.hedge_deadline_ns(1, 4096, 3, 80_000) == 0
    t.hedge_us[1, abi.key_index(0, abi.inflight_bucket(3), 0)] = 90
    assert t.hedge_deadline_ns(1, 4096, 3, 80_000) == 90_000


class _FakeModel:
    """P(slow) 0.01 everywhere: deadlines from the latencies alone."""
    threshold = 0.5

    def p_slow(self, rows):
        return np.full(len(rows), 0.01, dtype=np.float32)


def test_learned_deadlines_use_only_what_the_policy_has_seen():
    """The deadlines given to the reads of a trace's first part do not change
    when more of the trace follows (they come from the past, not the
    future); and none is given before the first table is in force."""
    full = _trace(6000, gap_ns=500_000)
    first = full.take(np.arange(3000))

    def deadlines(tr, cls):
        got = []
        pol = cls(_FakeModel(), recompute_ns=50_000_000, staleness_ns=1_000_000,
                  tick_ns=10_000_000)
        orig = pol.hedge_deadline_ns

        def record(now, nbytes, legs, leg):
            got.append(orig(now, nbytes, legs, leg))
            return got[-1]
        pol.hedge_deadline_ns = record
        r = simulate(tr, 2, pol, DeviceParams(bg_per_s=20.0), seed=4, hedge_budget=0.05)
        return got, r, pol
    for cls in (P.HedgedLearned, P.TableHedged):
        a, _, _ = deadlines(first, cls)
        b, r, pol = deadlines(full, cls)
        assert a == b[:3000], cls.name
        assert b[0] == 0 and max(b) > 0, cls.name        # warm-up: no table, no hedge
        st_ = pol.stats()
        assert st_["deadline_updates"] > 10 and st_["deadlines"]["legs"][0]["min_us"] > 80
        assert r.hedging["budget"] == 0.05


def test_table_hedged_sends_a_hedge_to_another_healthy_leg():
    pol = P.TableHedged(_FakeModel(), recompute_ns=10_000_000, tick_ns=10_000_000)
    sent = []
    orig = pol.hedge_leg

    def record(now, nbytes, legs, primary, exclude):
        sent.append((primary, exclude, orig(now, nbytes, legs, primary, exclude)))
        return sent[-1][2]
    pol.hedge_leg = record
    r = simulate(_trace(4000, gap_ns=50_000), 3, pol, BUSY, hedge_budget=1.0)
    hedged = [(p, x, h) for p, x, h in sent if h >= 0]
    assert hedged and all(p != h and 0 <= h < 3 and h not in x for p, x, h in hedged)
    # a hedge is futile only when every other leg is excluded
    assert r.hedging["futile"] == sum(1 for p, x, h in sent if h < 0)
    assert all({0, 1, 2} - {p} <= x for p, x, h in sent if h < 0)


# ------------------------------------------------------------------ replay

def _steady(n=4000):
    issue = np.arange(n, dtype=np.int64) * 1_000_000
    return Trace(_normalise_batch({"issue_ns": issue, "bytes": np.full(n, 4096),
                                   "op": np.zeros(n)}), {"source": "steady"})


def test_learned_hedging_falls_back_to_the_module_default_without_a_model():
    rep = run_replay(_steady(), 2, ["hedged", "hedged-learned", "table-hedged"], max_epochs=2,
                     params=DeviceParams(bg_per_s=0.0, gc_every_write_mb=1e18))
    assert list(rep["fallbacks"]) == ["hedged-learned", "table-hedged"]
    for name in ("hedged-learned", "table-hedged"):
        s = rep["policies"][name]
        assert s["fallback"].startswith("its model (the heimdall one) is not trained: the "
                                        "training part has no slow I/Os")
        assert s["fallback"].endswith("; replayed as leastinflight")
        assert s["replayed_as"] == "leastinflight" and s["extra_ios"] == 0
        assert "hedging" not in s          # the module default does not hedge
    assert rep["policies"]["hedged"]["hedging"]["budget"] is None
    text = format_table(rep)
    assert "* hedged-learned: its model (the heimdall one) is not trained" in text
    assert "\nhedged-learned*" in text and "\ntable-hedged*" in text


def test_hedged_within_a_budget_on_request(tmp_path):
    tr = _trace(6000, gap_ns=20_000, writes_every=3)
    base = dict(params=DeviceParams(bg_per_s=20.0), seed=1)
    free = run_replay(tr, 2, ["hedged"], **base)["policies"]["hedged"]
    assert free["hedging"]["budget"] is None and free["extra_ios"] > 0
    zero = run_replay(tr, 2, ["hedged"], budget_hedged=True, hedge_budget=0.0,
                      **base)["policies"]["hedged"]
    h = zero["hedging"]
    assert zero["extra_ios"] == 0 and h["refused_by_budget"] == h["deadlines_passed"] > 0
    assert h["budget"] == 0.0
    with pytest.raises(UsageError, match="hedge budget 2"):
        run_replay(tr, 2, ["hedged"], hedge_budget=2, **base)


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory):
    p = tmp_path_factory.mktemp("hedge") / "t.parquet"
    write_trace(p, _trace(6000, gap_ns=20_000, writes_every=3))
    return p


@pytest.mark.parametrize("value,budget", [("0", 0.0), ("1", 1.0), ("0.005", 0.005)])
def test_cli_accepts_a_hedge_budget_from_0_to_1(small_trace, capsys, value, budget):
    assert cli.main(["replay", "-q", "--trace", str(small_trace), "--policy", "hedged",
                     "--bg-per-s", "100", "--budget-hedged", "--hedge-budget", value,
                     "--json"]) == 0
    h = json.loads(capsys.readouterr().out)["policies"]["hedged"]["hedging"]
    assert h["budget"] == budget
    assert h["extra_reads"] <= budget * 4000 + H.BUCKET_HEDGES


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan", "inf", "5%", ""])
def test_cli_refuses_a_hedge_budget_outside_0_to_1(small_trace, capsys, value):
    with pytest.raises(SystemExit) as exc:
        cli.main(["replay", "-q", "--trace", str(small_trace), f"--hedge-budget={value}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"error: argument --hedge-budget: must be a number from 0 to 1, got " in err


def test_cli_text_reports_every_hedging_policy(small_trace, capsys):
    assert cli.main(["replay", "-q", "--trace", str(small_trace), "--policy", "leastinflight",
                     "--policy", "hedged", "--bg-per-s", "100"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("hedging "))
    assert lines[head].split() == ["hedging", "budget", "deadlines", "extra", "reads", "of",
                                   "reads", "futile", "refused", "won"]
    assert lines[head + 1].split()[:2] == ["hedged", "none"]
    assert not any(ln.startswith("leastinflight ") for ln in lines[head:])
