"""`iobridge bench prefetch` (issue 11's benchmark): readahead policies on
buffered reads in a memory-limited cgroup, in one VM boot.

Test bed: prefetch_record's (a null_blk disk, memory backed, 100 us per
request through its timer, ext4; data files of prefetch_record.FILE_MB
under a cgroup whose memory.max is prefetch_record.MEMORY_MB; workloads
started inside the cgroup), with data files chosen so that what the agent
remembers of a file (drop-behind stopped after refaults, a file's advice
step) does not carry over into a workload that would use it: the
sequential read and the mixed case's scanner have a file each; strided,
random and reverse reads share one, in that order.

Workloads (buffered, psync): fio sequential read, fio strided read
(rw=read:GAP), fio random read, the reverse reader of prefetch_record (fio
has no backward pattern), and mixed: a sequential scanner and a random
reader on two files of the same device at once. db_bench (Debian's
rocksdb-tools) is not covered yet.

Policies: (a) kernel default (read_ahead_kb 128, no agent); (b) the best
static read_ahead_kb of a sweep, per workload ((a)'s run counts as the
sweep's 128); (c) KML-like per device: `iobridge run --prefetch on` with
prefetch.device_only (the device's class sets its read_ahead_kb, nothing
per file, no feedback); (d) `iobridge run --prefetch on`, per file with
feedback (the shipped prefetch model). One agent start per policy; every
run starts at read_ahead_kb 128 (what the agent then changes is its own
doing) from a freshly mounted file system with dropped caches (no shadow
entries left by an earlier run, so refaults are the run's own).

Figures per (workload, policy), from the page-cache observer
(kernel/cachestat.py, the benchmark's own CacheObserver; counter deltas on
the test disk, as `iobridge cachestat` reports them) from before the run
to after the caches are dropped at its end, so prefetched pages left unused
in the cache count as wasted: throughput MB/s (the workload's own), hit
ratio, readahead accuracy (used / prefetched), wasted MB (prefetched pages
removed unused), refaults; and the agent's CPU % of one core (psutil, as
lab/experiment.py's CpuMeter). Then the ratios d/b, d/a, d/c per workload
and the issue's goals, marked met or missed (never asserted), and the
observer-alone cost on the random reads (attached vs not, same boot).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from ..core import cliutil
from ..core.errors import IobridgeError

PAGE_KB = 4
DEFAULT_RUNTIME_S = 8.0
MIN_RUNTIME_S = 2.0                  # the agent needs a few 1 s windows to act at all
MAX_RUNTIME_S = 3600.0
DEFAULT_SWEEP_KB = (0, 32, 128, 512, 1024)
DEFAULT_KB = 128                     # the kernel's default read_ahead_kb: policy (a)
MAX_READ_AHEAD_KB = 65536
DEFAULT_SEED = 11
MIXED_RANDOM_MB = 24                 # the mixed case's random reader's file: half of memory.max
NULLB = "nullb_pfbench"

POLICIES = ("a", "b", "c", "d")
POLICY_LABELS = {
    "a": "(a) kernel default",
    "b": "(b) best static",
    "c": "(c) KML-like, per device",
    "d": "(d) iobridge, per file",
}
NOT_COVERED = ("db_bench (Debian's rocksdb-tools: readseq, readreverse, readrandom, mixgraph) "
               "is not installed on this machine: not covered yet")

# name -> parts (kind for prefetch_record.start, block KiB, file, fio rw= or
# None) and how it is described. Files: "seq", "shared" (strided, random and
# reverse, in that order: none of them uses what the agent may remember of
# the file from the one before: drop-behind, a file's advice step), and the
# mixed case's two.
WORKLOADS = {
    "seq": {"parts": (("seq", 32, "seq", None),),
            "how": "fio rw=read bs=32k psync buffered"},
    "stride": {"parts": (("seq", 16, "shared", "read:16k"),),
               "how": "fio rw=read:16k bs=16k psync buffered (16 KiB read, 16 KiB skipped)"},
    "rand": {"parts": (("rand", 4, "shared", None),),
             "how": "fio rw=randread bs=4k psync buffered"},
    "rev": {"parts": (("rev", 8, "shared", None),),
            "how": "python pread of 8k blocks from the end backward (prefetch_record's)"},
    "mixed": {"parts": (("seq", 32, "mixed_scan", None), ("rand", 4, "mixed_random", None)),
              "how": f"fio rw=read bs=32k on one file beside fio rw=randread bs=4k on a "
                     f"{MIXED_RANDOM_MB} MB file, same device, at once"},
}
WORKLOAD_NAMES = tuple(WORKLOADS)

# Goals of issue 11, printed beside the figures, never asserted:
# (figure, workloads, op, limit, what it says)
GOALS = (
    ("d_over_b", WORKLOAD_NAMES, ">=", 0.95, "(d) throughput at least 0.95x (b)'s"),
    ("d_over_a", ("rev", "mixed"), ">=", 1.3, "(d) throughput at least 1.3x (a)'s"),
    ("d_over_c", ("mixed",), ">=", 1.1, "(d) throughput at least 1.1x (c)'s"),
    ("wasted_d_over_a", ("rand",), "<=", 0.5, "(d) wasted readahead at most half (a)'s"),
)
OBSERVER_COST_GOAL = 0.03


def log(msg: str) -> None:
    print(f"bench prefetch: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- pure logic

def figures(delta: dict, delta_in_run: dict | None = None) -> dict:
    """A run's page-cache figures from the observer's counter deltas on the
    device (`delta`: before the run to after the closing drop of caches;
    `delta_in_run`: to the end of the run)."""
    reads, hits = delta["reads"], delta["hits"]
    ra, used = delta["ra_pages"], delta["ra_used"]
    mb = PAGE_KB / 1024
    out = {
        "reads": reads, "hits": hits,
        "hit_ratio": hits / reads if reads else None,
        "insertions": delta["insertions"],
        "device_read_mb": round(delta["insertions"] * mb, 3),
        "prefetched_pages": ra, "prefetched_used": used,
        "ra_accuracy": used / ra if ra else None,
        "wasted_mb": round(delta["ra_unused_removed"] * mb, 3),
        "refaults": delta["refaults"],
    }
    if delta_in_run is not None:
        out["wasted_in_run_mb"] = round(delta_in_run["ra_unused_removed"] * mb, 3)
    return out


def best_static(sweep: dict) -> tuple[int | None, dict | None]:
    """(read_ahead_kb, run) with the highest throughput of a sweep {kb: run}
    (runs that failed, None or without mb_s, left out; ties to the smaller kb)."""
    best = None
    for kb in sorted(sweep):
        r = sweep[kb]
        if r is None or r.get("mb_s") is None:
            continue
        if best is None or r["mb_s"] > best[1]["mb_s"]:
            best = (kb, r)
    return best if best else (None, None)


def _ratio(num, den):
    return num / den if num is not None and den else None


def ratios(per: dict) -> dict:
    """d/b, d/a, d/c of throughput, and (d)'s wasted MB over (a)'s, for one
    workload's policies {policy: run or None}."""
    def get(p, k):
        r = per.get(p)
        return None if r is None else r.get(k)
    out = {f"d_over_{p}": _ratio(get("d", "mb_s"), get(p, "mb_s")) for p in "abc"}
    wd, wa = get("d", "wasted_mb"), get("a", "wasted_mb")
    out["wasted_d_over_a"] = _ratio(wd, wa)
    if wd is not None and wa == 0:
        out["wasted_d_over_a"] = 0.0 if wd == 0 else None
    return out


