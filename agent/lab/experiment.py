"""The admission experiment behind `make demo` and `iobridge bench agent`
(inside the test VM): a two-leg iobridge target whose second leg goes
through slow periods, and fio random reads under

  (a) the module default (least in-flight, no program attached),
  (b) the module's round robin,
  (c) the learned policy: `iobridge run` with the shipped model,

at each queue depth, with the same seeded slow-period schedule in every
run. Also counts the reads the slow leg served while it was slow.

AgentProcess runs `iobridge run` as a separate process, the way an
operator (or systemd) does, and waits for its sd_notify READY=1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..core.errors import IobridgeError
from ..kernel import dmtarget
from . import testbed, workload
from .faults import SlowPeriods, now_ns, read_count

POLICIES = ("default", "roundrobin", "learned")
POLICY_LABELS = {"default": "(a) module default", "roundrobin": "(b) round robin",
                 "learned": "(c) learned"}


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

    def start(self, timeout_s: float = 400.0, wait: bool = True) -> "AgentProcess":
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
                raise IobridgeError(f"the agent was not ready within {timeout_s:.0f} s")
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
    # Each leg's device: 100 us timer completions, an SSD-like read time.
    NULLB = {"irqmode": 2, "completion_nsec": 100_000, "memory_backed": 0}

    def __post_init__(self):
        self.nullbs = [f"{self.name}_nb{i}" for i in range(2)]
        self.fast_leg = f"{self.name}_leg0"
        self.slow: SlowPeriods | None = None
        self.dev = f"/dev/mapper/{self.name}"

    def create(self) -> "ReplicaSet":
        testbed.ensure_module()
        devs = [testbed.make_nullb(n, self.size_mb, **self.NULLB) for n in self.nullbs]
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

    def remove(self) -> None:
        for name in (self.name, self.fast_leg):
            if dmtarget.exists(name):
                dmtarget.remove(name)
        if self.slow is not None:
            self.slow.stop()
            self.slow.remove()
        for n in self.nullbs:
            testbed.remove_nullb(n)


class SlowLegReads:
    """Samples the slow leg's completed reads and splits them by period."""

    def __init__(self, slow: SlowPeriods, interval_s: float = 0.01):
        self.slow = slow
        self.interval_s = interval_s
        self.reads = {"slow": 0, "normal": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = read_count(self.slow.path)
        while not self._stop.wait(self.interval_s):
            now = read_count(self.slow.path)
            self.reads["slow" if self.slow.in_slow(now_ns()) else "normal"] += now - last
            last = now

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class CpuMeter:
    """CPU time of a process over a span, as % of one core."""

    def __init__(self, pid: int | None):
        self.pid = pid
        self.percent: float | None = None

    def _cpu(self) -> float:
        import psutil  # noqa: PLC0415
        t = psutil.Process(self.pid).cpu_times()
        return t.user + t.system

    def __enter__(self):
        if self.pid:
            self._c0, self._t0 = self._cpu(), time.monotonic()
        return self

    def __exit__(self, *exc):
        if self.pid:
            self.percent = 100.0 * (self._cpu() - self._c0) / (time.monotonic() - self._t0)


def run_policy(rs: ReplicaSet, policy: str, iodepth: int, runtime_s: float, seed: int,
               agent_pid: int | None = None) -> dict:
    """One fio run on the target under `policy`, with a fresh slow schedule."""
    dmtarget.message(rs.name, "policy", "round_robin" if policy == "roundrobin" else "least_inflight")
    before = dmtarget.status(rs.name)
    rs.restart_periods(seed)
    try:
        with SlowLegReads(rs.slow) as sampler, CpuMeter(agent_pid) as cpu:
            fig = workload.fio_random_reads(rs.dev, iodepth, runtime_s)
    finally:
        rs.slow.stop()
    after = dmtarget.status(rs.name)
    slow_s = rs.slow.slow_fraction() * runtime_s
    fig.update({
        "policy": policy, "iodepth": iodepth, "agent_cpu_percent": cpu.percent,
        "slow_leg_reads_while_slow": sampler.reads["slow"],
        "slow_leg_reads_while_normal": sampler.reads["normal"],
        "slow_seconds": round(slow_s, 2),
        "hook_routed": sum(a.hook_routed - b.hook_routed for a, b in zip(after.legs, before.legs)),
        "default_routed": sum(a.default_routed - b.default_routed
                              for a, b in zip(after.legs, before.legs)),
    })
    return fig


def compare(depths=(1, 16), runtime_s: float = 15.0, seed: int = 7, slow_ms: int = 8,
            agent_args: list[str] = (), progress=print, keep_agent=None) -> dict:
    """The full comparison; returns {"runs": [...], "ratios": {...}, ...}."""
    rs = ReplicaSet(slow_ms=slow_ms).create()
    runs = []
    agent = None
    try:
        for policy in ("default", "roundrobin"):
            for qd in depths:
                progress(f"  {POLICY_LABELS[policy]}, queue depth {qd}: fio {runtime_s:g} s ...")
                runs.append(run_policy(rs, policy, qd, runtime_s, seed))
        progress("  starting the agent with the shipped model (BCC compiles its programs) ...")
        t0 = time.monotonic()
        agent = AgentProcess(list(agent_args)).start()
        startup_s = time.monotonic() - t0
        for qd in depths:
            progress(f"  {POLICY_LABELS['learned']}, queue depth {qd}: fio {runtime_s:g} s ...")
            runs.append(run_policy(rs, "learned", qd, runtime_s, seed, agent.pid))
        if keep_agent is not None:
            keep_agent(agent, rs)
    finally:
        if agent is not None:
            rc = agent.stop()
            if rc != 0:
                progress(f"  the agent exited with {rc}: {agent.log()[-400:]}")
        rs.remove()
    return {"runs": runs, "ratios": ratios(runs, depths), "agent_startup_s": round(startup_s, 1),
            "setup": {"slow_ms": slow_ms, "normal_mean_s": rs.normal_mean_s,
                      "slow_mean_s": rs.slow_mean_s, "seed": seed, "runtime_s": runtime_s}}


def ratios(runs: list[dict], depths) -> dict:
    """Per depth and figure: learned / best of (default, round robin)."""
    out = {}
    for qd in depths:
        by = {r["policy"]: r for r in runs if r["iodepth"] == qd}
        out[qd] = {}
        for key in ("mean_us", "p50_us", "p99_us", "p999_us"):
            best = min(by[p][key] for p in ("default", "roundrobin"))
            out[qd][key] = by["learned"][key] / best if best else None
    return out


def render(res: dict) -> str:
    s = res["setup"]
    lines = [f"leg 1 slow periods: +{s['slow_ms']} ms per read, period lengths exponential "
             f"(normal mean {s['normal_mean_s']} s, slow mean {s['slow_mean_s']} s, seed {s['seed']}); "
             f"fio 4 KiB random reads, {s['runtime_s']:g} s per run",
             "",
             f"{'policy':20} {'QD':>3} {'IOPS':>7} {'mean us':>9} {'p50 us':>8} {'p99 us':>9} "
             f"{'p99.9 us':>9}  {'slow-leg reads while slow':>25}"]
    for r in sorted(res["runs"], key=lambda r: (r["iodepth"], POLICIES.index(r["policy"]))):
        lines.append(f"{POLICY_LABELS[r['policy']]:20} {r['iodepth']:>3} {r['iops']:>7.0f} "
                     f"{r['mean_us']:>9.1f} {r['p50_us']:>8.1f} {r['p99_us']:>9.1f} "
                     f"{r['p999_us']:>9.1f}  {r['slow_leg_reads_while_slow']:>9} in "
                     f"{r['slow_seconds']:>5.2f} s slow")
    lines.append("")
    for qd, rat in res["ratios"].items():
        lines.append(f"QD {qd}: (c) / best of (a), (b): " + ", ".join(
            f"{k[:-3]} {v:.2f}" for k, v in rat.items() if v is not None))
    return "\n".join(lines)


# --------------------------------------------------------- iobridge bench agent

def pinned_percpu_hist(path: Path) -> list[int]:
    """Sum over CPUs of a pinned per-CPU u64 array (bpftool's JSON dump)."""
    proc = testbed.sh(["bpftool", "-j", "map", "dump", "pinned", str(path)])
    out = []
    for entry in json.loads(proc.stdout):
        entry = entry.get("formatted", entry)
        total = 0
        for v in entry["values"]:
            val = v["value"]
            total += int(val) if isinstance(val, int) else int.from_bytes(
                bytes(int(b, 16) for b in val), "little")
        key = entry["key"]
        idx = key if isinstance(key, int) else int.from_bytes(bytes(int(b, 16) for b in key), "little")
        if idx >= len(out):
            out.extend([0] * (idx + 1 - len(out)))
        out[idx] = total
    return out


def agent_run_in_vm(args) -> dict:
    """`iobridge bench agent` inside the VM."""
    import numpy as np  # noqa: PLC0415

    from ..core import histogram
    from ..core import model  # noqa: PLC0415
    from ..daemon.config import DEFAULT_MODEL, Config  # noqa: PLC0415

    extra: dict = {}

    def measure(agent: AgentProcess, rs: ReplicaSet) -> None:
        hist = np.array(pinned_percpu_hist(Config.pin_dir / "iobridge_decision_age"))
        p50, p99 = histogram.percentiles(hist, (50, 99))
        extra["decision_age"] = {"routings": int(hist.sum()),
                                 "p50_us": p50 / 1e3 if p50 else None,
                                 "p99_us": p99 / 1e3 if p99 else None}
        st = agent.status()
        extra["agent_tick_us_2legs"] = st["timing_us"]
        # 8 legs: a second target; the two-leg one is removed so only 8 are managed.
        names = [f"iob_eight_nb{i}" for i in range(8)]
        try:
            devs = [testbed.make_nullb(n, 64, irqmode=0, completion_nsec=0, memory_backed=0)
                    for n in names]
            dmtarget.remove(rs.name)
            dmtarget.create("iob_eight", devs)
            agent.wait_status(lambda s: [t["name"] for t in s["targets"]] == ["iob_eight"])
            with CpuMeter(agent.pid) as cpu:
                fig = workload.fio_random_reads("/dev/mapper/iob_eight", 1, args.runtime)
            extra["agent_cpu_percent_8legs"] = cpu.percent
            extra["fio_8legs"] = fig
            with CpuMeter(agent.pid) as idle:
                time.sleep(min(args.runtime, 5))
            extra["agent_cpu_percent_8legs_idle"] = idle.percent
            extra["agent_tick_us_8legs"] = agent.status()["timing_us"]
        finally:
            if dmtarget.exists("iob_eight"):
                dmtarget.remove("iob_eight")
            for n in names:
                testbed.remove_nullb(n)

    res = compare(depths=tuple(args.depths), runtime_s=args.runtime, seed=args.seed,
                  slow_ms=args.slow_ms, keep_agent=None if args.latency_only else measure,
                  agent_args=["--tick-ms", str(args.tick_ms)],
                  progress=lambda m: print(m, file=sys.stderr, flush=True))
    res.update(extra)
    if not args.latency_only:
        res["onnx_batch"] = {n: model.bench(DEFAULT_MODEL, batch=n, runs=500)
                             for n in (2 * 4, 8 * 4)}
    res["tick_ms"] = args.tick_ms
    return res


def agent_render(res: dict) -> str:
    lines = [render(res)]
    for r in res["runs"]:
        if r["policy"] == "learned" and r["agent_cpu_percent"] is not None:
            lines.append(f"agent CPU at QD {r['iodepth']} (2 legs): {r['agent_cpu_percent']:.1f}% of a core")
    if "decision_age" in res:
        d = res["decision_age"]
        lines.append(f"decision age at routing: p50 {d['p50_us']:.0f} us, p99 {d['p99_us']:.0f} us "
                     f"({d['routings']} routings by the table; tick {res['tick_ms']} ms)")
    if "agent_cpu_percent_8legs" in res:
        lines.append(f"agent CPU with 8 legs under fio QD1: {res['agent_cpu_percent_8legs']:.1f}% "
                     f"of a core (idle target: {res['agent_cpu_percent_8legs_idle']:.1f}%)")
        for k in ("agent_tick_us_2legs", "agent_tick_us_8legs"):
            t = res[k]
            lines.append(f"{k[10:]}: tick phases p50/p99 us: " + ", ".join(
                f"{p} {t[p]['p50_us']}/{t[p]['p99_us']}" for p in ("read", "infer", "publish", "tick")))
    for n, b in res.get("onnx_batch", {}).items():
        lines.append(f"ONNX batch of {n} rows: median {b['median_us']:.1f} us, p99 {b['p99_us']:.1f} us")
    return "\n".join(lines)


def agent_args(p) -> None:
    p.add_argument("--runtime", type=float, default=15, help="seconds per fio run (default 15)")
    p.add_argument("--depths", type=int, nargs="+", default=[1, 16], help="queue depths (default 1 16)")
    p.add_argument("--seed", type=int, default=7, help="slow-period schedule seed (default 7)")
    p.add_argument("--slow-ms", type=int, default=8, help="added read latency in slow periods (default 8)")
    p.add_argument("--tick-ms", type=float, default=1.0, help="agent tick (default 1 ms)")
    p.add_argument("--latency-only", action="store_true",
                   help="only the policy comparison (what `make demo` shows)")
