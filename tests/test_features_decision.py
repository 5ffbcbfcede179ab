"""Feature schema v2 (relative history, causal baselines) and the keyed
decision table (core/decision.py): key rows, penalties, the route() rule."""

from dataclasses import replace

import numpy as np
import pytest

from iobridge.core import abi
from iobridge.core import decision as D
from iobridge.core import features as F
from iobridge.core.decision import LegBaseline, TableMaker, route
from iobridge.offline.devmodel import DeviceParams, Leg
from iobridge.offline import policies as P
from iobridge.offline.simulate import simulate
from iobridge.offline.trace import Trace, _normalise_batch


# ------------------------------------------------------------------ features

def test_schema_is_heimdalls_twelve_features_relative_to_the_baseline():
    assert F.NUM_FEATURES == 12 and len(F.FEATURE_UNITS) == 12
    assert F.SCHEMA_VERSION == 2
    assert F.FEATURE_NAMES[:3] == ("io_type", "size_bytes", "queue_len")
    assert F.FEATURE_NAMES[3:6] == ("prev_queue_len_1", "prev_queue_len_2", "prev_queue_len_3")
    assert F.FEATURE_NAMES[6] == "prev_latency_rel_1" and F.FEATURE_NAMES[9] == "prev_tput_rel_1"
    d = F.schema_dict()
    assert d["schema_version"] == F.SCHEMA_VERSION and "baseline" in d


def test_device_features_history_is_causal_and_relative():
    # I/O 1 is issued before I/O 0 completes: it must not see I/O 0's latency
    issue = np.array([0, 10_000, 500_000, 600_000])
    comp = np.array([400_000, 110_000, 700_000, 650_000])
    nb = np.array([4096, 8192, 4096, 4096])
    q = np.array([0, 1, 0, 1])
    x = F.device_features(issue, comp, nb, np.array([0, 1, 0, 0]), q)
    lat = (comp - issue) / 1000.0
    b_lat, b_tput = F.causal_baseline(issue, comp, lat, nb / lat)
    assert (b_lat > 0).all() and (b_tput > 0).all()
    assert x[:, F.COL_QLEN].tolist() == [0, 1, 0, 1]
    assert x[1, F.COL_IO_TYPE] == 1
    assert x[1, F.COLS_PREV_LAT].tolist() == [0, 0, 0]
    # at 500 us, both completed; latest completion (I/O 0, 400 us) first
    np.testing.assert_allclose(x[2, F.COLS_PREV_LAT], np.array([400.0, 100.0, 0.0]) / b_lat[2],
                               rtol=1e-6)
    assert x[2, F.COLS_PREV_TPUT][0] == pytest.approx(4096 / 400.0 / b_tput[2], rel=1e-6)
    assert x[3, F.COLS_PREV_QLEN].tolist() == [0, 1, 0]


def _steady(n, spacing_ns, lat_ns):
    issue = np.arange(n, dtype=np.int64) * spacing_ns
    return issue, issue + np.asarray(lat_ns, dtype=np.int64)


def test_causal_baseline_is_causal():
    """A latency change after time T leaves the features (and baselines) of
    every I/O issued before T unchanged."""
    n = 3000
    lat_a = np.full(n, 100_000)
    issue, comp_a = _steady(n, 20_000, lat_a)
    T = issue[1800]
    lat_b = np.where(issue >= T, 5_000_000, lat_a)        # slow from T on
    comp_b = issue + lat_b
    nb = np.full(n, 4096)
    q = np.zeros(n)
    before = issue < T
    for comp, lat in ((comp_a, lat_a), (comp_b, lat_b)):
        assert (comp[~before] > T).all()
    ba = F.causal_baseline(issue, comp_a, lat_a / 1000, nb / (lat_a / 1000))
    bb = F.causal_baseline(issue, comp_b, lat_b / 1000, nb / (lat_b / 1000))
    for a, b in zip(ba, bb):
        np.testing.assert_array_equal(a[before], b[before])
    xa = F.device_features(issue, comp_a, nb, np.zeros(n), q)
    xb = F.device_features(issue, comp_b, nb, np.zeros(n), q)
    np.testing.assert_array_equal(xa[before], xb[before])
    # and the change does show, once the slow I/Os complete
    assert xa[~before, F.COLS_PREV_LAT].max() == pytest.approx(1.0)
    assert xb[~before, F.COLS_PREV_LAT].max() >= 10


