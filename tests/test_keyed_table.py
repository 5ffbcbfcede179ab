"""The replay's learned policies over the keyed table (offline/policies.py):
baseline feeding, table rebuilds, staleness/expiry, the per-I/O penalty,
and the keyed table against least in flight on a trace with slow periods."""

import numpy as np
import pytest

from iobridge.core import abi
from iobridge.core import decision as D
from iobridge.core import features as F
from iobridge.offline import policies as P
from iobridge.offline.devmodel import DeviceParams
from iobridge.offline.simulate import latency_stats, simulate
from iobridge.offline.trace import Trace, _normalise_batch


class LatModel:
    """P(slow) 0.9 once the newest latency is >= 10x the leg's baseline."""
    threshold = 0.5

    def __init__(self):
        self.rows = 0

    def p_slow(self, rows):
        self.rows += len(rows)
        return np.where(rows[:, F.COLS_PREV_LAT.start] >= 10, 0.9, 0.01)


class FakeLeg:
    """The per-leg state the policies read, set by hand."""

    def __init__(self):
        self.qlen = 0
        self.prev_qlen = [0] * 4
        self.prev_lat_qlen = [0] * 4
        self.prev_lat = [0.0] * 4
        self.prev_tput = [0.0] * 4
        self.last_lat_ns = 0
        self.last_lat_qlen = 0
        self.last_complete_ns = 0
        self.completed = 0

    def complete(self, t, lat_us, nbytes=4096):
        self.prev_lat.insert(0, lat_us); del self.prev_lat[4:]
        self.prev_lat_qlen.insert(0, 0); del self.prev_lat_qlen[4:]
        self.prev_tput.insert(0, nbytes / lat_us); del self.prev_tput[4:]
        self.last_lat_ns, self.last_complete_ns = int(lat_us * 1000), t
        self.completed += 1

    def state(self):
        return self.qlen, tuple(self.prev_qlen[:3]), tuple(self.prev_lat[:3]), tuple(self.prev_tput[:3])


def test_baselines_take_at_most_three_newest_completions_per_check():
    b = P.LegBaselines(2)
    legs = [FakeLeg(), FakeLeg()]
    for i in range(10):
        legs[0].complete(i, 100.0 + i)
    b.observe(legs, 0)
    tr = b.trackers[0]
    assert tr.n == 3 and b.trackers[1].n == 0 and b.samples == 3
    assert tr._held()[0].tolist() == [107.0, 108.0, 109.0]      # oldest first
    b.observe(legs, 1)                                          # nothing new
    assert tr.n == 3
    legs[0].complete(20, 50.0)
    b.observe(legs, 2)
    assert tr.n == 4 and tr._held()[0][-1] == 50.0


def test_baselines_are_re_read_at_most_once_per_tick():
    b = P.LegBaselines(1, tick_ns=1000)
    leg = FakeLeg()
    for t in range(F.MIN_BASELINE_SAMPLES):
        leg.complete(t, 100.0)
        b.observe([leg], t)
    assert b.own() == [None]                    # ready only after the first re-read at t=0
    b.observe([leg], 1000)
    assert b.own()[0].lat_us == 100.0 and b.changed
    b.changed = False
    for t in range(1001, 1100):
        leg.complete(t, 300.0)
        b.observe([leg], t)
    assert b.own()[0].lat_us == 100.0 and not b.changed     # same tick
    b.observe([leg], 2000)
    assert b.own()[0].lat_us == 300.0 and b.changed


def test_a_leg_without_a_baseline_borrows_the_fastest_ready_one():
    b = P.LegBaselines(3)
    legs = [FakeLeg(), FakeLeg(), FakeLeg()]
    assert b.current() == ([None] * 3, [False] * 3)
    for t in range(F.MIN_BASELINE_SAMPLES):
        legs[0].complete(t, 200.0)
        legs[2].complete(t, 100.0)
        b.observe(legs, t * P.TICK_NS)
    bases, borrowed = b.current()
    assert borrowed == [False, True, False]
    assert bases[1] == bases[2] and bases[2].lat_us == 100.0 and bases[0].lat_us == 200.0
    # The slow-read cost is the target's: the highest of the legs' (10 x 200 us).
    assert [x.slow_lat_us for x in bases] == [2000.0] * 3
    assert b.own()[1] is None and b.own()[2].slow_lat_us == 1000.0


