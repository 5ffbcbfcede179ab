"""The agent end to end on the VM kernel: `iobridge run` as a separate
process (as systemd runs it), the real module and BPF programs, fio as the
client, and a leg with real slow periods (dm-delay reloaded on a schedule).

Each agent start pays for BCC compiling the observer and the routing
program (about a minute under emulation), so the policy comparisons share
one agent (the module-scoped `comparison` fixture).

The comparisons' margins are chosen to hold on a machine twice as slow, or
with a busy host core, and to fail for a learned policy that does nothing:
such a policy routes like the module default, so its reads on the slow leg
while slow, the reads fio saw pay a slow period at queue depth 1, and its
p99 at queue depth 1 come out at about 1x the default's, not under the
bounds below.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import KERNEL_TROUBLE, run

from iobridge.core import abi
from iobridge.core import features as F
from iobridge.daemon.config import DEFAULT_MODEL, Config
from iobridge.kernel import dmtarget
from iobridge.lab import testbed, workload
from iobridge.lab.experiment import (AgentProcess, ReplicaSet, agent_shadowed, route_stats,
                                     routed_fraction, run_policy, slow_read_share,
                                     switchable_agent, table_ready, warm_up)

pytestmark = pytest.mark.vm

PIN_DIR = Config.pin_dir

# The comparisons: 100 us legs (the demo's) at QD1 and QD16, and legs ten
# times slower (1 ms) at QD1 with the same model (no retraining): (legs,
# fio iodepth, seconds per run).
COMPARE_SEED = 11
COMPARE_PLAN = (("fast", 1, 10), ("fast", 16, 20), ("slowdev", 1, 10))
# Bounds, learned against the module default, same seeded slow periods, the
# agent running in both runs (shadow mode for the default's, experiment.
# agent_shadowed): under single-threaded TCG the agent's CPU (12-25% of the
# vCPU) comes out of fio's, and with the agent stopped for the default run
# that alone decided QD16's p99 (a CI run: 1.45x with 11 slow-leg reads
# while slow against 880). The slow periods switch by ioctl (lab/faults):
# with two dmsetup processes per switch (0.3-0.4 s of the guest's CPU
# about twice a second) QD16 ran at 1,000-1,450 IOPS and its p99 was
# 0.65-1.20x over 10 runs. Since, 6 runs on 6.1 and 6.12 (quiet, beside a
# busy host core, both kernels' VMs side by side as CI runs them, and a CI
# pre-check):
#   100 us legs, QD1:  p99 0.19-0.47x, reads over 20 ms 0.06-0.18x
#   100 us legs, QD16: p99 0.60-1.00x (1,700-4,450 IOPS; 1.00x in the CI
#                      pre-check on 6.1, median 1.16x, IOPS 1.01x)
#   1 ms legs,   QD1:  p99 0.27-0.57x, reads over 20 ms 0.04-0.11x
# and 31-72 slow-leg reads while slow against 192-250 (QD1), 227-589
# against 1,445-2,554 (QD16). Those counts put the reads of each 20 ms
# sample in the period current at its end, so the reads routed just before
# a slow period counted as slow-leg reads while slow: at QD16 a floor of
# about 1.3% of the reads while slow under both policies (one run: 0.52x,
# learned 2.15% against 4.15%, failed SLOW_READS_BOUND). Counted in spans
# inside one period only (experiment.SlowLegReads), a run on 6.1 had 10
# against 138 (QD1) and 84 against 1,230 (QD16, share 0.08x). A policy that does nothing routes like the
# module default and gets about 1x on each. Beyond what CI does, both VMs
# side by side *and* a busy host core (three hogs on two cores, ~150-900
# IOPS) broke 6.1's QD16 (1.63x, learned IOPS 0.64x, median 1.46x) and its
# 1 ms legs (0.85x; reads over 20 ms 4.0% against 10.9%, so host stalls
# set both p99s); 6.12 passed beside it (0.35x, 1.02x, 0.22x). At QD16 every
# read queues behind 15 others and a host stall delays all of them, so
# there the p99 bound says "not worse beyond the host's noise" (20 s runs:
# a single 100 ms stall is not the p99 by itself), and the slow-leg share
# carries the proof that the table steers.
P99_BOUND = {("fast", 1): 0.8, ("fast", 16): 1.25, ("slowdev", 1): 0.8}   # x the default's
# Share of the reads fio saw take longer than a slow period adds (slow_ms),
# x the default's, at QD1: a policy that does nothing gets about 1x. Not at
# QD16, where reads queued behind any read pass it in both runs.
OVER_SLOW_BOUND = {("fast", 1): 0.5, ("slowdev", 1): 0.5}
SLOW_MS = 20                          # what a slow period adds to a read (ReplicaSet.slow_ms)
SLOW_READS_BOUND = 0.5                # share of the reads while slow that the slow leg served
MIN_ROUTED_FRACTION = 0.95            # reads the table routed while the agent ran (after warm-up)
# A pair whose learned run's median read took more than this many times the
# default run's is run again (at most STALLED_ATTEMPTS pairs in all) and the
# last pair is judged. Why: with the agent running in both runs the learned
# median was 0.52-1.39x the default's with dmsetup switching and 0.66-1.21x
# since (1.46x in the three-hog run above), and the legs are the same: no routing makes the median read worse by half
# unless it piles reads onto a slow leg, which every pair shows again; a
# whole-VM stall does (a CI
# run, agent stopped for the default: QD16 p50 20.1 against 4.75 ms, IOPS 571
# against 1,452, p99 114.8 against 54.3 ms).
STALLED_P50_FACTOR = 1.5
STALLED_ATTEMPTS = 3


def _replicas(name: str, completion_us: int = 100, period_scale: float = 1.0) -> ReplicaSet:
    return ReplicaSet(name=name, size_mb=256, slow_ms=SLOW_MS, normal_mean_s=0.6 * period_scale,
                      slow_mean_s=0.4 * period_scale, seed=3, completion_us=completion_us)


# The 1 ms legs' slow periods last twice as long (the same 40% of the time
# slow). Why: a policy that reacts to what it sees pays at least one slow
# read per slow period it meets (this one two, the second confirming the
# first was not a host stall) plus a probe per 32 slow latencies, and at
# QD1 on 1 ms legs the reads per second are few, so with 0.4 s periods the
# unavoidable reads alone passed 1% of the reads on a slow host and became
# the p99 whatever the policy did: a busy host core, 166 IOPS, 1658 reads,
# slow for 3.5 s in about 9 periods, 23 slow-leg reads (1.39%), p99 0.64x.
# Twice as long, half as many periods per run; the default's share of slow
# reads is unchanged.
SLOWDEV_PERIOD_SCALE = 2.0


@pytest.fixture
def replicas(iobridge_module):
    rs = _replicas("iob_t").create()
    yield rs
    rs.remove()


@pytest.fixture
def agents():
    """Start agents with agents(args...); every one is stopped at the end."""
    started: list[AgentProcess] = []

    def factory(*args: str, env: dict | None = None, workdir=None, verbose: int = 1) -> AgentProcess:
        a = AgentProcess(list(args), env=env, workdir=workdir, verbose=verbose)
        started.append(a)
        return a.start()

    yield factory
    for a in started:
        if a.proc and a.proc.poll() is None:
            a.send(signal.SIGCONT)       # a stopped agent would not see the SIGKILL's effect
        a.stop(signal.SIGKILL if a.proc and a.proc.poll() is None else signal.SIGTERM)
    if PIN_DIR.exists():   # a killed agent leaves its pins; don't leak them to the next test
        shutil.rmtree(PIN_DIR, ignore_errors=True)


def routed(name: str) -> tuple[int, int]:
    """(reads routed by the table, reads left to the module default) so far."""
    st = dmtarget.status(name)
    return sum(leg.hook_routed for leg in st.legs), sum(leg.default_routed for leg in st.legs)


def route_programs_attached() -> list[str]:
    """Names of loaded BPF programs called iobridge_route (bpftool), but not
    those this test process holds itself (test_dmtarget.py's session-wide
    policy, when that file ran first in the session)."""
    progs = json.loads(run(["bpftool", "-j", "prog", "show"]).stdout)
    return [p["name"] for p in progs if p.get("name", "").startswith("iobridge_route")
            and os.getpid() not in [q.get("pid") for q in p.get("pids", [])]]


def route_programs_left(before: list[str] = (), timeout_s: float = 15.0) -> list[str]:
    """The routing programs loaded beyond those of `before` (a listing taken
    earlier), waiting up to timeout_s for them to go. The kernel frees a
    program its last holder released after an RCU grace period: right
    after an agent exits it may still be listed, with no holder (seen on
    6.12, test_systemd.py); one listed in `before` may go meanwhile."""
    deadline = time.monotonic() + timeout_s
    while (left := list((Counter(route_programs_attached()) - Counter(before)).elements())) \
            and time.monotonic() < deadline:
        time.sleep(0.25)
    return left


def iobridge(*args: str, user: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "iobridge.cli", *args]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


WINDOW_QD = 4     # fio queue depth of window()


def window(rs: ReplicaSet, seconds: float, iodepth: int = WINDOW_QD) -> dict:
    """fio random reads on the target for `seconds`; per-leg reads and the
    routing program's counters over that span."""
    s0, r0 = dmtarget.status(rs.name), route_stats()
    fig = workload.fio_random_reads(rs.dev, iodepth, seconds)
    s1, r1 = dmtarget.status(rs.name), route_stats()
    assert fig["errors"] == 0
    return {"legs": [a.reads - b.reads for a, b in zip(s1.legs, s0.legs)],
            "hook": sum(a.hook_routed - b.hook_routed for a, b in zip(s1.legs, s0.legs)),
            "default": sum(a.default_routed - b.default_routed for a, b in zip(s1.legs, s0.legs)),
            **({k: r1[k] - r0[k] for k in ("probes", "silent")} if r0 and r1 else {})}


