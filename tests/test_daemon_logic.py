"""Pure logic of the agent daemon: target listing, scores, probing, status text."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

from iobridge.core import abi
from iobridge.daemon import agent as daemon
from iobridge.core import decision


LISTING = """mirror: 0 204800 iobridge 3 least_inflight 2 AF 0 0 0 0 251:0 10 5 0 0 1 7 3 251:16 4 5 0 0 0 0 4
other: 0 2048 iobridge 0 round_robin 3 AAA 1 2 3 4 7:0 0 0 0 0 0 0 0 7:1 0 0 0 0 0 0 0 7:2 0 0 0 0 0 0 0
"""


def test_status_listing_gives_ids_legs_and_kernel_devs():
    targets = daemon.parse_status_listing(LISTING + "No devices found\n")
    assert [t.name for t in targets] == ["mirror", "other"]
    m = targets[0]
    assert m.target_id == 3 and m.legs == ("251:0", "251:16")
    assert m.kdevs == ((251 << 20) | 0, (251 << 20) | 16)
    assert len(targets[1].kdevs) == 3


def test_kernel_scores_match_the_scalar_rule():
    p = np.array([0.0, 0.0825, 0.5, 1.0, -0.1, 1.7], dtype=np.float32)
    assert decision.kernel_scores(p).tolist() == [decision.kernel_score(float(v)) for v in p]
    assert decision.kernel_score(0.25) == 750_000


class FixedModel:
    threshold = 0.5

    def __init__(self, p):
        self.p = p

    def p_slow(self, rows):
        return np.resize(np.asarray(self.p, dtype=np.float32), len(rows))


def legs(n, idle):
    z = np.zeros((n, abi.HISTORY))
    return decision.LegArrays(np.zeros(n), z, z + 100.0, z + 40.0, np.asarray(idle, dtype=float))


def test_an_avoided_leg_is_probed_after_probe_after_ns():
    # P(slow) 0.9 everywhere: every leg avoided, unless idle long enough.
    maker = decision.DecisionMaker(FixedModel([0.9]), probe_after_ns=100)
    table = maker.decide(0, legs(3, [np.nan, 50, 150]))
    assert table.probe.tolist() == [False, False, True]
    assert table.admit.tolist() == [[False] * 4, [False] * 4, [True] * 4]
    assert (table.score[2] == 0).all()      # best score: wins the tie-break


def test_no_probing_when_disabled():
    table = decision.DecisionMaker(FixedModel([0.9])).decide(0, legs(2, [1e12, 1e12]))
    assert not table.admit.any() and not table.probe.any()


def test_leg_arrays_and_states_give_the_same_rows():
    states = [decision.LegState(2, [1, 2, 3], [10, 20, 30], [4, 5, 6], 7),
              decision.LegState(0, [0, 0, 0], [0, 0, 0], [0, 0, 0], None)]
    a = decision.LegArrays.from_states(states)
    rows = decision.feature_rows(a)
    assert rows.shape == (2 * abi.NUM_SIZE_BUCKETS, 12)
    assert rows[0, 2] == 2 and rows[3, 3:6].tolist() == [1, 2, 3]
    assert rows[4:, 2:].sum() == 0
    assert rows[:4, 1].tolist() == list(decision.BUCKET_SIZE_BYTES)
    assert np.isnan(a.idle_ns[1])


def test_phase_times_percentiles():
    t = daemon.PhaseTimes()
    for ns in (1000,) * 99 + (1_000_000,):
        t.add("infer", ns)
    s = t.summary()["infer"]
    assert s["count"] == 100 and 0.9 <= s["p50_us"] <= 1.2 and s["p99_us"] <= 1.2


def test_format_status_renders_everything():
    st = {"pid": 1, "agent_alive": True, "status_age_s": 0.2, "shadow": False, "tick_ms": 1.0,
          "ttl_ticks": 5, "max_silence_ms": 50, "program_attached": True, "pins": ["/x"],
          "table_age_ms": 0.7, "model": {"path": "m.onnx", "threshold": 0.08, "sha256": "ab" * 32},
          "routing": {"routed": 5, "default": 2, "silent": 1}, "counters": {"ticks": 9},
          "timing_us": daemon.PhaseTimes().summary(), "discovery_error": None,
          "targets": [{"name": "mirror", "target_id": 0, "legs": [
              {"dev": "251:0", "admit": [True, True, False, True], "p_slow": [0.1] * 4, "probe": True}]}]}
    text = daemon.format_status(st)
    assert "leg 0 251:0: admit per bucket [AA-A]" in text and "(probe)" in text
    assert "5 reads by the table, 2 by the module default (1 while the agent was silent)" in text


def test_read_status_without_agent(tmp_path):
    with pytest.raises(daemon.IobridgeError, match="the agent is not running"):
        daemon.read_status(tmp_path / "status.json")


def test_bpffs_check_uses_the_innermost_mount(monkeypatch):
    import psutil

    from iobridge.kernel import pins

    Part = collections.namedtuple("Part", "mountpoint fstype")
    mounts = [Part("/", "ext4"), Part("/sys", "sysfs"), Part("/sys/fs/bpf", "bpf"),
              Part("/sys/fs/bpfx", "tmpfs")]
    monkeypatch.setattr(psutil, "disk_partitions", lambda all=False: mounts)
    assert pins._is_bpffs(Path("/sys/fs/bpf")) and pins._is_bpffs(Path("/sys/fs/bpf/iobridge"))
    assert not pins._is_bpffs(Path("/sys/fs/bpfx/a")) and not pins._is_bpffs(Path("/sys/kernel"))