def test_table_rebuilds_when_a_baseline_moves_at_most_every_recompute_ns():
    m = LatModel()
    pol = P.Table(m, recompute_ns=1_000_000, staleness_ns=0, probe_after_ns=0, tick_ns=1)
    pol.reset(2, 0)
    legs = [FakeLeg(), FakeLeg()]
    t = 0

    def feed(lat0, k):
        nonlocal t
        for _ in range(k):
            t += 10_000
            legs[0].complete(t, lat0)
            legs[1].complete(t, 100.0)
            pol.choose(t, 4096, legs)

    feed(100.0, F.MIN_BASELINE_SAMPLES - 1)
    assert pol.maker.calls == 0 and pol.defaults == F.MIN_BASELINE_SAMPLES - 1
    feed(100.0, 1)                                    # first baselines: built at once
    # both legs' rows are alike (same bytes per read): one inference, one leg's rows
    assert pol.rebuilds == pol.maker.calls == 1 and m.rows == abi.KEYS_PER_LEG
    feed(100.0, 3 * F.BASELINE_STEP)                  # baselines re-read, unchanged: no rebuild
    assert pol.rebuilds == 1
    feed(300.0, F.BASELINE_WINDOW)                    # leg 0 slows down for good
    assert pol.rebuilds >= 2
    calls = pol.maker.calls
    built = [tb.computed_ns for tb in pol.tables]
    assert all(b - a >= pol.recompute_ns for a, b in zip(built, built[1:]))
    assert pol.tables[-1].baselines[0].lat_us == pytest.approx(300.0)
    st = pol.stats()
    assert st["inference_calls"] == calls and st["keys"]["legs"][0]["baseline"]["lat_us"] == 300.0
    assert st["routed_fraction"] == pytest.approx(1 - (F.MIN_BASELINE_SAMPLES - 1) / pol.reads)
    k = st["keys"]["legs"][0]["inflight_bucket_0"]
    assert len(k["p_slow"]) == abi.NUM_LAT_BUCKETS == len(k["penalty_us"])
    assert k["p_slow"][0] == pytest.approx(0.01) and k["p_slow"][-1] == pytest.approx(0.9)


def test_table_in_force_is_the_newest_visible_and_expires_without_keepalive():
    pol = P.Table(LatModel(), recompute_ns=1, staleness_ns=500, ttl_ns=1_000)
    pol.reset(1, 0)
    mk = pol.maker
    a = mk.build(0, [D.LegBaseline(100.0, 40.0, 1000.0)])
    b = mk.build(300, [D.LegBaseline(200.0, 40.0, 1000.0)])
    pol.tables.extend([a, b])
    assert pol.visible(400) is None                   # a is visible from 500
    assert pol.visible(600) is a                      # b not yet
    assert pol.visible(800) is b                      # b replaces a
    assert b.expiry_ns == 1_800
    legs = [FakeLeg()]
    pol.choose(1_900, 4096, legs)                     # expired: the module default
    assert pol.defaults == 1 and pol.no_table == 1
    kept = P.Table(LatModel())                        # ttl None: the live agent keeps it
    assert kept.maker.build(0, [None]).expiry_ns >= P.NEVER


def test_per_io_penalty_is_the_keyed_formula_at_the_reads_own_latency():
    base = D.LegBaseline(100.0, 40.0, 1000.0)
    assert P._per_io_penalty_ns(0.0, base, 5_000_000) == 0
    assert P._per_io_penalty_ns(0.5, base, 100_000) == 450_000          # 0.5 x (1000 - 100) us
    assert P._per_io_penalty_ns(0.5, base, 5_000_000) == 2_450_000      # own latency 5 ms
    # the keyed table's penalty at a key whose representative is that latency
    for lb, rep in enumerate(D.LAT_REP_REL):
        pk = D.penalties_ns(np.full(abi.KEYS_PER_LEG, 0.5), base)[abi.key_index(0, 0, lb)]
        assert pk == P._per_io_penalty_ns(0.5, base, int(rep * base.lat_us * 1000))


