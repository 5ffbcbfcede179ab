"""Per-leg admission feature state on the real kernel: bio-level latency of
stacked legs, exact counts, queue-length history, seq consistency under
concurrent load, and slot assignment."""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest
from conftest import run

from iobridge.core import abi
from iobridge.kernel import blockdev
from iobridge.kernel.observer import BlockObserver

pytestmark = pytest.mark.vm

DEBIAN_JIFFY_US = 4_000      # Debian's kernels: CONFIG_HZ=250


def fio_args(dev: str, rw: str, *extra: str) -> list[str]:
    return ["fio", "--name=legs", f"--filename={dev}", f"--rw={rw}", "--bs=4k", "--direct=1",
            "--ioengine=psync", "--randrepeat=0", "--norandommap", "--output-format=json",
            *extra]


def fio(dev: str, rw: str, *extra: str) -> dict:
    job = json.loads(run(fio_args(dev, rw, *extra)).stdout)["jobs"][0]
    assert job["error"] == 0, job
    return job


def kdev(path: str) -> int:
    return blockdev.resolve(path).kdev


@pytest.fixture(scope="module")
def observer():
    """One loaded observer for the module: a BCC compile takes ~30 s under TCG."""
    with BlockObserver() as obs:
        print(f"observer compile time in the VM: {obs.compile_seconds:.1f}s")
        yield obs


@pytest.fixture
def legs(observer):
    m = observer.leg_features()
    yield m
    m.assign([])
    assert observer.legs_dropped() == 0 and observer.legs_walk_overflow() == 0


def test_dm_delay_leg_is_timed_at_bio_level_apart_from_the_nullb_below(legs, make_nullb,
                                                                       make_dm_delay):
    n = 12
    nullb = make_nullb(size_mb=64)
    dm = make_dm_delay(nullb, read_ms=20, write_ms=0)
    top, low = kdev(dm), kdev(nullb)
    legs.assign([top, low])
    before = legs.read_devs([top, low])
    job = fio(dm, "randread", f"--number_ios={n}")
    s = legs.read_devs([top, low])
    assert s.stable.all()
    print(f"dm-delay leg prev_lat_us {s.prev_lat_us[0].round(1).tolist()}, "
          f"null_blk leg below {s.prev_lat_us[1].round(1).tolist()}, "
          f"fio clat max {job['read']['clat_ns']['max'] / 1e3:.1f} us")
    # dm is bio-based (no requests, so no block_rq_* events): only the bio
    # hooks see it. Each of its bios becomes one clone bio on the null_blk.
    assert (s.issued - before.issued).tolist() == [n, n]
    assert (s.completed - before.completed).tolist() == [n, n]
    assert s.inflight.tolist() == [0, 0]
    # The 20 ms delay, less at most one jiffy: dm-delay since 6.8 times short
    # delays with a kthread that compares jiffies, so a read may leave up to a
    # jiffy early (4 ms at Debian's HZ=250; 19.1-19.3 ms seen on 6.12), where
    # 6.1's timer never fired early.
    assert (s.prev_lat_us[0] >= 20_000 - DEBIAN_JIFFY_US).all()
    # From queue to completion inside the kernel: within what fio measured.
    assert (s.prev_lat_us[0] <= job["read"]["clat_ns"]["max"] / 1e3).all()
    # The clone reaches the null_blk only after the delay: its own time is short.
    assert (s.prev_lat_us[1] > 0).all() and (s.prev_lat_us[1] < 5_000).all()
    assert (s.prev_bytes == 4096).all()
    np.testing.assert_allclose(s.prev_tput_mbps, 4096 / s.prev_lat_us)
    assert (s.prev_qlen == 0).all()   # psync: one at a time


