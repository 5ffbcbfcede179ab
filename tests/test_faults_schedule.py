"""Host-side parts of iobridge.lab.faults: period drawing, timeline queries, errors.
The device-mapper side runs in the VM (tests/vm/test_faults.py)."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from iobridge.lab import faults
from iobridge.core.errors import IobridgeError, UsageError
from iobridge.lab.faults import NORMAL, SLOW, SWITCHING, SlowPeriods, draw_periods


def _take(n, **kw):
    args = dict(normal_mean_s=0.5, slow_mean_s=0.3, min_s=0.05)
    args.update(kw)
    seed = args.pop("seed", 7)
    return list(itertools.islice(draw_periods(random.Random(seed), **args), n))


def test_periods_alternate_and_are_seeded():
    periods = _take(200)
    assert [s for s, _ in periods[:4]] == [NORMAL, SLOW, NORMAL, SLOW]
    assert all(a[0] != b[0] for a, b in zip(periods, periods[1:]))
    assert periods == _take(200)
    assert periods != _take(200, seed=8)
    assert _take(1, first=SLOW)[0][0] == SLOW


def test_periods_respect_min_and_means():
    periods = _take(40000)
    normal = [d for s, d in periods if s == NORMAL]
    slow = [d for s, d in periods if s == SLOW]
    assert min(normal) >= 0.05 and min(slow) >= 0.05
    # 20000 draws each: the sample mean is within ~1% (sd/sqrt(n)) of the true one.
    assert statistics.fmean(normal) == pytest.approx(0.5, rel=0.04)
    assert statistics.fmean(slow) == pytest.approx(0.3, rel=0.04)
    # Exponential beyond the minimum: the excess has sd equal to its mean.
    assert statistics.pstdev(normal) == pytest.approx(0.45, rel=0.08)


@pytest.mark.parametrize("kw", [
    dict(normal_mean_s=0.05),          # mean not above the minimum
    dict(slow_mean_s=0.01),
    dict(min_s=-1),
    dict(first="fast"),
])
def test_bad_period_parameters(kw):
    with pytest.raises(UsageError):
        _take(1, **kw)


def test_missing_device_and_bad_delay():
    with pytest.raises(IobridgeError, match="no such device: /dev/nonexistent-leg"):
        SlowPeriods("/dev/nonexistent-leg", "x", 20, 0.5, 0.3)
    with pytest.raises(UsageError, match="slow_ms"):
        SlowPeriods("/dev/null", "x", 0, 0.5, 0.3)
    with pytest.raises(UsageError, match="must exceed"):
        SlowPeriods("/dev/null", "x", 20, 0.01, 0.3)
    # /dev/null exists but is no block device: create() must say so.
    with pytest.raises(IobridgeError, match="not a block device"):
        SlowPeriods("/dev/null", "x", 20, 0.5, 0.3).create()


def test_timeline_queries():
    sp = SlowPeriods("/dev/null", "x", 20, 0.5, 0.3)
    sp.timeline = [(0, 100, NORMAL), (100, 110, SWITCHING), (110, 400, SLOW),
                   (400, 410, SWITCHING), (410, 500, NORMAL)]
    assert sp.state_at(50) == NORMAL and not sp.in_slow(50)
    assert sp.state_at(105) == SWITCHING and not sp.in_slow(105)
    assert sp.in_slow(110) and sp.in_slow(399) and not sp.in_slow(400)
    assert sp.state_at(500) is None and sp.state_at(-1) is None
    assert sp.slow_fraction() == pytest.approx(290 / 500)
    # A span counts for a period only if that period covers all of it.
    assert sp.state_over(10, 90) == NORMAL and sp.state_over(110, 399) == SLOW
    assert sp.state_over(90, 120) is None          # meets a switch
    assert sp.state_over(102, 108) is None         # inside the switch
    assert sp.state_over(300, 450) is None         # slow, switch, normal
    assert sp.state_over(110, 400) is None         # ends where slow ends
    assert sp.state_over(490, 510) is None and sp.state_over(-5, 5) is None   # outside the run


def test_slow_leg_reads_count_only_spans_inside_one_period(monkeypatch):
    """The sampler puts a span's reads in a period only if the period covers
    the whole span; reads of spans that meet a switch count for neither."""
    from types import SimpleNamespace

    from iobridge.lab import experiment

    sp = SlowPeriods("/dev/null", "x", 20, 0.5, 0.3)
    sp.timeline = [(0, 1000, NORMAL), (1000, 1010, SWITCHING), (1010, 2000, SLOW)]
    clock = itertools.count(0, 50)          # each now_ns() call 50 ns later
    # (slow leg, other leg) reads before each status: 10 + 10 per span
    counts = iter([(i * 10, i * 10) for i in range(100)])
    monkeypatch.setattr(experiment, "now_ns", lambda: next(clock))

    def status(name):
        a, b = next(counts)
        return SimpleNamespace(legs=[SimpleNamespace(reads=b), SimpleNamespace(reads=a)])
    monkeypatch.setattr(experiment.dmtarget, "status", status)
    rs = SimpleNamespace(name="x", slow=sp, SLOW_LEG=1)
    sampler = experiment.SlowLegReads(rs, interval_s=0)
    stops = iter([False] * 19 + [True])
    sampler._stop = SimpleNamespace(wait=lambda s: next(stops))   # noqa: SLF001
    sampler._run()                                                # noqa: SLF001
    # counts at t 0-50, 100-150, ... 1900-1950, so the spans are [0, 150],
    # [100, 250], ... [1800, 1950]: those ending before 1000 are normal (9),
    # those meeting the switch ([900, 1050] and [1000, 1150]) count for
    # neither, and the rest are slow (8).
    assert sampler.reads == {"normal": 90, "switching": 20, "slow": 80}
    assert sampler.all_reads == {"normal": 180, "switching": 40, "slow": 160}


def test_dmsetup_failures_are_clear(tmp_path, monkeypatch):
    fake = tmp_path / "dmsetup"
    fake.write_text("#!/bin/sh\necho 'device-mapper: reload ioctl on x failed: "
                    "No such device or address' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(IobridgeError, match=r"dmsetup load x .* failed: device-mapper: reload"):
        faults._dmsetup("load", "x", "--table", "0 8 delay /dev/x 0 0")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(IobridgeError, match="dmsetup not found"):
        faults._dmsetup("info")


def test_read_count_needs_a_block_device():
    with pytest.raises(IobridgeError):
        faults.read_count("/dev/nonexistent-leg")
    with pytest.raises(IobridgeError, match="not a block device"):
        faults.read_count("/dev/null")
