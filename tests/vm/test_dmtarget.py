"""The iobridge device-mapper target and its BPF routing hook, in the VM.

Real module, real null_blk / dm-flakey legs, real fio.  One BCC compile of
the routing program is shared by the whole file (session fixture).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import mmap
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (cmp_devices, fio, fio_errors, insmod, module_loaded, reload, rmmod, run,
                      sectors_of, verify_while_flipping, wait_for_path)

from iobridge.core import abi, decision
from iobridge.core.errors import IobridgeError
from iobridge.kernel import dmtarget
from iobridge.kernel.route_policy import RoutePolicy, now_ns

pytestmark = pytest.mark.vm


# Extra BPF programs for tests, compiled with the routing program:
# iobridge_test_force_leg stores whatever iobridge_test_force[0] holds into
# chosen_leg, to check that the module validates the choice;
# iobridge_test_peek keeps a copy of the newest hook context (the state the
# routing program decided on), attached next to the routing program.
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

BPF_ARRAY(iobridge_test_ctx, struct iobridge_route_ctx, 1);
int iobridge_test_peek(struct bpf_raw_tracepoint_args *args)
{
	u64 addr = args->args[0];
	struct iobridge_route_ctx *ctx = (struct iobridge_route_ctx *)addr;
	u32 k = 0;
	struct iobridge_route_ctx *copy = iobridge_test_ctx.lookup(&k);

	if (copy)
		__builtin_memcpy(copy, ctx, sizeof(*copy));
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


def _agent_unchecked(policy: RoutePolicy) -> None:
    """No heartbeat check (max_silence_ns 0), as a test starts and ends."""
    policy.agent.max_silence_ns = 0
    policy.agent.heartbeat_ns = 0


@pytest.fixture
def routing(policy):
    """The shared policy with a clean table, detached after the test."""
    policy.clear()
    _agent_unchecked(policy)
    yield policy
    policy.detach()
    policy.clear()
    _agent_unchecked(policy)


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





def flakey_table(dev: str, up: int, down: int, features: tuple[str, ...] = ()) -> str:
    table = f"0 {sectors_of(dev)} flakey {dev} 0 {up} {down}"
    if features:
        table += f" {len(features)} " + " ".join(features)
    return table


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
    assert dmtarget.module_version() == abi.ABI_VERSION


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
    ("bad-hedge-us", lambda s, l: f"0 {s} iobridge 2 {l[0]} {l[1]} 2 hedge_us 10000001",
     "hedge_us needs a deadline 0..10000000 microseconds"),
    ("bad-hedge-budget", lambda s, l: f"0 {s} iobridge 2 {l[0]} {l[1]} 2 hedge_budget 5%",
     "hedge_budget needs a percent of reads (up to 4 decimals) 0..100"),
    ("too-fine-hedge-budget",
     lambda s, l: f"0 {s} iobridge 2 {l[0]} {l[1]} 2 hedge_budget 0.00001",
     "hedge_budget needs a percent of reads (up to 4 decimals) 0..100"),
    ("hedge-us-no-value", lambda s, l: f"0 {s} iobridge 2 {l[0]} {l[1]} 1 hedge_us",
     "hedge_us needs a deadline"),
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


def test_ioctl_calls_agree_with_dmsetup(make_nullb, make_iobridge):
    """kernel/dmioctl (what the agent lists targets with and the slow-period
    schedule swaps tables with) against dmsetup on the same devices."""
    from iobridge.kernel import dmioctl
    legs = [make_nullb(size_mb=8), make_nullb(size_mb=8)]
    name = make_iobridge(legs, policy="round_robin")
    subprocess.run(["fio", "--name=r", f"--filename=/dev/mapper/{name}", "--rw=randread",
                    "--direct=1", "--number_ios=20", "--size=4m"], capture_output=True, check=True)
    for ours, cmd in ((dmtarget.table(name), "table"),
                      (" ".join(map(str, dataclasses.astuple(dmioctl.status(name)[0]))), "status")):
        assert ours.split() == run(["dmsetup", cmd, name]).stdout.split(), cmd
    listed = run(["dmsetup", "ls"]).stdout
    names = dmioctl.list_devices()
    assert name in names
    assert sorted(names) == sorted(line.split()[0] for line in listed.splitlines()
                                   if line.strip() and "No devices" not in line)
    # A staged table takes effect at resume, as dmsetup load + resume.
    lin = f"{name}_lin"
    size = sectors_of(legs[0])
    run(["dmsetup", "create", lin, "--table", f"0 {size} linear {legs[0]} 0"])
    try:
        dmioctl.load(lin, [dmioctl.TargetLine(0, size // 2, "linear", f"{legs[1]} 0")])
        assert run(["dmsetup", "table", lin]).stdout.split()[1] == str(size)   # staged only
        dmioctl.resume(lin)
        rdev = os.stat(legs[1]).st_rdev
        assert run(["dmsetup", "table", lin]).stdout.split() == [
            "0", str(size // 2), "linear", f"{os.major(rdev)}:{os.minor(rdev)}", "0"]
        with pytest.raises(IobridgeError, match="no device-mapper device"):
            dmioctl.status(f"{name}_absent")
        with pytest.raises(IobridgeError, match="loading a table into"):
            dmioctl.load(lin, [dmioctl.TargetLine(0, 8, "no_such_target", "")])
        assert run(["dmsetup", "table", lin]).stdout.split()[1] == str(size // 2)
    finally:
        run(["dmsetup", "remove", lin])


def test_messages(make_nullb, make_iobridge):
    legs = [make_nullb(size_mb=8), make_nullb(size_mb=8)]
    name = make_iobridge(legs)
    bad = [("bogus",), ("fail_leg", "2"), ("fail_leg", "x"), ("policy", "fastest"),
           ("restore_leg", "0", "please"), ("error_threshold", "0"), ("bench_hook", "0"),
           ("hedge_us", "1.5"), ("hedge_us", "10000001"), ("hedge_budget", "101"),
           ("hedge_budget", "x"), ("hedge_budget", "100.0001"), ("hedge_budget", "0.00001"),
           ("hedge_budget", "5."), ("hedge_budget", ".5"), ("hedge_budget", "1.2.3"),
           ("hedge_budget", "+5"), ("hedge_budget", "99999999999")]
    for words in bad:
        since = dmesg_len()
        proc = run(["dmsetup", "message", name, "0", *words], check=False)
        assert proc.returncode != 0, words
        assert "iobridge" in dmesg_tail(since), words
    # A refused message changed nothing.
    h = dmtarget.status(name).hedge
    assert (h.hedge_us, h.budget_pct) == (0, abi.HEDGE_DEFAULT_BUDGET_PCT), h

    dmtarget.message(name, "policy", "primary")
    assert dmtarget.status(name).policy == "primary"
    dmtarget.message(name, "hedge_us", "250")
    dmtarget.message(name, "hedge_budget", "12")
    h = dmtarget.status(name).hedge
    assert (h.hedge_us, h.budget_pct) == (250, 12), h
    assert dmtarget.table(name).endswith("6 policy primary hedge_us 250 hedge_budget 12")
    # Under 1%, to 4 decimals (target 1.3), printed as it was set.
    dmtarget.message(name, "hedge_budget", "0.0150")
    assert dmtarget.status(name).hedge.budget_pct == 0.015
    assert dmtarget.table(name).endswith("hedge_us 250 hedge_budget 0.015")
    dmtarget.message(name, "hedge_us", "0")
    dmtarget.message(name, "hedge_budget", "5")
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


# ---------------------------------------------------------------- BPF routing (ABI 3)
#
# The rule (kmodule/iobridge_abi.h, decision.route()): per read, every
# healthy leg with a valid entry costs (inflight + 1) * service_ns +
# penalty_ns[key], key = (size bucket, in-flight bucket, latency bucket of
# the leg's newest completion latency); the lowest cost wins, exact ties at
# random; an idle valid leg is probed after probe_after_ns. Under TCG on a
# busy host latencies jump by tens of ms: the tests below assert what the
# rule guarantees whatever the timing (counts, shares with wide margins,
# bounds derived from the elapsed time), never timings themselves.

HUGE_NS = 1_000_000_000      # a penalty no queue makes up for
MAX_EDGE = 0xFFFFFFFF        # a latency edge no read reaches


def by_lat(penalties: list[int]) -> np.ndarray:
    """penalty_ns for every key from a penalty per latency bucket (any size
    and in-flight bucket): the latency bucket varies fastest in a key index."""
    assert len(penalties) == abi.NUM_LAT_BUCKETS
    return np.tile(np.asarray(penalties, dtype=np.int64),
                   abi.NUM_SIZE_BUCKETS * abi.NUM_INFLIGHT_BUCKETS)


def by_size(penalties: list[int]) -> np.ndarray:
    """penalty_ns for every key from a penalty per size bucket."""
    assert len(penalties) == abi.NUM_SIZE_BUCKETS
    return np.repeat(np.asarray(penalties, dtype=np.int64),
                     abi.NUM_INFLIGHT_BUCKETS * abi.NUM_LAT_BUCKETS)


class DirectIO:
    """One O_DIRECT descriptor on a device, open for the whole test: udev
    probes a device (reads) when a writer closes it, and those reads would
    land in the counts, so writes never go through a short-lived writer."""

    SPAN = 4 << 20       # reads wrap around in the first 4 MiB (legs have >= 8 MiB)

    def __init__(self, dev: str):
        self.fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
        self.buf = mmap.mmap(-1, 1 << 20)        # page-aligned

    def read(self, count: int = 1, bs: int = 4096, first: int = 0) -> None:
        """`count` reads of `bs` bytes, one at a time (QD1), from block `first`."""
        view = memoryview(self.buf)[:bs]
        for i in range(count):
            assert os.preadv(self.fd, [view], (first + i) * bs % self.SPAN) == bs

    def read_at(self, offset: int, nbytes: int) -> None:
        assert os.preadv(self.fd, [memoryview(self.buf)[:nbytes]], offset) == nbytes

    def write(self, block: int, bs: int = 4096) -> None:
        """One write: a copy to every leg, which gives each its newest latency."""
        assert os.pwritev(self.fd, [memoryview(self.buf)[:bs]], block * bs) == bs

    def close(self) -> None:
        os.close(self.fd)     # the buffer goes with the object (a traceback may hold views)


@pytest.fixture
def direct_io():
    """Factory: direct_io(dev) -> DirectIO, closed after the test."""
    opened: list[DirectIO] = []

    def factory(dev: str) -> DirectIO:
        opened.append(DirectIO(dev))
        return opened[-1]

    yield factory
    for io in opened:
        io.close()


@dataclasses.dataclass
class Routed:
    """What one measured stretch of reads did: per-leg counts from the
    target, the routing program's counters (deltas) and the target status."""
    hook: list[int]
    default: list[int]
    stats: dict[str, int]
    status: dmtarget.TargetStatus


