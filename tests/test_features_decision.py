import numpy as np
import pytest

from iobridge.core import features as F
from iobridge.core.abi import NUM_SIZE_BUCKETS, size_bucket
from iobridge.core.decision import (BUCKET_SIZE_BYTES, KERNEL_SCORE_SCALE, DecisionMaker,
                               DecisionTable, LegState, feature_rows, kernel_score, route)
from iobridge.offline.devmodel import DeviceParams, Leg
from iobridge.offline import policies as P
from iobridge.offline.simulate import simulate
from iobridge.offline.trace import Trace, _normalise_batch


def test_schema_is_heimdalls_twelve_features():
    assert F.NUM_FEATURES == 12 and len(F.FEATURE_UNITS) == 12
    assert F.FEATURE_NAMES[:3] == ("io_type", "size_bytes", "queue_len")
    assert F.FEATURE_NAMES[3:6] == ("prev_queue_len_1", "prev_queue_len_2", "prev_queue_len_3")
    assert F.FEATURE_NAMES[6] == "prev_latency_us_1" and F.FEATURE_NAMES[9] == "prev_tput_mbps_1"
    assert F.schema_dict()["schema_version"] == F.SCHEMA_VERSION


def test_device_features_are_causal():
    # I/O 1 is issued before I/O 0 completes: it must not see I/O 0's latency
    issue = np.array([0, 10_000, 500_000, 600_000])
    comp = np.array([400_000, 110_000, 700_000, 650_000])
    nb = np.array([4096, 8192, 4096, 4096])
    q = np.array([0, 1, 0, 1])
    x = F.device_features(issue, comp, nb, np.array([0, 1, 0, 0]), q)
    assert x[:, F.COL_QLEN].tolist() == [0, 1, 0, 1]
    assert x[1, F.COL_IO_TYPE] == 1
    assert x[1, F.COLS_PREV_LAT].tolist() == [0, 0, 0]
    # at 500 us, both completed; latest completion (I/O 0, 400 us) first
    assert x[2, F.COLS_PREV_LAT].tolist() == [400.0, 100.0, 0.0]
    assert x[2, F.COLS_PREV_TPUT][0] == pytest.approx(4096 / 400.0)
    assert x[3, F.COLS_PREV_QLEN].tolist() == [0, 1, 0]


def test_offline_features_match_the_simulators_online_state():
    """features.device_features on recorded I/Os == the state a policy sees."""
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
            seen.append((now, leg, legs[leg].state()))
            return leg

    rec = simulate(tr, 2, Spy(), params, seed=1, record=True).records
    for leg in (0, 1):
        m = rec["leg"] == leg
        x = F.device_features(rec["issue_ns"][m], rec["complete_ns"][m], rec["bytes"][m],
                              rec["op"][m] == 1, rec["qlen"][m])
        row_at = {int(t): r for t, r, o in zip(rec["issue_ns"][m], x, rec["op"][m]) if o == 0}
        checked = 0
        for now, lg, (q, pq, pl, pt) in seen:
            if lg != leg:
                continue
            r = row_at[now]
            assert r[F.COL_QLEN] == q
            assert r[F.COLS_PREV_QLEN].tolist() == list(pq)
            assert np.allclose(r[F.COLS_PREV_LAT], pl, rtol=1e-5)
            assert np.allclose(r[F.COLS_PREV_TPUT], pt, rtol=1e-4)
            checked += 1
        assert checked > 500


class QueueModel:
    """P(slow) grows with queue length: 0.9 when >= 4 in flight."""
    threshold = 0.5

    def __init__(self):
        self.batches = []

    def p_slow(self, rows):
        self.batches.append(len(rows))
        return np.where(rows[:, F.COL_QLEN] >= 4, 0.9, 0.1 + rows[:, F.COL_SIZE] / 1e7)