def goals(ratio_table: dict, observer_cost: float | None = None) -> list[dict]:
    """Issue 11's goals against the measured ratios {workload: ratios()}:
    one entry per (goal, workload) measured; met None where a figure is
    missing."""
    from .experiment import meets  # noqa: PLC0415
    out = []
    for fig, wls, op, limit, what in GOALS:
        for wl in wls:
            if wl not in ratio_table:
                continue
            v = ratio_table[wl].get(fig)
            out.append({"figure": fig, "workload": wl, "value": v, "goal": f"{op} {limit:g}",
                        "what": what, "met": meets(v, op, limit)})
    if observer_cost is not None or "observer_cost" in ratio_table:
        out.append({"figure": "observer_cost", "workload": "rand", "value": observer_cost,
                    "goal": f"<= {OBSERVER_COST_GOAL:g}",
                    "what": "the observer alone costs fio buffered random reads at most 3%",
                    "met": meets(observer_cost, "<=", OBSERVER_COST_GOAL)})
    return out


def observer_cost(without: list[float], with_: list[float]) -> float | None:
    """1 - mean throughput with the observer over without (a loss is > 0)."""
    if not without or not with_:
        return None
    return 1 - (sum(with_) / len(with_)) / (sum(without) / len(without))


def summarize(res: dict) -> None:
    """Fill res["best_static"], res["ratios"], res["goals"] from res["runs"]."""
    res["best_static"], res["ratios"] = {}, {}
    for wl, per in res["runs"].items():
        kb, run = best_static(per.get("sweep", {}))
        per["b"] = None if run is None else {**run, "read_ahead_kb": kb}
        res["best_static"][wl] = kb
        res["ratios"][wl] = ratios(per)
    oc = res.get("observer_cost") or {}
    res["goals"] = goals(res["ratios"], oc.get("cost"))
    judged = [g["met"] for g in res["goals"]]
    res["goals_met"] = sum(1 for m in judged if m is True)
    res["goals_missed"] = sum(1 for m in judged if m is False)
    res["goals_not_measured"] = sum(1 for m in judged if m is None)