def measure(routing: RoutePolicy, name: str, do_reads, legs: list[str] | None = None) -> Routed:
    """Reset the target's counters, run do_reads(), return what they did.
    Whatever the table says, the program's counters and the target's agree:
    every read the program routed is one the module followed, and every read
    it left to the default is one the default routed (and with `legs`, the
    legs' block-layer read counts agree with the target's)."""
    dmtarget.message(name, "reset_counters")
    s0 = routing.stats()
    blk0 = [blk_reads(d) for d in legs or ()]
    do_reads()
    st = dmtarget.status(name)
    blk = [blk_reads(d) - b for d, b in zip(legs or (), blk0)]
    s1 = routing.stats()
    stats = {k: s1[k] - s0[k] for k in s1}
    r = Routed([leg.hook_routed for leg in st.legs], [leg.default_routed for leg in st.legs],
               stats, st)
    assert st.hook_rejected == 0, r
    if routing.attached:
        assert stats["routed"] == sum(r.hook) and stats["default"] == sum(r.default), r
    else:
        assert stats["calls"] == 0 and sum(r.hook) == 0, r
    assert stats["calls"] == stats["routed"] + stats["default"], r
    if legs:
        assert [leg.reads for leg in st.legs] == blk, (r, blk)
    return r


def peek_ctx(routing: RoutePolicy) -> abi.RouteCtx:
    """The hook context of the newest read (iobridge_test_peek)."""
    leaf = routing.bpf[b"iobridge_test_ctx"][ctypes.c_int(0)]
    return abi.RouteCtx.from_buffer_copy(bytes(leaf))