# ------------------------------------------------------------------ learned vs default

@pytest.fixture(scope="module")
def comparison(iobridge_module):
    """The module default, then the learned policy (one agent with the
    shipped model for all, switched into shadow mode by a reload for the
    default runs), per COMPARE_PLAN, each pair with the same seeded slow
    periods. Kernel trouble in its span is reported to every test using it."""
    marker = f"iobridge-test: comparison {time.monotonic_ns()}"
    with open("/dev/kmsg", "w") as kmsg:
        kmsg.write(marker + "\n")
    sets = {"fast": _replicas("iob_c"), "slowdev": _replicas("iob_s", completion_us=1000,
                                                               period_scale=SLOWDEV_PERIOD_SCALE)}
    runs: dict = {}
    stalled_pairs: list = []
    agent = None
    rc, log, status, first_table_s = None, "", None, None
    try:
        for rs in sets.values():
            rs.create()
        agent, config = switchable_agent()
        agent.start()                        # the shipped model
        agent.wait_status(lambda s: len(s["targets"]) == 2)
        # The runs measure the table in force: each set's legs get baselines first.
        first_table_s = {key: warm_up(agent.status, rs) for key, rs in sets.items()}
        # Side by side in time: each default run (the agent in shadow mode:
        # the routing program detached, the module default decides, the
        # agent's CPU as in the learned run), then the learned run on the
        # same seeded slow periods.
        for key, qd, seconds in COMPARE_PLAN:
            for attempt in range(1, STALLED_ATTEMPTS + 1):
                with agent_shadowed(agent, config):
                    default = run_policy(sets[key], "default", qd, seconds, COMPARE_SEED,
                                         agent.pid)
                learned = run_policy(sets[key], "learned", qd, seconds, COMPARE_SEED,
                                     agent.pid)
                runs[key, qd, "default"], runs[key, qd, "learned"] = default, learned
                if (attempt == STALLED_ATTEMPTS
                        or learned["p50_us"] <= STALLED_P50_FACTOR * default["p50_us"]):
                    break
                stalled_pairs.append({"key": key, "iodepth": qd, "default": default,
                                      "learned": learned})
        status = agent.status()
    finally:
        if agent is not None:
            rc, log = agent.stop(), agent.log()
        for rs in sets.values():
            rs.remove()
        if PIN_DIR.exists():
            shutil.rmtree(PIN_DIR, ignore_errors=True)
    lines = run(["dmesg"]).stdout.splitlines()
    start = max((i for i, line in enumerate(lines) if marker in line), default=0)
    return {"runs": runs, "agent_rc": rc, "agent_log": log, "status": status,
            "first_table_s": first_table_s, "stalled_pairs": stalled_pairs,
            "kernel_trouble": [line for line in lines[start:] if KERNEL_TROUBLE.search(line)]}


