"""The block observer on the real kernel: counts, latency, event stream, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import run

from iobridge.core import abi
from iobridge.kernel import blockdev
from iobridge.kernel.observer import BlockObserver, DevSnapshot

# null_blk completing each request after 1 ms from a timer (irqmode=2), so
# the device time dominates the software path under emulation.
DEVICE_NS = 1_000_000
N_IOS = 400


def fio(dev: str, rw: str, n: int, extra: tuple[str, ...] = ()) -> dict:
    out = run(["fio", "--name=obs", f"--filename={dev}", f"--rw={rw}", "--rwmixread=70",
               "--bs=4k", "--direct=1", "--ioengine=psync", f"--number_ios={n}",
               "--randrepeat=0", "--norandommap", "--output-format=json", *extra]).stdout
    job = json.loads(out)["jobs"][0]
    assert job["error"] == 0, job
    return job


def attached_tracepoints() -> list[str]:
    """"PID:HOOK" for each attached BPF program as bpftool sees it: raw
    tracepoint links (with their owners' pids) and kprobe perf events."""
    out = [f"{e.get('pid')}:{e.get('tracepoint') or e.get('func')}"
           for e in json.loads(run(["bpftool", "perf", "show", "--json"]).stdout or "[]")]
    for link in json.loads(run(["bpftool", "link", "show", "--json"]).stdout or "[]"):
        if link.get("type") == "raw_tracepoint":
            out += [f"{p['pid']}:{link.get('tp_name')}" for p in link.get("pids", [])]
    return out


def drain(obs: BlockObserver) -> None:
    """Empty the observer's event stream."""
    while len(obs.poll_events(timeout_ms=0)):
        pass


@pytest.fixture
def slow_nullb(make_nullb):
    return make_nullb(size_mb=64, irqmode=2, completion_nsec=DEVICE_NS)


@pytest.fixture(scope="module")
def observer():
    """One loaded observer (tracepoints, event stream) shared by the tests
    that only need to point it at their own device: a BCC compile takes
    about 30 s under emulation."""
    with BlockObserver(stream=True) as obs:
        print(f"observer compile time in the VM: {obs.compile_seconds:.1f}s")
        yield obs


def test_observer_counts_match_fio_exactly_and_latency_agrees(observer, slow_nullb):
    obs = observer
    dev = blockdev.resolve(slow_nullb)
    obs.set_devices([dev])
    assert obs.probe == "tracepoint"
    mine = [a for a in attached_tracepoints() if a.startswith(f"{os.getpid()}:")]
    assert f"{os.getpid()}:block_rq_issue" in mine and f"{os.getpid()}:block_rq_complete" in mine
    before = obs.snapshot().get(dev.kdev, DevSnapshot.empty())
    job = fio(slow_nullb, "randrw", N_IOS)
    snap = obs.snapshot()[dev.kdev].minus(before)
    drain(obs)   # keep the shared stream empty for the next test
    reads, writes = job["read"]["total_ios"], job["write"]["total_ios"]
    assert reads + writes == N_IOS
    assert snap.completed == N_IOS
    assert snap.issued == N_IOS
    assert snap.inflight == 0
    assert snap.ios[abi.OP_READ] == reads and snap.ios[abi.OP_WRITE] == writes
    assert snap.bytes[abi.OP_READ] == reads * 4096
    assert snap.errors == 0
    assert int(snap.hist.sum()) == N_IOS

    # Latency: the observer times issue -> completion inside the block layer,
    # fio times submission -> completion from user space, which contains it.
    # So each observer percentile is at most fio's (the larger of its read
    # and write figures) plus one histogram slot (12.5%), and never below the
    # device's 1 ms completion timer. At the median the software path outside
    # the block layer is small next to the 1 ms device time, so there the
    # observer is also at least 65% of fio's smaller figure (seen: 97%). In
    # the tail, fio's figure also holds its own preemption on a loaded
    # emulated CPU (seen: fio p99 4-24 ms, observer 2.9 ms), so no such lower
    # bound is claimed for p99.
    figs = snap.figures()
    for q, key in (("50.000000", "lat_p50_us"), ("99.000000", "lat_p99_us")):
        fio_hi = max(job["read"]["clat_ns"]["percentile"][q],
                     job["write"]["clat_ns"]["percentile"][q]) / 1e3
        fio_lo = min(job["read"]["clat_ns"]["percentile"][q],
                     job["write"]["clat_ns"]["percentile"][q]) / 1e3
        ours = figs[key]
        print(f"p{q[:2]}: observer {ours:.1f} us, fio read/write {fio_lo:.1f}..{fio_hi:.1f} us")
        assert ours >= DEVICE_NS / 1e3, "cannot be faster than the device's completion timer"
        assert ours <= fio_hi * 1.125, (ours, fio_hi)
        if key == "lat_p50_us":
            assert ours >= fio_lo * 0.65, (ours, fio_lo)


def test_counts_stay_exact_with_interrupt_completions_at_depth_16(observer, make_nullb):
    # Completions arrive from a timer interrupt while requests are being
    # issued on the same CPU: no completion may be lost (in-flight returns
    # to zero, every I/O counted once).
    nullb = make_nullb(size_mb=64, irqmode=2, completion_nsec=100_000)
    dev = blockdev.resolve(nullb)
    observer.set_devices([dev])
    before = observer.snapshot().get(dev.kdev, DevSnapshot.empty())
    missed_before = observer.missed_starts()
    n = 3000
    job = fio(nullb, "randrw", n, ("--ioengine=libaio", "--iodepth=16"))
    time.sleep(0.2)
    snap = observer.snapshot()[dev.kdev].minus(before)
    drain(observer)
    assert job["read"]["total_ios"] + job["write"]["total_ios"] == n
    assert snap.completed == n and snap.issued == n
    assert snap.inflight == 0
    assert snap.ios[abi.OP_READ] == job["read"]["total_ios"]
    assert observer.missed_starts() == missed_before


def test_kprobe_fallback_counts_match_fio_exactly(slow_nullb):
    dev = blockdev.resolve(slow_nullb)
    with BlockObserver(probe="kprobe", devs=[dev]) as obs:
        assert obs.probe == "kprobe"
        mine = [a for a in attached_tracepoints() if a.startswith(f"{os.getpid()}:")]
        assert f"{os.getpid()}:blk_mq_start_request" in mine, mine
        job = fio(slow_nullb, "randrw", N_IOS)
        snap = obs.snapshot()[dev.kdev]
    assert snap.completed == N_IOS
    assert snap.ios[abi.OP_READ] == job["read"]["total_ios"]
    assert snap.ios[abi.OP_WRITE] == job["write"]["total_ios"]


def test_event_stream_has_one_record_per_io(observer, make_nullb):
    obs = observer
    nullb = make_nullb(size_mb=64)
    dev = blockdev.resolve(nullb)
    size = 64 << 20
    obs.set_devices([dev])
    drain(obs)
    dropped_before = obs.dropped_events()
    before = obs.snapshot().get(dev.kdev, DevSnapshot.empty())
    fio(nullb, "randread", N_IOS)
    events = []
    deadline = time.monotonic() + 10
    while sum(len(e) for e in events) < N_IOS and time.monotonic() < deadline:
        events.append(obs.poll_events(timeout_ms=50))
    completed = obs.snapshot()[dev.kdev].minus(before).completed
    ev = np.concatenate(events)
    assert completed == N_IOS
    assert obs.dropped_events() == dropped_before
    assert len(ev) == N_IOS
    assert (ev["dev"] == dev.kdev).all()
    assert (ev["op"] == abi.OP_READ).all()
    assert (ev["bytes"] == 4096).all()
    assert (ev["complete_ns"] > ev["issue_ns"]).all()
    assert (ev["sector"] * 512 + ev["bytes"] <= size).all()
    assert (ev["queue_len"] == 0).all(), "psync at depth 1: nothing else in flight"


def test_event_stream_counts_drops_when_the_ring_is_full(make_nullb):
    nullb = make_nullb(size_mb=64)
    dev = blockdev.resolve(nullb)
    # One page holds ~70 events: without draining, most of 400 are dropped,
    # and every I/O is either delivered or counted as dropped.
    with BlockObserver(devs=[dev], stream=True, ringbuf_pages=1) as obs:
        assert obs.dropped_events() == 0
        fio(nullb, "randread", N_IOS)
        delivered = 0
        for _ in range(5):
            delivered += len(obs.poll_events(timeout_ms=50))
        dropped = obs.dropped_events()
    assert dropped > 0
    assert delivered + dropped == N_IOS


def run_cli_until_ctrl_c(args: list[str], during) -> tuple[subprocess.Popen, str, str]:
    """Start `iobridge ARGS`, wait until it says it is attached, call
    during(proc), then Ctrl-C it; returns the process and its output."""
    proc = subprocess.Popen([sys.executable, "-m", "iobridge.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Lines before "attached" (a compiler's warnings) are kept for the
        # message; reading on to EOF here would wait for a process that runs
        # until Ctrl-C.
        seen = []
        while not (seen and "attached" in seen[-1]):
            line = proc.stderr.readline()
            assert line, "".join(seen) + "(the command ended before saying it was attached)"
            seen.append(line)
        during(proc)
        time.sleep(1.5)   # let the last interval or drain pass
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    return proc, out, err


def test_observe_cli_reports_and_detaches_on_ctrl_c(slow_nullb):
    jobs = []

    def during(proc):
        assert any(a.startswith(f"{proc.pid}:block_rq_issue") for a in attached_tracepoints())
        jobs.append(fio(slow_nullb, "randrw", N_IOS))

    proc, out, _ = run_cli_until_ctrl_c(
        ["observe", "--dev", slow_nullb, "--interval", "0.5", "--json"], during)
    job = jobs[0]
    lines = [json.loads(x) for x in out.splitlines()]
    reports, summary = lines[:-1], lines[-1]["summary"]
    name = os.path.basename(os.path.realpath(slow_nullb))
    assert reports and all(name in r["devices"] for r in reports)
    assert summary["devices"][name]["completed"] == N_IOS
    assert summary["devices"][name]["read_ios"] == job["read"]["total_ios"]
    assert sum(r["devices"][name]["completed"] for r in reports) == N_IOS
    assert not any(a.startswith(f"{proc.pid}:") for a in attached_tracepoints()), \
        "programs still attached after Ctrl-C"


def test_observe_cli_rejects_an_unknown_device():
    proc = run([sys.executable, "-m", "iobridge.cli", "observe", "--dev", "nosuchdisk"],
               check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip() == ("iobridge: error: no block device named 'nosuchdisk' "
                                   "(lsblk lists the devices)")


def test_record_writes_every_io_and_survives_ctrl_c(slow_nullb, tmp_path):
    from iobridge.offline.trace import read_trace

    out = tmp_path / "rec.parquet"
    jobs = []
    _, stdout, _ = run_cli_until_ctrl_c(
        ["record", "--dev", slow_nullb, "--out", str(out), "--json"],
        lambda proc: jobs.append(fio(slow_nullb, "randrw", N_IOS)))
    job = jobs[0]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["interrupted"] and summary["dropped_in_kernel"] == 0
    trace = read_trace(out)
    name = os.path.basename(os.path.realpath(slow_nullb))
    assert len(trace) == N_IOS == summary["ios"]
    assert set(trace["device"]) == {name}
    assert int((trace["op"] == abi.OP_READ).sum()) == job["read"]["total_ios"]
    assert int((trace["op"] == abi.OP_WRITE).sum()) == job["write"]["total_ios"]
    assert (trace["latency_ns"] >= DEVICE_NS).all()
    assert (trace["complete_ns"] - trace["issue_ns"] == trace["latency_ns"]).all()
    assert (trace["issue_ns"] >= 0).all() and (trace["bytes"] == 4096).all()


def test_record_refuses_to_overwrite(tmp_path):
    out = tmp_path / "exists.parquet"
    out.write_text("keep me")
    proc = run([sys.executable, "-m", "iobridge.cli", "record", "--out", str(out)], check=False)
    assert proc.returncode == 2 and "exists" in proc.stderr
    assert out.read_text() == "keep me"


def test_record_leg_writes_every_bio_of_a_stacked_device(make_nullb, make_dm_delay, tmp_path):
    """`record --leg` on a dm-delay device (bio-based: no request events of
    its own) writes one bio-level record per read, timed with the delay."""
    from iobridge.offline.trace import read_trace

    nullb = make_nullb(64)
    delayed = make_dm_delay(nullb, read_ms=8, write_ms=0)
    out = tmp_path / "leg.parquet"
    jobs = []
    _, stdout, _ = run_cli_until_ctrl_c(
        ["record", "--leg", delayed, "--out", str(out), "--json"],
        lambda proc: jobs.append(fio(delayed, "randread", 150)))
    summary = json.loads(stdout.strip().splitlines()[-1])
    trace = read_trace(out)
    name = os.path.basename(os.path.realpath(delayed))
    assert len(trace) == 150 == summary["ios"] == jobs[0]["read"]["total_ios"]
    assert set(trace["device"]) == {name}
    assert (trace["op"] == abi.OP_READ).all() and (trace["bytes"] == 4096).all()
    # dm-delay counts whole jiffies (2 at HZ=250). Under emulation the tick can
    # run late, so jiffies lag the clock and an odd read ends early (CI saw one
    # under 4 ms); the bulk carries the delay, far above nullb's microseconds.
    lat = trace["latency_ns"]
    print(f"latency ms: min {lat.min() / 1e6:.2f}, median {np.median(lat) / 1e6:.2f}, "
          f"under 4 ms {(lat < 4_000_000).sum()} of {len(lat)}")
    assert (lat >= 4_000_000).mean() >= 0.95
    assert np.median(lat) >= 7_000_000
    assert (trace["qlen"] == 0).all()   # psync: one read at a time