def test_bpf_routing_follows_penalties(make_nullb, make_iobridge, direct_io, routing):
    legs = [make_nullb(size_mb=8), make_nullb(size_mb=8)]
    name = make_iobridge(legs)
    tid = dmtarget.target_ref(name)
    io = direct_io(f"/dev/mapper/{name}")
    routing.attach()
    n = 300

    def reads(bs: int = 4096):
        return lambda: io.read(n, bs=bs)

    # A huge penalty on leg 1: it gets no read; the hook routes every read
    # (the program's, the target's and the block layer's counts agree).
    routing.set_leg(tid, 0, penalty_ns=0, ttl_s=600)
    routing.set_leg(tid, 1, penalty_ns=HUGE_NS, ttl_s=600)
    r = measure(routing, name, reads(), legs)
    assert r.hook[1] == 0 and r.hook[0] >= n and r.default == [0, 0], r
    assert r.stats["probes"] == 0 and r.stats["silent"] == 0, r

    # Swap the penalties: the legs swap.
    routing.set_leg(tid, 0, penalty_ns=HUGE_NS, ttl_s=600)
    routing.set_leg(tid, 1, penalty_ns=0, ttl_s=600)
    r = measure(routing, name, reads(), legs)
    assert r.hook[0] == 0 and r.hook[1] >= n and r.default == [0, 0], r

    # Both penalised: the lower cost still wins; service_ns counts as much
    # (leg 1's penalty is the lower). Leg 0's cost is max(service, newest
    # latency) + penalty: tens of ms apart, so that one read the host
    # delays does not make leg 0 the dearer (0.1 ms apart, it could).
    routing.set_leg(tid, 0, penalty_ns=60_000_000, service_ns=1_000_000, ttl_s=600)
    routing.set_leg(tid, 1, penalty_ns=40_000_000, service_ns=60_000_000, ttl_s=600)
    r = measure(routing, name, reads())
    assert r.hook[1] == 0 and r.hook[0] >= n, r

    # The size key: leg 1 avoided for reads up to 4 KiB only, leg 0 for the
    # others (64 KiB reads are size bucket 2).
    routing.set_leg(tid, 0, penalty_ns=by_size([0, HUGE_NS, HUGE_NS, HUGE_NS]), ttl_s=600)
    routing.set_leg(tid, 1, penalty_ns=by_size([HUGE_NS, 0, 0, 0]), ttl_s=600)
    r = measure(routing, name, reads(4096))
    assert r.hook[1] == 0 and r.hook[0] >= n, r
    r = measure(routing, name, reads(65536))
    assert r.hook[0] == 0 and r.hook[1] >= n, r

    # Failed legs are left out by the program too (and never chosen).
    routing.set_leg(tid, 0, penalty_ns=HUGE_NS, ttl_s=600)
    routing.set_leg(tid, 1, penalty_ns=0, ttl_s=600)
    dmtarget.message(name, "fail_leg", "1")
    r = measure(routing, name, reads())
    assert r.hook[1] == 0 and r.hook[0] >= n and r.status.hook_rejected == 0, r
    dmtarget.message(name, "restore_leg", "1")

    # Detached: the module default decides, even with a valid "leg 1 only" table.
    routing.detach()
    r = measure(routing, name, reads(), legs)
    assert r.hook == [0, 0] and min(r.default) >= n // 3, r