# ---------------------------------------------------------------- rendering

def _f(v, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:{width}{fmt}}"


def _pct(v, width: int = 6) -> str:
    return _f(None if v is None else 100 * v, ".1f", width)


def _mark(met) -> str:
    return {True: "met", False: "MISSED", None: "not measured"}[met]


def render(res: dict) -> str:
    s = res["setup"]
    lines = [
        f"iobridge bench prefetch  (kernel {res['kernel']}, {res['cpus']} CPUs; {s['device']}; "
        f"files of {s['file_mb']} MB under memory.max {s['memory_max_mb']} MB; "
        f"{s['runtime_s']:g} s per run, caches dropped before each; "
        f"sweep {', '.join(str(k) for k in s['sweep_kb'])} KiB)"]
    if res.get("seconds") is not None:
        lines[0] += f"; {res['seconds'] / 60:.1f} min in all"
    head = (f"  {'policy':28} {'RA KiB':>7} {'MB/s':>8} {'hit%':>6} {'RA acc%':>7} "
            f"{'wasted MB':>9} {'refaults':>9} {'agent CPU%':>10}")
    for wl, per in res["runs"].items():
        lines.append(f"\n{wl}: {WORKLOADS[wl]['how'] if wl in WORKLOADS else ''}")
        lines.append(head)
        for p in POLICIES:
            r = per.get(p)
            label = POLICY_LABELS[p]
            if r is None:
                why = (per.get("errors") or {}).get(p, "not run")
                lines.append(f"  {label:28} {why}")
                continue
            kb = r.get("read_ahead_kb", r.get("ra_kb_end"))
            kb_s = "-" if kb is None else (f"{kb}" if p in "ab" else f"{kb}*")
            lines.append(
                f"  {label:28} {kb_s:>7} {_f(r.get('mb_s'), '.1f', 8)} {_pct(r.get('hit_ratio'))} "
                f"{_pct(r.get('ra_accuracy'), 7)} {_f(r.get('wasted_mb'), '.1f', 9)} "
                f"{_f(r.get('refaults'), 'd', 9)} {_f(r.get('agent_cpu_percent'), '.1f', 10)}")
            if len(r.get("parts", [])) > 1:
                lines.append("  " + " " * 30 + "parts: " + ", ".join(
                    f"{q['kind']} {q['mb_s']:.1f} MB/s" for q in r["parts"]))
        sw = per.get("sweep", {})
        if sw:
            lines.append("  sweep MB/s: " + "  ".join(
                f"{kb}: {_f(None if r is None else r.get('mb_s'), '.1f', 0)}"
                for kb, r in sorted(sw.items(), key=lambda kv: int(kv[0]))))
        rt = res["ratios"].get(wl, {})
        lines.append("  ratios: " + "  ".join(
            f"{k.replace('_over_', '/')} {_f(rt.get(k), '.2f', 0)}"
            for k in ("d_over_b", "d_over_a", "d_over_c")))
    lines.append("\n  RA KiB: the setting; * the device's read_ahead_kb the agent left at the "
                 "run's end (per-file advice and WILLNEED not shown)")
    oc = res.get("observer_cost")
    if oc:
        lines.append(f"\nobserver alone (rand, fio buffered random reads): "
                     f"{_f(oc.get('without_mean_mb_s'), '.1f', 0)} MB/s without, "
                     f"{_f(oc.get('with_mean_mb_s'), '.1f', 0)} MB/s with it attached "
                     f"({len(oc.get('without_mb_s', []))} + {len(oc.get('with_mb_s', []))} runs): "
                     f"cost {_pct(oc.get('cost'), 0)}%")
    lines.append("\ngoals (issue 11):")
    for g in res["goals"]:
        v = g["value"]
        vs = "-" if v is None else (f"{100 * v:.1f}%" if g["figure"] == "observer_cost"
                                    else f"{v:.2f}")
        goal = g["goal"]
        if g["figure"] == "observer_cost":
            goal = f"<= {100 * float(goal.split()[1]):g}%"
        lines.append(f"  {g['figure']:16} {g['workload']:6} {vs:>7}  [goal {goal}: "
                     f"{_mark(g['met'])}]  {g['what']}")
    lines.append(f"  {res['goals_met']} met, {res['goals_missed']} missed, "
                 f"{res['goals_not_measured']} not measured")
    for e in res.get("errors", []):
        lines.append(f"error: {e}")
    lines.append(f"not covered: {NOT_COVERED}")
    return "\n".join(lines)


