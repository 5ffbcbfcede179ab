"""iobridge.lab.faults.SlowPeriods on a real dm-delay device, measured with fio.

fio logs every read's latency with a CLOCK_MONOTONIC timestamp (the clock of
the SlowPeriods timeline), so each read can be placed in a period.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest
from conftest import run

from iobridge.lab import faults
from iobridge.lab.faults import NORMAL, SLOW, SWITCHING

pytestmark = pytest.mark.vm

SLOW_MS = 20
# Long enough for several slow periods after fio's start-up: when switches
# ran dmsetup they took up to 0.9 s beside a busy host core (6.12), and in
# 6 s only one slow period held reads wholly inside it.
RUNTIME_S = 10
# fio's log timestamps are whole ms, and its clock reads are not exactly the
# kernel's submit/complete times: a read is placed in a period only if this
# much slack on either side still falls inside it.
SLACK_NS = 3_000_000


def _jiffy_ms() -> float:
    """One kernel tick: dm-delay holds a bio until `slow_ms` worth of jiffies
    have passed, counted from the tick before it arrived, so a delayed read
    can complete up to one tick early."""
    config = Path(f"/boot/config-{os.uname().release}")
    for line in config.read_text().splitlines() if config.exists() else ():
        if line.startswith("CONFIG_HZ="):
            return 1000 / int(line.split("=")[1])
    return 10.0   # HZ=100, the coarsest common setting


def _read_lat_log(path: Path) -> list[tuple[int, int]]:
    """(timestamp_ns, latency_ns) of every read in a fio per-I/O latency log."""
    rows = []
    for line in path.read_text().splitlines():
        t_ms, lat_ns, ddir, *_ = (f.strip() for f in line.split(","))
        if ddir == "0":
            rows.append((int(t_ms) * 1_000_000, int(lat_ns)))
    return rows


def test_slow_periods_delay_reads_only_while_slow(make_nullb, make_slow_periods, tmp_path):
    leg = make_nullb(size_mb=64, memory_backed=0)
    sp = make_slow_periods(leg, SLOW_MS, normal_mean_s=0.5, slow_mean_s=0.3, seed=3)
    reads_before = faults.read_count(sp.path)

    sp.start()
    try:
        proc = run(["fio", "--output-format=json", "--name=slowp", f"--filename={sp.path}",
                    "--direct=1", "--rw=randread", "--bs=4k", "--iodepth=1",
                    "--ioengine=psync", "--clocksource=clock_gettime", "--time_based", f"--runtime={RUNTIME_S}",
                    f"--write_lat_log={tmp_path}/fio", "--log_avg_msec=0",
                    # timestamps in ms of CLOCK_MONOTONIC (clock id 1)
                    "--log_alternate_epoch=1", "--log_alternate_epoch_clock_id=1"],
                   check=False)
    finally:
        sp.stop()
    assert proc.returncode == 0, f"fio failed: {proc.stderr}\n{proc.stdout[-2000:]}"
    job = json.loads(proc.stdout[proc.stdout.find("{"):])["jobs"][0]
    assert job["error"] == 0
    fio_reads = job["read"]["total_ios"]

    # stop() left the device with no delay for reads or writes.
    table = run(["dmsetup", "table", sp.name]).stdout.split()
    assert table[2] == "delay" and table[5] == "0" and table[8] == "0", table

    # The dm device's own counter saw every read fio made, and more: each
    # table switch emits a change uevent on which udev's blkid probe reads
    # the device (see iobridge.lab.faults).
    assert faults.read_count(sp.path) - reads_before >= fio_reads

    # The timeline is contiguous, alternates through a switch each time, and
    # covers the whole fio run.
    tl = sp.timeline
    assert all(a[1] == b[0] for a, b in zip(tl, tl[1:])), tl
    states = [s for _, _, s in tl]
    assert states[0] == NORMAL and states[-1] == NORMAL
    for prev, cur in zip(states, states[1:]):
        assert (cur == SWITCHING) != (prev == SWITCHING), states
    steady = [s for s in states if s != SWITCHING]
    assert all(a != b for a, b in zip(steady, steady[1:])), states
    assert steady.count(SLOW) >= 3, f"only {steady.count(SLOW)} slow periods in {RUNTIME_S} s"

    rows = _read_lat_log(tmp_path / "fio_lat.1.log")
    assert len(rows) == fio_reads
    first_submit = min(t - lat for t, lat in rows)
    assert tl[0][0] <= first_submit and tl[-1][1] >= max(t for t, _ in rows)

    def period_of(t: int, lat: int) -> str | None:
        """The one state that held around the whole read, else None."""
        lo, hi = t - lat - SLACK_NS, t + lat + SLACK_NS   # whether t is submit or completion
        for start, end, state in tl:
            if start <= lo and hi < end:
                return state
        return None

    def period_at(t: int) -> tuple[int, int]:
        """(start, end) of the timeline entry holding time t."""
        return next((start, end) for start, end, _ in tl if start <= t < end)

    slow_rows = [(t, lat) for t, lat in rows if period_of(t, lat) == SLOW]
    slow_lat = [lat for _, lat in slow_rows]
    periods_measured = {period_at(t)[0] for t, _ in slow_rows}
    normal_lat = [lat for t, lat in rows if period_of(t, lat) == NORMAL]
    # Less 1% besides the tick: under emulation the tick count and the clock
    # fio reads disagree by tens of us (15.98 ms seen against a 16 ms floor).
    floor_ns = (SLOW_MS - _jiffy_ms()) * 0.99 * 1e6
    switches = [(e - s) / 1e6 for s, e, st in tl if st == SWITCHING]
    udev_reads = faults.read_count(sp.path) - reads_before - fio_reads
    slow_sorted, normal_sorted = sorted(slow_lat) or [0], sorted(normal_lat) or [0]
    figures = (f"{fio_reads} reads: {len(slow_lat)} wholly in slow periods (latency min "
               f"{slow_sorted[0] / 1e6:.2f} ms, median {statistics.median(slow_sorted) / 1e6:.2f} ms), "
               f"{len(normal_lat)} wholly in normal ones (median "
               f"{statistics.median(normal_sorted) / 1e6:.3f} ms, p99 "
               f"{normal_sorted[int(0.99 * (len(normal_sorted) - 1))] / 1e6:.3f} ms, max "
               f"{normal_sorted[-1] / 1e6:.2f} ms); slow fraction {sp.slow_fraction():.2f}; "
               f"{len(switches)} switches, mean {statistics.fmean(switches or [0]):.0f} ms, "
               f"max {max(switches, default=0):.0f} ms; {udev_reads} reads by udev")
    print(figures)
    # Under a loaded TCG host a switch took up to 0.1 s by ioctl (0.9 s
    # with dmsetup), which eats into the 0.3 s slow periods; fio's own
    # start-up takes seconds too. So ask for few, but from more than one
    # period.
    assert len(slow_lat) >= 10 and len(periods_measured) >= 2 and len(normal_lat) >= 100, figures
    # Every read wholly inside a slow period was delayed, but for at most one
    # in a hundred (and one in any run): "delayed" is more than half the
    # delay, far above a normal read. Placing a read in a period takes two
    # clocks read by two processes, fio's log (whole ms, its own epoch) and
    # the switching thread's; one CI run on 6.12 had one read of 105 at 7.35
    # ms, most likely misplaced at a period's edge.
    #
    # Most also waited out the whole delay less a tick, but not all: dm-delay
    # counts the delay in jiffies from the last tick handled, and under a
    # loaded TCG host a tick can be handled milliseconds late, so a read that
    # arrives then is released early by as much. A CI run with both kernels'
    # VMs side by side had 2 reads of 127 at 12.8 and 13.5 ms, 287 and 547 ms
    # inside periods of over 0.8 s, far from any edge. So up to one in twenty
    # (and two in any run) may come in under that floor. The figures name
    # each early read's margins to its period's ends, so a failure says which.
    early = [(lat / 1e6, (t - lat - start) / 1e6, (end - t - lat) / 1e6)
             for t, lat in slow_rows if lat < floor_ns for start, end in [period_at(t)]]
    figures += "; early slow reads (ms, ms after start, ms before end): " + (
        ", ".join(f"({a:.2f}, {b:.0f}, {c:.0f})" for a, b, c in early) or "none")
    undelayed = [lat for lat, _, _ in early if lat < SLOW_MS / 2]
    assert len(undelayed) <= max(1, len(slow_lat) // 100), figures
    assert len(early) <= max(2, len(slow_lat) // 20), figures
    assert statistics.median(slow_lat) >= 0.9 * SLOW_MS * 1e6, figures
    # ... and reads wholly inside normal periods were not delayed.
    assert statistics.median(normal_lat) < 0.25 * SLOW_MS * 1e6, figures
    slow_looking = sum(lat >= floor_ns for lat in normal_lat)
    assert slow_looking <= 0.01 * len(normal_lat), figures


def test_read_count_is_exact_when_quiet(make_nullb, make_slow_periods):
    leg = make_nullb(size_mb=16, memory_backed=0)
    sp = make_slow_periods(leg, SLOW_MS, normal_mean_s=0.5, slow_mean_s=0.3)
    run(["udevadm", "settle"], check=False)   # let udev's probe of the new device finish
    before = faults.read_count(sp.path), faults.read_count(leg)
    run(["fio", "--name=count", f"--filename={sp.path}", "--direct=1", "--rw=randread",
         "--bs=4k", "--ioengine=psync", "--number_ios=777", "--size=16m"])
    run(["udevadm", "settle"], check=False)
    after = faults.read_count(sp.path), faults.read_count(leg)
    assert after[0] - before[0] == 777
    assert after[1] - before[1] == 777    # dm-delay passes each read to the leg once