def test_decide_is_one_batched_call_over_legs_and_buckets():
    m = QueueModel()
    dm = DecisionMaker(m, ttl_ns=5_000, staleness_ns=1_000)
    states = [LegState(5, (1, 2, 3), (100, 100, 100), (40, 40, 40)),
              LegState(0, (0, 0, 0), (90, 90, 90), (45, 45, 45)),
              LegState(1, (0, 0, 0), (90, 90, 90), (45, 45, 45))]
    rows = feature_rows(states)
    assert rows.shape == (3 * NUM_SIZE_BUCKETS, F.NUM_FEATURES)
    assert rows[:NUM_SIZE_BUCKETS, F.COL_SIZE].tolist() == list(BUCKET_SIZE_BYTES)
    assert (rows[:, F.COL_IO_TYPE] == 0).all()
    t = dm.decide(10_000, states)
    assert m.batches == [3 * NUM_SIZE_BUCKETS]
    assert t.admit.shape == (3, NUM_SIZE_BUCKETS)
    assert not t.admit[0].any() and t.admit[1:].all()
    assert t.valid_from_ns == 11_000 and t.expiry_ns == 16_000
    b = size_bucket(4096)
    # not yet visible (staleness), then least in-flight admitted leg, then expired
    assert route(t, 10_500, b, [0, 3, 2]) == -1
    assert route(t, 11_000, b, [0, 3, 2]) == 2
    assert route(t, 15_999, b, [0, 1, 2]) == 1
    assert route(t, 16_000, b, [0, 1, 2]) == -1
    assert route(None, 0, b, [0, 0, 0]) == -1


def test_route_all_avoid_picks_the_leg_least_likely_slow():
    m = QueueModel()
    dm = DecisionMaker(m, ttl_ns=1000)
    t = dm.decide(0, [LegState(9, (0,) * 3, (0,) * 3, (0,) * 3),
                      LegState(4, (0,) * 3, (0,) * 3, (0,) * 3)])
    t.score[0, :] = 0.95
    t.score[1, :] = 0.97
    assert not t.admit.any()
    assert route(t, 0, 0, [9, 0]) == 0      # lower P(slow), though busier
    t.score[1, :] = 0.95
    assert route(t, 0, 0, [9, 0]) == 1      # tie: fewer in flight
    assert route(t, 1000, 0, [9, 0]) == -1  # expired: the module default


def test_route_prefers_least_inflight_then_lower_p_slow():
    t = DecisionTable(admit=np.ones((3, 4), dtype=bool),
                      score=np.array([[0.1] * 4, [0.05] * 4, [0.01] * 4], dtype=np.float32),
                      valid_from_ns=0, expiry_ns=100)
    assert route(t, 0, 0, [2, 1, 3]) == 1          # fewest in flight
    assert route(t, 0, 0, [1, 1, 3]) == 1          # tie: lower P(slow)
    t.admit[1, 0] = False
    assert route(t, 0, 0, [1, 1, 3]) == 0
    assert route(t, 100, 0, [1, 1, 3]) == -1       # expired


def test_kernel_score_is_higher_for_lower_p_slow():
    assert kernel_score(0.0) == KERNEL_SCORE_SCALE
    assert kernel_score(1.0) == 0
    assert kernel_score(0.2) > kernel_score(0.3)
    assert kernel_score(-1) == KERNEL_SCORE_SCALE and kernel_score(2) == 0


def test_device_model_queueing_and_busy_periods():
    p = DeviceParams(channels=2, bg_per_s=0.0, gc_every_write_mb=1.0, gc_min_ms=5,
                     gc_max_ms=5, block_frac=1.0)
    leg = Leg(p, seed=0)
    d0, q0 = leg.submit(0, 4096, False)
    d1, q1 = leg.submit(0, 4096, False)
    d2, q2 = leg.submit(0, 4096, False)        # waits for a service unit
    svc = int((80 + 4096 / 2000) * 1000)
    assert (q0, q1, q2) == (0, 1, 2) and d0 == d1 == svc and d2 == 2 * svc
    leg.advance(10_000_000)
    assert leg.qlen == 0 and leg.state()[2][0] == pytest.approx(2 * svc / 1000)
    leg.submit(10_000_000, 1_000_000, True)    # 1 MB written: GC for 5 ms
    d, _ = leg.submit(10_000_001, 4096, False)
    assert d == 15_000_000 + svc               # read waited for the busy period
