"""Host test: the leg feature reader's seq-retry logic and feature maths on a
plain buffer laid out like the kernel's leg_features array (no kernel)."""

from __future__ import annotations

import numpy as np
import pytest

from iobridge.core import abi
from iobridge.core import features
from iobridge.core.errors import IobridgeError
from iobridge.kernel.legstate import LEG_DTYPE, LegSnapshot, consistent_copy
from iobridge.kernel.observer import BlockObserver


def table(n: int = 8) -> tuple[bytearray, np.ndarray]:
    """A raw buffer standing in for the mmap, and a record view to set it up."""
    buf = bytearray(n * LEG_DTYPE.itemsize)
    return buf, np.frombuffer(buf, dtype=LEG_DTYPE)


def test_dtype_is_the_abi_record():
    assert LEG_DTYPE.itemsize == 112
    assert LEG_DTYPE.fields["seq"][1] == 0 and LEG_DTYPE.fields["dev"][1] == 4
    assert LEG_DTYPE["prev_lat_ns"].shape == (abi.HISTORY,)
    assert abi.HISTORY == features.HISTORY


def test_stable_rows_copy_once_and_match():
    buf, t = table()
    t["seq"][:] = [0, 2, 4, 6, 8, 10, 12, 14]
    t["issued"][:] = np.arange(8) * 10
    rec, stable, retries = consistent_copy(buf, [5, 1, 3])
    assert stable.all() and retries == 0
    assert rec["issued"].tolist() == [50, 10, 30]
    t["issued"][5] = 99                       # a copy, not a view
    assert rec["issued"][0] == 50


def test_odd_row_is_retried_and_only_that_row():
    buf, t = table()
    t["seq"][2] = 7                           # a writer holds row 2
    t["prev_lat_ns"][2] = [1, 2, 3]
    copies = []

    def writer(attempt, row):                 # ...and finishes after the first copy
        copies.append((attempt, row))
        if attempt == 0 and row == 2:
            t["seq"][2] = 8
            t["prev_lat_ns"][2] = [30, 20, 10]

    rec, stable, retries = consistent_copy(buf, [0, 2, 4], between=writer)
    assert stable.tolist() == [True, True, True]
    assert retries == 1 and copies == [(0, 0), (0, 2), (0, 4), (1, 2)]
    assert rec["prev_lat_ns"][1].tolist() == [30, 20, 10]


def test_row_changed_during_the_copy_is_retried():
    buf, t = table()
    t["seq"][1] = 4
    t["prev_bytes"][1] = [4096, 4096, 4096]

    def writer(attempt, row):                 # a whole update lands mid-copy
        if attempt == 0:
            t["seq"][1] += 2
            t["prev_bytes"][1] = [8192, 4096, 4096]

    rec, stable, retries = consistent_copy(buf, [1], between=writer)
    assert stable.all() and retries == 1
    assert rec["prev_bytes"][0].tolist() == [8192, 4096, 4096]


def test_row_never_stable_is_flagged_after_bounded_retries():
    buf, t = table()
    t["seq"][3] = 1                           # held for ever
    rec, stable, retries = consistent_copy(buf, [0, 3], max_retries=4)
    assert stable.tolist() == [True, False]
    assert retries == 4


def snapshot_of(buf, rows) -> LegSnapshot:
    rec, stable, retries = consistent_copy(buf, rows)
    return LegSnapshot.from_records(rows, rec, stable, retries)


def test_features_in_heimdall_units_and_no_history_is_zero():
    buf, t = table()
    t["dev"][0] = (8 << 20) | 16
    t["inflight"][0] = 3
    t["issued"][0], t["completed"][0] = 10, 7
    t["last_complete_ns"][0] = 5_000_000
    t["prev_lat_ns"][0] = [2_000_000, 500_000, 0]      # 2 ms, 0.5 ms, none yet
    t["prev_bytes"][0] = [65536, 4096, 0]
    t["prev_qlen"][0] = [2, 1, 0]
    t["dev"][1] = (8 << 20) | 32                       # assigned, never completed
    s = snapshot_of(buf, [0, 1])
    np.testing.assert_allclose(s.prev_lat_us[0], [2000.0, 500.0, 0.0])
    # MB/s = bytes per microsecond
    np.testing.assert_allclose(s.prev_tput_mbps[0], [65536 / 2000, 4096 / 500, 0.0])
    assert s.prev_tput_mbps[1].tolist() == [0.0, 0.0, 0.0]
    assert s.idle_ns(6_000_000) == [1_000_000, None]
    assert s.inflight.tolist() == [3, 0]
    assert s.prev_qlen[0].tolist() == [2, 1, 0]


def test_new_samples_are_the_completions_since_last_seen():
    buf, t = table()
    t["dev"][0] = (8 << 20) | 16
    t["completed"][0] = 7
    t["prev_lat_ns"][0] = [2_000_000, 500_000, 250_000]
    t["prev_bytes"][0] = [4096, 4096, 8192]
    t["prev_lat_qlen"][0] = [3, 0, 1]
    s = snapshot_of(buf, [0])
    lat, tput, per_read = s.new_samples(np.array([5]))[0]      # two new completions
    np.testing.assert_allclose(lat, [2000.0, 500.0])
    np.testing.assert_allclose(tput, [4096 / 2000, 4096 / 500])
    # per read: the latency over the bios ahead of it at queue time + 1
    np.testing.assert_allclose(per_read, [2000.0 / 4, 500.0])
    assert len(s.new_samples(np.array([7]))[0][0]) == 0       # nothing new
    assert len(s.new_samples(np.array([0]))[0][0]) == 3       # more than the history holds


def test_kprobe_observer_refuses_leg_features():
    obs = BlockObserver(probe="kprobe")
    with pytest.raises(IobridgeError, match="not loaded"):
        obs.leg_features()
    obs.probe, obs.bpf = "kprobe", object()  # as open() leaves it with kprobes
    with pytest.raises(IobridgeError, match="block_bio_queue") as err:
        obs.leg_features()
    assert err.value.hint == "use --probe tracepoint"