# ---------------------------------------------------------------- options

class _Unique(argparse.Action):
    """nargs="+" that refuses a value given twice."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = set()
        for v in values:
            if v in seen:
                parser.error(f"argument {option_string}: {v} given twice")
            seen.add(v)
        setattr(namespace, self.dest, list(values))


def _workload(text: str) -> str:
    if text not in WORKLOADS:
        raise argparse.ArgumentTypeError(f"unknown workload {text!r}: one of "
                                         f"{', '.join(WORKLOADS)}")
    return text


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", type=cliutil.float_range(MIN_RUNTIME_S, MAX_RUNTIME_S),
                   default=DEFAULT_RUNTIME_S, metavar="S",
                   help=f"seconds per run (default {DEFAULT_RUNTIME_S:g}; each run also takes about "
                        "10-15 s to set up under emulation: 20-25 min in all)")
    p.add_argument("--workloads", type=_workload, nargs="+", action=_Unique,
                   default=list(WORKLOADS), metavar="NAME",
                   help=f"which workloads (default all: {' '.join(WORKLOADS)})")
    p.add_argument("--sweep", type=cliutil.int_range(0, MAX_READ_AHEAD_KB), nargs="+",
                   action=_Unique, default=list(DEFAULT_SWEEP_KB), metavar="KB",
                   help="read_ahead_kb values for (b) (default "
                        f"{' '.join(map(str, DEFAULT_SWEEP_KB))}; (a)'s run is the 128)")
    p.add_argument("--seed", type=cliutil.seed, default=DEFAULT_SEED,
                   help=f"fio's random seed, the same for every policy (default {DEFAULT_SEED})")
    p.add_argument("--no-observer-cost", action="store_true",
                   help="skip the observer-alone cost (a warm-up and 4 random-read runs)")


# ---------------------------------------------------------------- in the VM

def _dev_counters(obs, fs_dev: int, ino: int):
    """The test disk's cachestat.Counters now (empty before its first event)."""
    from ..kernel import cachestat as cs  # noqa: PLC0415
    from . import prefetch_record as P  # noqa: PLC0415
    dev, _ = P.snapshot(obs, None, fs_dev, ino)
    return dev or cs.Counters.empty()


