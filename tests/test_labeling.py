import numpy as np
import pytest

from iobridge.core import features as F
from iobridge.offline.labeling import (baseline_latency_us, knee, label_periods,
                                       relative_lat_threshold, time_split)

FAST, SLOW = 100.0, 5000.0      # latency us
SZ = 4096                       # bytes: fast tput 40.96 MB/s, slow 0.82 MB/s
THR = dict(lat_threshold_us=1000.0, tput_threshold_mbps=10.0)


def lab(lats, sizes=None, **kw):
    sizes = [SZ] * len(lats) if sizes is None else sizes
    return label_periods(np.array(lats, float), np.array(sizes, float), **{**THR, **kw})


def test_one_slow_period_is_labeled_exactly():
    seq = [FAST] * 10 + [SLOW] * 6 + [FAST] * 10
    r = lab(seq)
    assert r.slow.tolist() == [0] * 10 + [1] * 6 + [0] * 10
    assert r.keep.all()
    assert r.periods == [(10, 16)]


def test_period_continues_until_three_recovered_ios():
    # a single fast I/O inside does not end the period; two do not either
    seq = [FAST] * 5 + [SLOW] * 3 + [FAST] + [SLOW] * 2 + [FAST, FAST] + [SLOW] + [FAST] * 6
    r = lab(seq)
    assert r.slow.tolist() == [0] * 5 + [1] * 9 + [0] * 6
    assert r.periods == [(5, 14)]


def test_short_periods_are_noise():
    seq = [FAST] * 5 + [SLOW] * 3 + [FAST] * 5 + [SLOW] * 4 + [FAST] * 5
    r = lab(seq)
    # the 3-I/O period is filtered out (label 0, not used for training)
    assert r.slow.tolist() == [0] * 13 + [1] * 4 + [0] * 5
    assert r.keep.tolist() == [True] * 5 + [False] * 3 + [True] * 14


def test_isolated_slow_io_with_normal_throughput_is_noise():
    # high latency but a large request keeps throughput high: no period starts
    lats = [FAST] * 5 + [2000.0] + [FAST] * 5
    sizes = [SZ] * 5 + [1 << 20] + [SZ] * 5       # 524 MB/s, above 10
    r = lab(lats, sizes)
    assert r.slow.sum() == 0
    assert r.keep.tolist() == [True] * 5 + [False] + [True] * 5


def test_period_without_recovery_runs_to_the_end():
    r = lab([FAST] * 4 + [SLOW] * 5 + [FAST, FAST])
    assert r.slow.tolist() == [0] * 4 + [1] * 7


def test_relative_throughput_groups_keep_small_fast_ios_from_holding_periods():
    # small fast reads (512 B / 100 us = 5 MB/s) follow a slow period of 4 KiB
    # reads; with raw throughput they are below the median (40 MB/s) and the
    # period never ends; relative to their own group they have recovered.
    lats = [FAST] * 30 + [SLOW] * 5 + [FAST] * 6
    sizes = [SZ] * 35 + [512] * 6
    groups = [0] * 35 + [1] * 6
    raw = label_periods(np.array(lats), np.array(sizes, float), 1000.0, 10.0)
    rel = label_periods(np.array(lats), np.array(sizes, float), 1000.0, 0.5,
                        groups=np.array(groups))
    assert raw.slow[30:].all()
    assert rel.slow.tolist() == [0] * 30 + [1] * 5 + [0] * 6


def test_thresholds_from_knees():
    rng = np.random.default_rng(1)
    lats = rng.normal(100, 5, 400)
    lats[200:220] = rng.normal(8000, 500, 20)
    r = label_periods(lats, np.full(400, SZ, float))
    assert 100 < r.lat_threshold_us < 8000
    tput = SZ / lats
    # the period starts at the first slow I/O and ends before the first 3
    # consecutive I/Os at or above the median throughput
    ok = tput >= np.median(tput)
    end = next(j for j in range(220, 400) if ok[j:j + 3].all())
    assert r.periods == [(200, end)]
    assert r.slow.sum() == end - 200


def test_knee_of_known_curves():
    assert knee(np.r_[np.full(100, 1.0), np.full(5, 100.0)], "high") == 1.0
    assert knee(np.r_[np.full(5, 0.01), np.full(100, 1.0)], "low") == 1.0
    with pytest.raises(ValueError):
        knee(np.array([]))