def test_table_hedge_deadline_reaches_the_target(make_nullb, make_iobridge, direct_io, routing):
    """The chosen leg's hedge_us for the read's key reaches the target
    (ABI 7): leg 0 (10 ms, time enough for the hedge's workqueue on a busy
    host) gets 4 KiB reads with a 1 ms deadline and they are hedged on leg 1
    (budget 100%); 64 KiB reads have none and are not; once
    the entries expire (no agent) nothing is hedged, the target having no
    deadline of its own. Not shorter: a deadline from the program hedges
    only to a leg whose recent read took less than the read has waited
    (iob_hedge_futile), and leg 1's reads take tens of us under emulation."""
    # Not slower: the losers stay in flight on leg 0 for its whole latency,
    # and at 30 ms 32 of them made its cost (33 x 30 ms) reach leg 1's
    # penalty, so leg 1 got the rest of the reads (VM, 6.1).
    legs = [make_nullb(size_mb=8, irqmode=2, completion_nsec=10_000_000), make_nullb(size_mb=8)]
    name = make_iobridge(legs, hedge_budget=100)
    tid = dmtarget.target_ref(name)
    io = direct_io(f"/dev/mapper/{name}")
    routing.attach()
    n = 200
    routing.set_leg(tid, 0, penalty_ns=0, ttl_s=600, hedge_us=by_size([1000, 0, 0, 0]))
    routing.set_leg(tid, 1, penalty_ns=HUGE_NS, ttl_s=600)
    dmtarget.message(name, "reset_counters")
    io.read(n, bs=4096)
    st = dmtarget.status(name)
    assert st.legs[0].hook_routed >= n and st.hedge.issued >= 0.9 * n, st
    # most hedges win (leg 1 answers at once); a host stall of 10 ms in the
    # hedge's timer or workqueue lets the primary win instead
    assert st.hedge.won >= 0.5 * n, st.hedge
    issued = st.hedge.issued
    io.read(n, bs=65536)
    assert dmtarget.status(name).hedge.issued == issued
    routing.set_leg(tid, 0, penalty_ns=0, ttl_s=0.2, hedge_us=1000)
    routing.set_leg(tid, 1, penalty_ns=HUGE_NS, ttl_s=0.2)
    time.sleep(0.5)
    io.read(n, bs=4096)
    st = dmtarget.status(name)
    assert st.hedge.issued == issued and sum(st.legs[i].default_routed for i in (0, 1)) >= n, st


def test_a_learned_deadline_does_not_hedge_to_a_slower_leg(make_nullb, make_iobridge,
                                                           direct_io, routing):
    """A deadline from the routing program hedges only to a leg whose
    recent read took less than the read has waited (iob_hedge_futile): leg
    0 answers in 10 ms, leg 1 in 30 ms; reads on leg 0 with a 1 ms deadline
    get no hedge (no token spent, none refused), while the target's own
    hedge_us (plain hedging) sends each to leg 1 all the same."""
    legs = [make_nullb(size_mb=8, irqmode=2, completion_nsec=10_000_000),
            make_nullb(size_mb=8, irqmode=2, completion_nsec=30_000_000)]
    name = make_iobridge(legs, hedge_budget=100)
    tid = dmtarget.target_ref(name)
    io = direct_io(f"/dev/mapper/{name}")
    routing.attach()
    n = 40
    # leg 1's recent reads: 30 ms
    routing.set_leg(tid, 0, penalty_ns=HUGE_NS, ttl_s=600)
    routing.set_leg(tid, 1, penalty_ns=0, ttl_s=600)
    io.read(4, bs=4096)
    routing.set_leg(tid, 0, penalty_ns=0, ttl_s=600, hedge_us=by_size([1000, 0, 0, 0]))
    routing.set_leg(tid, 1, penalty_ns=HUGE_NS, ttl_s=600)
    dmtarget.message(name, "reset_counters")
    io.read(n, bs=4096)
    st = dmtarget.status(name)
    assert st.legs[0].hook_routed == n and st.legs[1].reads == 0, st
    assert (st.hedge.issued, st.hedge.refused) == (0, 0), st.hedge
    # The target's own deadline, the program giving none: plain hedging.
    routing.set_leg(tid, 0, penalty_ns=0, ttl_s=600)
    dmtarget.message(name, "hedge_us", "1000")
    dmtarget.message(name, "reset_counters")
    io.read(n, bs=4096)
    st = dmtarget.status(name)
    assert st.hedge.issued >= 0.9 * n and st.legs[1].reads == st.hedge.issued, st


