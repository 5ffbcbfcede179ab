"""The admission experiment behind `make demo` and `iobridge bench agent`
(inside the test VM): a two-leg iobridge target whose second leg goes
through slow periods, and fio random reads under

  (a) the module default (least in-flight, no program attached),
  (b) the module's round robin,
  (c) the learned policy: `iobridge run` with the shipped model,

at each queue depth, with the same seeded slow-period schedule in every
run. Per run it also counts the reads the slow leg served while it was
slow (and their share of all reads served then), and, for (c), the reads the routing program decided from the table
(its kernel counters: routed, default, probes); with a latency directory
it keeps every read's completion latency (fio's latency log) for the CDF
plot.

The benchmark adds, in the same boot: fio IOPS with the agent against the
module default alone on the same legs without slow periods (the agent's
overhead), the agent's CPU with 8 legs, the decision age histogram, and the
QD1 comparison on legs ten times slower (null_blk completions of 1 ms
instead of 100 us) with the same model, to show it transfers.

AgentProcess runs `iobridge run` as a separate process, the way an
operator (or systemd) does, and waits for its sd_notify READY=1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ..core import abi, cliutil, clock, resources
from ..core.errors import IobridgeError, UsageError
from ..core.features import MIN_BASELINE_SAMPLES
from ..core.outfiles import atomic_output
from ..core.clock import TICK_MS_MAX, TICK_MS_MIN
from ..kernel import dmtarget
from . import testbed, workload
from .faults import NORMAL, SLOW, SlowPeriods, now_ns

POLICIES = ("default", "roundrobin", "learned")
POLICY_LABELS = {"default": "(a) module default", "roundrobin": "(b) round robin",
                 "learned": "(c) learned"}
LATENCY_KEYS = ("mean_us", "p50_us", "p99_us", "p999_us")
# Where `make demo` and `iobridge bench agent` put the CDF plot: a folder of
# the repository, which the test VM shares read-write with the host.
DEFAULT_OUTPUT_DIR = Path(".scratch") / "demo"
CDF_PNG = "latency-cdf.png"

# The benchmark goals (issue 10), printed beside the figures; never
# asserted by the benchmark. (figure, depth or None, op, limit)
GOALS = {
    "p99_us@1": ("<=", 0.5), "p999_us@1": ("<", 1.0),
    "p99_us@16": ("<=", 0.8), "mean_us@16": ("<=", 1.05), "p999_us@16": ("<", 1.0),
    "routed_fraction": (">=", 0.95),
    "overhead_iops_ratio": (">=", 0.90),
    "agent_cpu_2legs_qd16": ("<=", 10.0),
    "agent_cpu_8legs": ("<=", 15.0),
    "transfer_p99_us@1": ("<=", 0.5),
    # issue 12 (--hedging): learned routing with hedging on / the same with it off
    "hedged_p999_us@1": ("<=", 0.5), "hedged_p999_us@16": ("<=", 0.5),
    "hedged_iops": (">=", 0.95),
}
# --hedging: what "extra reads within the budget" allows above the budget
# (reads the token bucket held at the start, over a run of a few thousand).
HEDGE_TOLERANCE = 0.01
HEDGE_COUNTERS = ("issued", "won", "lost", "refused", "nomem")


def meets(value: float | None, op: str, limit: float) -> bool | None:
    """Whether `value op limit` holds (op: "<=", "<" or ">="); None when
    the figure was not measured."""
    if value is None:
        return None
    return {"<=": value <= limit, "<": value < limit, ">=": value >= limit}[op]


def goal_check(name: str, value: float | None) -> dict:
    """{"value", "goal", "met"} for one figure against GOALS[name]."""
    op, limit = GOALS[name]
    return {"value": value, "goal": f"{op} {limit:g}", "met": meets(value, op, limit)}


def goal_mark(check: dict | None) -> str:
    if check is None:
        return ""
    tag = {True: "met", False: "MISSED", None: "n/a"}[check["met"]]
    return f"  [goal {check['goal']}: {tag}]"


class AgentProcess:
    """`iobridge run` in a child process, with a notify socket to watch it."""

    def __init__(self, args: list[str] = (), env: dict | None = None, workdir: Path | None = None,
                 verbose: int = 1):
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="iobridge-agent-"))
        self.status_file = self.dir / "status.json"
        self.log_file = self.dir / "agent.log"
        self.args = ["--status-file", str(self.status_file), *args]
        self.env = env or {}
        self.verbose = verbose      # -v: info, 2: debug (every decision change)
        self.messages: list[str] = []
        self.proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None

    # BCC compiles the observer and the routing program at start: about
    # 1.5 min under TCG on a quiet host, 4-5 min with other VMs beside it.
    def start(self, timeout_s: float = 500.0, wait: bool = True) -> "AgentProcess":
        sock_path = self.dir / "notify.sock"
        sock_path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(sock_path))
        self._sock.settimeout(0.2)
        self._reader = threading.Thread(target=self._read_notify, daemon=True)
        self._reader.start()
        env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), **self.env}
        cmd = [sys.executable, "-m", "iobridge.cli", *(["-v"] * self.verbose), "run", *self.args]
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(self.log_file, "ab"),
                                     stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready(timeout_s)
        return self

    def _read_notify(self) -> None:
        while self._sock is not None:
            try:
                data = self._sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.extend(data.decode(errors="replace").splitlines())

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while "READY=1" not in self.messages:
            if self.proc.poll() is not None:
                raise IobridgeError(f"the agent exited with {self.proc.returncode} before it was "
                                    f"ready: {self.log().strip()[-600:]}")
            if time.monotonic() > deadline:
                raise IobridgeError(f"the agent was not ready within {timeout_s:.0f} s; its log "
                                    f"ends: {self.log().strip()[-600:] or '(empty)'}")
            time.sleep(0.1)

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def status(self) -> dict | None:
        """The agent's status file, or None before it wrote one."""
        from ..daemon.agent import read_status  # noqa: PLC0415
        try:
            return read_status(self.status_file)
        except IobridgeError:
            return None

    def wait_status(self, check, timeout_s: float = 30.0) -> dict:
        """Wait until check(status) holds; returns that status."""
        deadline = time.monotonic() + timeout_s
        while True:
            st = self.status()
            if st is not None and check(st):
                return st
            if self.proc.poll() is not None:
                raise IobridgeError(f"the agent exited with {self.proc.returncode}: "
                                    f"{self.log().strip()[-600:]}")
            if time.monotonic() > deadline:
                raise IobridgeError(f"the agent's status did not reach the expected state "
                                    f"within {timeout_s:.0f} s: {st}; log: {self.log()[-1500:]}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        """Stop the agent; returns its exit status (negative: killed by a signal)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()
        return self.proc.returncode


@dataclasses.dataclass
class ReplicaSet:
    """Two null_blk legs behind dm-delay devices; leg 1 has slow periods."""
    name: str = "iob_demo"
    size_mb: int = 512
    slow_ms: int = 8
    normal_mean_s: float = 1.0
    slow_mean_s: float = 0.6
    seed: int = 1
    # Each leg's device: timer completions after completion_us (100 us: an
    # SSD-like read time; the transfer check uses 1 ms).
    completion_us: int = 100
    SLOW_LEG = 1       # the target's leg index with slow periods

    def __post_init__(self):
        self.nullbs = [f"{self.name}_nb{i}" for i in range(2)]
        self.fast_leg = f"{self.name}_leg0"
        self.slow: SlowPeriods | None = None
        self.dev = f"/dev/mapper/{self.name}"

    @property
    def nullb_params(self) -> dict:
        return {"irqmode": 2, "completion_nsec": self.completion_us * 1000, "memory_backed": 0}

    def create(self) -> "ReplicaSet":
        testbed.ensure_module()
        devs = [testbed.make_nullb(n, self.size_mb, **self.nullb_params) for n in self.nullbs]
        sectors = dmtarget.device_sectors(devs[0])
        # Leg 0 goes through dm-delay too (with no delay), so both legs have
        # the same stack and only the slow periods differ.
        testbed.sh(["dmsetup", "create", self.fast_leg, "--table",
                    f"0 {sectors} delay {devs[0]} 0 0"])
        self.slow = SlowPeriods(devs[1], f"{self.name}_leg1", self.slow_ms,
                                self.normal_mean_s, self.slow_mean_s, seed=self.seed)
        self.slow.create()
        dmtarget.create(self.name, [f"/dev/mapper/{self.fast_leg}", self.slow.path])
        testbed.sh(["udevadm", "settle"], check=False)
        return self

    def restart_periods(self, seed: int) -> None:
        """A fresh slow-period schedule (same seed, same schedule)."""
        self.slow.restart(seed)

    def set_slow(self, slow: bool) -> None:
        """Make leg 1 slow (+slow_ms per read) or fast now, off schedule."""
        self.slow.stop()
        self.slow._switch(SLOW if slow else NORMAL)   # noqa: SLF001 - one reload, no thread

    def remove(self) -> None:
        """Remove everything created (idempotent)."""
        for name in (self.name, self.fast_leg):
            if dmtarget.exists(name):
                dmtarget.remove(name)
        if self.slow is not None:
            self.slow.stop()
            self.slow.remove()
        for n in self.nullbs:
            testbed.remove_nullb(n)


class SlowLegReads:
    """Samples the reads the target sent to its slow leg, and to all its
    legs, and splits them by period. The target's own per-leg counters, not
    the leg device's: udev probes the leg after every table swap (blkid, a
    dozen reads or more, each delayed while slow), and those reads are no
    policy's doing.

    A sample's reads count for a period only if that period covers the whole
    span in which they can have been routed (from before the last counter
    read to after this one); the reads of a span that meets a switch count
    as "switching", for neither. Why: with each span's reads put in the
    period current at its end, the reads routed just before a slow period
    counted as the slow leg's while slow. At QD16 (115 reads per 20 ms
    span) that was about a third of the default's slow-leg reads while slow
    and half of the learned policy's in one run, a floor under both shares
    that no routing could lower."""

    def __init__(self, rs: "ReplicaSet", interval_s: float = 0.02, periods: bool = True):
        self.rs = rs
        self.periods = periods          # False: no slow periods run, every read is normal
        self.interval_s = interval_s
        self.reads = {"slow": 0, "normal": 0, "switching": 0}        # the slow leg's
        self.all_reads = {"slow": 0, "normal": 0, "switching": 0}    # every leg's
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _count(self) -> tuple[int, tuple[int, int], int]:
        """(time before, (slow leg's reads, all legs' reads), time after)."""
        t0 = now_ns()
        legs = dmtarget.status(self.rs.name).legs
        return t0, (legs[self.rs.SLOW_LEG].reads, sum(leg.reads for leg in legs)), now_ns()

    def _run(self) -> None:
        since, last, _ = self._count()
        while not self._stop.wait(self.interval_s):
            t0, now, t1 = self._count()
            state = self.rs.slow.state_over(since, t1) if self.periods else NORMAL
            key = {SLOW: "slow", NORMAL: "normal"}.get(state, "switching")
            self.reads[key] += now[0] - last[0]
            self.all_reads[key] += now[1] - last[1]
            since, last = t0, now

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class CpuMeter:
    """CPU time of a process over a span, as % of one core, counting the
    children it waited for (the agent's dmsetup listings)."""

    def __init__(self, pid: int | None):
        self.pid = pid
        self.percent: float | None = None

    def _cpu(self) -> float:
        import psutil  # noqa: PLC0415
        t = psutil.Process(self.pid).cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self):
        if self.pid:
            self._c0, self._t0 = self._cpu(), time.monotonic()
        return self

    def __exit__(self, *exc):
        if self.pid:
            self.percent = 100.0 * (self._cpu() - self._c0) / (time.monotonic() - self._t0)


