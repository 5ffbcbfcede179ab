"""The iobridge device-mapper target and its BPF routing hook, in the VM.

Real module, real null_blk / dm-flakey legs, real fio.  One BCC compile of
the routing program is shared by the whole file (session fixture).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import insmod, module_loaded, rmmod, run, sectors_of, wait_for_path

from iobridge.core import abi
from iobridge.kernel import dmtarget
from iobridge.kernel.route_policy import RoutePolicy

pytestmark = pytest.mark.vm


# Extra BPF program for tests: stores whatever iobridge_test_force[0] holds
# into chosen_leg, to check that the module validates the choice.
FORCE_SRC = r"""
BPF_ARRAY(iobridge_test_force, s32, 1);
int iobridge_test_force_leg(struct bpf_raw_tracepoint_args *args)
{
	u64 addr = args->args[0];
	struct iobridge_route_ctx *ctx = (struct iobridge_route_ctx *)addr;
	u32 k = 0;
	s32 *v = iobridge_test_force.lookup(&k);

	if (v)
		ctx->chosen_leg = *v;
	return 0;
}
"""


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="session")
def policy(iobridge_module):
    """The routing program plus the test-only force program, compiled once."""
    p = RoutePolicy(extra_source=FORCE_SRC).load()
    yield p
    p.close()


@pytest.fixture
def routing(policy):
    """The shared policy with a clean table, detached after the test."""
    policy.clear()
    yield policy
    policy.detach()
    policy.clear()


@pytest.fixture
def make_iobridge(iobridge_module):
    """Factory: make_iobridge(legs, **opts) -> NAME (device /dev/mapper/NAME)."""
    names: list[str] = []

    def factory(legs: list[str], **opts) -> str:
        name = f"iob{os.getpid()}_{len(names)}"
        dmtarget.create(name, legs, sectors=min(sectors_of(d) for d in legs), **opts)
        names.append(name)
        wait_for_path(f"/dev/mapper/{name}")
        run(["udevadm", "settle"], check=False)
        return name

    yield factory
    for name in reversed(names):
        if run(["dmsetup", "info", name], check=False).returncode != 0:
            continue
        for _ in range(50):
            if run(["dmsetup", "remove", name], check=False).returncode == 0:
                break
            time.sleep(0.1)


def blk_reads(dev: str) -> int:
    """Completed reads of a block device, from /sys/block/*/stat."""
    name = Path(os.path.realpath(dev)).name
    return int(Path(f"/sys/block/{name}/stat").read_text().split()[0])


def blk_writes(dev: str) -> int:
    name = Path(os.path.realpath(dev)).name
    return int(Path(f"/sys/block/{name}/stat").read_text().split()[4])


def dd_read(dev: str, count: int, skip: int = 0) -> None:
    run(f"dd if={dev} of=/dev/null bs=4k count={count} skip={skip} iflag=direct status=none")


def dmesg_tail(since: int) -> str:
    return "\n".join(run(["dmesg"]).stdout.splitlines()[since:])


def dmesg_len() -> int:
    return len(run(["dmesg"]).stdout.splitlines())


def fio(*args: str, check: bool = True) -> dict:
    # verify_state_save=0: no *-verify.state files left in the working tree
    proc = run(["fio", "--output-format=json", "--verify_state_save=0", *args], check=False)
    out = proc.stdout[proc.stdout.find("{"):]
    result = json.loads(out) if out else {}
    if check:
        assert proc.returncode == 0, f"fio failed ({proc.returncode}): {proc.stderr}\n{proc.stdout[-2000:]}"
    return result


def fio_errors(result: dict) -> int:
    return sum(job.get("error", 0) for job in result.get("jobs", []))


def flakey_table(dev: str, up: int, down: int, features: tuple[str, ...] = ()) -> str:
    table = f"0 {sectors_of(dev)} flakey {dev} 0 {up} {down}"
    if features:
        table += f" {len(features)} " + " ".join(features)
    return table


def reload(name: str, table: str) -> None:
    run(["dmsetup", "load", name, "--table", table])
    run(["dmsetup", "suspend", "--noudevsync", name])
    run(["dmsetup", "resume", "--noudevsync", name])


def cmp_devices(a: str, b: str, nbytes: int) -> None:
    proc = run(f"cmp -n {nbytes} {a} {b}", check=False)
    assert proc.returncode == 0, f"{a} and {b} differ: {proc.stdout}{proc.stderr}"


# ---------------------------------------------------------------- module

def test_unload_refused_while_target_exists(make_nullb, make_iobridge):
    legs = [make_nullb(size_mb=8), make_nullb(size_mb=8)]
    name = make_iobridge(legs)
    proc = rmmod(check=False)
    assert proc.returncode != 0 and "in use" in proc.stderr, proc.stderr
    run(["dmsetup", "remove", name])
    rmmod()
    assert not module_loaded()
    insmod()
    assert abi.module_version() == abi.ABI_VERSION


# ---------------------------------------------------------------- tables

BAD_TABLES = [
    # (id, table builder (size, legs) -> args, expected kernel log text)
    ("one-leg", lambda s, l: f"0 {s} iobridge 1 {l[0]}", "leg count '1' is not a number from 2 to 8"),
    ("nine-legs", lambda s, l: f"0 {s} iobridge 9 " + " ".join([l[0]] * 9),
     "leg count '9' is not a number from 2 to 8"),
    ("count-not-number", lambda s, l: f"0 {s} iobridge two {l[0]} {l[1]}",
     "leg count 'two' is not a number"),
    ("missing-device-arg", lambda s, l: f"0 {s} iobridge 3 {l[0]} {l[1]}",
     "leg count is 3 but only 2 device(s) given"),
    ("no-such-device", lambda s, l: f"0 {s} iobridge 2 {l[0]} /dev/iobridge-no-such-dev",
     "leg 1: cannot open device '/dev/iobridge-no-such-dev'"),
    ("duplicate", lambda s, l: f"0 {s} iobridge 2 {l[0]} {l[0]}", "legs 0 and 1 are the same device"),
    ("leg-too-small", lambda s, l: f"0 {s + 8} iobridge 2 {l[0]} {l[1]}",
     "has LEG_SECTORS sectors, fewer than the target's"),
    ("unknown-option", lambda s, l: f"0 {s} iobridge 2 {l[0]} {l[1]} 1 frobnicate",
     "unknown option 'frobnicate'"),
    ("bad-threshold", lambda s, l: f"0 {s} iobridge 2 {l[0]} {l[1]} 2 error_threshold 0",
     "error_threshold needs a value"),
    ("bad-policy", lambda s, l: f"0 {s} iobridge 2 {l[0]} {l[1]} 2 policy fastest",
     "policy needs one of"),
    ("option-count-mismatch", lambda s, l: f"0 {s} iobridge 2 {l[0]} {l[1]} 3 strict_writes",
     "option count must be a number"),
    ("trailing-junk", lambda s, l: f"0 {s} iobridge 2 {l[0]} {l[1]} 1 strict_writes extra",
     "unexpected argument(s) after the options"),
]


def test_bad_tables_rejected(make_nullb, iobridge_module):
    legs = [make_nullb(size_mb=8), make_nullb(size_mb=8)]
    size = sectors_of(legs[0])
    for i, (label, build, expect) in enumerate(BAD_TABLES):
        name = f"iobbad{i}"
        since = dmesg_len()
        proc = dmtarget.create_raw(name, build(size, legs))
        log = dmesg_tail(since)
        assert proc.returncode != 0, label
        assert "Invalid argument" in proc.stderr, (label, proc.stderr)
        expect = expect.replace("LEG_SECTORS", str(size))
        assert expect in log, (label, log)
        assert "(-EINVAL)" in log, (label, log)
        assert run(["dmsetup", "info", name], check=False).returncode != 0, f"{label}: device left behind"


def test_table_round_trip_and_options(make_nullb, make_iobridge):
    legs = [make_nullb(size_mb=8), make_nullb(size_mb=8), make_nullb(size_mb=8)]
    name = make_iobridge(legs, error_threshold=7, policy="round_robin", strict_writes=True)
    table = dmtarget.table(name)
    assert table.endswith("5 error_threshold 7 policy round_robin strict_writes"), table
    st = dmtarget.status(name)
    assert st.policy == "round_robin" and st.health == "AAA" and len(st.legs) == 3


def test_messages(make_nullb, make_iobridge):
    legs = [make_nullb(size_mb=8), make_nullb(size_mb=8)]
    name = make_iobridge(legs)
    bad = [("bogus",), ("fail_leg", "2"), ("fail_leg", "x"), ("policy", "fastest"),
           ("restore_leg", "0", "please"), ("error_threshold", "0"), ("bench_hook", "0")]
    for words in bad:
        since = dmesg_len()
        proc = run(["dmsetup", "message", name, "0", *words], check=False)
        assert proc.returncode != 0, words
        assert "iobridge" in dmesg_tail(since), words

    dmtarget.message(name, "policy", "primary")
    assert dmtarget.status(name).policy == "primary"
    dmtarget.message(name, "reset_counters")
    dd_read(f"/dev/mapper/{name}", 50)
    st = dmtarget.status(name)
    assert st.legs[1].reads == 0 and st.legs[0].reads >= 50

    dmtarget.message(name, "fail_leg", "0")
    assert dmtarget.status(name).health == "FA"
    # The last healthy leg cannot be failed.
    since = dmesg_len()
    assert run(["dmsetup", "message", name, "0", "fail_leg", "1"], check=False).returncode != 0
    assert "last healthy leg" in dmesg_tail(since)
    dmtarget.message(name, "reset_counters")
    dd_read(f"/dev/mapper/{name}", 50)
    st = dmtarget.status(name)
    assert st.legs[0].reads == 0 and st.legs[1].reads == 50
    dmtarget.message(name, "restore_leg", "0")
    assert dmtarget.status(name).health == "AA"

    out = dmtarget.message(name, "bench_hook", "10000")
    assert out.startswith("calls=10000 ") and "program_attached=0" in out, out


# ---------------------------------------------------------------- routing

def test_default_policy_counters_match_block_stats(make_nullb, make_iobridge):
    legs = [make_nullb(size_mb=8), make_nullb(size_mb=8)]
    name = make_iobridge(legs)
    dev = f"/dev/mapper/{name}"
    dmtarget.message(name, "reset_counters")
    before = [blk_reads(d) for d in legs]
    dd_read(dev, 400)
    st = dmtarget.status(name)
    delta = [blk_reads(d) - b for d, b in zip(legs, before)]
    assert [leg.reads for leg in st.legs] == delta
    assert sum(delta) == 400
    # QD1: every read sees equal in-flight counts, so ties rotate legs.
    assert min(delta) >= 150, delta
    assert all(leg.hook_routed == 0 for leg in st.legs)


def test_bpf_routing_follows_table(make_nullb, make_iobridge, routing):
    legs = [make_nullb(size_mb=8), make_nullb(size_mb=8)]
    name = make_iobridge(legs)
    dev = f"/dev/mapper/{name}"
    tid = dmtarget.target_id(name)
    routing.attach()

    def measure(count=300):
        dmtarget.message(name, "reset_counters")
        before = [blk_reads(d) for d in legs]
        dd_read(dev, count)
        st = dmtarget.status(name)
        delta = [blk_reads(d) - b for d, b in zip(legs, before)]
        assert [leg.reads for leg in st.legs] == delta, (st, delta)
        return st, delta

    # Table says avoid leg 1: everything goes to leg 0, routed by the hook.
    routing.set_leg(tid, 0, admit=True, score=10, ttl_s=60)
    routing.set_leg(tid, 1, admit=False, score=99, ttl_s=60)
    st, delta = measure()
    assert delta == [300, 0]
    assert st.legs[0].hook_routed == 300 and st.hook_rejected == 0

    # Flip: reads follow.
    routing.set_leg(tid, 0, admit=False, ttl_s=60)
    routing.set_leg(tid, 1, admit=True, score=10, ttl_s=60)
    st, delta = measure()
    assert delta == [0, 300]

    # Both avoided: the higher score (less likely slow) still gets the reads.
    routing.set_leg(tid, 0, admit=False, score=7, ttl_s=60)
    routing.set_leg(tid, 1, admit=False, score=5, ttl_s=60)
    st, delta = measure()
    assert delta == [300, 0] and st.legs[0].hook_routed == 300

    # Both admitted: the one with fewer bios in flight wins; dd reads one
    # at a time, so in-flight ties and the higher score decides.
    routing.set_leg(tid, 0, admit=True, score=50, ttl_s=60)
    st, delta = measure()
    assert delta == [300, 0]

    # Decisions for another size bucket do not apply to 4 KiB reads.
    routing.clear(tid)
    routing.set_leg(tid, 1, admit=True, score=10, ttl_s=60, buckets=[1, 2, 3])
    st, delta = measure()
    assert min(delta) >= 100 and st.legs[1].hook_routed == 0, delta

    # Expired entries leave the choice to the module default.
    routing.set_leg(tid, 1, admit=True, score=10, ttl_s=0.2)
    time.sleep(0.3)
    st, delta = measure()
    assert min(delta) >= 100, delta
    assert all(leg.hook_routed == 0 for leg in st.legs)
    calls = routing.stats()
    assert calls["calls"] >= 1500 and calls["default"] >= 600, calls

    # Detach: the default applies again even with a valid "leg 1 only" table.
    routing.set_leg(tid, 0, admit=False, ttl_s=60)
    routing.set_leg(tid, 1, admit=True, score=10, ttl_s=60)
    routing.detach()
    st, delta = measure()
    assert min(delta) >= 100, delta
    assert all(leg.hook_routed == 0 for leg in st.legs)

    # Failed legs are skipped by the policy program too.
    routing.attach()
    dmtarget.message(name, "fail_leg", "1")
    st, delta = measure()
    assert delta == [300, 0] and st.hook_rejected == 0


def test_invalid_choice_from_program_is_ignored(make_nullb, make_iobridge, routing):
    legs = [make_nullb(size_mb=8), make_nullb(size_mb=8)]
    name = make_iobridge(legs)
    dev = f"/dev/mapper/{name}"
    force = routing.bpf[b"iobridge_test_force"]
    routing.attach(b"iobridge_test_force_leg")

    for i, bogus in enumerate((7, 2, -5, 1 << 30)):
        force[ctypes.c_int(0)] = ctypes.c_int(bogus)
        dmtarget.message(name, "reset_counters")
        since = dmesg_len()
        dd_read(dev, 100)
        st = dmtarget.status(name)
        assert st.hook_rejected == 100, (bogus, st)
        assert sum(leg.reads for leg in st.legs) == 100
        assert all(leg.hook_routed == 0 for leg in st.legs)
        if i == 0:  # the warning is rate-limited
            assert f"routing program chose leg {bogus}, which is out of range or not healthy" \
                in dmesg_tail(since)

    # A valid choice is followed; a failed leg is refused.
    force[ctypes.c_int(0)] = ctypes.c_int(1)
    dmtarget.message(name, "reset_counters")
    dd_read(dev, 100)
    st = dmtarget.status(name)
    assert st.legs[1].hook_routed == 100 and st.hook_rejected == 0
    dmtarget.message(name, "fail_leg", "1")
    dmtarget.message(name, "reset_counters")
    dd_read(dev, 100)
    st = dmtarget.status(name)
    assert st.legs[0].reads == 100 and st.legs[1].reads == 0 and st.hook_rejected == 100


# ---------------------------------------------------------------- integrity

def test_integrity_under_routing_flips(make_nullb, make_iobridge, routing):
    size_mb = 16
    legs = [make_nullb(size_mb=size_mb), make_nullb(size_mb=size_mb)]
    name = make_iobridge(legs)
    dev = f"/dev/mapper/{name}"
    tid = dmtarget.target_id(name)
    routing.attach()
    stop = threading.Event()
    flips = [0]

    def flipper():
        leg = 0
        while not stop.is_set():
            routing.set_leg(tid, leg, admit=True, score=10, ttl_s=5)
            routing.set_leg(tid, 1 - leg, admit=False, ttl_s=5)
            leg = 1 - leg
            flips[0] += 1
            time.sleep(0.003)

    thread = threading.Thread(target=flipper, daemon=True)
    thread.start()
    try:
        # Write everything with checksummed blocks, verifying as it goes and
        # again at the end; some blocks are rewritten while the table flips.
        result = fio("--name=verify", f"--filename={dev}", "--direct=1",
                     "--ioengine=libaio", "--iodepth=8", "--rw=randwrite", "--bs=4k",
                     f"--size={size_mb}M", "--verify=crc32c", "--do_verify=1",
                     "--verify_fatal=1", "--verify_backlog=256", "--randrepeat=0")
        # A second pass: mixed sizes through the same flips.
        result2 = fio("--name=verify2", f"--filename={dev}", "--direct=1",
                      "--ioengine=libaio", "--iodepth=16", "--rw=randwrite",
                      "--bsrange=4k-128k", f"--size={size_mb // 2}M", "--verify=crc32c",
                      "--do_verify=1", "--verify_fatal=1", "--randrepeat=0")
    finally:
        stop.set()
        thread.join()
    assert fio_errors(result) == 0 and fio_errors(result2) == 0
    st = dmtarget.status(name)
    assert flips[0] > 50, flips
    assert st.legs[0].hook_routed > 0 and st.legs[1].hook_routed > 0, st
    assert st.health == "AA" and st.read_failures == 0 and st.write_failures == 0
    run(["sync"])
    cmp_devices(legs[0], legs[1], size_mb << 20)


def test_flush_discard_and_reload_under_load(make_nullb, make_iobridge):
    size_mb = 16
    legs = [make_nullb(size_mb=size_mb, discard=1), make_nullb(size_mb=size_mb, discard=1)]
    name = make_iobridge(legs)
    dev = f"/dev/mapper/{name}"
    table = dmtarget.table(name)
    fio_proc = subprocess.Popen(
        ["fio", "--output-format=json", "--verify_state_save=0", "--name=load",
         f"--filename={dev}", "--direct=1",
         "--ioengine=libaio", "--iodepth=8", "--rw=randwrite", "--bs=4k",
         f"--size={size_mb}M", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
         "--verify_backlog=128", "--loops=3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for policy in ("round_robin", "primary", "least_inflight"):
            time.sleep(0.5)
            run(["dmsetup", "suspend", name])
            assert dmtarget.status(name).legs[0].inflight == 0
            run(["dmsetup", "resume", name])
            time.sleep(0.5)
            reload(name, f"{table} 2 policy {policy}")
            assert dmtarget.status(name).policy == policy
    finally:
        out, err = fio_proc.communicate(timeout=300)
    assert fio_proc.returncode == 0, err + out[-2000:]
    assert fio_errors(json.loads(out[out.find("{"):])) == 0

    # fsync reaches both legs as flushes; discard reaches both legs.
    before = [blk_writes(d) for d in legs]
    run(f"dd if=/dev/urandom of={dev} bs=64k count=16 conv=fsync status=none")
    assert all(blk_writes(d) > b for d, b in zip(legs, before))
    run(["blkdiscard", "-o", "0", "-l", str(1 << 20), dev])
    for leg in legs:
        data = run(f"dd if={leg} bs=1M count=1 iflag=direct status=none | od -An -tx1 | sort -u",
                   ).stdout.split()
        assert set(data) <= {"00", "*"}, f"{leg} not discarded"
    cmp_devices(legs[0], legs[1], size_mb << 20)


# ---------------------------------------------------------------- failures

def test_read_failover_when_a_leg_fails_mid_run(make_nullb, make_dm, make_iobridge):
    size_mb = 16
    base = [make_nullb(size_mb=size_mb), make_nullb(size_mb=size_mb)]
    flaky = make_dm(flakey_table(base[1], up=3600, down=1), name=f"iobflk{os.getpid()}_{time.monotonic_ns()}")
    flaky_name = Path(flaky).name
    name = make_iobridge([base[0], flaky], error_threshold=5)
    dev = f"/dev/mapper/{name}"
    run(f"dd if=/dev/urandom of=/tmp/iob_pattern bs=1M count={size_mb} status=none")
    run(f"dd if=/tmp/iob_pattern of={dev} bs=1M oflag=direct status=none")
    dmtarget.message(name, "reset_counters")

    reader = subprocess.Popen(
        ["fio", "--output-format=json", "--name=reads", f"--filename={dev}", "--direct=1",
         "--ioengine=libaio", "--iodepth=16", "--rw=randread", "--bs=4k",
         "--time_based", "--runtime=10", "--numjobs=2", "--group_reporting"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while dmtarget.status(name).legs[1].reads < 1000:
        assert time.monotonic() < deadline and reader.poll() is None, "fio did not get going"
        time.sleep(0.2)
    since = dmesg_len()
    # Every read on leg 1 now fails (dm-flakey down, no features: reads error).
    t0 = time.monotonic()
    reload(flaky_name, flakey_table(base[1], up=0, down=1))
    reload_s = time.monotonic() - t0
    while dmtarget.status(name).health != "AF" and reader.poll() is None:
        time.sleep(0.1)
    assert reader.poll() is None, f"fio ended before the leg was failed (reload took {reload_s:.1f}s)"
    out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err + out[-2000:]
    result = json.loads(out[out.find("{"):])
    assert fio_errors(result) == 0
    assert result["jobs"][0]["read"]["total_ios"] > 0

    st = dmtarget.status(name)
    assert st.health == "AF", st
    assert st.read_failures == 0
    assert st.legs[1].read_errors >= 5 and st.retries == st.legs[1].read_errors
    log = dmesg_tail(since)
    assert "leg 1" in log and "marked failed: read error threshold reached" in log, log
    # After the failure no read is routed to leg 1; data is intact.
    reads_leg1 = st.legs[1].reads
    run(f"cmp {dev} /tmp/iob_pattern")
    assert dmtarget.status(name).legs[1].reads == reads_leg1

    # Leg back up and not stale: restore works, reads return to it.
    reload(flaky_name, flakey_table(base[1], up=3600, down=1))
    dmtarget.message(name, "restore_leg", "1")
    dmtarget.message(name, "reset_counters")
    dd_read(dev, 200)
    assert dmtarget.status(name).legs[1].reads > 0


def test_write_failure_semantics(make_nullb, make_dm, make_iobridge):
    size_mb = 8
    base = [make_nullb(size_mb=size_mb), make_nullb(size_mb=size_mb)]
    flaky = make_dm(flakey_table(base[1], up=3600, down=1), name=f"iobflk{os.getpid()}_{time.monotonic_ns()}")
    flaky_name = Path(flaky).name
    name = make_iobridge([base[0], flaky])
    dev = f"/dev/mapper/{name}"
    run(f"dd if=/dev/urandom of={dev} bs=1M count={size_mb} oflag=direct status=none")
    cmp_devices(base[0], base[1], size_mb << 20)

    # Writes now fail on leg 1 (reads still work there).
    reload(flaky_name, flakey_table(base[1], up=0, down=1, features=("error_writes",)))
    since = dmesg_len()
    run("dd if=/dev/urandom of=/tmp/iob_w bs=64k count=4 status=none")
    # Default: the write succeeds on leg 0, leg 1 is failed and stale.
    run(f"dd if=/tmp/iob_w of={dev} bs=64k oflag=direct status=none")
    st = dmtarget.status(name)
    assert st.health == "AS", st
    assert st.legs[1].write_errors >= 1 and st.write_failures == 0
    assert "leg 1" in dmesg_tail(since) and "marked failed and stale: write error" in dmesg_tail(since)
    run(f"cmp -n {4 << 16} {dev} /tmp/iob_w")
    # A stale leg receives no I/O at all, reads included.
    writes1 = st.legs[1].writes
    dmtarget.message(name, "reset_counters")
    dd_read(dev, 100)
    run(f"dd if=/tmp/iob_w of={dev} bs=64k oflag=direct seek=8 status=none")
    st = dmtarget.status(name)
    assert st.legs[1].reads == 0 and st.legs[1].writes == 0 and writes1 > 0
    # It cannot be restored until resynced.
    since = dmesg_len()
    assert run(["dmsetup", "message", name, "0", "restore_leg", "1"], check=False).returncode != 0
    assert "missed writes" in dmesg_tail(since)
    # A table reload keeps the target id and the stale leg stale.
    tid = dmtarget.target_id(name)
    reload(name, dmtarget.table(name))
    st = dmtarget.status(name)
    assert st.health == "AS" and st.target_id == tid, st

    # Resync (copy leg 0 onto the repaired leg 1), then restore.
    reload(flaky_name, flakey_table(base[1], up=3600, down=1))
    run(["dmsetup", "suspend", name])
    run(f"dd if={base[0]} of={flaky} bs=1M oflag=direct status=none")
    run(["dmsetup", "resume", name])
    dmtarget.message(name, "restore_leg", "1", "resynced")
    assert dmtarget.status(name).health == "AA"

    # strict_writes (table reload): a write failing on any leg fails.
    table = dmtarget.table(name)
    reload(name, f"{table} 1 strict_writes")
    reload(flaky_name, flakey_table(base[1], up=0, down=1, features=("error_writes",)))
    proc = run(f"dd if=/tmp/iob_w of={dev} bs=64k count=1 oflag=direct status=none", check=False)
    assert proc.returncode != 0 and "Input/output error" in proc.stderr, proc.stderr
    st = dmtarget.status(name)
    assert st.write_failures >= 1 and st.health == "AS"