def test_bpf_routing_follows_live_latency(make_nullb, make_dm_delay, make_iobridge, direct_io,
                                          routing):
    """Both legs have the same entry: latency bucket 0 (newest latency under
    EDGE) costs nothing, every higher bucket a huge penalty. Leg 1 is a
    dm-delay device whose delay the test switches: reads follow the legs'
    live latency, with no table change."""
    edge_ns, slow_ms = 200_000_000, 600     # the slow leg's latency is 3x the edge
    base = make_nullb(size_mb=8)
    delay = make_dm_delay(base, 0)
    delay_name = Path(delay).name

    def set_delay(ms: int) -> None:
        reload(delay_name, f"0 {sectors_of(base)} delay {base} 0 {ms} {base} 0 {ms}")

    name = make_iobridge([make_nullb(size_mb=8), delay])
    tid = dmtarget.target_ref(name)
    io = direct_io(f"/dev/mapper/{name}")
    # A service time of 1 s, above either leg's latency: the per-read term
    # ties (the cost rule takes the larger of the two), only the penalty
    # of the latency bucket tells the legs apart.
    for leg in (0, 1):
        routing.set_leg(tid, leg, penalty_ns=by_lat([0] + [HUGE_NS] * 7), ttl_s=600,
                        lat_edges_ns=[edge_ns] + [MAX_EDGE] * 6, service_ns=1_000_000_000)
    routing.attach()
    routing.attach(b"iobridge_test_peek")

    # Both fast: equal costs, ties go either way, both legs serve reads.
    io.write(0)          # fresh latencies on both legs (udev's probe reads are older)
    r = measure(routing, name, lambda: io.read(200))
    assert min(r.hook) >= 20 and sum(r.hook) >= 200, r

    # Leg 1 slow: two writes give it two slow latencies (>= 600 ms, bucket 1;
    # the routing takes the lower per read of a leg's two newest): reads
    # avoid it. Leg 0 crossing the edge itself (two TCG stalls of 200 ms in
    # a row) would make one tie, hence the margin of a few reads.
    set_delay(slow_ms)
    io.write(1)
    io.write(3)
    r = measure(routing, name, lambda: io.read(100))
    ctx = peek_ctx(routing)
    assert ctx.last_lat_ns[1] >= slow_ms * 1_000_000 * 0.9, (r, list(ctx.last_lat_ns[:2]))
    assert r.hook[1] <= 3 and r.hook[0] >= 97, (r, list(ctx.last_lat_ns[:2]))

    # Leg 1 fast again: one fast write is enough (the lower of its two newest).
    set_delay(0)
    io.write(2)
    r = measure(routing, name, lambda: io.read(200))
    ctx = peek_ctx(routing)
    assert min(r.hook) >= 20, (r, list(ctx.last_lat_ns[:2]))


def test_bpf_inflight_rule_at_depth(make_nullb, make_iobridge, direct_io, routing):
    """Cost grows with the leg's queue: at queue depth 16 a leg takes its
    share even with a (small) penalty that keeps it idle at QD1. The legs
    complete by timer (2 ms), so reads stay in flight."""
    legs = [make_nullb(size_mb=16, irqmode=2, completion_nsec=2_000_000) for _ in range(2)]
    name = make_iobridge(legs)
    dev = f"/dev/mapper/{name}"
    tid = dmtarget.target_ref(name)
    io = direct_io(dev)
    routing.attach()
    # A service time well above the legs' latency (2 ms, more under a
    # loaded emulator): the cost rule takes the larger of the queue term
    # and the recent latency, so only then is the queue term (and the
    # penalty) what decides, not one leg's latency jitter (since ABI 5).
    service = 20_000_000

    def fio_qd16():
        fio("--name=depth", f"--filename={dev}", "--direct=1", "--ioengine=libaio",
            "--iodepth=16", "--rw=randread", "--bs=4k", "--io_size=6M", "--randrepeat=0")

    # Equal legs, no penalty: least cost is least in flight, both legs share.
    for leg in (0, 1):
        routing.set_leg(tid, leg, penalty_ns=0, service_ns=service, ttl_s=600)
    r = measure(routing, name, fio_qd16)
    total = sum(r.hook)
    assert total >= 1536 and r.default == [0, 0], r
    assert min(r.hook) >= total * 0.25, r

    # Leg 1 penalised by 3 reads' service: at QD1 (nothing in flight) it
    # gets nothing; at QD16 it takes reads once leg 0 has 3 more in flight.
    routing.set_leg(tid, 1, penalty_ns=3 * service, service_ns=service, ttl_s=600)
    r = measure(routing, name, lambda: io.read(100))
    assert r.hook[1] == 0 and r.hook[0] >= 100, r
    r = measure(routing, name, fio_qd16)
    total = sum(r.hook)
    assert total >= 1536 and r.hook[1] >= total * 0.10 and r.hook[1] < r.hook[0], r


def burst_reads(io: DirectIO, bursts: int, per_burst: int, pause_s: float, elapsed: list):
    """A reader for measure(): `bursts` bursts of per_burst sequential reads,
    each after a pause of pause_s; appends the time it took (ns) to elapsed."""
    def reads():
        t0 = time.monotonic_ns()
        for b in range(bursts):
            time.sleep(pause_s)
            io.read(per_burst, first=b * per_burst)
        elapsed.append(time.monotonic_ns() - t0)
    return reads