class Bed:
    """The test bed inside the VM: files, the observer, and one run."""

    def __init__(self, mnt: Path, fs_dev: int, runtime_s: float, seed: int):
        self.mnt, self.fs_dev, self.runtime_s, self.seed = mnt, fs_dev, runtime_s, seed
        self.obs = None
        self.files: dict[str, Path] = {}
        self.remount_failures = 0

    def write_files(self, workloads) -> None:
        from . import prefetch_record as P  # noqa: PLC0415
        need = {f for wl in workloads for *_, f, _ in WORKLOADS[wl]["parts"]}
        for f in sorted(need):
            self.files[f] = self.mnt / f
            P.write_file(self.files[f], self.size_mb(f))
        self._ino = os.stat(next(iter(self.files.values()))).st_ino

    def fresh_cache(self) -> None:
        """Drop the caches, and remount first: dropping pages leaves the
        shadow entries of pages an earlier run's reclaim evicted, and those
        would count as this run's refaults (and stop the agent's
        drop-behind); unmounting evicts the inodes with them. A failed
        unmount (a file still open) is counted and the caches dropped."""
        from . import prefetch_record as P  # noqa: PLC0415
        from . import testbed  # noqa: PLC0415
        if testbed.sh(["umount", str(self.mnt)], check=False).returncode == 0:
            testbed.sh(["mount", "-o", "noatime", f"/dev/{NULLB}", str(self.mnt)])
        else:
            self.remount_failures += 1
        P.drop_caches()

    def size_mb(self, f: str) -> int:
        from . import prefetch_record as P  # noqa: PLC0415
        return MIXED_RANDOM_MB if f == "mixed_random" else P.FILE_MB

    def run(self, wl: str, kb: int, agent=None) -> dict:
        """One run of workload `wl`, read_ahead_kb set to `kb` first."""
        from . import prefetch_record as P  # noqa: PLC0415
        from .experiment import CpuMeter  # noqa: PLC0415
        P.set_read_ahead_kb(kb, NULLB)
        self.fresh_cache()
        c0 = _dev_counters(self.obs, self.fs_dev, self._ino) if self.obs else None
        st0 = _agent_counters(agent)
        procs = []
        t0 = time.monotonic()
        with CpuMeter(agent.pid if agent else None) as cpu:
            for i, (kind, bs, f, rw) in enumerate(WORKLOADS[wl]["parts"]):
                procs.append((kind, P.start(kind, bs, self.files[f], self.seed + i,
                                            run_s=self.runtime_s, size_mb=self.size_mb(f),
                                            rw=rw)))
            outs = [(kind, *p.communicate(), p.returncode) for kind, p in procs]
        wall = time.monotonic() - t0
        ra_end = int(Path(f"/sys/block/{NULLB}/queue/read_ahead_kb").read_text())
        c1 = _dev_counters(self.obs, self.fs_dev, self._ino) if self.obs else None
        P.drop_caches()
        c2 = _dev_counters(self.obs, self.fs_dev, self._ino) if self.obs else None
        parts = []
        for kind, so, se, rc in outs:
            if rc != 0:
                raise IobridgeError(f"{wl} ({kind}) at {kb} KiB failed ({rc}): {se[-300:]}")
            rd, _wr, secs = P.throughput(kind, so, self.runtime_s)
            parts.append({"kind": kind, "mb_s": round(rd, 3), "seconds": round(secs, 2)})
        out = {"mb_s": round(sum(q["mb_s"] for q in parts), 3), "parts": parts,
               "start_kb": kb, "ra_kb_end": ra_end, "wall_s": round(wall, 2)}
        if c0 is not None:
            out.update(figures(c2.minus(c0).values, c1.minus(c0).values))
        if agent is not None:
            out["agent_cpu_percent"] = None if cpu.percent is None else round(cpu.percent, 2)
            st1 = _agent_counters(agent)
            if st0 is not None and st1 is not None:
                out["agent_actions"] = {k: st1[k] - st0.get(k, 0) for k in
                                        ("windows", "actions", "device_changes", "file_advice",
                                         "willneed_calls", "dropped_pages", "errors", "gone")
                                        if k in st1}
        return out