def test_heimdall_rows_are_relative_to_each_legs_baseline():
    m = LatModel()
    pol = P.Heimdall(m, probe_after_ns=0, tick_ns=1)
    pol.reset(2, 0)
    legs = [FakeLeg(), FakeLeg()]
    for t in range(1, F.MIN_BASELINE_SAMPLES + 1):
        legs[0].complete(t, 100.0)
        legs[1].complete(t, 400.0)
        pol.choose(t, 4096, legs)
    assert pol.calls == 1                             # once both baselines exist
    legs[0].complete(100, 1500.0)                     # 15x its baseline: slow
    legs[1].complete(100, 800.0)                      # 2x its baseline
    legs[0].qlen = legs[1].qlen = 1
    bases, _ = pol.base.current()
    x = pol.rows(8192, legs, bases)
    assert x[:, F.COL_SIZE].tolist() == [8192, 8192] and x[:, F.COL_QLEN].tolist() == [1, 1]
    assert x[0, F.COLS_PREV_LAT.start] == pytest.approx(15.0)
    assert x[1, F.COLS_PREV_LAT.start] == pytest.approx(2.0)
    assert x[1, F.COLS_PREV_TPUT.start] == pytest.approx((4096 / 800) / (4096 / 400))
    # leg 1 is 4x slower when fast, but leg 0 is in a slow period
    assert pol.choose(101, 4096, legs) == 1


def test_linnos_rows_keep_absolute_latency_digits():
    pol = P.LinnOS(LatModel())
    legs = [FakeLeg()]
    legs[0].complete(1, 1234.0)
    legs[0].qlen = 7
    x = pol.rows(4096, legs, None)
    assert x.shape == (1, P.LINNOS_WIDTH)
    assert x[0, :3].tolist() == [0, 0, 7]
    lat0 = P.LINNOS_QLEN_DIGITS * (1 + P.LINNOS_HISTORY)
    assert x[0, lat0:lat0 + 4].tolist() == [1, 2, 3, 4]


# ------------------------------------------ keyed table vs least in flight

def _slow_period_case(n=5000, gap=2_000_000):
    """Reads every 2 ms (queues stay short); recorded latencies: leg 0 takes
    100 us, but 1.5 ms in a slow period of 100 ms out of every 300 ms; leg 1
    always 100 us."""
    issue = np.arange(n, dtype=np.int64) * gap
    tr = Trace(_normalise_batch({"issue_ns": issue, "bytes": np.full(n, 4096),
                                 "op": np.zeros(n)}), {"source": "synthetic"})
    t = np.arange(0, n * gap, 50_000_000, dtype=np.int64)
    lat0 = np.where((t // 100_000_000) % 3 == 2, 1_500_000, 100_000)
    no_writes = (np.zeros(1, np.int64), np.zeros(1, np.int64))
    tl = [{False: (t, lat0), True: no_writes},
          {False: (np.zeros(1, np.int64), np.array([100_000])), True: no_writes}]
    return tr, tl


def test_keyed_table_beats_least_inflight_when_one_leg_has_slow_periods():
    tr, tl = _slow_period_case()
    res = {}
    for pol in (P.LeastInflight(), P.Table(LatModel(), probe_after_ns=20_000_000),
                P.Heimdall(LatModel(), probe_after_ns=20_000_000)):
        r = simulate(tr, 2, pol, DeviceParams(), seed=0, timelines=tl)
        res[pol.name] = (latency_stats(r.read_lat_ns), r.sent, r.policy_stats)
    li, tb, hd = res["leastinflight"], res["table"], res["heimdall"]
    # least in flight: both legs idle at every read, ties go to leg 0, which
    # serves all the slow periods (a third of the reads at 1.5 ms)
    assert li[1] == [len(tr), 0] and li[0]["mean_us"] > 500
    # the table sees leg 0's newest latency, avoids it, probes it back
    assert tb[0]["mean_us"] < 0.4 * li[0]["mean_us"]
    assert tb[2]["inference_calls"] < 10 and tb[2]["probes"] > 0
    # only the reads before the first tick (the first baselines) go to the default
    before_first_tick = P.TICK_NS // 2_000_000 + 2
    default_routed = round((1 - tb[2]["routed_fraction"]) * len(tr))
    assert default_routed <= before_first_tick, default_routed
    # the per-I/O model with the same rule does the same here
    assert hd[0]["mean_us"] == pytest.approx(tb[0]["mean_us"], rel=0.05)
    assert hd[2]["inference_calls"] >= len(tr) - before_first_tick


def test_table_replays_are_deterministic():
    tr, tl = _slow_period_case(n=1500)
    runs = [simulate(tr, 2, P.Table(LatModel(), probe_after_ns=20_000_000), DeviceParams(),
                     seed=4, timelines=tl) for _ in range(2)]
    assert np.array_equal(runs[0].read_lat_ns, runs[1].read_lat_ns)
    assert runs[0].sent == runs[1].sent