def test_bpf_probing(make_nullb, make_iobridge, direct_io, routing):
    """An avoided leg, idle for probe_after_ns, gets the next read (a probe):
    at least one per pause longer than probe_after_ns, at most one per
    probe_after_ns elapsed. No probes with probe_after_ns = 0."""
    legs = [make_nullb(size_mb=8), make_nullb(size_mb=8)]
    name = make_iobridge(legs)
    tid = dmtarget.target_ref(name)
    io = direct_io(f"/dev/mapper/{name}")
    routing.attach()
    # 40 ms: the wait is also 32x leg 1's newest latency, which stays under
    # the pause (100 ms) unless a read of it took over 3 ms.
    probe_after = 40_000_000
    bursts, per_burst = 5, 40

    elapsed: list[int] = []
    # leg 1 idle for > probe_after before each burst
    bursty = burst_reads(io, bursts, per_burst, 2.5 * probe_after / 1e9, elapsed)

    routing.set_leg(tid, 0, penalty_ns=0, ttl_s=600)
    routing.set_leg(tid, 1, penalty_ns=HUGE_NS, ttl_s=600, probe_after_ns=probe_after)
    r = measure(routing, name, bursty)
    n = bursts * per_burst
    assert sum(r.hook) >= n and r.default == [0, 0], r
    # Every read leg 1 got was a probe (it never costs less), and probes count.
    assert r.stats["probes"] == r.hook[1], r
    assert bursts <= r.hook[1] <= elapsed[-1] // probe_after + 1, (r, elapsed)
    assert r.hook[0] > r.hook[1], r

    # probe_after_ns = 0: never probed.
    routing.set_leg(tid, 1, penalty_ns=HUGE_NS, ttl_s=600, probe_after_ns=0)
    r = measure(routing, name, bursty)
    assert r.hook[1] == 0 and r.hook[0] >= n and r.stats["probes"] == 0, r

    # probe_after_ns on the lowest-cost leg itself: it gets the read anyway,
    # which is no probe.
    routing.set_leg(tid, 0, penalty_ns=0, ttl_s=600, probe_after_ns=1)
    r = measure(routing, name, bursty)
    assert r.hook[1] == 0 and r.hook[0] >= n and r.stats["probes"] == 0, r


def test_bpf_probe_waits_32x_the_legs_newest_latency(make_nullb, make_iobridge, direct_io,
                                                      routing):
    """A leg whose reads take 10 ms is probed at most once per 320 ms
    (abi.PROBE_LAT_MULT x its newest latency), not once per probe_after_ns
    (20 ms): with a pause of 100 ms before each of 8 bursts, probes every
    probe_after_ns would be 8."""
    slow_ns = 10_000_000
    legs = [make_nullb(size_mb=8), make_nullb(size_mb=8, irqmode=2, completion_nsec=slow_ns)]
    name = make_iobridge(legs)
    tid = dmtarget.target_ref(name)
    io = direct_io(f"/dev/mapper/{name}")
    routing.attach()
    probe_after = 20_000_000
    bursts, per_burst = 8, 20
    elapsed: list[int] = []
    bursty = burst_reads(io, bursts, per_burst, 0.1, elapsed)

    routing.set_leg(tid, 0, penalty_ns=0, ttl_s=600)
    routing.set_leg(tid, 1, penalty_ns=HUGE_NS, ttl_s=600, probe_after_ns=probe_after)
    r = measure(routing, name, bursty)
    wait = abi.PROBE_LAT_MULT * slow_ns
    assert r.stats["probes"] == r.hook[1] >= 1, r
    # The first probe may come at once (leg 1 idle since before the test).
    assert r.hook[1] <= elapsed[-1] // wait + 1 < bursts, (r, elapsed)


def test_bpf_expired_or_silent_table_leaves_reads_to_the_default(make_nullb, make_iobridge,
                                                                 direct_io, routing):
    legs = [make_nullb(size_mb=8), make_nullb(size_mb=8)]
    name = make_iobridge(legs)
    tid = dmtarget.target_ref(name)
    io = direct_io(f"/dev/mapper/{name}")
    routing.attach()
    n = 200

    # Expired entries: the module default decides (least in flight, rotating
    # on ties at QD1), counted as default and not as silent.
    routing.set_leg(tid, 0, penalty_ns=0, ttl_s=0.2)
    routing.set_leg(tid, 1, penalty_ns=HUGE_NS, ttl_s=0.2)
    time.sleep(0.3)
    r = measure(routing, name, lambda: io.read(n))
    assert r.hook == [0, 0] and r.stats["default"] >= n and r.stats["silent"] == 0, r
    assert min(r.default) >= n // 3, r

    # Valid entries but the agent's heartbeat is 10 s old with a 100 ms
    # silence limit: the whole table is ignored, counted as default and silent.
    routing.set_leg(tid, 0, penalty_ns=0, ttl_s=600)
    routing.set_leg(tid, 1, penalty_ns=HUGE_NS, ttl_s=600)
    routing.heartbeat(now_ns() - 10_000_000_000, max_silence_ns=100_000_000)
    r = measure(routing, name, lambda: io.read(n))
    assert r.hook == [0, 0] and r.stats["default"] >= n, r
    assert r.stats["silent"] == r.stats["default"], r
    assert min(r.default) >= n // 3, r

    # A fresh heartbeat: the table routes again.
    routing.heartbeat(now_ns(), max_silence_ns=600_000_000_000)
    r = measure(routing, name, lambda: io.read(n))
    assert r.hook[1] == 0 and r.hook[0] >= n and r.stats["silent"] == 0, r