def _agent_counters(agent) -> dict | None:
    if agent is None:
        return None
    st = agent.status() or {}
    return (st.get("prefetch") or {}).get("counters")


def _start_agent(device_only: bool):
    from . import testbed  # noqa: PLC0415
    from .experiment import AgentProcess  # noqa: PLC0415
    testbed.ensure_module()          # the agent refuses to start without it (admission idles)
    d = Path(tempfile.mkdtemp(prefix="iobridge-pfbench-agent-"))
    cfg = d / "agent.toml"
    cfg.write_text(f'[prefetch]\nstate_file = "{d / "prefetch-state.json"}"\n'
                   f"device_only = {'true' if device_only else 'false'}\n")
    agent = AgentProcess(["--config", str(cfg), "--prefetch", "on"], workdir=d)
    t0 = time.monotonic()
    agent.start()
    agent.wait_status(lambda s: (s.get("prefetch") or {}).get("running"), timeout_s=120)
    return agent, time.monotonic() - t0


def run_in_vm(args) -> dict:
    from ..kernel import cachestat as cs  # noqa: PLC0415
    from . import prefetch_record as P  # noqa: PLC0415

    t_start = time.monotonic()
    wls = list(args.workloads)
    sweep = sorted(set(args.sweep))
    res: dict = {
        "benchmark": "prefetch", "kernel": os.uname().release, "cpus": os.cpu_count(),
        "setup": {"device": f"null_blk memory backed, {P.COMPLETION_NS // 1000} us per request "
                            "(timer), ext4", "file_mb": P.FILE_MB,
                  "memory_max_mb": P.MEMORY_MB, "mixed_random_mb": MIXED_RANDOM_MB,
                  "runtime_s": args.runtime, "sweep_kb": sweep, "seed": args.seed,
                  "workloads": {w: WORKLOADS[w]["how"] for w in wls},
                  "figures": "observer counter deltas on the test disk from before the run to "
                             "after the caches were dropped at its end"},
        "not_covered": [NOT_COVERED],
        "runs": {w: {"sweep": {}, "errors": {}} for w in wls},
        "agents": {}, "errors": [],
    }
    n_runs = len(wls) * (1 + len([k for k in sweep if k != DEFAULT_KB]) + 2)
    done = [0]

    def one(bed, wl, policy, kb, agent=None):
        done[0] += 1
        log(f"[{(time.monotonic() - t_start) / 60:5.1f} min] run {done[0]}/{n_runs}: {wl}, "
            f"{POLICY_LABELS.get(policy, policy)}" + (f", read_ahead_kb {kb}" if policy in "ab"
                                                       else ""))
        try:
            r = bed.run(wl, kb, agent)
        except Exception as err:      # noqa: BLE001 - the other runs still say something
            res["runs"][wl]["errors"][policy if policy != "b" else f"b{kb}"] = str(err)[:400]
            log(f"  failed: {err}")
            return None
        log(f"  {r['mb_s']:.1f} MB/s, hit {_pct(r.get('hit_ratio'), 0)}%, wasted "
            f"{r.get('wasted_mb', 0):.1f} MB" + (f", agent CPU {r['agent_cpu_percent']:.1f}%"
                                                 if r.get("agent_cpu_percent") is not None
                                                 else ""))
        return r

    P.setup_cgroup()
    nullb_mb = 3 * P.FILE_MB + MIXED_RANDOM_MB + 64      # 3 files of FILE_MB at most
    with P.data_fs(nullb_mb, NULLB) as (mnt, fs_dev):
        bed = Bed(mnt, fs_dev, args.runtime, args.seed)
        files = list(wls) + (["rand"] if not args.no_observer_cost and "rand" not in wls else [])
        log(f"writing the data files ({nullb_mb} MB null_blk)")
        bed.write_files(files)
        oc = {"without_mb_s": [], "with_mb_s": []}

        def cost_run(key):
            try:
                oc[key].append(bed.run("rand", DEFAULT_KB)["mb_s"])
                log(f"  observer cost, rand {key.split('_')[0]} the observer: "
                    f"{oc[key][-1]:.1f} MB/s")
            except Exception as err:      # noqa: BLE001
                res["errors"].append(f"observer cost run ({key}): {err}")

        if not args.no_observer_cost:
            # the first run after the boot and the files' writing is slower
            # (fio and the page cache cold): not counted
            log("warm-up run (rand, not counted)")
            try:
                bed.run("rand", DEFAULT_KB)
            except Exception as err:      # noqa: BLE001
                res["errors"].append(f"warm-up run: {err}")
            cost_run("without_mb_s")
        bed.obs = cs.CacheObserver().open()
        try:
            log(f"observer compiled in {bed.obs.compile_seconds:.1f} s; {bed.obs.hooks}")
            if not args.no_observer_cost:
                cost_run("with_mb_s")
            for wl in wls:
                res["runs"][wl]["a"] = r = one(bed, wl, "a", DEFAULT_KB)
                if DEFAULT_KB in sweep:
                    res["runs"][wl]["sweep"][DEFAULT_KB] = r
            for wl in wls:
                for kb in sweep:
                    if kb != DEFAULT_KB:
                        res["runs"][wl]["sweep"][kb] = one(bed, wl, "b", kb)
            if DEFAULT_KB not in sweep:      # (a) is a static setting too
                for wl in wls:
                    res["runs"][wl]["sweep"][DEFAULT_KB] = res["runs"][wl]["a"]
            for policy, device_only in (("c", True), ("d", False)):
                log(f"[{(time.monotonic() - t_start) / 60:5.1f} min] starting the agent for "
                    f"{POLICY_LABELS[policy]} (BCC compiles: a minute or more)")
                agent = None
                try:
                    agent, start_s = _start_agent(device_only)
                    res["agents"][policy] = {"start_s": round(start_s, 1),
                                             "device_only": device_only}
                    for wl in wls:
                        res["runs"][wl][policy] = one(bed, wl, policy, DEFAULT_KB, agent)
                    st = agent.status() or {}
                    pf = st.get("prefetch") or {}
                    res["agents"][policy].update(
                        {k: pf.get(k) for k in ("counters", "classifier_info", "device_only")})
                except Exception as err:      # noqa: BLE001
                    res["errors"].append(f"policy {policy}: {err}"[:600])
                    log(f"policy {policy} failed: {err}")
                    for wl in wls:
                        res["runs"][wl].setdefault(policy, None)
                        res["runs"][wl]["errors"].setdefault(policy, f"agent: {err}"[:200])
                finally:
                    if agent is not None:
                        rc = agent.stop()
                        res["agents"].setdefault(policy, {})["exit"] = rc
                        if rc != 0:
                            res["errors"].append(f"policy {policy}: the agent exited {rc}: "
                                                 f"{agent.log()[-400:]}")
                        P.set_read_ahead_kb(DEFAULT_KB, NULLB)
            if not args.no_observer_cost:
                cost_run("with_mb_s")
        finally:
            bed.obs.close()
            bed.obs = None
        if not args.no_observer_cost:
            cost_run("without_mb_s")
            w, x = oc["without_mb_s"], oc["with_mb_s"]
            oc.update({"without_mean_mb_s": sum(w) / len(w) if w else None,
                       "with_mean_mb_s": sum(x) / len(x) if x else None,
                       "cost": observer_cost(w, x),
                       "order": "without, with (observer just attached), ... the benchmark ..., "
                                "with, without (observer closed)"})
            res["observer_cost"] = oc
        res["setup"]["remount_failures"] = bed.remount_failures
    for wl in wls:
        res["runs"][wl]["sweep"] = {int(k): v for k, v in res["runs"][wl]["sweep"].items()}
    summarize(res)
    res["seconds"] = round(time.monotonic() - t_start, 1)
    log(f"done in {res['seconds'] / 60:.1f} min")
    return res


def json_keys_to_int(res: dict) -> dict:
    """A result read back from JSON: the sweep's keys are ints again."""
    for per in res.get("runs", {}).values():
        if "sweep" in per:
            per["sweep"] = {int(k): v for k, v in per["sweep"].items()}
    return res


if __name__ == "__main__":
    print(render(json_keys_to_int(json.load(open(sys.argv[1])))))