def test_time_split_is_by_time_not_by_count():
    t = np.array([0, 1, 2, 3, 4, 5, 6, 7, 100])
    s = time_split(t, 0.5)
    assert s == 50
    assert (t < s).sum() == 8        # a count split would put 4 rows first
    with pytest.raises(ValueError):
        time_split(t, 1.0)


# ------------------------------------------------- thresholds relative to the baseline

def qd1_times(lats_us):
    """issue/complete ns of back-to-back I/Os at queue depth 1 (10 us apart)."""
    lat_ns = (np.asarray(lats_us, float) * 1000).astype(np.int64)
    issue = np.zeros(len(lat_ns), np.int64)
    for i in range(1, len(lat_ns)):
        issue[i] = issue[i - 1] + lat_ns[i - 1] + 10_000
    return issue, issue + lat_ns


def test_baseline_latency_is_the_feature_schemas_causal_baseline():
    rng = np.random.default_rng(2)
    lats = rng.lognormal(np.log(300), 0.3, 3000)
    issue, comp = qd1_times(lats)
    sizes = np.full(len(lats), SZ, float)
    base = baseline_latency_us(issue, comp, sizes)
    lat_us = (comp - issue) / 1000.0
    want, _ = F.causal_baseline(issue, comp, lat_us, SZ / lat_us)
    np.testing.assert_array_equal(base, want)
    # what device_features divides the latency history by
    X = F.device_features(issue, comp, sizes, np.zeros(len(lats)), np.zeros(len(lats)))
    np.testing.assert_allclose(X[1:, F.COLS_PREV_LAT.start] * base[1:], lat_us[:-1], rtol=1e-5)
    np.testing.assert_allclose(relative_lat_threshold(issue, comp, sizes, 4.0), 4.0 * base)


def test_relative_threshold_labels_fast_and_slow_devices_alike():
    # two devices 20x apart in speed, each with one slow period 20x its own
    # baseline: one relative threshold labels both the same way
    pattern = [1.0] * 40 + [20.0] * 6 + [1.0] * 20
    kw = dict(tput_threshold_mbps=0.5, groups=np.zeros(len(pattern)))
    for fast_us in (100.0, 2000.0):
        lats = np.array(pattern) * fast_us
        issue, comp = qd1_times(lats)
        thr = relative_lat_threshold(issue, comp, np.full(len(lats), SZ), 5.0)
        np.testing.assert_allclose(thr, 5.0 * fast_us)
        r = label_periods(lats, np.full(len(lats), SZ, float), lat_threshold_us=thr, **kw)
        assert r.slow.tolist() == [0] * 40 + [1] * 6 + [0] * 20
        assert r.keep.all()
        assert r.periods == [(40, 46)]
    # one threshold in us that suits the fast device makes every I/O of the
    # slow one "slow-looking": its fast I/Os all become noise
    lats = np.array(pattern) * 2000.0
    r = label_periods(lats, np.full(len(lats), SZ, float), lat_threshold_us=1000.0, **kw)
    assert r.periods == [(40, 46)]
    assert not r.keep[:40].any() and not r.keep[46:].any()


def test_relative_threshold_follows_a_device_that_changes_speed():
    # the baseline is causal: after the device becomes 10x slower for good,
    # the threshold catches up within a baseline window
    lats = np.r_[np.full(2000, 100.0), np.full(3000, 1000.0)]
    issue, comp = qd1_times(lats)
    thr = relative_lat_threshold(issue, comp, np.full(len(lats), SZ), 3.0)
    assert np.allclose(thr[:2000], 300.0)
    assert np.allclose(thr[2000 + F.BASELINE_WINDOW + F.BASELINE_STEP:], 3000.0)
    r = label_periods(lats, np.full(len(lats), SZ, float), lat_threshold_us=thr,
                      tput_threshold_mbps=5.0)
    assert not r.slow[2000 + F.BASELINE_WINDOW + F.BASELINE_STEP:].any()


def test_per_io_thresholds_must_match_the_ios():
    with pytest.raises(ValueError, match="expected 3 values"):
        label_periods(np.array([1.0, 2.0, 3.0]), np.full(3, SZ, float),
                      lat_threshold_us=np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="positive"):
        relative_lat_threshold([0], [1000], [SZ], 0.0)