def check_learned_beats_default(comparison, key: str, qd: int) -> None:
    default = comparison["runs"][key, qd, "default"]
    learned = comparison["runs"][key, qd, "learned"]
    print(json.dumps({"default": default, "learned": learned,
                      "first_table_s": comparison["first_table_s"],
                      "stalled_pairs": [p for p in comparison["stalled_pairs"]
                                        if (p["key"], p["iodepth"]) == (key, qd)]}, indent=1))
    assert not comparison["kernel_trouble"], comparison["kernel_trouble"]
    assert comparison["agent_rc"] == 0, comparison["agent_log"][-1500:]
    assert default["errors"] == 0 and learned["errors"] == 0
    # The module default decided every read of the default run (program detached).
    assert default["hook_routed"] == 0, default["hook_routed"]
    # Both legs got reads from the table and samples of their own (none was
    # starved: the learned policy must not win by never reading the slow leg).
    name = {"fast": "iob_c", "slowdev": "iob_s"}[key]
    legs = [leg for t in comparison["status"]["targets"] if t["name"] == name for leg in t["legs"]]
    assert len(legs) == 2 and all(leg["samples"] >= F.MIN_BASELINE_SAMPLES for leg in legs), legs
    # The table, not the module default, decided the learned run's reads.
    frac = routed_fraction(learned)
    assert frac is not None and frac >= MIN_ROUTED_FRACTION, (
        f"the table routed {frac} of the reads", learned["route"])
    # Both runs met slow periods (same seeded schedule).
    assert default["slow_seconds"] > 1 and learned["slow_seconds"] > 1
    assert learned["p99_us"] < P99_BOUND[key, qd] * default["p99_us"], (
        learned["p99_us"], default["p99_us"])
    if (key, qd) in OVER_SLOW_BOUND:
        over = {r["policy"]: r["over_ms"][str(SLOW_MS)] for r in (default, learned)}
        assert over["default"] > 0 and over["learned"] < OVER_SLOW_BOUND[key, qd] * over["default"], (
            f"share of reads over {SLOW_MS} ms", over)
    # A share, not a rate per slow second: the learned run serves more reads
    # per second (IOPS 1.4-1.6x at QD1), on both legs (rate 0.50x, share
    # 0.3x in one run).
    share = {r["policy"]: slow_read_share(r) for r in (default, learned)}
    assert None not in share.values() and share["learned"] < SLOW_READS_BOUND * share["default"], share