def test_kernel_routing_matches_decision_route(make_nullb, make_iobridge, direct_io, routing):
    """The kernel's choice for a read equals decision.route()'s for the same
    state: iobridge_test_peek keeps the context the routing program saw
    (in flight, health, each leg's newest latency and completion time, the
    clock), and route() is run on it with the table the kernel has. Random
    penalties per key make a wrong key (size or latency bucket, per-leg
    edges) or a wrong cost pick another leg; no-tie costs make the choice
    deterministic. The legs' latencies spread over the buckets by themselves
    (two fast legs and one 20 ms leg, edges 25 us .. 64 ms); the 20 ms leg's
    edges end at 16 ms, so its reads land in the open top bucket, priced
    beyond its top_lat_ns (17 ms) in proportion."""
    legs = [make_nullb(size_mb=8), make_nullb(size_mb=8),
            make_nullb(size_mb=8, irqmode=2, completion_nsec=20_000_000)]
    name = make_iobridge(legs)
    tid = dmtarget.target_ref(name)
    io = direct_io(f"/dev/mapper/{name}")
    routing.attach()
    routing.attach(b"iobridge_test_peek")
    nlegs = len(legs)
    base_edges = np.array([25_000, 100_000, 400_000, 1_600_000, 6_400_000, 16_000_000,
                           64_000_000])
    edges = np.stack([base_edges, base_edges * 2, base_edges // 4])     # per leg
    top_lat = np.array([0, 0, 17_000_000])
    service = np.array([100_000, 150_000, 200_000])
    # Sizes on both sides of every size-bucket boundary.
    sizes = (4096, 8192, 16384, 20480, 65536, 69632, 131072, 4096)
    compared: list[tuple] = []
    skipped = scaled = 0

    # Three tables: plain costs, the same with leg 0 failed halfway, and with
    # probing (route() and the kernel must agree on probes as well).
    for seed, probe_after, fail_leg0 in ((1, 0, False), (2, 0, True), (3, 40_000_000, False)):
        rng = np.random.default_rng(seed)
        penalty = rng.integers(0, 3_000_000, size=(nlegs, abi.KEYS_PER_LEG))
        expires = now_ns() + 600_000_000_000
        table = decision.KeyedTable(
            valid=np.ones(nlegs, dtype=bool),
            p_slow=np.zeros((nlegs, abi.KEYS_PER_LEG), dtype=np.float32),
            penalty_ns=penalty, lat_edges_ns=edges, service_ns=service,
            probe_after_ns=probe_after, computed_ns=0, valid_from_ns=0, expiry_ns=expires,
            top_lat_ns=top_lat)
        routing.clear(tid.id)
        routing.publish(tid, penalty, edges, service, probe_after, expires, top_lat)
        hook0 = [leg.hook_routed for leg in dmtarget.status(name).legs]
        for i, nbytes in enumerate(sizes):
            if fail_leg0 and i == len(sizes) // 2:
                dmtarget.message(name, "fail_leg", "0")
            offset = (i + 1) << 19      # a fresh 512 KiB per read
            s0 = routing.stats()
            io.read_at(offset, nbytes)
            st = dmtarget.status(name)
            s1 = routing.stats()
            hook1 = [leg.hook_routed for leg in st.legs]
            delta = [b - a for a, b in zip(hook0, hook1)]
            hook0 = hook1
            ctx = peek_ctx(routing)
            if s1["calls"] - s0["calls"] != 1 or ctx.sector != offset // 512:
                skipped += 1    # another read (udev?) went through the hook meanwhile
                continue
            assert ctx.bio_bytes == nbytes and ctx.target_id == tid.id and ctx.nr_legs == nlegs
            assert ctx.abi_version == abi.ABI_VERSION
            inflight = list(ctx.inflight[:nlegs])
            last_lat = list(ctx.last_lat_ns[:nlegs])
            last_done = list(ctx.last_complete_ns[:nlegs])
            last_qlen = list(ctx.last_lat_qlen[:nlegs])
            healthy = [bool(h) for h in ctx.healthy[:nlegs]]
            # The context carries live latencies: the timer leg's are >= 20 ms.
            assert last_lat[2] == 0 or last_lat[2] >= 20_000_000, last_lat
            assert healthy == [not (fail_leg0 and i >= len(sizes) // 2), True, True], healthy
            costs = [table.cost(g, nbytes, inflight[g], last_lat[g], last_qlen[g])
                     for g in range(nlegs) if healthy[g]]
            if costs.count(min(costs)) > 1:
                skipped += 1    # an exact tie: a random choice
                continue
            want, probe = decision.route(table, ctx.now_ns, nbytes, inflight, last_lat,
                                         last_done, healthy=healthy, last_lat_qlen=last_qlen)
            state = dict(seed=seed, nbytes=nbytes, inflight=inflight, last_lat=last_lat,
                         last_qlen=last_qlen,
                         since_done=[ctx.now_ns - d for d in last_done], healthy=healthy,
                         costs=costs, route=(want, probe), kernel=delta,
                         probes=s1["probes"] - s0["probes"])
            assert sum(delta) == 1 and want >= 0, state
            assert delta.index(1) == want, state
            assert s1["probes"] - s0["probes"] == int(probe), state
            compared.append((want, probe))
            scaled += healthy[2] and last_lat[2] > top_lat[2]
        if fail_leg0:
            dmtarget.message(name, "restore_leg", "0")

    assert len(compared) >= 16, (compared, skipped)
    # Some choices had the 20 ms leg's penalty scaled (it had served a read).
    assert scaled >= 1, compared

    # The comparison is not trivial: the reads went to more than one leg.
    assert len({leg for leg, _ in compared}) >= 2, compared


def test_hook_context_has_the_queue_each_legs_newest_read_met(make_nullb, make_iobridge, routing):
    """last_lat_qlen: the bios ahead of each leg's newest completed read when
    the module submitted it: with 8 in flight over two 1 ms legs (the
    module default spreads them), some, never 8 or more. (One read at a
    time gives 0: test_kernel_routing_matches_decision_route.)"""
    legs = [make_nullb(size_mb=8, irqmode=2, completion_nsec=1_000_000) for _ in range(2)]
    name = make_iobridge(legs)
    routing.attach(b"iobridge_test_peek")
    qlens = []
    for _ in range(3):
        fio("--name=qd8", f"--filename=/dev/mapper/{name}", "--direct=1", "--ioengine=libaio",
            "--iodepth=8", "--rw=randread", "--bs=4k", "--io_size=1M", "--randrepeat=0")
        qlens.append(max(peek_ctx(routing).last_lat_qlen[:2]))
    assert 0 < max(qlens) < 8, qlens


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
    tid = dmtarget.target_ref(name)
    routing.attach()
    def flip(i: int) -> None:
        leg = i % 2
        routing.set_leg(tid, leg, penalty_ns=0, ttl_s=5)
        routing.set_leg(tid, 1 - leg, penalty_ns=HUGE_NS, ttl_s=5)
        time.sleep(0.003)

    # Write everything with checksummed blocks, verifying as it goes and
    # again at the end; some blocks are rewritten while the table flips;
    # then a second pass of mixed sizes through the same flips.
    result, result2, flips = verify_while_flipping(dev, size_mb, "128k", flip)
    assert fio_errors(result) == 0 and fio_errors(result2) == 0
    st = dmtarget.status(name)
    assert flips > 50, flips
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
         # long enough that a dm reload slowed by a busy host (7 s seen) ends inside it
         "--time_based", "--runtime=30", "--numjobs=2", "--group_reporting"],
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


def test_failed_readahead_on_a_suspended_leg_does_not_fail_it(make_nullb, make_dm, make_iobridge):
    """Device-mapper fails readahead bios while a device is suspended (by
    design, dm_submit_bio). A dm leg being reloaded must not be failed for
    that: buffered reads through the target while its primary leg (dm-linear)
    is suspended get their data from the other leg, the leg counts the
    errors but stays healthy even with error_threshold 1."""
    size_mb = 8
    base = [make_nullb(size_mb=size_mb), make_nullb(size_mb=size_mb)]
    lin = make_dm(f"0 {sectors_of(base[0])} linear {base[0]} 0",
                  name=f"iobra{os.getpid()}_{time.monotonic_ns()}")
    name = make_iobridge([lin, base[1]], policy="primary", error_threshold=1)
    dev = f"/dev/mapper/{name}"
    run(f"dd if=/dev/urandom of=/tmp/iob_ra_src bs=1M count={size_mb} status=none")
    run(f"dd if=/tmp/iob_ra_src of={dev} bs=1M oflag=direct status=none")
    run(["blockdev", "--flushbufs", dev])
    dmtarget.message(name, "reset_counters")
    run(["dmsetup", "suspend", Path(lin).name])
    try:
        reader = subprocess.Popen(["dd", f"if={dev}", "of=/tmp/iob_ra_out", "bs=128k",
                                   f"count={size_mb * 8}", "status=none"], stderr=subprocess.PIPE,
                                  text=True)
        time.sleep(3)
    finally:
        run(["dmsetup", "resume", Path(lin).name])
    _, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err
    st = dmtarget.status(name)
    print(f"\nsuspended primary: {st}")
    assert st.legs[0].read_errors >= 1, st       # readahead failed on the suspended leg
    assert st.health == "AA" and st.read_failures == 0, st
    run("cmp /tmp/iob_ra_src /tmp/iob_ra_out")


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
    tid = dmtarget.target_ref(name)
    reload(name, dmtarget.table(name))
    st = dmtarget.status(name)
    assert st.health == "AS" and st.target_id == tid.id, st

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