# ------------------------------------------------- the agent's pinned maps

def _le_bytes(hexes) -> bytes:
    return bytes(int(b, 16) for b in hexes)


def pinned_percpu(path: Path) -> dict[int, list]:
    """Per-CPU values of a pinned per-CPU array, by index (bpftool's JSON;
    a value is an int, a dict of fields with BTF, or a list of hex bytes)."""
    proc = testbed.sh(["bpftool", "-j", "map", "dump", "pinned", str(path)])
    out = {}
    for entry in json.loads(proc.stdout):
        entry = entry.get("formatted", entry)
        key = entry["key"]
        idx = key if isinstance(key, int) else int.from_bytes(_le_bytes(key), "little")
        out[idx] = [v["value"] for v in entry["values"]]
    return out


def pinned_percpu_hist(path: Path) -> list[int]:
    """Sum over CPUs of a pinned per-CPU u64 array."""
    values = pinned_percpu(path)
    out = [0] * (max(values) + 1 if values else 0)
    for idx, per_cpu in values.items():
        out[idx] = sum(v if isinstance(v, int) else int.from_bytes(_le_bytes(v), "little")
                       for v in per_cpu)
    return out


def pin_dir() -> Path:
    from ..daemon.config import Config  # noqa: PLC0415
    return Path(Config.pin_dir)