def test_counts_are_exact_and_history_is_the_last_ios(legs, make_nullb):
    n, device_us = 300, 200
    nullb = make_nullb(size_mb=64, irqmode=2, completion_nsec=device_us * 1000)
    dev = kdev(nullb)
    slot = legs.assign([dev])[dev]
    before = legs.read([slot])
    t0 = time.monotonic_ns()
    fio(nullb, "randread", f"--number_ios={n}")
    s = legs.read([slot])
    now = time.monotonic_ns()
    print(f"issued {s.issued[0] - before.issued[0]}, completed "
          f"{s.completed[0] - before.completed[0]}, prev_lat_us {s.prev_lat_us[0].round(1)}, "
          f"idle_ns {s.idle_ns(now)[0]}")
    assert s.issued[0] - before.issued[0] == n
    assert s.completed[0] - before.completed[0] == n
    assert s.inflight[0] == 0
    assert t0 < s.last_complete_ns[0] <= now       # the kernel's clock is CLOCK_MONOTONIC
    assert 0 <= s.idle_ns(now)[0] < 5e9
    assert (s.prev_lat_us[0] >= device_us).all()   # null_blk's timer holds each one
    assert (s.prev_bytes[0] == 4096).all() and (s.prev_qlen[0] == 0).all()
    # The agent's lean read gives the snapshot's samples: the newest HISTORY.
    samples, done = legs.new_samples([slot], before.completed.tolist())
    (lat, tput, per_read), = s.new_samples(before.completed)
    assert done == s.completed.tolist()
    assert samples[0][0] == lat.tolist() == s.prev_lat_us[0].tolist()
    assert samples[0][1] == tput.tolist() and len(lat) == abi.HISTORY
    # psync: nothing ahead of any of them, so a read's own latency
    assert (s.prev_lat_qlen[0] == 0).all() and samples[0][2] == per_read.tolist() == lat.tolist()


def test_bios_merged_into_one_request_all_complete(legs, observer, make_nullb):
    # null_blk's bios get no block_bio_complete (blk_update_request clears
    # BIO_TRACE_COMPLETION): the observer ends them by walking rq->bio at
    # block_rq_complete. Sequential 4k reads submitted 32 at a time are
    # plug-merged, so requests carry several bios each.
    n = 512
    nullb = make_nullb(size_mb=64, irqmode=2, completion_nsec=100_000)
    dev = blockdev.resolve(nullb)
    slot = legs.assign([dev.kdev])[dev.kdev]
    observer.set_devices([dev])
    rq_before = observer.snapshot().get(dev.kdev)
    before = legs.read([slot])
    fio(nullb, "read", f"--number_ios={n}", "--ioengine=libaio", "--iodepth=32",
        "--iodepth_batch_submit=32", "--iodepth_batch_complete_min=32")
    s = legs.read([slot])
    rq = observer.snapshot()[dev.kdev]
    requests = rq.completed - (rq_before.completed if rq_before else 0)
    observer.set_devices([])
    print(f"{n} bios in {requests} requests; leg issued {s.issued[0] - before.issued[0]}, "
          f"completed {s.completed[0] - before.completed[0]}, inflight {s.inflight[0]}")
    assert requests < n // 2                       # merging happened
    assert s.issued[0] - before.issued[0] == n
    assert s.completed[0] - before.completed[0] == n and s.inflight[0] == 0