# The first of these pays for the shared fixture (an agent start and six
# fio runs): a longer bound than the suite's per-test 600 s, for busy hosts.
@pytest.mark.timeout(1200)
def test_learned_policy_beats_the_module_default_at_qd1(comparison):
    check_learned_beats_default(comparison, "fast", 1)


@pytest.mark.timeout(1200)
def test_learned_policy_beats_the_module_default_at_qd16(comparison):
    check_learned_beats_default(comparison, "fast", 16)


@pytest.mark.timeout(1200)
def test_learned_policy_transfers_to_10x_slower_legs_at_qd1(comparison):
    """Legs with 1 ms completions instead of 100 us, the same model."""
    check_learned_beats_default(comparison, "slowdev", 1)


# ------------------------------------------------------------------ metrics

def _scrape(port: int) -> dict[str, float]:
    """The endpoint's samples: 'name{labels}' -> value (label order as served)."""
    import urllib.request  # noqa: PLC0415
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _free_port() -> int:
    import socket  # noqa: PLC0415
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(900)   # an agent start: BCC under TCG, slower on a busy host
def test_metrics_endpoint_counts_what_dmsetup_status_counts(replicas, agents):
    """Prometheus metrics over loopback: a port in use stops the start with
    nothing attached; a running agent's counters equal the module's
    (`dmsetup status`) at a quiescent moment; the endpoint goes with it.
    The agent runs with --hedging on (issue 12): it learns a deadline for
    each leg from its reads, and a leg turned slow gets its reads hedged by
    the target, which the metrics and the agent's status count as the
    target does."""
    import socket  # noqa: PLC0415
    # (a routing program another test of this session holds may still be
    # going away: compare with what was there before)
    attached = route_programs_attached()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = iobridge("run", "--metrics-listen", f"127.0.0.1:{port}", "--duration", "5")
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert route_programs_left(attached) == [] and not PIN_DIR.exists()

    port = _free_port()
    agent = agents("--metrics-listen", f"127.0.0.1:{port}", "--hedging", "on")
    warm_up(agent.status, replicas, timeout_s=60)
    window(replicas, 1.0)
    name = replicas.name
    # Quiescent: two scrapes with the module's status between them agree
    # (udev may still read the device just after fio).
    for _ in range(10):
        before = _scrape(port)
        st = dmtarget.status(name)
        after = _scrape(port)
        if before == after:
            break
        time.sleep(1)
    assert before == after, "the counters did not settle"
    m = after
    for i, leg in enumerate(st.legs):
        lab = f'{{dev="{leg.dev}",leg="{i}",target="{name}"}}'
        assert m[f"iobridge_reads_routed_by_table_total{lab}"] == leg.hook_routed
        assert m[f"iobridge_reads_routed_by_default_total{lab}"] == leg.default_routed
        assert m[f"iobridge_leg_reads_total{lab}"] == leg.reads
        assert m[f"iobridge_leg_writes_total{lab}"] == leg.writes
        assert m[f"iobridge_leg_healthy{lab}"] == 1
    assert sum(leg.hook_routed for leg in st.legs) > 0
    s = agent.status()
    assert m["iobridge_up"] == 1
    assert [k for k in m if k.startswith("iobridge_model_info{") and s["model"]["sha256"] in k]
    # The program's counters (all targets: only this one here) and its
    # decision-age histogram, one count per routing it decided.
    routed = m["iobridge_route_routed_total"]
    assert routed >= sum(leg.hook_routed for leg in st.legs) > 0
    assert m['iobridge_decision_age_seconds_bucket{le="+Inf"}'] == routed
    assert m["iobridge_decision_age_seconds_count"] == routed
    assert m["iobridge_agent_recomputes_total"] >= 1
    assert m['iobridge_recompute_seconds_bucket{le="+Inf"}'] >= 1
    print(json.dumps({k: v for k, v in m.items() if "bucket" not in k}, indent=1))

    # Hedging: deadlines learned for both legs, then leg 1 turned slow
    # (+20 ms per read): its reads routed before the kernel saw it slow,
    # and its probes, outlast their deadline and are hedged.
    targets = agent.wait_status(lambda st: all(
        leg["hedge"]["on"] for t in st["targets"] if t["name"] == name for leg in t["legs"]),
        timeout_s=60)["targets"]
    print(json.dumps([leg["hedge"] for t in targets for leg in t["legs"]], indent=1))
    replicas.set_slow(True)
    try:
        window(replicas, 3.0, iodepth=1)
    finally:
        replicas.set_slow(False)
    for _ in range(10):      # quiescent again: the losers on the slow leg end
        h = dmtarget.status(name).hedge
        m = _scrape(port)
        if h.active == 0 and m[f'iobridge_hedges_issued_total{{target="{name}"}}'] == h.issued:
            break
        time.sleep(1)
    print(f"hedges in the target: {h}")
    assert h.issued > 0 and h.won > 0, h
    for k in ("issued", "won", "lost", "refused"):
        assert m[f'iobridge_hedges_{k}_total{{target="{name}"}}'] == getattr(h, k), k
    st = agent.wait_status(lambda st: any(
        t["name"] == name and (t.get("target_hedges") or {}).get("issued") == h.issued
        for t in st["targets"]), timeout_s=30)
    assert st["hedging"] == "on"
    assert agent.stop() == 0
    with pytest.raises(OSError):
        _scrape(port)