def route_stats(directory: Path | None = None) -> dict | None:
    """The routing program's counters summed over CPUs, from the agent's
    pinned iobridge_route_stats map: routed (by the table, probes
    included), default (left to the module default), silent (of default:
    heartbeat too old), probes. None when no agent has pinned it."""
    path = Path(directory or pin_dir()) / "iobridge_route_stats"
    if not path.exists():
        return None
    fields = [f for f, _ in abi.RouteStats._fields_]
    total = dict.fromkeys(fields, 0)
    for v in pinned_percpu(path).get(0, []):
        if isinstance(v, dict):
            for f in fields:
                total[f] += int(v[f])
        else:
            s = abi.RouteStats.from_buffer_copy(_le_bytes(v))
            for f in fields:
                total[f] += int(getattr(s, f))
    return {"routed": total["routed"], "default": total["fallback"],
            "silent": total["silent"], "probes": total["probes"]}


def route_delta(before: dict | None, after: dict | None) -> dict | None:
    """Counters over a span, with routed_fraction = routed / (routed + default)."""
    if before is None or after is None:
        return None
    d = {k: after[k] - before[k] for k in after}
    calls = d["routed"] + d["default"]
    d["routed_fraction"] = d["routed"] / calls if calls else None
    return d


def decision_age(directory: Path | None = None) -> dict:
    """p50/p99 of the table's age at each routing (iobridge_decision_age)."""

    from ..core import histogram  # noqa: PLC0415
    hist = np.array(pinned_percpu_hist(Path(directory or pin_dir()) / "iobridge_decision_age"))
    p50, p99 = histogram.percentiles(hist, (50, 99)) if len(hist) else (None, None)
    return {"routings": int(hist.sum()) if len(hist) else 0,
            "p50_ms": None if p50 is None else round(p50 / 1e6, 2),
            "p99_ms": None if p99 is None else round(p99 / 1e6, 2)}


# ------------------------------------------------------------------ one run

def read_clat_log(prefix: str) -> np.ndarray:
    """Read completion latencies (ns) from fio's per-I/O latency log
    (`--write_lat_log=PREFIX --log_avg_msec=0`: "msec, ns, dir, bs, ..."),
    then remove the log files."""
    path = Path(f"{prefix}_clat.1.log")
    values = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split(",", 3)
                if len(parts) >= 3 and parts[2].strip() == "0":
                    values.append(int(parts[1]))
    except OSError as err:
        raise IobridgeError(f"cannot read fio's latency log {path}: {err.strerror}") from None
    finally:
        for kind in ("clat", "lat", "slat"):
            Path(f"{prefix}_{kind}.1.log").unlink(missing_ok=True)
    return np.array(values, dtype=np.int64)


def _write_shadow_config(config: Path, shadow: bool) -> None:
    with atomic_output(config) as tmp:     # the agent never reads half a file
        tmp.write_text(f"[agent]\nshadow = {'true' if shadow else 'false'}\n")


def switchable_agent(args=()) -> tuple["AgentProcess", Path]:
    """An AgentProcess (not started) that reads its config from a file in its
    own workdir, out of shadow mode, so that set_agent_shadow and
    agent_shadowed can switch it; returns it and the config's path."""
    workdir = Path(tempfile.mkdtemp(prefix="iobridge-agent-"))
    config = workdir / "iobridge.toml"
    _write_shadow_config(config, False)
    return AgentProcess([*args, "--config", str(config)], workdir=workdir), config


def set_agent_shadow(agent: "AgentProcess", config: Path, shadow: bool,
                     timeout_s: float = 120.0) -> None:
    """Switch a running agent started with `--config config` into or out
    of shadow mode by a reload (SIGHUP), rewriting the file. Returns once
    it is in force: into shadow, the routing program detached (the module
    default decides every read); out of it, a fresh table published."""
    since = clock.now_ns()
    _write_shadow_config(config, shadow)
    agent.send(signal.SIGHUP)
    agent.wait_status(lambda s: s.get("shadow") is shadow
                      and (shadow or (s.get("last_published_ns") or 0) > since), timeout_s)


@contextlib.contextmanager
def agent_shadowed(agent: "AgentProcess", config: Path):
    """The agent in shadow mode for a baseline run: the module default
    decides every read while the agent goes on observing and deciding, so
    both runs of a pair pay the agent's CPU and differ in the routing
    alone. Why not a stopped agent (SIGSTOP, once the default of the demo
    too): under emulation, with a single vCPU, the agent's CPU (17% of it
    at QD16 in one CI run) comes out of fio's, and at QD16, where the run
    is CPU-bound, that alone put the learned run's p99 at 1.45x the
    agent-stopped default's (IOPS 0.81x) while it steered all but 11 reads
    away from the slow leg while slow (default 880). What the agent costs
    is its own question (the bench's overhead runs)."""
    set_agent_shadow(agent, config, True)
    try:
        yield
    finally:
        set_agent_shadow(agent, config, False)


def run_policy(rs: ReplicaSet, policy: str, iodepth: int, runtime_s: float, seed: int,
               agent_pid: int | None = None, *, slow: bool = True,
               lat_dir: Path | None = None) -> dict:
    """One fio run on the target under `policy`, with a fresh slow schedule
    (none with slow=False). With lat_dir, "_lat_ns" holds every read's
    completion latency (not JSON: pop it before dumping)."""
    if policy not in POLICIES:
        raise UsageError(f"unknown policy {policy!r}", f"one of {', '.join(POLICIES)}")
    dmtarget.message(rs.name, "policy", "round_robin" if policy == "roundrobin" else "least_inflight")
    extra, prefix = [], None
    if lat_dir is not None:
        prefix = str(Path(lat_dir) / f"{rs.name}_{policy}_qd{iodepth}_{'slow' if slow else 'plain'}")
        extra = [f"--write_lat_log={prefix}", "--log_avg_msec=0"]
    before = dmtarget.status(rs.name)
    r0 = route_stats() if policy == "learned" else None
    if slow:
        rs.restart_periods(seed)
    try:
        with SlowLegReads(rs, periods=slow) as sampler, CpuMeter(agent_pid) as cpu:
            fig = workload.fio_random_reads(rs.dev, iodepth, runtime_s, extra=extra)
    finally:
        rs.slow.stop()
    r1 = route_stats() if r0 is not None else None
    after = dmtarget.status(rs.name)
    hook = sum(a.hook_routed - b.hook_routed for a, b in zip(after.legs, before.legs))
    dflt = sum(a.default_routed - b.default_routed for a, b in zip(after.legs, before.legs))
    if after.hedge is not None and before.hedge is not None:
        fig["hedges"] = {k: getattr(after.hedge, k) - getattr(before.hedge, k)
                         for k in HEDGE_COUNTERS}
        fig["hedge_budget_pct"] = after.hedge.budget_pct
    fig.update({
        "policy": policy, "iodepth": iodepth, "slow_periods": slow,
        "completion_us": rs.completion_us, "agent_cpu_percent": cpu.percent,
        "slow_leg_reads_while_slow": sampler.reads["slow"] if slow else 0,
        "slow_leg_reads_while_normal": sampler.reads["normal"],
        "reads_while_slow": sampler.all_reads["slow"] if slow else 0,
        "reads_at_switches": sampler.all_reads["switching"],
        "slow_seconds": round(rs.slow.slow_fraction() * runtime_s, 2) if slow else 0.0,
        "leg_reads": [a.reads - b.reads for a, b in zip(after.legs, before.legs)],
        "hook_routed": hook, "default_routed": dflt,
        "route": route_delta(r0, r1),
    })
    if prefix is not None:
        fig["_lat_ns"] = read_clat_log(prefix)
    return fig