def test_queue_length_history_at_iodepth_8(legs, make_nullb):
    n, depth = 1600, 8     # enough bios for dozens of distinct views under emulation
    nullb = make_nullb(size_mb=64, irqmode=2, completion_nsec=1_000_000)
    dev = kdev(nullb)
    slot = legs.assign([dev])[dev]
    before = legs.read([slot])
    proc = subprocess.Popen(fio_args(nullb, "randread", f"--number_ios={n}",
                                     "--ioengine=libaio", f"--iodepth={depth}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    qlens, lat_qlens, inflight = [], [], []
    last_issued = None
    while proc.poll() is None:
        s = legs.read([slot])
        # One sample per new view: once three bios of this run have pushed their
        # queue lengths, and only when another bio was issued since the last
        # sample (fio's exit is slow under emulation; repeating the last view
        # for all of it would weigh the drained tail by time, not by bios).
        issued = s.issued[0] - before.issued[0]
        if s.stable[0] and 3 <= issued and issued != last_issued:
            qlens.append(s.prev_qlen[0].copy())
            lat_qlens.append(s.prev_lat_qlen[0].copy())
            inflight.append(s.inflight[0])
            last_issued = issued
        time.sleep(0.002)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    s = legs.read([slot])
    q = np.array(qlens)
    print(f"{len(q)} samples; prev_qlen[0] distribution "
          f"{np.bincount(q[:, 0], minlength=depth).tolist()}; inflight max {max(inflight)}")
    assert s.issued[0] - before.issued[0] == n and s.completed[0] - before.completed[0] == n
    assert s.inflight[0] == 0
    assert len(q) > 20
    assert q.max() <= depth - 1 and max(inflight) <= depth
    # With a 1 ms device, fio keeps the queue full: most bios find others ahead.
    assert (q[:, 0] > 0).mean() > 0.5
    assert q.max() == depth - 1
    # The same for the bios of the newest latencies (kept at completion).
    lq = np.array(lat_qlens)
    assert lq.max() <= depth - 1 and (lq[:, 0] > 0).mean() > 0.5, np.bincount(lq[:, 0])


def test_reads_stay_consistent_under_concurrent_load(legs, make_nullb):
    sizes = (4096, 8192, 16384, 65536)
    jobs, depth, seconds = 2, 16, 8
    nullb = make_nullb(size_mb=256, submit_queues=2)
    dev = kdev(nullb)
    slot = legs.assign([dev])[dev]
    before = legs.read([slot])
    seq0 = before.seq[0]
    split = ":".join(f"{b // 1024}k/25" for b in sizes)
    proc = subprocess.Popen(
        fio_args(nullb, "randread", "--ioengine=libaio", f"--iodepth={depth}",
                 f"--numjobs={jobs}", f"--bssplit={split}", "--time_based",
                 f"--runtime={seconds}", "--group_reporting"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reads = unstable = checked = 0
    retries0 = legs.retries
    per_read = []
    while proc.poll() is None:
        s = legs.read([slot])
        reads += 1
        per_read.append(s.retries)
        if not s.stable[0]:
            unstable += 1
            continue
        assert 0 <= s.inflight[0] <= jobs * depth
        assert s.completed[0] <= s.issued[0]
        assert s.prev_qlen[0].max() < jobs * depth
        # Once three completions have written the history it is all real.
        if s.completed[0] - before.completed[0] >= 3 + s.contended[0] - before.contended[0]:
            checked += 1
            assert set(s.prev_bytes[0].tolist()) <= set(sizes), s.prev_bytes[0]
            assert (s.prev_lat_us[0] > 0).all(), s.prev_lat_us[0]
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    ios = json.loads(out)["jobs"][0]["read"]["total_ios"]
    s = legs.read([slot])
    issued = s.issued[0] - before.issued[0]
    completed = s.completed[0] - before.completed[0]
    contended = s.contended[0] - before.contended[0]
    seq = s.seq[0]
    print(f"fio {ios} I/Os; {reads} reads ({checked} checked), {legs.retries - retries0} "
          f"row retries, {unstable} unstable; kernel: issued {issued}, contended {contended}; "
          f"retries per read histogram {np.bincount(per_read).tolist()}")
    # Enough reads checked against a history fio's reads had written. Not a
    # share of all reads: the loop starts reading before fio's I/O does, and
    # fio's start-up took most of the run on 6.12 under single-threaded TCG
    # with a busy host core (1,853 checked of 6,911).
    assert reads > 1000 and checked >= 500
    # A vCPU preempted by the host while it holds a record can outlast the
    # retries; that must stay rare.
    assert unstable * 100 <= reads
    assert issued == completed == ios and s.inflight[0] == 0
    # Every update either took the record (seq += 2) or was counted contended.
    assert seq % 2 == 0
    assert (seq - seq0) // 2 == issued + completed - contended


def test_only_assigned_devices_are_tracked_and_slots_are_reused(legs, observer, make_nullb):
    a, b, c = (make_nullb(size_mb=16) for _ in range(3))
    ka, kb, kc = kdev(a), kdev(b), kdev(c)
    everything = np.arange(abi.MAX_LEG_SLOTS)

    def total_issued() -> int:
        return int(legs.read(everything).issued.sum())

    def kernel_slots() -> dict[int, int]:
        return {int(k.value): int(v.value) for k, v in observer.bpf[b"leg_slots"].items()}

    first = legs.assign([ka, kb])
    assert kernel_slots() == first and len(set(first.values())) == 2
    t0 = total_issued()
    fio(c, "randread", "--number_ios=50")
    assert total_issued() == t0                      # c has no slot: not tracked
    fio(b, "randread", "--number_ios=50")
    assert legs.read([first[kb]]).issued[0] == 50

    second = legs.assign([kb, kc])
    assert second[kb] == first[kb]                   # kept, with its counts
    assert kernel_slots() == second
    s = legs.read([second[kb], second[kc]])
    assert s.dev.tolist() == [kb, kc] and s.issued.tolist() == [50, 0]
    if second[kc] != first[ka]:
        assert legs.read([first[ka]]).dev[0] == 0    # a's record was cleared
    t1 = total_issued()
    fio(a, "randread", "--number_ios=50")            # a was freed
    assert total_issued() == t1
    fio(c, "randread", "--number_ios=20")
    assert legs.read([second[kc]]).issued[0] == 20

    assert legs.assign([]) == {} and kernel_slots() == {}
    assert (legs.read(everything).dev == 0).all()