def test_causal_baseline_moves_every_step_over_the_window():
    n = 4 * F.BASELINE_WINDOW
    lat = np.where(np.arange(n) < n // 2, 100_000, 300_000)
    issue, comp = _steady(n, 1_000_000, lat)                # no overlap: completion order = issue order
    b_lat, _ = F.causal_baseline(issue, comp, lat / 1000, np.full(n, 40.0))
    assert b_lat[0] == pytest.approx(100.0)                 # start: the first baseline
    assert b_lat[n // 2 + 10] == pytest.approx(100.0)       # old window still holds fast ones
    assert b_lat[-1] == pytest.approx(300.0)                # a full window later: the new level
    assert np.all(np.diff(b_lat) >= 0)


def test_baseline_tracker_quantiles_and_window():
    tr = F.BaselineTracker(window=100)
    tr.add(np.arange(1, 16, dtype=float), np.arange(1, 16, dtype=float))
    assert not tr.ready and tr.n == 15
    tr.add([0.0, -1.0], [5.0, 5.0])                         # no latency: ignored
    assert tr.n == 15
    tr.add(np.arange(16, 101, dtype=float), np.arange(16, 101, dtype=float) * 10)
    assert tr.ready and tr.n == 100
    lat = np.arange(1, 101, dtype=float)
    tput = np.concatenate([np.arange(1, 16), np.arange(16, 101) * 10.0])
    assert tr.latency_us() == pytest.approx(np.quantile(lat, F.BASELINE_LAT_QUANTILE))
    assert tr.tput() == pytest.approx(np.quantile(tput, F.BASELINE_TPUT_QUANTILE))
    # the ring keeps the newest `window` samples
    tr.add(np.full(100, 1000.0), np.full(100, 1.0))
    assert tr.latency_us() == 1000.0 and tr.tput() == 1.0
    b = LegBaseline.of(tr)
    assert b.lat_us == 1000.0 and b.slow_lat_us == D.SLOW_LAT_FLOOR_REL * 1000.0
    assert LegBaseline.of(F.BaselineTracker()) is None


def test_slow_read_cost_is_the_median_of_several_slow_reads():
    tr = F.BaselineTracker()
    tr.add(np.full(200, 100.0), np.full(200, 1.0))
    # A few jittery reads 50x the baseline: not enough to be slow periods.
    tr.add(np.full(D.SLOW_READ_MIN_COUNT - 1, 5000.0), np.ones(D.SLOW_READ_MIN_COUNT - 1))
    assert tr.slow_latency_us(D.SLOW_READ_REL * 100.0, D.SLOW_READ_MIN_COUNT) is None
    assert LegBaseline.of(tr).slow_lat_us == D.SLOW_LAT_FLOOR_REL * 100.0
    # Slow periods: the cost is what their reads took (the median).
    tr.add(np.array([20_000.0, 21_000.0, 22_000.0, 30_000.0] * 5), np.ones(20))
    slow = np.concatenate([np.full(D.SLOW_READ_MIN_COUNT - 1, 5000.0),
                           np.array([20_000.0, 21_000.0, 22_000.0, 30_000.0] * 5)])
    assert tr.slow_latency_us(D.SLOW_READ_REL * 100.0, D.SLOW_READ_MIN_COUNT) == np.median(slow)
    assert LegBaseline.of(tr).slow_lat_us == np.median(slow)


# ------------------------------------------------------------- keyed table

BASE = LegBaseline(lat_us=100.0, tput=40.0, slow_lat_us=2000.0)


@pytest.mark.parametrize("base", [BASE, LegBaseline(400.0, 10.0, 4000.0, 100.0)])
def test_key_rows_cover_every_key_with_its_representatives(base):
    x = D.key_rows(base)
    ratio = D.per_read_ratio(base)
    assert ratio == base.service_us / base.lat_us
    assert x.shape == (abi.KEYS_PER_LEG, F.NUM_FEATURES) and x.dtype == np.float32
    assert (x[:, F.COL_IO_TYPE] == 0).all()
    for sb in range(abi.NUM_SIZE_BUCKETS):
        for fb in range(abi.NUM_INFLIGHT_BUCKETS):
            for lb in range(abi.NUM_LAT_BUCKETS):
                r = x[abi.key_index(sb, fb, lb)]
                size = D.BUCKET_SIZE_BYTES[sb]
                assert r[F.COL_SIZE] == size
                assert abi.size_bucket(int(r[F.COL_SIZE])) == sb
                assert r[F.COL_QLEN] == D.INFLIGHT_REP[fb]
                assert abi.inflight_bucket(int(r[F.COL_QLEN])) == fb
                assert (r[F.COLS_PREV_QLEN] == D.INFLIGHT_REP[fb]).all()
                # the representative per read, back in the model's unit: x the
                # service time x (the queue + 1), over the baseline latency
                lat_rel = D.LAT_REP_REL[lb] * ratio * (D.INFLIGHT_REP[fb] + 1)
                assert np.allclose(r[F.COLS_PREV_LAT], lat_rel)
                # the representative's latency per read falls in its own bucket
                lat_ns = int(D.LAT_REP_REL[lb] * base.service_us * 1000)
                assert abi.lat_bucket(D.lat_edges_ns(base), lat_ns) == lb
                tput_rel = size / (lat_rel * base.lat_us) / base.tput
                assert np.allclose(r[F.COLS_PREV_TPUT], tput_rel, rtol=1e-5)


def test_penalties_grow_with_p_slow_and_the_key_latency():
    ps = np.linspace(0, 1, 11)
    pens = np.stack([D.penalties_ns(np.full(abi.KEYS_PER_LEG, p), BASE) for p in ps])
    assert (pens[0] == 0).all()
    assert (np.diff(pens, axis=0) >= 0).all() and (pens[-1] > pens[1]).all()
    # P = 1 at a fast key: the slow read's cost over the service estimate
    k0 = abi.key_index(0, 0, 0)
    assert pens[-1, k0] == round((BASE.slow_lat_us - BASE.lat_us) * 1000)
    # at the top latency bucket the key's own latency (64x) exceeds slow_lat
    ktop = abi.key_index(0, 0, abi.NUM_LAT_BUCKETS - 1)
    assert pens[-1, ktop] == round((64 * BASE.lat_us - BASE.lat_us) * 1000)
    huge = LegBaseline(1e6, 1.0, 1e9)
    assert D.penalties_ns(np.ones(abi.KEYS_PER_LEG), huge).max() == abi.PENALTY_MAX_NS


class LatModel:
    """P(slow) 0.9 once the newest latency is >= 10x the baseline, else 0.01;
    counts its (batched) calls."""
    threshold = 0.5

    def __init__(self):
        self.batches = []

    def p_slow(self, rows):
        self.batches.append(len(rows))
        return np.where(rows[:, F.COLS_PREV_LAT.start] >= 10, 0.9, 0.01)


def test_build_is_one_batched_call_over_every_key_of_every_valid_leg():
    m = LatModel()
    mk = TableMaker(m, ttl_ns=5_000, staleness_ns=1_000, probe_after_ns=7)
    other = LegBaseline(50.0, 160.0, 500.0)        # 8 KB per read, BASE 4 KB: other rows
    t = mk.build(10_000, [BASE, None, other])
    assert m.batches == [2 * abi.KEYS_PER_LEG] and mk.calls == 1
    assert t.valid.tolist() == [True, False, True]
    assert t.valid_from_ns == 11_000 and t.expiry_ns == 16_000 and t.probe_after_ns == 7
    assert t.service_ns.tolist() == [100_000, 0, 50_000]
    assert (t.penalty_ns[1] == 0).all()
    slow_key = abi.key_index(0, 0, 5)               # 10-16x baseline
    fast_key = abi.key_index(0, 0, 0)
    assert t.p_slow[0, slow_key] == pytest.approx(0.9) and t.p_slow[0, fast_key] == pytest.approx(0.01)
    assert t.key_of(0, 4096, 0, 1_200_000) == slow_key
    assert t.key_of(2, 4096, 0, 1_200_000) == abi.key_index(0, 0, 6)      # 24x 50 us
    # The latency is taken per read: 3.5 ms of a read submitted behind 3
    # others is 3.5 / (3 + 1) = 17.5x 50 us, whatever is in flight now.
    assert t.key_of(2, 70_000, 3, 3_500_000, 3) == abi.key_index(3, 2, 6)
    assert t.key_of(2, 70_000, 0, 3_500_000, 3) == abi.key_index(3, 0, 6)
    assert t.key_of(2, 70_000, 3, 3_500_000) == abi.key_index(3, 2, abi.NUM_LAT_BUCKETS - 1)
    assert t.avoided(0.5)[0, slow_key] and not t.avoided(0.5)[0, fast_key]
    with pytest.raises(ValueError):
        TableMaker(m, ttl_ns=0)


def test_build_of_many_legs_equals_each_leg_built_by_the_one_leg_rules():
    """The build works on every leg at once; each row must still be what the
    one-leg rules say (penalties_ns, lat_edges_ns, the top's price), and a
    leg without a baseline a row of zeros."""
    rng = np.random.default_rng(5)
    mk = TableMaker(LatModel())
    for n in (1, 3, 8):
        bases = [None if rng.random() < 0.25 else
                 LegBaseline(float(rng.uniform(20, 5000)), float(rng.uniform(1, 500)),
                             float(rng.uniform(500, 80_000)), float(rng.uniform(10, 5000)))
                 for _ in range(n)]
        t = mk.build(0, bases)
        for i, b in enumerate(bases):
            if b is None:
                assert not t.valid[i] and not t.penalty_ns[i].any() and not t.p_slow[i].any()
                assert t.service_ns[i] == t.top_lat_ns[i] == 0 and not t.lat_edges_ns[i].any()
                continue
            alone = mk.build(0, [b])
            assert (t.p_slow[i] == alone.p_slow[0]).all()
            risk = D.latency_risk(alone.p_slow[0].astype(np.float64))
            assert t.penalty_ns[i].tolist() == D.penalties_ns(risk, b).tolist()
            assert t.lat_edges_ns[i].tolist() == D.lat_edges_ns(b).tolist()
            assert t.service_ns[i] == round(b.service_us * 1000)
            assert t.top_lat_ns[i] == round(max(D.LAT_REP_REL[-1] * b.service_us, b.slow_lat_us) * 1000)


def test_model_runs_again_only_for_rows_it_has_not_seen():
    """The rows depend on the baselines only through latency x throughput:
    a leg that gets 3x slower at the same read size reuses P(slow) (new
    edges and penalties, no inference); a new read size runs the model."""
    m = LatModel()
    mk = TableMaker(m)
    slower = LegBaseline(300.0, 40.0 / 3, 6000.0)
    assert (D.key_rows(slower) == D.key_rows(BASE)).all()
    a = mk.build(0, [BASE, BASE])
    b = mk.build(1, [slower, BASE])
    assert m.batches == [abi.KEYS_PER_LEG] and mk.calls == 1
    assert (b.p_slow == a.p_slow).all()
    assert b.service_ns.tolist() == [300_000, 100_000] and (b.lat_edges_ns[0] == 3 * a.lat_edges_ns[0]).all()
    assert (b.penalty_ns[0] != a.penalty_ns[0]).any()
    mk.build(2, [LegBaseline(100.0, 400.0, 2000.0), BASE])     # 40 KB reads now
    assert m.batches == [abi.KEYS_PER_LEG] * 2 and mk.calls == 2
    # the grid: 16 points per octave, 4 KB on it; 1% off shares the point, 10% does not
    assert D.bytes_grid_point(4096.0) == D.bytes_grid_point(4140.0) == 4096.0 != D.bytes_grid_point(4500.0)
    assert D.bytes_grid_point(0.0) == 0.0


def _table(bases, **kw):
    return TableMaker(LatModel(), **{"ttl_ns": 1_000_000_000, **kw}).build(0, bases)


def test_route_takes_the_lowest_expected_completion_time():
    t = _table([BASE, BASE, LegBaseline(300.0, 40.0, 3000.0)])
    fast, slow = 100_000, 2_000_000                        # newest latency: 1x / 20x baseline
    lc = [1, 1, 1]
    # all fast: (inflight + 1) * service decides
    assert route(t, 10, 4096, [1, 0, 0], [fast] * 3, lc) == (1, False)
    assert route(t, 10, 4096, [3, 3, 0], [fast] * 3, lc) == (2, False)   # 1 x 300 < 4 x 100
    # leg 1 in a slow period: its penalty outweighs a queue of 2 on leg 0
    assert route(t, 10, 4096, [2, 0, 9], [fast, slow, fast], lc) == (0, False)
    # unhealthy legs are skipped; none healthy -> -1
    assert route(t, 10, 4096, [1, 0, 0], [fast] * 3, lc, healthy=[True, False, False]) == (0, False)
    assert route(t, 10, 4096, [1, 0, 0], [fast] * 3, lc, healthy=[False] * 3) == (-1, False)


def test_route_prices_every_queued_read_of_a_slow_leg():
    """Leg 0 is idle after one read the host delayed (newest latency 40x,
    as high as the slow leg's); leg 1 is in a slow period with reads queued.
    Every read queued on leg 1 is slow too, so leg 0 takes the next read
    (with the penalty outside the product, leg 1 took every read until
    leg 0's probe, in the VM)."""
    t = _table([BASE, BASE])
    # As the shipped model says: P(slow) a little lower with reads in flight.
    queued_keys = D._KEY_INFLIGHT > 0                          # noqa: SLF001
    t.penalty_ns[:, queued_keys] = t.penalty_ns[:, queued_keys] * 9 // 10
    hiccup, slow = 4_000_000, 20_000_000
    for queued in (1, 2, 3):
        assert route(t, 10, 4096, [0, queued], [hiccup, slow * (queued + 1)], [1, 1],
                     last_lat_qlen=[0, queued]) == (0, False)
    # One read at a time on each: the lower per-read estimate wins as before.
    assert route(t, 10, 4096, [0, 0], [100_000, slow], [1, 1]) == (0, False)


class QueueModel:
    """As the shipped model: P(slow) rises with the newest latency and, at a
    fast latency, also with the queue (0.15 at 8-15 reads in flight)."""
    threshold = 0.5

    def p_slow(self, rows):
        lat = rows[:, F.COLS_PREV_LAT.start]
        return np.clip(np.where(lat >= 10, 0.95, 0.02) + 0.15 * (rows[:, F.COL_QLEN] >= 8), 0, 1)


def test_latency_risk_is_p_slow_over_the_same_key_with_a_fast_latency():
    # service time 1/12 of the baseline latency: at 8-15 reads in flight
    # (representative 11) a row's latency is its representative
    p = QueueModel().p_slow(D.key_rows(LegBaseline(1200.0, 4096 / 1200.0, 12_000.0, 100.0)))
    risk = D.latency_risk(p)
    fast_lat = D._KEY_LAT == 0                                 # noqa: SLF001
    assert (risk[fast_lat] == 0).all() and (risk >= 0).all()
    deep_slow = abi.key_index(0, 4, abi.NUM_LAT_BUCKETS - 1)
    assert risk[deep_slow] == pytest.approx(1.0 - (0.02 + 0.15), abs=1e-6)      # P clipped at 1


def test_route_at_depth_16_keeps_a_fast_busy_leg_over_an_idle_slow_one():
    """Leg 0 is fast with 15 reads in flight, leg 1 idle after a 20 ms read.
    Priced with P(slow) in full, leg 0's queue (15% each read) cost more and
    the slow leg took reads all through its slow periods (VM, QD16)."""
    t = TableMaker(QueueModel()).build(0, [BASE, BASE])
    # leg 0's newest read waited behind 15 others
    assert route(t, 10, 4096, [15, 0], [1_000_000, 20_000_000], [1, 1],
                 last_lat_qlen=[15, 0]) == (0, False)
    # both fast: the queues decide, as least in flight would
    assert route(t, 10, 4096, [15, 0], [1_000_000, 100_000], [1, 1],
                 last_lat_qlen=[15, 0]) == (1, False)


def test_service_per_read_is_the_low_quantile_of_latency_over_the_queue_ahead():
    """At queue depth 16 each read waits behind the others: its latency
    counts the queue, its per-read latency does not. The baseline latency
    (the model's unit) keeps the queue; the service estimate and the key's
    edges are per read."""
    tr = F.BaselineTracker()
    qlen = np.tile(np.arange(16), 10)                     # 0..15 bios ahead
    lat = 100.0 * (qlen + 1)                              # 100 us each
    tr.add(lat, 4096 / lat, lat / (qlen + 1))
    b = LegBaseline.of(tr)
    assert b.lat_us == pytest.approx(np.quantile(lat, F.BASELINE_LAT_QUANTILE))
    assert b.service_us == pytest.approx(100.0)
    assert (D.lat_edges_ns(b) == np.rint(np.array(D.REL_LAT_EDGES) * 100_000)).all()
    t = TableMaker(LatModel()).build(0, [b])
    assert t.service_ns[0] == 100_000
    # Without per-read latencies (None), it is the latency itself.
    tr2 = F.BaselineTracker()
    tr2.add(lat, 4096 / lat)
    assert LegBaseline.of(tr2).service_us == LegBaseline.of(tr2).lat_us
    # A baseline moves when its service estimate does.
    assert b.moved(replace(b, service_us=b.service_us * 1.2), 0.1)


def test_route_at_depth_16_on_a_busy_host_keeps_the_fast_leg():
    """A busy host: at queue depth 16 the fast leg's reads take 2 ms, of
    which 0.25 ms its own. Priced at the baseline latency, 16 reads of it
    (32 ms) cost more than an idle leg in a 20 ms slow period, or one with 1
    to 7 reads queued (it looked like a fast leg with a deep queue), and the
    slow leg got 1.5% of the reads (VM, a host core busy)."""
    old = LegBaseline(2000.0, 4096 / 2000.0, 21_000.0)
    new = replace(old, service_us=250.0)
    model = QueueModel()
    slow = 21_000_000
    for inflight_slow in (0, 1, 3, 7):
        # each leg's newest read met the queue the leg has now
        args = (4096, [15, inflight_slow], [2_000_000, slow], [1, 1])
        kw = {"last_lat_qlen": [15, inflight_slow]}
        assert route(TableMaker(model).build(0, [new, new]), 10, *args, **kw) == (0, False)
    # With the baseline latency as the service time, the slow leg with 7 reads
    # queued still looks cheaper than the fast leg's 16 (2.6 ms x 8 < 2 ms x 16).
    old_args = (4096, [15, 7], [2_000_000, slow], [1, 1])
    assert route(TableMaker(model).build(0, [old, old]), 10, *old_args,
                 last_lat_qlen=[15, 7]) == (1, False)


def test_route_takes_the_latency_per_read_of_the_queue_that_read_met():
    """A leg reads moved away from: its newest read took 2 ms behind 15
    others (125 us each, its service time), and 1 bio is in flight now.
    Over the queue of now (ABI 3) it looked 8x slow and stayed avoided
    (learned IOPS 0.74x the default's at QD16, busy host); over the queue
    it met, it is as fast as it is."""
    base = LegBaseline(2000.0, 4096 / 2000.0, 21_000.0, 125.0)
    t = TableMaker(QueueModel()).build(0, [base, base])
    assert t.key_of(0, 4096, 1, 2_000_000, 15) == abi.key_index(0, 1, 0)
    assert t.key_of(0, 4096, 1, 2_000_000, 1) == abi.key_index(0, 1, 4)    # 1 ms: 8x
    # leg 1 has 15 in flight, its newest 2.4 ms behind 15 (150 us per read):
    # leg 0 (1 in flight, its newest 2 ms) wins
    assert route(t, 10, 4096, [1, 15], [2_000_000, 2_400_000], [1, 1],
                 last_lat_qlen=[15, 15]) == (0, False)


def test_route_at_depth_16_prices_a_jittery_fast_leg_below_an_idle_slow_one():
    """A busy host at queue depth 16: the fast leg's newest read took 1.6x
    or 2.6x its time per read (jitter), which the shipped model prices at
    5.7 and 9.5 ms; the slow leg is idle, its newest read took 20 ms behind
    7 others (2.5 ms per read, penalty 1.8 ms). Times the fast leg's 16 reads
    (ABI 4) the penalty cost more than the slow leg, which got 1.2% of the
    reads (VM, a host core busy); counted once, and with the slow leg no
    cheaper than its newest read, the fast leg keeps the reads."""
    base = LegBaseline(2000.0, 4096 / 2000.0, 21_000.0, 250.0)
    t = TableMaker(QueueModel()).build(0, [base, base])
    t.penalty_ns[0, abi.key_index(0, 4, 1)] = 5_700_000        # the shipped model's figures
    t.penalty_ns[0, abi.key_index(0, 4, 2)] = 9_500_000
    t.penalty_ns[1, abi.key_index(0, 0, 5)] = 1_800_000
    for per_read, lat_b in ((400_000, 1), (650_000, 2)):
        assert t.key_of(0, 4096, 15, per_read * 16, 15) == abi.key_index(0, 4, lat_b)
        assert t.key_of(1, 4096, 0, 20_000_000, 7) == abi.key_index(0, 0, 5)
        assert route(t, 10, 4096, [15, 0], [per_read * 16, 20_000_000], [1, 1],
                     last_lat_qlen=[15, 7]) == (0, False)
        # ABI 4's rule: every queued read paid the penalty
        old = [(n + 1) * (250_000 + int(t.penalty_ns[leg, t.key_of(leg, 4096, n, lat, q)]))
               for leg, n, lat, q in ((0, 15, per_read * 16, 15), (1, 0, 20_000_000, 7))]
        assert old[0] > old[1]


def test_route_prices_every_read_queued_on_a_leg_at_its_time_per_read_now():
    """A slow leg's queue costs its slow time per read: one host stall on
    the other leg (idle, newest read 30 ms) moves one read to the slow leg,
    not every read."""
    t = _table([BASE, BASE])
    stall, slow = 30_000_000, 20_000_000
    costs = [t.cost(1, 4096, n, slow, 0) for n in range(4)]
    assert all(b - a >= slow for a, b in zip(costs, costs[1:]))
    assert route(t, 10, 4096, [0, 0], [stall, slow], [1, 1]) == (1, False)
    assert route(t, 10, 4096, [0, 1], [stall, slow], [1, 1]) == (0, False)


def test_top_latency_bucket_is_priced_at_the_key_latency():
    """The top bucket is open: its penalties were priced for a read of
    top_lat_ns (64x service, or the slow-read cost); a leg beyond pays in
    proportion. A fresh agent (slow-read cost still the floor) otherwise
    priced a 20 ms slow leg like a fast leg's 2 ms host stall, and the slow
    leg got 33 reads in 2 s (VM, queue depth 4, SIGSTOP test)."""
    base = LegBaseline(150.0, 4096 / 150.0, 1500.0, 75.0)
    t = TableMaker(LatModel()).build(0, [base, base])
    assert t.top_lat_ns.tolist() == [round(64 * 75.0 * 1000)] * 2
    top_key = abi.key_index(0, 0, abi.NUM_LAT_BUCKETS - 1)
    pen = int(t.penalty_ns[1, top_key])
    assert t.cost(1, 4096, 0, 20_000_000) == 20_000_000 + pen * 20_000_000 // t.top_lat_ns[1]
    assert t.cost(1, 4096, 0, int(t.top_lat_ns[1])) == t.top_lat_ns[1] + pen
    # leg 0 with 1 read in flight, newest 12 ms (a host stall); leg 1 idle
    # after 20 ms
    args = (4096, [1, 0], [12_000_000, 20_000_000], [1, 1])
    assert route(t, 10, *args) == (0, False)
    assert route(replace(t, top_lat_ns=None), 10, *args) == (1, False)     # unscaled


def test_cache_overflow_keeps_every_point_the_build_needs():
    """The P(slow) cache starts over when full; the points of the build
    that overflows it are all evaluated again (a KeyError before)."""
    m = LatModel()
    mk = TableMaker(m)
    for i in range(D.MAX_CACHED_POINTS - 1):
        mk.build(i, [LegBaseline(100.0, 40.0 * 1.5 ** (i / 4), 1000.0)])
    t = mk.build(99, [BASE, LegBaseline(100.0, 40.0 * 3000, 1000.0)])
    assert t.valid.all() and (t.p_slow[0] == mk.build(100, [BASE]).p_slow[0]).all()


def test_the_least_recently_used_point_goes_first():
    """The cache keeps the points builds use: one used at every build stays
    while others come and go; the oldest unused one is run again."""
    m = LatModel()
    mk = TableMaker(m)
    mk.build(0, [BASE])
    for i in range(D.MAX_CACHED_POINTS + 5):
        mk.build(i, [BASE, LegBaseline(100.0, 40.0 * 1.1 ** (i + 1), 1000.0)])
    calls = mk.calls
    mk.build(1, [BASE])                                       # kept: used at every build
    assert mk.calls == calls
    mk.build(2, [LegBaseline(100.0, 40.0 * 1.1, 1000.0)])      # the first other point: gone
    assert mk.calls == calls + 1


def test_many_legs_grid_points_at_once_equal_one_at_a_time():
    rng = np.random.default_rng(3)
    nbytes = np.concatenate([[0.0, -1.0, 4096.0, 1.0], rng.uniform(1, 1e7, 200)])
    ratio = np.concatenate([[0.0, -1.0, 1.0, 2.0], rng.uniform(1e-3, 1.5, 200)])
    b, r = D.grid_points(nbytes, ratio)
    # the rule one leg at a time, as Python floats
    assert b.tolist() == [2.0 ** (round(np.log2(x) * D.BYTES_GRID_STEPS) / D.BYTES_GRID_STEPS)
                          if x > 0 else 0.0 for x in nbytes]
    assert r.tolist() == [min(2.0 ** (round(np.log2(x) * D.RATIO_GRID_STEPS) / D.RATIO_GRID_STEPS), 1.0)
                          if x > 0 else 1.0 for x in ratio]
    assert [D.bytes_grid_point(x) for x in nbytes] == b.tolist()
    assert b[:4].tolist() == [0.0, 0.0, 4096.0, 1.0] and r[:4].tolist() == [1.0, 1.0, 1.0, 1.0]
    # on the grid: 16 points per octave of bytes, 8 of ratio (at most 1)
    assert np.allclose(np.log2(b[4:]) * D.BYTES_GRID_STEPS, np.rint(np.log2(b[4:]) * D.BYTES_GRID_STEPS))
    assert (r <= 1.0).all()


def test_route_ties_lowest_index_without_rng_random_with_it():
    t = _table([BASE, BASE])
    args = (10, 4096, [0, 0], [100_000, 100_000], [1, 1])
    assert all(route(t, *args) == (0, False) for _ in range(5))
    rng = np.random.default_rng(0)
    picks = [route(t, *args, rng=rng)[0] for _ in range(200)]
    assert 60 < sum(picks) < 140
    # no tie: rng changes nothing
    assert all(route(t, 10, 4096, [0, 1], [100_000] * 2, [1, 1], rng=rng) == (0, False)
               for _ in range(20))


def test_route_probes_an_idle_leg_only_when_idle_long_enough():
    t = _table([BASE, BASE], probe_after_ns=1_000_000)
    slow = 2_000_000
    now = 5_000_000
    now = 200_000_000
    wait = abi.PROBE_LAT_MULT * slow          # 64 ms: more than probe_after (1 ms)
    # leg 1 avoided (slow newest latency), idle for 32x its newest latency -> probed
    assert route(t, now, 4096, [1, 0], [100_000, slow], [now - 10, now - wait]) == (1, True)
    # idle for longer than probe_after but less than 32x its latency -> not yet
    assert route(t, now, 4096, [1, 0], [100_000, slow], [now - 10, now - wait + 1]) == (0, False)
    # completed recently -> not probed, avoided
    assert route(t, now, 4096, [1, 0], [100_000, slow], [now - 10, now - 500_000]) == (0, False)
    # a bio in flight -> not idle, not probed
    assert route(t, now, 4096, [1, 1], [100_000, slow], [now - 10, now - wait]) == (0, False)
    # a fast newest latency: probe_after alone (32 x 10 us < 1 ms)
    assert abi.probe_wait_ns(1_000_000, 10_000) == 1_000_000
    assert abi.probe_wait_ns(1_000_000, slow) == wait
    # the idle leg is the best anyway: routed, not counted as a probe
    assert route(t, now, 4096, [3, 0], [100_000, 100_000], [now - 10, 0]) == (1, False)
    # probing off
    t0 = _table([BASE, BASE], probe_after_ns=0)
    assert route(t0, now, 4096, [1, 0], [100_000, slow], [now - 10, 0]) == (0, False)
    # unhealthy idle legs are not probed
    assert route(t, now, 4096, [1, 0], [100_000, slow], [now - 10, 0],
                 healthy=[True, False]) == (0, False)


def test_route_without_a_valid_table_is_the_module_default():
    t = TableMaker(LatModel(), ttl_ns=5_000, staleness_ns=1_000).build(10_000, [BASE, BASE])
    args = (4096, [0, 0], [100_000] * 2, [1, 1])
    assert route(t, 10_500, *args) == (-1, False)          # not yet visible
    assert route(t, 11_000, *args) == (0, False)
    assert route(t, 15_999, *args) == (0, False)
    assert route(t, 16_000, *args) == (-1, False)          # expired
    assert route(None, 0, *args) == (-1, False)
    t2 = _table([None, None])
    assert route(t2, 10, *args) == (-1, False)             # no leg has an entry
    t3 = _table([None, BASE])
    assert route(t3, 10, 4096, [0, 5], [100_000] * 2, [1, 1]) == (1, False)   # only valid legs
    assert D.least_inflight([2, 1, 1]) == 1


# --------------------------------------------------------- device model

def test_device_model_queueing_busy_periods_and_newest_completion():
    p = DeviceParams(channels=2, bg_per_s=0.0, gc_every_write_mb=1.0, gc_min_ms=5,
                     gc_max_ms=5, block_frac=1.0)
    leg = Leg(p, seed=0)
    assert (leg.last_lat_ns, leg.last_complete_ns, leg.completed) == (0, 0, 0)
    d0, q0 = leg.submit(0, 4096, False)
    d1, q1 = leg.submit(0, 4096, False)
    d2, q2 = leg.submit(0, 4096, False)        # waits for a service unit
    svc = int((80 + 4096 / 2000) * 1000)
    assert (q0, q1, q2) == (0, 1, 2) and d0 == d1 == svc and d2 == 2 * svc
    leg.advance(svc)
    assert leg.completed == 2 and leg.last_complete_ns == svc and leg.last_lat_ns == svc
    leg.advance(10_000_000)
    assert leg.qlen == 0 and leg.state()[2][0] == pytest.approx(2 * svc / 1000)
    assert leg.completed == 3 and leg.last_complete_ns == 2 * svc
    # of the two newest (2 svc behind 2, svc behind 1) the lower per read
    assert leg.recent == [(2 * svc, 2), (svc, 1)] and (leg.last_lat_ns, leg.last_lat_qlen) == (svc, 1)
    leg.submit(10_000_000, 1_000_000, True)    # 1 MB written: GC for 5 ms
    d, _ = leg.submit(10_000_001, 4096, False)
    assert d == 15_000_000 + svc               # read waited for the busy period


def test_offline_features_match_the_simulators_online_state():
    """device_features on recorded I/Os == the state a policy sees: same
    queue lengths, and the relative history times the causal baseline is
    the leg's absolute history; the leg's newest completion is the first."""
    rng = np.random.default_rng(3)
    n = 3000
    issue = np.cumsum(rng.integers(5_000, 60_000, n))
    cols = _normalise_batch({"issue_ns": issue, "bytes": rng.choice([512, 4096, 65536], n),
                             "op": rng.choice([0, 1], n, p=[0.7, 0.3])})
    tr = Trace(cols, {})
    params = DeviceParams(bg_per_s=0.0, gc_every_write_mb=1e12)
    seen = []

    class Spy(P.Random):
        def choose(self, now, nbytes, legs):
            leg = super().choose(now, nbytes, legs)
            lg = legs[leg]
            seen.append((now, leg, lg.state(), lg.recent[0][0], lg.completed))
            return leg

    rec = simulate(tr, 2, Spy(), params, seed=1, record=True).records
    for leg in (0, 1):
        m = rec["leg"] == leg
        iss, comp, nb = rec["issue_ns"][m], rec["complete_ns"][m], rec["bytes"][m]
        x = F.device_features(iss, comp, nb, rec["op"][m] == 1, rec["qlen"][m])
        lat = (comp - iss) / 1000.0
        b_lat, b_tput = F.causal_baseline(iss, comp, lat, nb / lat)
        at = {int(t): (r, bl, bt) for t, r, bl, bt, o in zip(iss, x, b_lat, b_tput, rec["op"][m])
              if o == 0}
        checked = 0
        for now, lg, (q, pq, pl, pt), last_lat_ns, done in seen:
            if lg != leg:
                continue
            r, bl, bt = at[now]
            assert r[F.COL_QLEN] == q
            assert r[F.COLS_PREV_QLEN].tolist() == list(pq)
            assert np.allclose(r[F.COLS_PREV_LAT] * bl, pl, rtol=1e-5)
            assert np.allclose(r[F.COLS_PREV_TPUT] * bt, pt, rtol=1e-4)
            if done:
                assert last_lat_ns / 1000 == pytest.approx(pl[0])
            checked += 1
        assert checked > 500