def table_ready(status: dict | None, target: str) -> bool:
    """True once the agent has published a table in which every leg of
    `target` has a baseline of its own (not one borrowed from a sibling)."""
    if not status or not status.get("last_published_ns"):
        return False
    legs = [leg for t in status.get("targets", []) if t["name"] == target for leg in t["legs"]]
    return bool(legs) and all(leg["baseline"] is not None and leg["samples"] >= MIN_BASELINE_SAMPLES
                              for leg in legs)


def warm_up(status, rs: ReplicaSet, timeout_s: float = 120.0, iodepth: int = 4) -> float:
    """Read from `rs` (no slow periods) until the agent's table covers every
    leg with a baseline of its own; returns the seconds it took.

    A fresh agent has no baselines, and baselines come only from completed
    reads, so until then the module default routes. The comparisons measure
    the policy in force, so they start after this; the time to the first
    table is reported on its own. status() returns the agent's status dict."""
    t0 = time.monotonic()
    while not table_ready(status(), rs.name):
        if time.monotonic() - t0 > timeout_s:
            raise IobridgeError(f"the agent published no table for every leg of {rs.name} "
                                f"within {timeout_s:.0f} s of reads: {status()}")
        workload.fio_random_reads(rs.dev, iodepth, 1.0)
    return round(time.monotonic() - t0, 1)


def routed_fraction(run: dict) -> float | None:
    """Reads the table routed over all reads of a run: the routing program's
    counters, else the module's per-leg hook_routed / default_routed."""
    if run.get("route") and run["route"].get("routed_fraction") is not None:
        return run["route"]["routed_fraction"]
    calls = run.get("hook_routed", 0) + run.get("default_routed", 0)
    return run["hook_routed"] / calls if calls else None


def slow_read_share(run: dict) -> float | None:
    """Of the reads the target served while its leg was slow, the share the
    slow leg served: what the policy chose, whatever its throughput (a
    policy twice as fast serves twice the reads per second, on both legs)."""
    total = run.get("reads_while_slow") or 0
    return run["slow_leg_reads_while_slow"] / total if total else None


# ------------------------------------------------------------ the comparison

def compare(depths=(1, 16), runtime_s: float = 15.0, seed: int = 7, slow_ms: int = 8,
            agent_args: list[str] = (), progress=print, lat_dir: Path | None = None,
            before_agent=None, with_agent=None,
            baselines: tuple[str, ...] = ("default", "roundrobin"),
            replicas: ReplicaSet | None = None) -> dict:
    """(a), (b), then (c) at each depth on one replica set, one depth after
    the other, (a) and (b) with the agent in shadow mode (agent_shadowed:
    every run pays the agent's CPU, the runs differ in routing); returns
    {"runs": [...], "ratios": {depth: {...}}, "setup": {...}, "_latencies":
    {panel: {label: ns array}} (with lat_dir)}. before_agent(rs) runs
    before the agent starts; with_agent(agent, rs) after
    (c), while the agent still runs."""
    rs = (replicas or ReplicaSet(slow_ms=slow_ms)).create()
    runs: list[dict] = []
    panels: dict[str, dict] = {}
    agent = None
    startup_s = first_table_s = None

    def one(policy: str, qd: int, pid: int | None = None) -> None:
        progress(f"  {POLICY_LABELS[policy]}, queue depth {qd}: fio {runtime_s:g} s ...")
        r = run_policy(rs, policy, qd, runtime_s, seed, pid, lat_dir=lat_dir)
        if "_lat_ns" in r:
            panels.setdefault(f"queue depth {qd}", {})[POLICY_LABELS[policy]] = r.pop("_lat_ns")
        runs.append(r)

    try:
        if before_agent is not None:
            before_agent(rs)
        progress("  starting the agent (BCC compiles its programs) ...")
        t0 = time.monotonic()
        agent, config = switchable_agent(agent_args)
        agent.start()
        startup_s = time.monotonic() - t0
        progress("  reading until the agent has a baseline for every leg ...")
        first_table_s = warm_up(agent.status, rs)
        # Side by side: each depth's baselines (agent in shadow), then (c).
        for qd in depths:
            with agent_shadowed(agent, config):
                for policy in baselines:
                    one(policy, qd, agent.pid)
            one("learned", qd, agent.pid)
        if with_agent is not None:
            with_agent(agent, rs)
    finally:
        if agent is not None:
            rc = agent.stop()
            if rc != 0:
                progress(f"  the agent exited with {rc}: {agent.log()[-400:]}")
        rs.remove()
    return {"runs": runs, "ratios": ratios(runs, depths),
            "agent_startup_s": None if startup_s is None else round(startup_s, 1),
            "first_table_s": first_table_s,
            "setup": {"slow_ms": rs.slow_ms, "normal_mean_s": rs.normal_mean_s,
                      "slow_mean_s": rs.slow_mean_s, "seed": seed, "runtime_s": runtime_s,
                      "completion_us": rs.completion_us},
            "_latencies": panels}


def ratios(runs: list[dict], depths) -> dict:
    """Per depth: learned / best of the baselines run ((a), (b)) for each
    latency figure (best = lowest) and for IOPS (best = highest)."""
    out = {}
    for qd in depths:
        by = {r["policy"]: r for r in runs if r["iodepth"] == qd and r.get("slow_periods", True)}
        base = [p for p in ("default", "roundrobin") if p in by]
        if "learned" not in by or not base:
            continue
        out[qd] = {}
        for key in LATENCY_KEYS:
            vals = [by[p][key] for p in base if by[p][key] is not None]
            best = min(vals) if vals else None
            out[qd][key] = by["learned"][key] / best if best and by["learned"][key] is not None else None
        best = max(by[p]["iops"] for p in base)
        out[qd]["iops"] = by["learned"]["iops"] / best if best else None
    return out


def _ratio_of(rat: dict, qd: int, key: str):
    per = rat.get(qd, rat.get(str(qd)))
    return None if per is None else per.get(key)


