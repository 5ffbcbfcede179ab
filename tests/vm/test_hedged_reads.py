"""Hedged reads in the dm target (issue 12 item 1), in the VM.

Real module, null_blk legs behind dm-delay / dm-flakey, real fio. The
deadlines here are the target's own (`hedge_us`, a table option and a
message), so no BPF program is needed; test_dmtarget.py checks that the
routing program's deadline from the decision table reaches the target.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (cmp_devices, fio, fio_errors, reload, run, sectors_of,
                      verify_while_flipping)

from iobridge.core import abi
from iobridge.kernel import dmtarget

pytestmark = pytest.mark.vm


def delay_table(dev: str, read_ms: int) -> str:
    return f"0 {sectors_of(dev)} delay {dev} 0 {read_ms} {dev} 0 0"


def assert_idle(name: str, timeout_s: float = 10.0) -> dmtarget.HedgeStatus:
    """Nothing of a hedged read is left: no context, no bounce page, once
    the reads that lost (on a slow leg, or delayed by the host) ended."""
    deadline = time.monotonic() + timeout_s
    while True:
        h = dmtarget.status(name).hedge
        assert h is not None, "the module reports no hedge fields"
        if (h.active, h.bounce_pages) == (0, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert (h.active, h.bounce_pages) == (0, 0), h
    return h


def randread_p99_us(dev: str, runtime_s: int) -> tuple[float, int]:
    """fio 4 KiB random reads at queue depth 1: (p99 completion latency us, reads)."""
    r = fio("--name=p99", f"--filename={dev}", "--direct=1", "--ioengine=psync",
            "--rw=randread", "--bs=4k", "--time_based", f"--runtime={runtime_s}",
            "--randrepeat=0")
    job = r["jobs"][0]["read"]
    return job["clat_ns"]["percentile"]["99.000000"] / 1e3, job["total_ios"]


def test_hedged_reads_verify_while_the_slow_leg_flips(make_nullb, make_dm, make_iobridge):
    """Every read hedged at once (1 us, budget 100%) while leg 1 flips
    between fast and 3 ms: checksummed writes and reads of 512 B to 512 KiB
    (above 256 KiB reads are not hedge-eligible and go direct; sizes that
    are not whole pages are copied out of bounce pages too) see 0 verify
    errors, hedges win and lose, the legs stay byte-identical, and nothing
    is left once the I/O stops."""
    size_mb = 16
    base = [make_nullb(size_mb=size_mb), make_nullb(size_mb=size_mb)]
    slow = make_dm(delay_table(base[1], 0), name=f"iobhd{time.monotonic_ns()}")
    name = make_iobridge([base[0], slow], hedge_us=1, hedge_budget=100)
    dev = f"/dev/mapper/{name}"
    assert dmtarget.table(name).endswith("4 hedge_us 1 hedge_budget 100")

    def flip(i: int) -> None:
        reload(Path(slow).name, delay_table(base[1], 3 if i % 2 == 0 else 0))
        time.sleep(0.2)

    r1, r2, flips = verify_while_flipping(dev, size_mb, "512k", flip, min_flips=3,
                                          min_bs="512")
    assert fio_errors(r1) == 0 and fio_errors(r2) == 0
    st = dmtarget.status(name)
    h = st.hedge
    print(f"\nflips {flips}, hedges issued {h.issued} won {h.won} lost {h.lost} "
          f"refused {h.refused}, leg reads {[leg.reads for leg in st.legs]}")
    assert flips >= 3, flips
    assert h.issued > 0 and h.won > 0, h
    assert h.refused == 0, h           # budget 100%: every due hedge has a token
    assert st.health == "AA" and st.read_failures == 0 and st.write_failures == 0, st
    assert_idle(name)                  # losers still on the 3 ms leg finish
    run(["sync"])
    cmp_devices(base[0], slow, size_mb << 20)


def test_hedging_lowers_p99_of_a_slow_primary_within_its_budget(make_nullb, make_dm,
                                                                  make_iobridge):
    """Leg 0 (the primary) answers in 100 ms, leg 1 at once. Same target,
    one run: without hedging every read waits 100 ms; hedged after 1 ms, p99
    is under half of that, and the extra reads stay within the budget (the
    margin, 50 ms against 6-10 ms, is for host stalls under emulation). (The
    hedged p99 is the deadline plus the timer's and the hedge workqueue's
    delay, which emulation stretches: 5.9 ms on 6.1 with multi-threaded TCG,
    9.4 ms on 6.12 with single-threaded TCG, against 15 and 21 ms unhedged
    with 8 and 20 ms legs.)"""
    base = [make_nullb(size_mb=8), make_nullb(size_mb=8)]
    slow = make_dm(delay_table(base[0], 100), name=f"iobhs{time.monotonic_ns()}")
    name = make_iobridge([slow, base[1]], policy="primary", hedge_budget=100)
    dev = f"/dev/mapper/{name}"

    off_p99, off_reads = randread_p99_us(dev, 6)
    assert dmtarget.status(name).hedge.issued == 0
    dmtarget.message(name, "hedge_us", "1000")
    dmtarget.message(name, "reset_counters")
    on_p99, on_reads = randread_p99_us(dev, 6)
    st = dmtarget.status(name)
    h = st.hedge
    routed = sum(leg.hook_routed + leg.default_routed for leg in st.legs)
    print(f"\nQD1 4k: p99 unhedged {off_p99:.0f} us ({off_reads} reads), hedged after 1 ms "
          f"{on_p99:.0f} us ({on_reads} reads): {on_p99 / off_p99:.2f}x; hedges {h.issued} "
          f"won {h.won} lost {h.lost} refused {h.refused} of {routed} reads")
    assert off_p99 >= 100000, off_p99
    assert on_p99 < 0.5 * off_p99, (on_p99, off_p99)
    assert h.won > 0.9 * on_reads, h
    # The budget (100% here): at most one extra read per read routed.
    assert h.issued <= routed + abi.HEDGE_BUCKET, (h, routed)
    assert_idle(name)


def _hedge_every_read(make_nullb, make_iobridge, **opts):
    """A fresh target over two legs that complete each read from a 200 us
    timer, with a 1 us deadline every read reaches (and `opts`), after
    4,096 fio random reads at depth 4: (name, hedge status, reads routed,
    the budget's bound on hedges: budget x reads, the bucket starting
    empty). Why the timer: a plain null_blk can answer before the 1 us
    hedge timer fires under emulation (in one CI run only 26 of 4,126
    reads reached their deadline, so none was refused)."""
    base = [make_nullb(size_mb=8, irqmode=2, completion_nsec=200_000) for _ in range(2)]
    name = make_iobridge(base, hedge_us=1, **opts)
    r = fio("--name=budget", f"--filename=/dev/mapper/{name}", "--direct=1",
            "--ioengine=libaio", "--iodepth=4", "--rw=randread", "--bs=4k", "--size=8M",
            "--io_size=16M", "--randrepeat=0")
    assert fio_errors(r) == 0
    st = dmtarget.status(name)
    h = st.hedge
    routed = sum(leg.hook_routed + leg.default_routed for leg in st.legs)
    # the budget in millionths of a read: what each read earns of a token
    bound = routed * round(h.budget_pct * 10 ** abi.HEDGE_BUDGET_DECIMALS) // abi.HEDGE_TOKEN
    print(f"\nbudget {h.budget_pct:g}%: {routed} reads, hedges issued {h.issued} "
          f"(bound {bound}), refused {h.refused}, won {h.won}, lost {h.lost}")
    assert routed >= 4000
    assert 0 < h.issued <= bound, (h, bound)
    assert h.refused > 0 and h.issued + h.refused <= routed, h
    assert_idle(name)
    return name, h


def test_budget_bounds_extra_reads(make_nullb, make_iobridge):
    """A deadline every read reaches (1 us) under the default budget (5%):
    the target issues at most 5% of its reads as hedges (the bucket starts
    empty) and counts the rest as refused; with a budget of 0 it never
    hedges."""
    name, h = _hedge_every_read(make_nullb, make_iobridge)
    assert h.budget_pct == abi.HEDGE_DEFAULT_BUDGET_PCT
    # Budget 0: never hedge, whatever the deadline.
    dmtarget.message(name, "hedge_budget", "0")
    dmtarget.message(name, "reset_counters")
    fio("--name=none", f"--filename=/dev/mapper/{name}", "--direct=1", "--rw=randread",
        "--bs=4k", "--number_ios=500", "--size=8M")
    h = dmtarget.status(name).hedge
    assert (h.issued, h.refused) == (0, 0), h


def test_a_budget_under_one_percent_bounds_extra_reads(make_nullb, make_iobridge):
    """A budget of 0.25% (target 1.3 takes 4 decimals; a whole percent was
    the finest before, 20x the budgets the replay finds right for
    CloudPhysics and OLTP): with a deadline every read reaches, a fresh
    target issues at most 0.25% of its reads as hedges (each read earns
    2,500 of a hedge's 1,000,000 micro-tokens) and refuses the rest."""
    name, h = _hedge_every_read(make_nullb, make_iobridge, hedge_budget=0.25)
    assert h.budget_pct == 0.25
    assert dmtarget.table(name).endswith("hedge_us 1 hedge_budget 0.25")


def test_failing_leg_with_hedging_loses_no_read(make_nullb, make_dm, make_iobridge):
    """Leg 1's reads all fail (dm-flakey down) under hedged reads: fio sees
    no error, the leg is marked failed, the data reads back intact."""
    size_mb = 8
    base = [make_nullb(size_mb=size_mb), make_nullb(size_mb=size_mb)]
    flaky = make_dm(f"0 {sectors_of(base[1])} flakey {base[1]} 0 3600 1",
                    name=f"iobhf{time.monotonic_ns()}")
    name = make_iobridge([base[0], flaky], hedge_us=1, hedge_budget=100, error_threshold=5)
    dev = f"/dev/mapper/{name}"
    run(f"dd if=/dev/urandom of=/tmp/iob_hpat bs=1M count={size_mb} status=none")
    run(f"dd if=/tmp/iob_hpat of={dev} bs=1M oflag=direct status=none")
    reload(Path(flaky).name, f"0 {sectors_of(base[1])} flakey {base[1]} 0 0 1")
    r = fio("--name=reads", f"--filename={dev}", "--direct=1", "--ioengine=libaio",
            "--iodepth=16", "--rw=randread", "--bsrange=4k-64k", "--number_ios=3000",
            f"--size={size_mb}M", "--randrepeat=0")
    assert fio_errors(r) == 0
    st = dmtarget.status(name)
    print(f"\nflakey leg: {st.health}, leg 1 read errors {st.legs[1].read_errors}, "
          f"retries {st.retries}, hedges {st.hedge}")
    assert st.health == "AF", st
    assert st.read_failures == 0 and st.legs[1].read_errors >= 5, st
    run(f"cmp {dev} /tmp/iob_hpat")
    assert_idle(name)


def test_reload_and_remove_with_hedges_in_flight(make_nullb, make_dm, make_iobridge):
    """Losing reads outlive the reads they answered (leg 1 takes 400 ms):
    a suspend waits for them (nothing left while suspended), table reloads
    under load lose no read, and removing the target right after I/O
    stops, with losers still on leg 1 (then 5 s), leaves no warning (the fixture
    checks the kernel log) and lets the module unload at the end."""
    size_mb = 8
    base = [make_nullb(size_mb=size_mb), make_nullb(size_mb=size_mb)]
    slow = make_dm(delay_table(base[1], 400), name=f"iobhr{time.monotonic_ns()}")
    name = make_iobridge([base[0], slow], hedge_us=1, hedge_budget=100)
    dev = f"/dev/mapper/{name}"
    table = dmtarget.table(name)
    load = subprocess.Popen(
        ["fio", "--output-format=json", "--name=load", f"--filename={dev}", "--direct=1",
         "--ioengine=libaio", "--iodepth=16", "--rw=randread", "--bs=4k", "--time_based",
         "--runtime=8", f"--size={size_mb}M"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(3):
            time.sleep(1)
            run(["dmsetup", "suspend", "--noudevsync", name])
            suspended = dmtarget.status(name)
            run(["dmsetup", "resume", "--noudevsync", name])
            assert (suspended.hedge.active, suspended.hedge.bounce_pages) == (0, 0), suspended
            reload(name, table)
    finally:
        out, err = load.communicate(timeout=300)
    assert load.returncode == 0, err + out[-2000:]
    assert fio_errors(json.loads(out[out.find("{"):])) == 0
    h = dmtarget.status(name).hedge
    print(f"\nafter reloads: {h}")

    # Hedges in flight at removal: leg 1 now takes 5 s, so the losers of a
    # burst (reads first sent to leg 1 and answered by their hedge on leg 0)
    # are still there when the target goes, however slow the host (with
    # 400 ms they had ended before the status read on a busy host).
    reload(Path(slow).name, delay_table(base[1], 5000))
    burst = subprocess.Popen(["fio", "--name=burst", f"--filename={dev}", "--direct=1",
                              "--ioengine=libaio", "--iodepth=16", "--rw=randread", "--bs=4k",
                              "--number_ios=64", f"--size={size_mb}M"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = burst.communicate(timeout=120)
    assert burst.returncode == 0, err
    in_flight = dmtarget.status(name).hedge.active
    t0 = time.monotonic()
    run(["dmsetup", "remove", name])
    print(f"removed with {in_flight} hedged read(s) alive, in {time.monotonic() - t0:.2f} s")
    assert in_flight > 0           # the losers on leg 1 were still there
    assert not dmtarget.exists(name)
