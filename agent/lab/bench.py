"""`iobridge bench ...`: benchmarks (not timed tests).

Subcommands register themselves in BENCHES; each has a `run_in_vm(args)`
that runs inside the test VM and returns a JSON-able dict, and a `render`
that prints it for people.  On the host `iobridge bench NAME` boots the VM
once, runs `iobridge bench NAME --in-vm` there and reports the result.  A
bench with `run_on_host(args)` instead runs where it is called, with no VM
(and has no --in-vm or --timeout).

bench hook: fio 4 KiB random reads at queue depth 1 and 32 on
  (a) dm-linear over one null_blk device,
  (b) the iobridge target over two null_blk legs with the BPF routing
      policy attached (every read routed by a valid decision entry),
  (c) the same iobridge target with no program (module default),
  (d) as (b) with hedging on: every key of the table has a hedge deadline
      (HEDGE_BENCH_US), so every read goes through bounce pages and is
      hedged if still pending then, within the default budget,
and the per-call cost of the routing hook with and without a program.

bench prefetch (lab/prefetch_bench.py): readahead policies (kernel default,
  best static read_ahead_kb of a sweep, KML-like per device, iobridge per
  file with feedback) on buffered reads in a memory-limited cgroup (fio,
  a reverse reader, and on request RocksDB's db_bench).

bench tick (on the host, lab/tickbench.py): the agent's real tick and
table recompute against in-memory stand-ins for the kernel maps, with
synthetic busy legs: microseconds per recompute, recomputes and ticks per
second, and the agent's CPU share at default settings, for 2 and 8 legs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ..core import cliutil
from ..core.errors import IobridgeError, UsageError
from ..core.outfiles import atomic_output, check_output
from ..kernel import dmtarget
from . import testbed, workload
from .vm import MAX_TIMEOUT_S as MAX_VM_TIMEOUT_S

IOPS_RATIO_GOAL = 0.90
# (d)'s deadline: well above a null_blk read's latency in the VM at queue
# depth 32, so what (d) costs is the bounce read and its copy, and hedges
# are the reads the host stalled.
HEDGE_BENCH_US = 5000


# ------------------------------------------------------------ VM-side helpers

def fio_randread(dev: str, iodepth: int, runtime_s: int, ramp_s: int = 1) -> dict:
    """fio 4 KiB random reads; returns iops and completion latency (us)."""
    r = workload.fio_random_reads(dev, iodepth, runtime_s, ioengine="libaio",
                                  extra=[f"--ramp_time={ramp_s}"])
    if r["errors"]:
        raise IobridgeError(f"fio reported error {r['errors']} on {dev}")
    return {"iops": r["iops"], "clat_mean_us": r["mean_us"], "clat_p99_us": r["p99_us"]}


def _median_run(runs: list[dict]) -> dict:
    keys = runs[0].keys()
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def _bench_hook_call(name: str, calls: int) -> dict:
    out = dmtarget.message(name, "bench_hook", str(calls))
    fields = dict(kv.split("=", 1) for kv in out.split())
    return {"calls": int(fields["calls"]), "ns_per_call": float(fields["ns_per_call"]),
            "program_attached": fields["program_attached"] == "1"}


def hook_run_in_vm(args) -> dict:
    """The hook benchmark; runs inside the VM (as root)."""
    from ..kernel.route_policy import RoutePolicy  # needs BCC: VM side only

    testbed.ensure_module()
    nullb = {"completion_nsec": 0, "irqmode": 0, "memory_backed": 0}
    names = ["iobbench_a", "iobbench_b", "iobbench_c"]
    linear = "iobbench_linear"
    target = "iobbench_ib"
    created_dm: list[str] = []
    policy = None
    try:
        devs = [testbed.make_nullb(n, **nullb) for n in names]
        size = dmtarget.device_sectors(devs[0])
        testbed.sh(["dmsetup", "create", linear, "--table", f"0 {size} linear {devs[0]} 0"])
        created_dm.append(linear)
        dmtarget.create(target, devs[1:], size)
        created_dm.append(target)
        testbed.sh(["udevadm", "settle"], check=False)
        tid = dmtarget.target_ref(target)

        policy = RoutePolicy().load()
        t0 = time.monotonic()
        hook = {"without_program": _bench_hook_call(target, args.hook_calls)}
        policy.attach()
        for leg in range(2):   # equal costs on both legs: the program routes every read
            policy.set_leg(tid, leg, penalty_ns=0, ttl_s=3600)
        hook["with_program"] = _bench_hook_call(target, args.hook_calls)
        policy.detach()

        configs = {
            "a_linear_1leg": f"/dev/mapper/{linear}",
            "b_iobridge_bpf": f"/dev/mapper/{target}",
            "c_iobridge_default": f"/dev/mapper/{target}",
            "d_iobridge_hedged": f"/dev/mapper/{target}",
        }
        routed_by_table = ("b_iobridge_bpf", "d_iobridge_hedged")
        results: dict[str, dict] = {}
        for qd in args.depths:
            runs: dict[str, list[dict]] = {k: [] for k in configs}
            for _ in range(args.repeat):
                for cfg, dev in configs.items():  # interleaved: drift hits all alike
                    if cfg in routed_by_table:
                        for leg in range(2):
                            policy.set_leg(tid, leg, penalty_ns=0, ttl_s=3600,
                                           hedge_us=HEDGE_BENCH_US if cfg == "d_iobridge_hedged" else 0)
                        policy.attach()
                    dmtarget.message(target, "reset_counters")
                    r = fio_randread(dev, qd, args.runtime)
                    if cfg in routed_by_table:
                        st = dmtarget.status(target)
                        reads = sum(leg.hook_routed + leg.default_routed for leg in st.legs)
                        r["hook_routed_fraction"] = (
                            sum(leg.hook_routed for leg in st.legs) / max(1, reads))
                        if cfg == "d_iobridge_hedged" and st.hedge is not None:
                            r["hedges_per_read"] = st.hedge.issued / max(1, reads)
                            r["hedges_refused_per_read"] = st.hedge.refused / max(1, reads)
                        policy.detach()
                    runs[cfg].append(r)
            per = {cfg: _median_run(rs) for cfg, rs in runs.items()}
            a = per["a_linear_1leg"]
            for cfg in ("b_iobridge_bpf", "c_iobridge_default", "d_iobridge_hedged"):
                per[f"ratio_{cfg[0]}_over_a"] = {k: per[cfg][k] / a[k]
                                                 for k in ("iops", "clat_mean_us", "clat_p99_us")}
            per["runs"] = runs
            results[f"qd{qd}"] = per
        return {
            "benchmark": "hook",
            "kernel": os.uname().release,
            "cpus": os.cpu_count(),
            "fio": {"bs": "4k", "rw": "randread", "ioengine": "libaio", "direct": 1,
                    "runtime_s": args.runtime, "ramp_s": 1, "repeat": args.repeat,
                    "statistic": "median of repeats"},
            "null_blk": nullb,
            "hedge_us_d": HEDGE_BENCH_US,
            "hook_call": hook,
            "fio_results": results,
            "iops_ratio_goal": IOPS_RATIO_GOAL,
            "goal_met": all(r[f"ratio_{c}_over_a"]["iops"] >= IOPS_RATIO_GOAL
                            for r in results.values() for c in "bd"),
            "seconds": round(time.monotonic() - t0, 1),
        }
    finally:
        if policy is not None:
            policy.close()
        for name in reversed(created_dm):
            testbed.sh(["dmsetup", "remove", "--retry", name], check=False)
        for n in names:
            try:
                testbed.remove_nullb(n)
            except OSError:
                pass


def hook_render(res: dict) -> str:
    lines = [f"iobridge bench hook  (kernel {res['kernel']}, {res['cpus']} CPUs; "
             f"fio 4k randread libaio direct, {res['fio']['runtime_s']}s x "
             f"{res['fio']['repeat']}, median)"]
    for qd, per in res["fio_results"].items():
        lines.append(f"\n{qd}:")
        lines.append(f"  {'config':22} {'IOPS':>10} {'mean us':>9} {'p99 us':>9}")
        for cfg in ("a_linear_1leg", "b_iobridge_bpf", "c_iobridge_default", "d_iobridge_hedged"):
            r = per[cfg]
            extra = (f"  hedges {100 * r['hedges_per_read']:.2f}% of reads"
                     if "hedges_per_read" in r else "")
            lines.append(f"  {cfg:22} {r['iops']:10.0f} {r['clat_mean_us']:9.1f} "
                         f"{r['clat_p99_us']:9.1f}{extra}")
        for key in ("ratio_b_over_a", "ratio_c_over_a", "ratio_d_over_a"):
            r = per[key]
            lines.append(f"  {key:22} {r['iops']:10.3f} {r['clat_mean_us']:9.3f} {r['clat_p99_us']:9.3f}")
    h = res["hook_call"]
    lines.append(f"\nhook call: {h['without_program']['ns_per_call']:.1f} ns without a program, "
                 f"{h['with_program']['ns_per_call']:.1f} ns with the routing program "
                 f"({h['with_program']['calls']} calls)")
    lines.append(f"goal (IOPS ratios b/a and d/a >= {res['iops_ratio_goal']:.2f} at every depth): "
                 f"{'met' if res['goal_met'] else 'NOT met'}")
    return "\n".join(lines)


# `bench hook` option ranges (fio's: workload.MAX_RUNTIME_S, workload.MAX_DEPTH)
MAX_REPEAT = 100              # interleaved runs per configuration
MAX_HOOK_CALLS = 1_000_000_000


def _hook_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", type=cliutil.positive_int(workload.MAX_RUNTIME_S), default=6,
                   help="seconds per fio run (default 6)")
    p.add_argument("--repeat", type=cliutil.positive_int(MAX_REPEAT), default=3,
                   help="interleaved runs per configuration, the median reported (default 3)")
    p.add_argument("--depths", type=cliutil.positive_int(workload.MAX_DEPTH), nargs="+", default=[1, 32],
                   help="fio queue depths (default 1 32)")
    p.add_argument("--hook-calls", type=cliutil.positive_int(MAX_HOOK_CALLS), default=1_000_000,
                   help="calls for the hook microbenchmark (default 1000000)")


def _agent_bench():
    from . import experiment  # noqa: PLC0415
    return experiment


def _prefetch_bench():
    from . import prefetch_bench  # noqa: PLC0415
    return prefetch_bench


def _tick_bench():
    from . import tickbench  # noqa: PLC0415
    return tickbench


BENCHES = {
    "hook": {
        "help": "routing hook overhead: dm-linear vs iobridge+BPF over null_blk",
        "add_args": _hook_args,
        "run_in_vm": hook_run_in_vm,
        "render": hook_render,
        "examples": (
            ("iobridge bench hook", "boot the VM, run it, print the table"),
            ("iobridge bench hook --depths 1 8 32 --repeat 3", "more depths, 3 runs each"),
            ("iobridge bench hook --json --output hook.json", "as JSON, kept in a file")),
    },
    "agent": {
        "help": "the agent end to end: default vs round robin vs learned latency with a "
                "slow leg (and a CDF plot), reads routed by the table, decision age, agent CPU "
                "with 2 and 8 legs, IOPS with the agent vs without, the QD1 comparison on "
                "10x slower legs, ONNX batch time; goals printed beside the figures",
        "add_args": lambda p: _agent_bench().agent_args(p),
        "host_check": lambda args: _agent_bench().agent_host_check(args),
        "run_in_vm": lambda args: _agent_bench().agent_run_in_vm(args),
        "render": lambda res: _agent_bench().agent_render(res),
        "examples": (
            ("iobridge bench agent", "boot the VM, run it, print the tables"),
            ("iobridge bench agent --latency-only", "only the policy comparison (make demo)"),
            ("iobridge bench agent --depths 1 --runtime 30", "queue depth 1, 30 s runs"),
            ("iobridge bench agent --latency-only --output-dir .scratch/mine",
             "the demo's comparison, its CDF plot in .scratch/mine/"),
            ("iobridge bench agent --json --output agent.json", "as JSON, kept in a file")),
    },
    "prefetch": {
        "help": "readahead policies on buffered reads in a memory-limited cgroup (issue 11): "
                "kernel default, best static read_ahead_kb of a sweep, KML-like per device, "
                "iobridge per file with feedback, on sequential, strided, random, reverse and "
                "mixed reads (and, asked for, db_bench's readseq, readreverse, readrandom, "
                "readrandomwriterandom): MB/s, hit ratio, readahead accuracy, wasted MB, "
                "refaults, agent CPU, observer-alone cost; goals printed beside the figures",
        "add_args": lambda p: _prefetch_bench().add_args(p),
        "host_check": lambda args: _prefetch_bench().host_check(args),
        "run_in_vm": lambda args: _prefetch_bench().run_in_vm(args),
        "render": lambda res: _prefetch_bench().render(_prefetch_bench().json_keys_to_int(res)),
        "timeout": 2400,
        "examples": (
            ("iobridge bench prefetch", "boot the VM, run it (20-25 min), print the tables"),
            ("iobridge bench prefetch --workloads rev mixed --runtime 20",
             "two workloads, 20 s runs"),
            ("iobridge bench prefetch --sweep 0 128 1024 --no-observer-cost",
             "a shorter sweep, no observer-alone cost"),
            ("iobridge bench prefetch --workloads db-readseq db-readreverse db-readrandom "
             "db-readrandomwriterandom", "the RocksDB workloads alone (db_bench)"),
            ("iobridge bench prefetch --json --output prefetch.json", "as JSON, kept in a file")),
    },
    "tick": {
        "help": "on this host, no kernel or VM: the agent's tick and table recompute "
                "(ONNX over the key grid, publish into the decision array) against in-memory "
                "maps with 2 and 8 synthetic busy legs: us per recompute, recomputes and ticks "
                "per second, agent CPU share at default settings; goals printed beside the figures",
        "add_args": lambda p: _tick_bench().add_args(p),
        "run_on_host": lambda args: _tick_bench().run(args),
        "render": lambda res: _tick_bench().render(res),
        "examples": (
            ("iobridge bench tick", "2 and 8 legs, 5 s runs, print the tables"),
            ("iobridge bench tick --legs 8 --duration 20", "8 legs only, longer runs"),
            ("iobridge bench tick --change-rate-hz 2", "slow inputs changing every 0.5 s"),
            ("iobridge bench tick --json --output tick.json", "as JSON, kept in a file")),
    },
}


# ------------------------------------------------------------------ driver

def _run(args) -> int:
    bench = BENCHES[args.bench]
    if args.output is not None:     # before the long work
        check_output(args.output, args.force)
    if "run_on_host" in bench:
        res = bench["run_on_host"](args)      # here, with no VM
    elif args.in_vm or os.environ.get("IOBRIDGE_IN_VM") == "1":
        if os.geteuid() != 0:
            raise UsageError("the benchmark needs root inside the VM")
        res = bench["run_in_vm"](args)
    else:
        from . import vm  # noqa: PLC0415

        if "host_check" in bench:
            bench["host_check"](args)
        out_dir = Path(tempfile.mkdtemp(prefix="iobridge-bench-"))
        out = out_dir / "result.json"
        cmd = ["python", "-m", "iobridge.cli", "bench", args.bench, "--in-vm",
               "--output", str(out)] + args.forward
        result = vm.run(cmd, timeout=args.timeout, quiet=args.json, shared=out_dir)
        if result.returncode != 0 or not out.exists():
            raise IobridgeError(f"benchmark failed in the VM (exit {result.returncode})",
                                "run with -v, or look at the console output above")
        res = json.loads(out.read_text())
    if args.output is not None:
        with atomic_output(args.output) as tmp:
            tmp.write_text(json.dumps(res, indent=2) + "\n")
    if args.json:
        print(json.dumps(res, indent=2))
    elif not args.output or not getattr(args, "in_vm", False):
        print(bench["render"](res))
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (in the test VM; `tick` on this host)",
                       **cliutil.examples(*(ex for b in BENCHES.values() for ex in b["examples"][:1])))
    bsub = p.add_subparsers(dest="bench", metavar="BENCH")
    bsub.required = True
    for name, bench in BENCHES.items():
        bp = bsub.add_parser(name, help=bench["help"], parents=[cliutil.json_parent()],
                             **cliutil.examples(*bench["examples"]))
        bp.add_argument("--output", metavar="FILE", help="also write the JSON result to FILE")
        bp.add_argument("--force", action="store_true", help="overwrite --output if it exists")
        if "run_on_host" not in bench:
            bp.add_argument("--in-vm", action="store_true",
                            help="run here (inside the VM) instead of booting one")
            bp.add_argument("--timeout", type=cliutil.positive_float(MAX_VM_TIMEOUT_S),
                            default=bench.get("timeout", 1200),
                            help=f"VM time bound in seconds (default {bench.get('timeout', 1200)})")
        bench["add_args"](bp)
        bp.set_defaults(func=_with_forward(bp), bench=name)


def _with_forward(parser: argparse.ArgumentParser):
    """Forward the benchmark's own options to the in-VM run."""
    own = {a.dest for a in parser._actions if a.dest not in
           ("help", "json", "output", "force", "in_vm", "timeout")}

    def func(args) -> int:
        fwd: list[str] = []
        for action in parser._actions:
            if action.dest in own and action.option_strings:
                value = getattr(args, action.dest)
                if value is None or value is False:
                    continue
                if value is True:
                    fwd.append(action.option_strings[0])
                    continue
                fwd.append(action.option_strings[0])
                fwd += [str(v) for v in value] if isinstance(value, list) else [str(value)]
        args.forward = fwd
        return _run(args)

    return func


if __name__ == "__main__":
    from .cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