def extra_reads_check(hedging: dict, value: float | None) -> dict:
    """Extra reads per read against the budget the target enforces, plus
    HEDGE_TOLERANCE."""
    limit = hedging["budget_pct"] / 100 + hedging["tolerance"]
    return {"value": value, "goal": f"<= {limit:g}", "met": meets(value, "<=", limit)}


def summarize(res: dict) -> dict:
    """Every goal of the issue against the measured figure (GOALS)."""
    goals = {}
    rat = res["ratios"]
    for name in ("p99_us@1", "p999_us@1", "p99_us@16", "mean_us@16", "p999_us@16"):
        key, qd = name.split("@")
        value = _ratio_of(rat, int(qd), key)
        if value is not None:
            goals[name] = goal_check(name, value)
    learned = [r for r in res["runs"] + res.get("transfer", {}).get("runs", [])
               if r["policy"] == "learned"]
    fractions = [f for f in (routed_fraction(r) for r in learned) if f is not None]
    if fractions:
        goals["routed_fraction"] = goal_check("routed_fraction", min(fractions))
    qd16 = [r for r in res["runs"] if r["policy"] == "learned" and r["iodepth"] == 16]
    if qd16 and qd16[0]["agent_cpu_percent"] is not None:
        goals["agent_cpu_2legs_qd16"] = goal_check("agent_cpu_2legs_qd16",
                                                   qd16[0]["agent_cpu_percent"])
    if res.get("eight_legs"):
        goals["agent_cpu_8legs"] = goal_check("agent_cpu_8legs",
                                              res["eight_legs"]["agent_cpu_percent"])
    if res.get("overhead"):
        goals["overhead_iops_ratio"] = goal_check(
            "overhead_iops_ratio", min(o["iops_ratio"] for o in res["overhead"].values()))
    if res.get("hedging"):
        h = res["hedging"]
        for qd, rat in h["ratios"].items():
            if f"hedged_p999_us@{qd}" in GOALS:
                goals[f"hedged_p999_us@{qd}"] = goal_check(f"hedged_p999_us@{qd}", rat["p999_us"])
        iops = [rat["iops"] for rat in h["ratios"].values() if rat["iops"] is not None]
        if iops:
            goals["hedged_iops"] = goal_check("hedged_iops", min(iops))
        extra = [rat["extra_read_fraction"] for rat in h["ratios"].values()
                 if rat["extra_read_fraction"] is not None]
        if extra:
            goals["hedged_extra_reads"] = extra_reads_check(h, max(extra))
    if res.get("transfer", {}).get("ratios"):
        goals["transfer_p99_us@1"] = goal_check(
            "transfer_p99_us@1", _ratio_of(res["transfer"]["ratios"], 1, "p99_us"))
    return goals