# ------------------------------------------------------------------ fail-safe

@pytest.mark.timeout(900)   # agent start(s): BCC under TCG, slower on a busy host
def test_sigstopped_agent_table_follows_the_legs_live_state(replicas, agents, tmp_path):
    """A stalled agent leaves a table that still follows each leg's live
    latency in the kernel: a leg turning slow is avoided within a few reads,
    and the kernel's own probe brings reads back when it is fast again."""
    # 60 s: the three windows (5.5 s of fio) took 8.5 s on a quiet host and
    # 26 s with a host core busy.
    ttl_s = 60
    cfg = tmp_path / "long-ttl.toml"
    cfg.write_text("[agent]\ntick_ms = 60\nttl_ticks = 1000\nmax_silence_ms = 60000\n")
    agent = agents("--config", str(cfg))
    # Reads until both legs have a baseline and the table is published.
    warm_up(agent.status, replicas, timeout_s=60)
    st = agent.status()
    assert st["ttl_ticks"] * st["tick_ms"] >= ttl_s * 1000

    st = agent.status()         # the table in force while the agent is stopped
    agent.send(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        both_fast = window(replicas, 1.5)
        replicas.set_slow(True)          # leg 1: +20 ms per read from now on
        slow = window(replicas, 2.0)
        replicas.set_slow(False)
        fast_again = window(replicas, 2.0)
        elapsed = time.monotonic() - stopped
    finally:
        agent.send(signal.SIGCONT)
    table = [{k: leg[k] for k in ("samples", "baseline", "lat_edges_us", "penalty_4k_us")}
             for leg in st["targets"][0]["legs"]]
    print(json.dumps({"table_at_sigstop": table, "both_fast": both_fast, "slow": slow,
                      "fast_again": fast_again, "elapsed_s": elapsed}, indent=1))
    assert elapsed < ttl_s - 5, "the windows took too long: the table may have expired"
    for w in (both_fast, slow, fast_again):
        # The table stayed in force: the kernel routed every read from it.
        assert w["default"] == 0 and w["silent"] == 0 and w["hook"] > 0, w
    # Both fast: neither leg is routed as if slow (that gets well under 1%,
    # as the slow window shows). Not an even split: the kernel prices each
    # leg by its own newest latency, which a host stall raises until the
    # next read or probe, so shares wander (19.3% seen for leg 1 in a CI
    # run, 6.1, quiet host).
    assert both_fast["legs"][1] > 0.1 * sum(both_fast["legs"]), both_fast
    # Slow: leg 1 got the reads in flight when it turned slow and those routed
    # before the first of them completed (at most WINDOW_QD: each takes 20
    # ms), then the kernel's probes of an idle leg (one per probe_after_ms)
    # and a few reads while leg 0's newest latency was a host stall (with a
    # fresh agent the table prices a slow read at what stalls cost, ~5 ms).
    # Seen besides the probes: at most 6 on a quiet host, 7 and 8 on loaded
    # ones (CI with other work, a busy host core), so the bound leaves room
    # for more stalls; 46-75 for the rule with the penalty outside the
    # product.
    assert slow["legs"][1] <= 4 * WINDOW_QD + slow["probes"], slow
    assert slow["legs"][0] >= 20 * max(1, slow["legs"][1] - slow["probes"]), slow
    # Fast again: a probe saw it, and reads came back beyond the probes.
    assert slow["probes"] + fast_again["probes"] >= 1
    assert fast_again["legs"][1] > fast_again["probes"], fast_again
    assert fast_again["legs"][1] > 0.1 * sum(fast_again["legs"]), fast_again
    assert agent.stop() == 0


def test_a_target_reusing_a_removed_ones_id_never_routes_by_its_entries(replicas, agents,
                                                                        tmp_path):
    """A removed target's id goes to the next target created, which the agent
    may not have seen yet: the entries name the incarnation (the device) they
    were made for, so the new target's reads go to the module default until
    the agent publishes for it. The agent is stopped across the swap, so its
    reaction time is unbounded here, the hardest case of "within 100 ms";
    its entries stay valid and its heartbeat counts as fresh all along
    (60 s), so only the incarnation keeps them from the new device.
    The safety-net listing is an hour apart: the agent can learn of the new
    target only from its uevents (queued while it was stopped), and of the
    target's removal at the end too."""
    cfg = tmp_path / "long-ttl.toml"
    cfg.write_text("[agent]\ntick_ms = 60\nttl_ticks = 1000\nmax_silence_ms = 60000\n"
                   "discover_interval_s = 3600\n")
    agent = agents("--config", str(cfg))
    warm_up(agent.status, replicas, timeout_s=60)
    old = dmtarget.target_ref(replicas.name)
    before = window(replicas, 1.0)
    assert before["hook"] > 0 and before["default"] == 0, before   # the table routes
    table = dmtarget.table(replicas.name)
    agent.send(signal.SIGSTOP)
    try:
        # The same name over the same legs: only the incarnation differs.
        dmtarget.remove(replicas.name)
        run(["dmsetup", "create", replicas.name, "--table", table])
        new = dmtarget.target_ref(replicas.name)
        swapped = window(replicas, 1.0)
    finally:
        agent.send(signal.SIGCONT)
        t_cont = time.monotonic()
    print(json.dumps({"old": old, "new": new, "before": before, "swapped": swapped}))
    assert new.id == old.id and new.incarnation != old.incarnation, (old, new)
    # The program ran with a live-looking agent and valid entries for that id,
    # and left every read to the default.
    assert swapped["hook"] == 0 and swapped["silent"] == 0 and swapped["default"] > 0, swapped
    # Once the agent sees the new device, it publishes for it and routes again.
    st = agent.wait_status(lambda st: [t["incarnation"] for t in st["targets"]]
                           == [new.incarnation], timeout_s=60)
    seen_s = time.monotonic() - t_cont
    assert st["counters"]["listings_by_uevent"] >= 1, st["counters"]
    assert "target discovery: dm uevents" in agent.log()
    deadline = time.monotonic() + 60
    while (w := window(replicas, 0.5))["hook"] == 0:
        assert time.monotonic() < deadline, ("the agent never published for the new target", w)
    after = window(replicas, 1.0)
    assert after["hook"] > 0 and after["default"] == 0, after
    # Removed while the agent runs: seen at once, not in an hour.
    t_rm = time.monotonic()
    dmtarget.remove(replicas.name)
    st = agent.wait_status(lambda st: st["targets"] == [], timeout_s=30)
    gone_s = time.monotonic() - t_rm
    print(f"uevent discovery: new incarnation in the status {seen_s:.2f} s after SIGCONT, "
          f"removal {gone_s:.2f} s after dmsetup remove; listings {st['counters']['listings']}, "
          f"{st['counters']['listings_by_uevent']} woken by a uevent")
    assert agent.stop() == 0


@pytest.mark.timeout(1200)   # agent start(s): BCC under TCG, slower on a busy host
def test_stall_expires_kill_falls_back_restart_resumes(replicas, agents, tmp_path):
    fio = subprocess.Popen(["fio", "--name=bg", f"--filename={replicas.dev}", "--rw=randread",
                            "--bs=4k", "--direct=1", "--ioengine=libaio", "--iodepth=4",
                            # Ended by SIGINT below. Longer than the test may take: with
                            # a busy host the two agent starts took most of 600 s, fio
                            # ended first, and the restarted agent saw no reads.
                            "--time_based", "--runtime=3600", "--output-format=json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Short limits, so the stall below outlasts both within a second.
    cfg = tmp_path / "short-limits.toml"
    cfg.write_text("[agent]\ntick_ms = 20\nttl_ticks = 50\nmax_silence_ms = 500\n")
    try:
        agent = agents("--config", str(cfg))
        # fio's reads give the legs baselines; then the table routes.
        agent.wait_status(lambda s: table_ready(s, replicas.name), timeout_s=120)

        def delta(seconds: float) -> tuple[int, int]:
            h0, d0 = routed(replicas.name)
            time.sleep(seconds)
            h1, d1 = routed(replicas.name)
            return h1 - h0, d1 - d0

        hook, _ = delta(2)
        assert hook > 0, "the agent's table routed nothing"

        # Stalled agent (SIGSTOP): past the heartbeat limit (500 ms) and the
        # entries' expiry (1 s) the module default decides every read.
        agent.send(signal.SIGSTOP)
        time.sleep(1.2)
        s0 = route_stats()
        hook, dflt = delta(2)
        s1 = route_stats()
        assert hook == 0 and dflt > 0, (hook, dflt)
        assert s1["silent"] > s0["silent"], (s0, s1)
        agent.send(signal.SIGCONT)
        time.sleep(0.5)
        hook, _ = delta(2)
        assert hook > 0, "routing by the table did not resume after SIGCONT"

        # Killed agent: its programs go with it; reads keep flowing by default.
        agent.send(signal.SIGKILL)
        agent.proc.wait(10)
        time.sleep(0.5)
        hook, dflt = delta(2)
        assert hook == 0 and dflt > 0, (hook, dflt)
        assert route_programs_left() == []
        assert PIN_DIR.exists(), "a killed agent cannot unpin: its pins should still be there"

        # A restarted agent replaces the leftovers and routes again.
        again = agents("--config", str(cfg))
        assert "removed pins left by a previous agent" in again.log()
        again.wait_status(lambda s: table_ready(s, replicas.name), timeout_s=120)
        hook, _ = delta(2)
        assert hook > 0
        assert again.stop() == 0
        assert "STOPPING=1" in again.messages
    finally:
        fio.send_signal(signal.SIGINT)
        out, err = fio.communicate(60)
    job = json.loads(out[out.find("{"):])["jobs"][0]
    assert job["error"] == 0 and job["read"]["total_ios"] > 0, err
    # Nothing left behind by the clean stop.
    assert not PIN_DIR.exists()
    assert route_programs_left() == []
    # Maps this test process holds itself (other tests' fixtures) do not count.
    maps = [m.get("name", "") for m in json.loads(run(["bpftool", "-j", "map", "show"]).stdout)
            if os.getpid() not in [p.get("pid") for p in m.get("pids", [])]]
    assert not [m for m in maps if m.startswith(("iobridge_", "leg_features", "leg_slots"))], maps
    assert dmtarget.status(replicas.name).health == "AA"


# ------------------------------------------------------------------ running agent

@pytest.mark.timeout(900)   # agent start(s): BCC under TCG, slower on a busy host
def test_status_reload_target_loss_and_notify(replicas, agents, tmp_path):
    cfg = tmp_path / "iobridge.toml"
    cfg.write_text(f'[admission]\nmodel = "{DEFAULT_MODEL}"\n')
    agent = agents("--config", str(cfg), env={"WATCHDOG_USEC": "1000000"}, workdir=tmp_path)
    assert "READY=1" in agent.messages
    # Reads give the legs their baselines; the agent then publishes a table,
    # and the reads after that are routed by it.
    warm_up(agent.status, replicas)
    workload.fio_random_reads(replicas.dev, 4, 1)
    st = agent.wait_status(lambda s: s["counters"]["recomputes"] > 0
                           and s["routing"]["routed"] > 0)
    assert "target discovery: dm uevents" in agent.log()

    # iobridge status, both forms
    proc = iobridge("status", "--json", "--status-file", str(agent.status_file))
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)
    assert st["agent_alive"] and st["program_attached"]
    assert [t["name"] for t in st["targets"]] == ["iob_t"]
    legs = st["targets"][0]["legs"]
    assert len(legs) == 2
    assert st["table_age_ms"] is not None and st["last_recompute_ns"] > 0
    assert st["tick_ms"] == 250 and st["ttl_ticks"] * st["tick_ms"] == 3000
    assert st["max_silence_ms"] == 2000
    assert st["routing"]["routed"] > 0, st["routing"]
    for leg in legs:
        assert leg["baseline"]["lat_us"] > 0 and leg["samples"] >= F.MIN_BASELINE_SAMPLES
        assert len(leg["lat_edges_us"]) == abi.NUM_LAT_BUCKETS - 1
        assert len(leg["p_slow_4k"]["inflight_0"]) == abi.NUM_LAT_BUCKETS
    sha = st["model"]["sha256"]
    assert sorted(Path(p).name for p in st["pins"]) == sorted(
        ["iobridge_decisions", "iobridge_agent", "iobridge_route_stats",
         "iobridge_decision_age", "leg_features"])
    text = iobridge("status", "--status-file", str(agent.status_file)).stdout
    assert "target iob_t (id" in text and "routing program attached" in text
    assert "reads by the table" in text
    time.sleep(1.2)
    assert agent.messages.count("WATCHDOG=1") >= 2

    # SIGHUP with a config naming a missing model, then a corrupt one: refused.
    cfg.write_text('[admission]\nmodel = "missing.onnx"\n')
    agent.send(signal.SIGHUP)
    agent.wait_status(lambda s: s["counters"]["reload_failures"] == 1)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    shutil.copy(str(DEFAULT_MODEL)[:-5] + ".card.json", tmp_path / "bad.card.json")
    cfg.write_text(f'[admission]\nmodel = "{bad}"\n')
    agent.send(signal.SIGHUP)
    st = agent.wait_status(lambda s: s["counters"]["reload_failures"] == 2)
    assert st["model"]["sha256"] == sha and st["counters"]["reloads"] == 0
    assert "reload refused" in agent.log() and "not an ONNX model" in agent.log()
    # ... and a good one is taken.
    cfg.write_text(f'[agent]\ntick_ms = 10\n[admission]\nmodel = "{DEFAULT_MODEL}"\n')
    agent.send(signal.SIGHUP)
    st = agent.wait_status(lambda s: s["counters"]["reloads"] == 1)
    assert st["tick_ms"] == 10 and agent.proc.poll() is None
    assert "unchanged" in agent.log()          # the same model file: kept, not checked again

    # Shadow mode switched by reloads: the routing program detached at once
    # (the module default decides every read), then attached again.
    cfg.write_text(f'[agent]\ntick_ms = 10\nshadow = true\n[admission]\nmodel = "{DEFAULT_MODEL}"\n')
    agent.send(signal.SIGHUP)
    st = agent.wait_status(lambda s: s["counters"]["reloads"] == 2)
    assert st["shadow"] and not st["program_attached"]
    w = window(replicas, 1.0)
    assert w["hook"] == 0 and w["default"] > 0, w
    since = time.monotonic_ns()
    cfg.write_text(f'[agent]\ntick_ms = 10\n[admission]\nmodel = "{DEFAULT_MODEL}"\n')
    agent.send(signal.SIGHUP)
    st = agent.wait_status(lambda s: s["counters"]["reloads"] == 3
                           and (s["last_published_ns"] or 0) > since)
    assert not st["shadow"] and st["program_attached"]
    w = window(replicas, 1.0)
    assert w["hook"] > 0, w

    # The target disappears while the agent runs (seen by a uevent, or by
    # the 10 s safety-net listing): it lets go and keeps running.
    listings = st["counters"]["listings"]
    dmtarget.remove(replicas.name)
    st = agent.wait_status(lambda s: s["targets"] == [], timeout_s=25)
    assert st["counters"]["targets_removed"] == 1 and agent.proc.poll() is None
    assert st["counters"]["listings"] > listings
    assert "iob_t (id" in agent.log() and "is gone" in agent.log()

    assert agent.stop() == 0
    assert "STOPPING=1" in agent.messages
    assert not PIN_DIR.exists() and route_programs_left() == []
    assert not agent.status_file.exists()


@pytest.mark.timeout(900)   # agent start(s): BCC under TCG, slower on a busy host
def test_shadow_mode_decides_but_publishes_nothing(replicas, agents):
    agent = agents("--shadow")
    h0, _ = routed(replicas.name)
    run(["fio", "--name=s", f"--filename={replicas.dev}", "--rw=randread", "--bs=4k",
         "--direct=1", "--runtime=3", "--time_based"])
    st = agent.wait_status(lambda s: s["counters"]["ticks"] > 50 and s["targets"]
                           and s["counters"]["recomputes"] > 0)
    h1, _ = routed(replicas.name)
    assert h1 == h0
    assert st["shadow"] and not st["program_attached"] and route_programs_left() == []
    assert st["last_published_ns"] == 0
    legs = st["targets"][0]["legs"]
    # The table is computed (baselines, P(slow) per key) but not published.
    assert all(leg["baseline"] is not None and
               len(leg["p_slow_4k"]["inflight_0"]) == abi.NUM_LAT_BUCKETS for leg in legs), legs
    assert agent.stop() == 0


# ------------------------------------------------------------------ refused at start


def test_bad_model_config_permission_and_missing_module(iobridge_module, tmp_path):
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x00garbage")
    shutil.copy(str(DEFAULT_MODEL)[:-5] + ".card.json", tmp_path / "corrupt.card.json")
    proc = iobridge("run", "--model", str(bad))
    assert proc.returncode != 0 and "not an ONNX model" in proc.stderr, proc.stderr

    wrong = tmp_path / "schema.onnx"
    shutil.copy(DEFAULT_MODEL, wrong)
    card = json.loads(Path(str(DEFAULT_MODEL)[:-5] + ".card.json").read_text())
    card["schema_version"] = 99
    (tmp_path / "schema.card.json").write_text(json.dumps(card))
    proc = iobridge("run", "--model", str(wrong))
    assert proc.returncode != 0 and "feature schema version 99" in proc.stderr, proc.stderr

    cfg = tmp_path / "typo.toml"
    cfg.write_text("[agent]\ntik_ms = 1\n")
    proc = iobridge("run", "--config", str(cfg))
    assert proc.returncode != 0 and "unknown key agent.tik_ms" in proc.stderr, proc.stderr

    proc = iobridge("run", user="65534")
    assert proc.returncode != 0 and "needs root" in proc.stderr, proc.stderr

    # Without the module (nothing uses it between tests): a clear refusal.
    assert run(["rmmod", abi.MODULE_NAME], check=False).returncode == 0
    try:
        proc = iobridge("run")
        assert proc.returncode != 0 and f"kernel module {abi.MODULE_NAME} is not loaded" in proc.stderr
    finally:
        run(["insmod", str(testbed.module_ko())])
    assert not PIN_DIR.exists() and route_programs_left() == []