def machine_speed(res: dict) -> float | None:
    """The module default's IOPS at QD1 with slow periods: how fast this machine is."""
    for r in res["runs"]:
        if r["policy"] == "default" and r["iodepth"] == 1:
            return r["iops"]
    return None


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def render(res: dict) -> str:
    s = res["setup"]
    goals = res.get("goals", {})
    speed = machine_speed(res)
    bar = "=" * 78
    lines = [bar,
             f"MACHINE SPEED: the module default at QD1 does {speed:,.0f} IOPS here"
             if speed is not None else "MACHINE SPEED: no module-default QD1 run",
             f"  (null_blk legs with {s['completion_us']} us completions; the yardstick for "
             "every figure below)",
             bar,
             f"leg 1 slow periods: +{s['slow_ms']} ms per read, period lengths exponential "
             f"(normal mean {s['normal_mean_s']} s, slow mean {s['slow_mean_s']} s, seed {s['seed']}); "
             f"fio 4 KiB random reads, {s['runtime_s']:g} s per run; (c) model: "
             f"{res.get('model', 'shipped default')}",
             "",
             f"{'policy':20} {'QD':>3} {'IOPS':>7} {'mean us':>9} {'p50 us':>8} {'p99 us':>9} "
             f"{'p99.9 us':>9}  {'slow-leg reads while slow (share)':>35}  {'by table':>8} {'probes':>6}"]
    for r in sorted(res["runs"], key=lambda r: (r["iodepth"], POLICIES.index(r["policy"]))):
        lines.append(_run_line(r))
    lines.append("")
    for qd, rat in res["ratios"].items():
        lines.append(f"QD {qd}: (c) / best of (a), (b): " + _ratio_parts(rat, goals, f"@{qd}"))
    learned = [r for r in res["runs"] if r["policy"] == "learned"]
    # Every learned run the goal judges, the transfer's too (summarize()).
    judged = [("", r) for r in learned] + [
        (f" at {res['transfer']['completion_us']} us", r)
        for r in res.get("transfer", {}).get("runs", []) if r["policy"] == "learned"]
    if learned:
        lines.append("reads routed by the table while the agent ran (kernel counters routed / "
                     "(routed + default)): " + ", ".join(
                         f"QD {r['iodepth']}{where} {_pct(routed_fraction(r))} "
                         f"({(r.get('route') or {}).get('probes', '-')} probes)"
                         for where, r in judged)
                     + goal_mark(goals.get("routed_fraction")))
    if res.get("decision_age"):
        d = res["decision_age"]
        lines.append(f"decision age at routing (time since the agent last recomputed the table): "
                     f"p50 {d['p50_ms']} ms, p99 {d['p99_ms']} ms over {d['routings']} routings")
    if res.get("agent"):
        a = res["agent"]
        lines.append(f"agent: {a['counters'].get('recomputes')} table recomputes in "
                     f"{a['counters'].get('ticks')} ticks of {a['tick_ms']} ms; started in "
                     f"{res.get('agent_startup_s')} s, first table for every leg after "
                     f"{res.get('first_table_s')} s of reads (the learned runs start then)")
        if a.get("legs_without_baseline"):
            lines.append("WARNING: " + ", ".join(a["legs_without_baseline"])
                         + f" had fewer than {MIN_BASELINE_SAMPLES} samples of its own after "
                         "the learned runs: the table starved it")
    for r in learned:
        if r["agent_cpu_percent"] is not None:
            lines.append(f"agent CPU at QD {r['iodepth']} (2 legs, slow periods): "
                         f"{r['agent_cpu_percent']:.1f}% of a core"
                         + (goal_mark(goals.get("agent_cpu_2legs_qd16")) if r["iodepth"] == 16 else ""))
    if res.get("eight_legs"):
        e = res["eight_legs"]
        lines.append(f"agent CPU with 8 legs under fio QD {e['iodepth']}: {e['agent_cpu_percent']:.1f}% "
                     f"of a core (idle target: {e['agent_cpu_percent_idle']:.1f}%; "
                     f"{_pct(routed_fraction(e))} routed by the table)"
                     + goal_mark(goals.get("agent_cpu_8legs")))
    if res.get("overhead"):
        parts = [f"QD {qd} {o['iops_ratio']:.3f} ({o['with']['iops']:,.0f} / "
                 f"{o['without']['iops']:,.0f}; agent CPU {o['with']['agent_cpu_percent']:.1f}%)"
                 for qd, o in res["overhead"].items()]
        lines.append("IOPS with the agent / the module default alone (same legs, no slow periods): "
                     + ", ".join(parts) + goal_mark(goals.get("overhead_iops_ratio")))
    if res.get("transfer"):
        t = res["transfer"]
        lines.append("")
        lines.append(f"transfer (same model, no retraining): legs with {t['completion_us']} us "
                     f"completions instead of {s['completion_us']} us, leg 1 +{t['slow_ms']} ms "
                     "when slow")
        for r in sorted(t["runs"], key=lambda r: POLICIES.index(r["policy"])):
            lines.append(_run_line(r))
        rat = t["ratios"].get(1, t["ratios"].get("1", {}))
        if rat:
            lines.append("QD 1 at the slower device: (c) / best of (a), (b): "
                         + _ratio_parts(rat, {"p99_us@1": goals.get("transfer_p99_us@1")}, "@1"))
        lines.append(f"QD 1 p99 ratio at {s['completion_us']} us: "
                     f"{_fmt(_ratio_of(res['ratios'], 1, 'p99_us'))}, at {t['completion_us']} us: "
                     f"{_fmt(_ratio_of(t['ratios'], 1, 'p99_us'))}")
    if res.get("hedging"):
        h = res["hedging"]
        lines.append("")
        lines.append(f"hedged reads: learned routing, the target hedging within {h['budget_pct']}% "
                     "of reads against the same with hedging off (same agent, deadlines, schedule)")
        for r in sorted(h["runs"], key=lambda r: (r["iodepth"], r["hedging"])):
            hc = r.get("hedges") or {}
            lines.append(_run_line(r) + ("  hedged: " + ", ".join(f"{k} {hc.get(k, '-')}"
                                                                  for k in HEDGE_COUNTERS)
                                         if r["hedging"] else "  not hedged"))
        for qd, rat in h["ratios"].items():
            # Each depth's own figures against the goal; the summary line's
            # verdicts take the worst depth.
            marks = {f"p999_us@{qd}": goals.get(f"hedged_p999_us@{qd}"),
                     f"iops@{qd}": (goal_check("hedged_iops", rat["iops"])
                                    if "hedged_iops" in goals else None)}
            extra = (extra_reads_check(h, rat["extra_read_fraction"])
                     if "hedged_extra_reads" in goals else None)
            lines.append(f"QD {qd}: hedged / not: " + _ratio_parts(rat, marks, f"@{qd}")
                         + f", extra reads {_pct(rat['extra_read_fraction'])} of reads"
                         + goal_mark(extra))
    for n, b in res.get("onnx_batch", {}).items():
        lines.append(f"ONNX batch of {n} rows (every key of {int(n) // abi.KEYS_PER_LEG} legs): "
                     f"median {b['median_us']:.0f} us, p99 {b['p99_us']:.0f} us")
    if goals:
        met = sum(1 for g in goals.values() if g["met"])
        lines.append(f"goals (issues 10 and 12): {met} of {len(goals)} met"
                     + ("; missed: " + ", ".join(k for k, g in goals.items() if g["met"] is False)
                        if met < len(goals) else ""))
    lines.append("")
    if res.get("cdf_png"):
        lines.append(f"read-latency CDF per queue depth: {res['cdf_png']}")
    elif res.get("cdf_error"):
        lines.append(f"no CDF plot: {res['cdf_error']}")
    if speed is not None:
        lines.append(f"machine speed: module default QD1 {speed:,.0f} IOPS")
    return "\n".join(lines)


def _ratio_parts(rat: dict, goals: dict, suffix: str) -> str:
    parts = []
    for key, label in (("mean_us", "mean"), ("p50_us", "p50"), ("p99_us", "p99"),
                       ("p999_us", "p99.9"), ("iops", "IOPS")):
        v = rat.get(key)
        if v is not None:
            parts.append(f"{label} {v:.2f}" + goal_mark(goals.get(f"{key}{suffix}")))
    return ", ".join(parts)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _run_line(r: dict) -> str:
    table = routed_fraction(r) if r["policy"] == "learned" else None
    probes = (r.get("route") or {}).get("probes") if r["policy"] == "learned" else None
    share = slow_read_share(r)
    return (f"{POLICY_LABELS[r['policy']]:20} {r['iodepth']:>3} {r['iops']:>7.0f} "
            f"{r['mean_us']:>9.1f} {r['p50_us']:>8.1f} {r['p99_us']:>9.1f} "
            f"{r['p999_us']:>9.1f}  {r['slow_leg_reads_while_slow']:>9} in "
            f"{r['slow_seconds']:>5.2f} s slow ({'-' if share is None else _pct(share):>6})  "
            f"{_pct(table) if table is not None else '-':>8} "
            f"{'-' if probes is None else probes:>6}")


# ------------------------------------------------------------------ the plot

def _curve(lat_ns, max_points: int = 3000):
    """(latency us, fraction <= it) of a sample, thinned to about max_points
    while keeping the tail point by point."""
    us = np.sort(np.asarray(lat_ns, dtype=np.float64)) / 1e3
    n = len(us)
    y = np.arange(1, n + 1) / n
    if n > max_points:
        head = np.linspace(0, n - 1, max_points // 2)
        tail = n - np.geomspace(1, n, max_points // 2)
        idx = np.unique(np.clip(np.concatenate([head, tail]).astype(np.int64), 0, n - 1))
        us, y = us[idx], y[idx]
    return us, y, n


def plot_cdfs(panels: dict[str, dict], out: Path, title: str) -> Path:
    """One column per panel (a queue depth): the CDF of read latency (top,
    log-x) and its tail, 1 - CDF (bottom, log-log). Written atomically."""
    if "MPLCONFIGDIR" not in os.environ:
        # The VM's home is read-only: keep matplotlib's font cache in the
        # repository's scratch folder (built once, reused by later boots).
        root = resources.checkout_root()
        cache = (root / ".scratch" / "matplotlib" if root
                 else Path(tempfile.gettempdir()) / "iobridge-mpl")
        cache.mkdir(parents=True, exist_ok=True)
        os.environ["MPLCONFIGDIR"] = str(cache)
    import matplotlib  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    colors = {POLICY_LABELS["default"]: "tab:blue", POLICY_LABELS["roundrobin"]: "tab:orange",
              POLICY_LABELS["learned"]: "tab:green"}
    cols = len(panels)
    fig, axes = plt.subplots(2, cols, figsize=(5.6 * cols, 8.5), squeeze=False)
    for c, (name, curves) in enumerate(panels.items()):
        top, bottom = axes[0][c], axes[1][c]
        for label, lat in curves.items():
            if len(lat) == 0:
                continue
            us, y, n = _curve(lat)
            p99 = float(np.percentile(lat, 99)) / 1e3
            kw = {"color": colors.get(label), "lw": 1.6}
            top.plot(us, y, label=f"{label}: p99 {p99:,.0f} us ({n:,} reads)", **kw)
            bottom.plot(us, np.maximum(1.0 - y, 0.5 / n), **kw)
        top.set_title(name)
        top.set_ylabel("fraction of reads completed within x")
        top.set_ylim(0, 1.01)
        bottom.set_yscale("log")
        bottom.set_ylabel("fraction of reads slower than x (tail)")
        bottom.set_xlabel("read completion latency (us, log scale)")
        for y, tag in ((1e-2, "p99"), (1e-3, "p99.9")):
            bottom.axhline(y, color="grey", ls=":", lw=0.8)
            bottom.text(1.0, y, f" {tag}", transform=bottom.get_yaxis_transform(),
                        va="center", fontsize=7, color="grey")
        for a in (top, bottom):
            a.set_xscale("log")
            a.grid(True, which="both", alpha=0.3)
        top.legend(fontsize=7.5, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out


def default_output_dir() -> Path:
    """.scratch/demo/ in the repository (the VM writes there; the host sees it)."""
    return (resources.checkout_root() or Path.cwd()) / DEFAULT_OUTPUT_DIR


# --------------------------------------------------------- iobridge bench agent

def agent_run_in_vm(args) -> dict:
    """`iobridge bench agent` (and `make demo` with --latency-only) inside the VM."""
    progress = lambda m: print(m, file=sys.stderr, flush=True)   # noqa: E731
    depths = tuple(args.depths)
    out_dir = Path(args.output_dir) if args.output_dir else default_output_dir()
    lat_dir = Path(tempfile.mkdtemp(prefix="iobridge-lat-"))
    extra: dict = {}
    transfer = {"runs": [], "panel": {}}

    def transfer_runs(policies, agent: AgentProcess | None = None) -> None:
        ts = ReplicaSet(name="iob_xfer", size_mb=256, slow_ms=args.slow_ms,
                        completion_us=args.transfer_completion_us).create()
        try:
            if agent is not None:
                agent.wait_status(lambda s: any(t["name"] == ts.name for t in s["targets"]))
                # As the main comparison: measure the table in force, not
                # the module default routing until the new legs have
                # baselines (427 of 7,596 reads, 5.6%, without this).
                warm_up(agent.status, ts)
            for policy in policies:
                progress(f"  transfer, {ts.completion_us} us legs: {POLICY_LABELS[policy]}, "
                         f"queue depth 1: fio {args.runtime:g} s ...")
                r = run_policy(ts, policy, 1, args.runtime, args.seed,
                               agent.pid if agent else None, lat_dir=lat_dir)
                transfer["panel"][POLICY_LABELS[policy]] = r.pop("_lat_ns")
                transfer["runs"].append(r)
        finally:
            ts.remove()

    def before_agent(rs: ReplicaSet) -> None:
        if args.hedging:
            # The agent publishes deadlines (--hedging on) but the target
            # hedges only in the hedging runs: everything else compares as
            # without --hedging.
            dmtarget.message(rs.name, "hedge_budget", "0")
        if args.latency_only:
            return
        extra["overhead"] = {}
        for qd in depths:
            progress(f"  overhead: module default alone, no slow periods, queue depth {qd} ...")
            extra["overhead"][qd] = {"without": run_policy(rs, "default", qd, args.runtime,
                                                           args.seed, slow=False)}
        transfer_runs(("default", "roundrobin"))

    def with_agent(agent: AgentProcess, rs: ReplicaSet) -> None:
        extra["decision_age"] = decision_age()
        st = agent.status() or {}
        extra["agent"] = {k: st.get(k) for k in ("counters", "timing_us", "routing", "tick_ms",
                                                 "ttl_ticks", "max_silence_ms", "recompute_ms")}
        # A leg with too few samples of its own after the learned runs got
        # (almost) no reads from the table: it was starved.
        extra["agent"]["legs_without_baseline"] = [
            f"{t['name']} leg {i}" for t in st.get("targets", [])
            for i, leg in enumerate(t["legs"]) if leg.get("samples", 0) < MIN_BASELINE_SAMPLES]
        if args.hedging:
            extra["hedging"] = hedging_runs(agent, rs, depths, args, lat_dir, progress)
        if args.latency_only:
            return
        for qd in depths:
            progress(f"  overhead: with the agent, no slow periods, queue depth {qd} ...")
            o = extra["overhead"][qd]
            o["with"] = run_policy(rs, "learned", qd, args.runtime, args.seed, agent.pid, slow=False)
            o["iops_ratio"] = o["with"]["iops"] / o["without"]["iops"]
        rs.remove()       # the agent manages only the next target
        extra["eight_legs"] = eight_legs(agent, args.runtime, progress)
        transfer_runs(("learned",), agent)

    res = compare(depths=depths, runtime_s=args.runtime, seed=args.seed, slow_ms=args.slow_ms,
                  agent_args=(["--tick-ms", str(args.tick_ms)] if args.tick_ms else [])
                  + (["--model", args.model] if args.model else [])
                  + (["--hedging", "on"] if args.hedging else []),
                  progress=progress, lat_dir=lat_dir, before_agent=before_agent,
                  with_agent=with_agent)
    panels = res.pop("_latencies")
    res.update(extra)
    if transfer["runs"]:
        res["transfer"] = {"completion_us": args.transfer_completion_us, "slow_ms": args.slow_ms,
                           "runs": transfer["runs"], "ratios": ratios(transfer["runs"], (1,))}
        panels[f"queue depth 1, legs {args.transfer_completion_us} us (transfer)"] = transfer["panel"]
    if not args.latency_only:
        from ..core import model  # noqa: PLC0415
        from ..daemon.config import DEFAULT_MODEL  # noqa: PLC0415
        res["onnx_batch"] = {n: model.bench(args.model or DEFAULT_MODEL, batch=n, runs=200,
                                            warmup=20)
                             for n in (2 * abi.KEYS_PER_LEG, 8 * abi.KEYS_PER_LEG)}
    res["tick_ms"] = args.tick_ms
    res["model"] = args.model or "shipped default"
    res["goals"] = summarize(res)
    s = res["setup"]
    try:
        res["cdf_png"] = str(plot_cdfs(
            panels, out_dir / CDF_PNG,
            f"fio 4 KiB random reads, {s['runtime_s']:g} s per run; leg 1 +{s['slow_ms']} ms per "
            f"read in slow periods (seed {s['seed']}); module default QD1: "
            f"{machine_speed(res) or 0:,.0f} IOPS"))
    except ImportError as err:
        res["cdf_error"] = f"matplotlib is missing ({err}): pip install -e '.[train]'"
    shutil.rmtree(lat_dir, ignore_errors=True)
    return res


def hedging_runs(agent: AgentProcess, rs: ReplicaSet, depths, args, lat_dir: Path,
                 progress) -> dict:
    """Issue 12's comparison: the learned routing with the target hedging
    (its default budget) against the same routing with hedging off (budget
    0), side by side at each depth with the same slow-period schedule; the
    agent (started with --hedging on) publishes the same deadlines to both."""
    runs = []
    for qd in depths:
        for budget in (0, abi.HEDGE_DEFAULT_BUDGET_PCT):
            dmtarget.message(rs.name, "hedge_budget", str(budget))
            progress(f"  hedging {'on' if budget else 'off'} (budget {budget}%), learned routing, "
                     f"queue depth {qd}: fio {args.runtime:g} s ...")
            r = run_policy(rs, "learned", qd, args.runtime, args.seed, agent.pid, lat_dir=lat_dir)
            r.pop("_lat_ns", None)
            r["hedging"] = bool(budget)
            runs.append(r)
    dmtarget.message(rs.name, "hedge_budget", "0")
    st = agent.status() or {}
    deadlines = {f"{t['name']} leg {i}": leg.get("hedge")
                 for t in st.get("targets", []) for i, leg in enumerate(t["legs"])}
    out = {}
    for qd in depths:
        off, on = (next(r for r in runs if r["iodepth"] == qd and r["hedging"] == h)
                   for h in (False, True))
        reads = on["hook_routed"] + on["default_routed"]
        out[qd] = {key: (on[key] / off[key] if off[key] else None)
                   for key in ("p99_us", "p999_us", "mean_us", "iops")}
        out[qd]["extra_read_fraction"] = (on["hedges"]["issued"] / reads
                                          if reads and "hedges" in on else None)
    return {"runs": runs, "ratios": out, "budget_pct": abi.HEDGE_DEFAULT_BUDGET_PCT,
            "tolerance": HEDGE_TOLERANCE, "deadlines": deadlines}


def eight_legs(agent: AgentProcess, runtime_s: float, progress) -> dict:
    """The agent's CPU with one 8-leg target (the demo's device type) under
    fio QD16, and idle; the agent manages only this target then."""
    names = [f"iob_eight_nb{i}" for i in range(8)]
    params = ReplicaSet().nullb_params
    try:
        devs = [testbed.make_nullb(n, 64, **params) for n in names]
        dmtarget.create("iob_eight", devs)
        agent.wait_status(lambda s: [t["name"] for t in s["targets"]] == ["iob_eight"])
        progress(f"  8 legs, with the agent, queue depth 16: fio {runtime_s:g} s ...")
        before, r0 = dmtarget.status("iob_eight"), route_stats()
        with CpuMeter(agent.pid) as cpu:
            fig = workload.fio_random_reads("/dev/mapper/iob_eight", 16, runtime_s)
        route, after = route_delta(r0, route_stats()), dmtarget.status("iob_eight")
        with CpuMeter(agent.pid) as idle:
            time.sleep(min(runtime_s, 5))
        st = agent.status() or {}
        return {"iodepth": 16, "agent_cpu_percent": cpu.percent,
                "agent_cpu_percent_idle": idle.percent, "fio": fig, "route": route,
                "hook_routed": sum(a.hook_routed - b.hook_routed
                                   for a, b in zip(after.legs, before.legs)),
                "default_routed": sum(a.default_routed - b.default_routed
                                      for a, b in zip(after.legs, before.legs)),
                "timing_us": st.get("timing_us")}
    finally:
        if dmtarget.exists("iob_eight"):
            dmtarget.remove("iob_eight")
        for n in names:
            testbed.remove_nullb(n)


def agent_render(res: dict) -> str:
    return render(res)


def _abs_path(text: str) -> str:
    return str(Path(text).resolve())


MAX_SLOW_MS = 10_000                # added read latency in slow periods
MAX_COMPLETION_US = 1_000_000       # null_blk completion time of the transfer check


def agent_args(p) -> None:
    p.add_argument("--runtime", type=cliutil.positive_float(workload.MAX_RUNTIME_S), default=15,
                   help="seconds per fio run (default 15)")
    p.add_argument("--depths", type=cliutil.positive_int(workload.MAX_DEPTH), nargs="+", default=[1, 16],
                   help="queue depths (default 1 16)")
    p.add_argument("--seed", type=cliutil.seed, default=7, help="slow-period schedule seed (default 7)")
    p.add_argument("--slow-ms", type=cliutil.positive_int(MAX_SLOW_MS), default=8,
                   help="added read latency in slow periods (default 8)")
    p.add_argument("--tick-ms", type=cliutil.float_range(TICK_MS_MIN, TICK_MS_MAX), default=None,
                   help="agent tick (default: the agent's own, agent.tick_ms)")
    p.add_argument("--model", type=_abs_path, default=None,
                   help="the agent's model for (c) (default: the shipped one)")
    p.add_argument("--transfer-completion-us", type=cliutil.positive_int(MAX_COMPLETION_US),
                   default=1000,
                   help="device speed of the transfer check: null_blk completion time "
                        "(default 1000 us, against the demo's 100 us)")
    p.add_argument("--output-dir", type=_abs_path, default=None,
                   help=f"where the CDF plot goes (default {DEFAULT_OUTPUT_DIR}/ in the "
                        "repository, which the VM shares with the host)")
    p.add_argument("--latency-only", action="store_true",
                   help="only the policy comparison and its plot (what `make demo` shows)")
    p.add_argument("--hedging", action="store_true",
                   help="also compare the learned routing with the target hedging reads "
                        "(the agent runs with --hedging on) against the same with hedging off")


def agent_host_check(args) -> None:
    """On the host: the plot must go where the VM can write (the repository)."""
    if args.output_dir is None:
        return
    root = resources.checkout_root()
    if root is None or not Path(args.output_dir).is_relative_to(root):
        raise UsageError(f"--output-dir {args.output_dir}: the test VM can only write inside "
                         f"the repository ({root})", "pick a folder under it, e.g. .scratch/demo")
