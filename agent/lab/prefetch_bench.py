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

Workloads (buffered, psync; fio with BENCH_FIO_OPTS: no advice of its
own, no invalidation): fio sequential read, fio strided read
(rw=read:GAP), fio random read (with replacement: BENCH_FIO_RANDOM_OPTS),
the reverse reader of prefetch_record (fio has no backward pattern), and
mixed: a sequential scanner and a random reader on two files of the same
device at once.

db workloads (db_bench of Debian's rocksdb-tools 7.8.3, what KML's
throughput was measured with): db-readseq, db-readreverse, db-readrandom,
db-readrandomwriterandom, on one RocksDB built once per bench run on the
test bed's ext4, outside the cgroup, before the first run: `db_bench
--benchmarks=fillseq,flush,waitforcompaction`, DB_KEYS keys of 16 B with
values of DB_VALUE_BYTES, compression none, no WAL (the memtable flushed
at the end), 4 MiB memtables: about 98 MiB in 25 or so SST files of 4 MiB, 2x
memory.max, so the working set does not fit. Each run is db_bench in the
cgroup: --advise_random_on_open=false (RocksDB would otherwise advise
every table file RANDOM, which switches readahead off whatever the policy),
no mmap, no O_DIRECT, an 8 MiB block cache (db_bench's default; with the
memtables and the library it leaves the page cache about half of
memory.max), one thread, the bench's seed. The read-only three open the
DB with --readonly=1, which writes nothing (no new MANIFEST, WAL, OPTIONS
or LOG; checked before every readrandomwriterandom run), so the built DB
stays pristine; readrandomwriterandom (90% reads) writes, so each of its
runs gets a fresh copy of it (new inodes too: nothing the agent remembers
of the DB's files carries over), with automatic compactions off (a
compaction that a faster policy's writes reach and a slower one's do not
would give the two runs different I/O besides readahead's). db_bench
ignores --duration for readseq and readreverse (one pass over the DB):
those passes are repeated, a new db_bench each (the DB opened anew), until
the run's time is up; readrandom and readrandomwriterandom run for it.
Throughput is db_bench's MB/s (key and value bytes read) where it prints
one, and ops/s for readrandomwriterandom (it prints none): each workload's
figures are in one unit, so its ratios are unit-free. The db workloads are
not in the default set (28 more runs and the DB's build: about 10 more
minutes under emulation, past the default --timeout 2400): ask for them
with --workloads and raise --timeout. Without db_bench they are refused
when asked for, and a default run says they could not run (not_covered in
the JSON). Their shared files are read in the order readseq, readreverse,
readrandom: drop-behind (the only thing a sequential scan leaves the
agent remembering for good) is of no use to the later two.

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
lab/experiment.py's CpuMeter). The counters are the device's for every
workload (one run at a time on the disk), which for a db workload sums its
many SST files (and, for readrandomwriterandom, the pages its WAL writes
put in the cache, counted as insertions). Then the ratios d/b, d/a, d/c per workload
and the issue's goals, marked met or missed (never asserted), and the
observer-alone cost on the random reads (attached vs not, same boot).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..core import cliutil
from ..core.errors import IobridgeError, UsageError

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
# fio options of every bench run. fio's defaults are not what the agent is
# for (seen with strace on fio 3.33):
# - fadvise_hint=1 advises each file RANDOM or SEQUENTIAL itself, which
#   decides readahead before any policy can (the db workloads run with
#   --advise_random_on_open=false for the same reason): off, the readers
#   give no advice, as most applications;
# - with its random map a random reader reads each block once a pass and
#   fio drops the file's pages (DONTNEED over the whole file) at the start
#   of every pass (80 times in 2 s on a 1 MB file; once with norandommap),
#   so the mixed case's random reader hit 0 of 10-14 thousand reads a run
#   under every policy. Random readers read with replacement, and fio never
#   invalidates (the bench drops the caches before each run itself).
BENCH_FIO_OPTS = ("--invalidate=0", "--fadvise_hint=0")
BENCH_FIO_RANDOM_OPTS = ("--norandommap",)

POLICIES = ("a", "b", "c", "d")
POLICY_LABELS = {
    "a": "(a) kernel default",
    "b": "(b) best static",
    "c": "(c) KML-like, per device",
    "d": "(d) iobridge, per file",
}
# The db workloads' RocksDB. 100,000 entries of 16 + 1000 B are 98 MiB on
# disk with db_bench 7.8.3 (103,256,405 B measured): 2x
# prefetch_record.MEMORY_MB. 4 MiB memtables keep a writing run's anon
# memory small beside memory.max (and give the DB 25 or so SST files).
DB_KEYS = 100_000
DB_KEY_BYTES = 16
DB_VALUE_BYTES = 1000
DB_DISK_MB = 100                     # what the DB takes on the test disk, rounded up
DB_BUFFER_BYTES = 4 << 20
DB_CACHE_BYTES = 8 << 20             # the block cache (db_bench's default)
DB_SEED_FOR_0 = 2**32                # db_bench takes --seed=0 for a seed from the clock
DB_DIR, DB_RW_DIR = "rocksdb", "rocksdb-rw"
DB_PACKAGE = "rocksdb-tools"
# db_bench's readseq and readreverse ignore --duration (one pass over the DB)
DB_PASS_BENCHES = ("readseq", "readreverse")
# Passes of a command ($2...) until $1 microseconds are up (EPOCHREALTIME: the
# shell's own clock, no process per check; its separator follows the locale).
DB_PASS_LOOP = ('end=$(( ${EPOCHREALTIME/[.,]/} + $1 )); shift; '
                'while :; do "$@" || exit; [ "${EPOCHREALTIME/[.,]/}" -lt "$end" ] || break; done')
DB_MISSING = (f"db_bench is not installed ({DB_PACKAGE}: apt-get install {DB_PACKAGE}, or "
              "make setup): the db workloads cannot run")

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
             "how": "fio rw=randread bs=4k psync buffered norandommap"},
    "rev": {"parts": (("rev", 8, "shared", None),),
            "how": "python pread of 8k blocks from the end backward (prefetch_record's)"},
    "mixed": {"parts": (("seq", 32, "mixed_scan", None), ("rand", 4, "mixed_random", None)),
              "how": f"fio rw=read bs=32k on one file beside fio rw=randread bs=4k "
                     f"norandommap on a {MIXED_RANDOM_MB} MB file, same device, at once"},
    # db_bench on the bench's RocksDB (no data files: "db" names the benchmark;
    # "unit" the throughput's where it is not MB/s). Their order is the runs'.
    "db-readseq": {"parts": (), "db": "readseq",
                   "how": "db_bench readseq (iterator forward over the DB), passes until the "
                          "run's time is up"},
    "db-readreverse": {"parts": (), "db": "readreverse",
                       "how": "db_bench readreverse (iterator backward over the DB), passes until "
                              "the run's time is up"},
    "db-readrandom": {"parts": (), "db": "readrandom",
                      "how": "db_bench readrandom (point lookups of random keys)"},
    "db-readrandomwriterandom": {"parts": (), "db": "readrandomwriterandom", "unit": "ops/s",
                                 "how": "db_bench readrandomwriterandom (90% lookups, 10% "
                                        "writes of random keys) on a fresh copy of the DB"},
}
WORKLOAD_NAMES = tuple(WORKLOADS)
DB_WORKLOADS = tuple(w for w in WORKLOADS if "db" in WORKLOADS[w])
# the db workloads are asked for by name: they add 28 runs and the DB's build
DEFAULT_WORKLOADS = tuple(w for w in WORKLOADS if w not in DB_WORKLOADS)

# Goals of issue 11, printed beside the figures, never asserted:
# (figure, workloads, op, limit, what it says)
GOALS = (
    ("d_over_b", WORKLOAD_NAMES, ">=", 0.95, "(d) throughput at least 0.95x (b)'s"),
    ("d_over_a", ("rev", "db-readreverse", "mixed"), ">=", 1.3,
     "(d) throughput at least 1.3x (a)'s"),
    ("d_over_c", ("mixed",), ">=", 1.1, "(d) throughput at least 1.1x (c)'s"),
    ("wasted_d_over_a", ("rand",), "<=", 0.5, "(d) wasted readahead at most half (a)'s"),
)
OBSERVER_COST_GOAL = 0.03
MAX_REPEAT = 20                      # rounds of the whole bench in one boot


def log(msg: str) -> None:
    print(f"bench prefetch: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- pure logic

def unit(wl: str) -> str:
    """The unit of workload `wl`'s throughput figures."""
    return WORKLOADS.get(wl, {}).get("unit", "MB/s")


def tput(r: dict | None):
    """A run's throughput in its workload's unit: MB/s, or ops/s where the
    workload gives no MB/s (db-readrandomwriterandom); None if not measured."""
    if r is None:
        return None
    return r["mb_s"] if r.get("mb_s") is not None else r.get("ops_s")


# ------------------------------------------------- the db workloads (db_bench)

def db_bench_installed() -> bool:
    return shutil.which("db_bench") is not None


def check_workloads(workloads, installed: bool | None = None) -> list[str]:
    """What the run cannot cover ([DB_MISSING] without db_bench, else []);
    db workloads asked for without db_bench are a usage error."""
    installed = db_bench_installed() if installed is None else installed
    if installed:
        return []
    asked = [w for w in workloads if w in DB_WORKLOADS]
    if asked:
        raise UsageError(f"{', '.join(asked)} need{'s' if len(asked) == 1 else ''} db_bench, "
                         f"which is not installed", f"apt-get install {DB_PACKAGE}, or make setup")
    return [DB_MISSING]


def _db_common(db: Path, seed: int) -> list[str]:
    return [f"--db={db}", f"--num={DB_KEYS}", f"--key_size={DB_KEY_BYTES}",
            f"--value_size={DB_VALUE_BYTES}", "--compression_type=none",
            f"--write_buffer_size={DB_BUFFER_BYTES}", "--threads=1",
            f"--seed={seed or DB_SEED_FOR_0}"]


def db_build_argv(db: Path, seed: int) -> list[str]:
    """db_bench building the bench's RocksDB in `db`: keys in order, no WAL
    (the memtable flushed at the end, so a read-only open has no log to
    replay), and the flush's L0 files moved down before it exits (fillseq's
    files do not overlap: trivial moves, nothing rewritten)."""
    return ["db_bench", "--benchmarks=fillseq,flush,waitforcompaction", *_db_common(db, seed),
            "--use_existing_db=0", "--disable_wal=1", f"--target_file_size_base={DB_BUFFER_BYTES}"]


def db_run_argv(bench: str, db: Path, runtime_s: float, seed: int) -> list[str]:
    """The command of one run of db_bench's `bench` on the DB in `db`."""
    argv = ["db_bench", f"--benchmarks={bench}", *_db_common(db, seed), "--use_existing_db=1",
            # RocksDB's default advises every table file RANDOM (no readahead)
            "--advise_random_on_open=false", "--mmap_read=0", "--use_direct_reads=0",
            f"--cache_size={DB_CACHE_BYTES}", "--disable_auto_compactions=1"]
    if bench != "readrandomwriterandom":
        argv.append("--readonly=1")       # opens without writing a byte
    if bench in DB_PASS_BENCHES:
        return ["bash", "-c", DB_PASS_LOOP, "db-passes", str(round(runtime_s * 1e6)), *argv]
    return argv + [f"--duration={math.ceil(runtime_s)}"]


_PROGRESS = re.compile(r"\.\.\. finished \d+ ops\s*")


def err_tail(err: str, n: int = 300) -> str:
    """The end of a workload's stderr, without db_bench's progress lines."""
    return " ".join(_PROGRESS.sub(" ", err).split())[-n:]


def parse_db_bench(bench: str, out: str, err: str = "") -> dict:
    """Throughput of a db_bench run from its result lines for `bench` (one
    per pass), e.g. `readrandom   :       3.399 micros/op 294170 ops/sec
    3.002 seconds 882999 operations;  285.0 MB/s (882999 of 882999 found)`:
    ops/s and MB/s over all passes (mb_s None where db_bench prints no MB/s),
    and the keys found, where it says."""
    line = re.compile(rf"^{re.escape(bench)}\s+:\s*[\d.]+ micros/op \d+ ops/sec "
                      r"([\d.]+) seconds (\d+) operations;(.*)$", re.M)
    runs = line.findall(out)
    if not runs:
        raise IobridgeError(f"db_bench {bench}: no result line in its output; stderr: "
                            f"{err_tail(err) or '(empty)'}")
    secs = sum(float(r[0]) for r in runs)
    ops = sum(int(r[1]) for r in runs)
    mbs = [re.search(r"([\d.]+) MB/s", r[2]) for r in runs]
    found = [re.search(r"(\d+) of \d+ found|found:(\d+)", r[2]) for r in runs]
    return {"ops": ops, "seconds": round(secs, 3), "passes": len(runs),
            "ops_s": round(ops / secs, 1) if secs else None,
            "mb_s": (round(sum(float(m[1]) * float(r[0]) for m, r in zip(mbs, runs)) / secs, 3)
                     if secs and all(mbs) else None),
            "found": sum(int(f[1] or f[2]) for f in found) if all(found) else None}


def db_listing(db: Path) -> dict:
    """{file name: (size, mtime ns)} of the DB's folder: what a write changes."""
    return {e.name: (e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(db)}


def restore_db(pristine: Path, work: Path, listing: dict) -> None:
    """`work` made a fresh copy of the DB in `pristine` (times kept, new
    inodes), after checking that the pristine one is as `listing` said."""
    now = db_listing(pristine)
    if now != listing:
        changed = sorted(set(now) ^ set(listing) | {k for k in set(now) & set(listing)
                                                     if now[k] != listing[k]})
        raise IobridgeError(f"the RocksDB in {pristine} changed since its build "
                            f"({', '.join(changed[:5])}): a read-only run wrote to it")
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(pristine, work)      # copy2: sizes, modes and times as they were


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
    (runs that failed, None or without a throughput, left out; ties to the
    smaller kb)."""
    best = None
    for kb in sorted(sweep):
        r = sweep[kb]
        if tput(r) is None:
            continue
        if best is None or tput(r) > tput(best[1]):
            best = (kb, r)
    return best if best else (None, None)


def _ratio(num, den):
    return num / den if num is not None and den else None


def ratios(per: dict) -> dict:
    """d/b, d/a, d/c of throughput (MB/s, or ops/s where the workload has
    no MB/s: the same unit for all of a workload's runs), and (d)'s wasted
    MB over (a)'s, for one workload's policies {policy: run or None}."""
    def get(p, k):
        r = per.get(p)
        return None if r is None else r.get(k)
    out = {f"d_over_{p}": _ratio(tput(per.get("d")), tput(per.get(p))) for p in "abc"}
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


def median_run(runs: list) -> dict | None:
    """Of one (workload, policy)'s runs over the rounds, the one with the
    median throughput (the lower of the middle two for an even count), with
    every round's throughput in "rounds"; None if no round measured it."""
    measured = sorted((r for r in runs if tput(r) is not None), key=tput)
    if not measured:
        return None
    return {**measured[(len(measured) - 1) // 2], "rounds": [tput(r) for r in runs]}


def merge_rounds(rounds: list[dict]) -> dict:
    """The runs of several rounds {workload: {"a", "c", "d", "sweep": {kb:
    run}, "errors"}} as one: each policy's and each setting's median run
    (median_run); errors kept with their round. Then summarize() judges the
    medians, and round_ratios() says how each round alone came out."""
    if len(rounds) == 1:
        return rounds[0]
    out = {}
    for wl in rounds[0]:
        per = [r[wl] for r in rounds]
        merged = {p: median_run([x.get(p) for x in per]) for p in ("a", "c", "d")}
        kbs = sorted({kb for x in per for kb in x.get("sweep", {})})
        merged["sweep"] = {kb: median_run([x.get("sweep", {}).get(kb) for x in per]) for kb in kbs}
        merged["errors"] = {f"{k} (round {i + 1})": v for i, x in enumerate(per)
                            for k, v in x.get("errors", {}).items()}
        out[wl] = merged
    return out


def round_ratios(rounds: list[dict]) -> dict:
    """{workload: [ratios() of each round alone]}, (b) being that round's
    best static setting: the spread behind the medians' ratios."""
    out: dict = {}
    for r in rounds:
        for wl, per in r.items():
            _, best = best_static(per.get("sweep", {}))
            out.setdefault(wl, []).append(ratios({**per, "b": best}))
    return out


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
        + (f"{s['rounds']} rounds of every run, medians; " if s.get("rounds", 1) > 1 else "")
        + f"sweep {', '.join(str(k) for k in s['sweep_kb'])} KiB)"]
    if s.get("fio_options"):
        lines[0] += f"; fio {s['fio_options']} (random readers also {s['fio_random_options']})"
    if s.get("db"):
        d = s["db"]
        lines[0] += (f"; RocksDB of {_f(d.get('size_mb'), '.0f', 0)} MB ({d['keys']} keys of "
                     f"{d['key_bytes']} + {d['value_bytes']} B, {_f(d.get('sst_files'), 'd', 0)} "
                     f"SST files)")
    if res.get("seconds") is not None:
        lines[0] += f"; {res['seconds'] / 60:.1f} min in all"
    for wl, per in res["runs"].items():
        lines.append(f"\n{wl}: {WORKLOADS[wl]['how'] if wl in WORKLOADS else ''}")
        lines.append(f"  {'policy':28} {'RA KiB':>7} {unit(wl):>8} {'hit%':>6} {'RA acc%':>7} "
                     f"{'wasted MB':>9} {'refaults':>9} {'agent CPU%':>10}")
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
                f"  {label:28} {kb_s:>7} {_f(tput(r), '.1f', 8)} {_pct(r.get('hit_ratio'))} "
                f"{_pct(r.get('ra_accuracy'), 7)} {_f(r.get('wasted_mb'), '.1f', 9)} "
                f"{_f(r.get('refaults'), 'd', 9)} {_f(r.get('agent_cpu_percent'), '.1f', 10)}")
            if len(r.get("rounds", [])) > 1:
                lines.append("  " + " " * 30 + "rounds: " + " / ".join(
                    _f(v, ".1f", 0) for v in r["rounds"]) + " (the median's figures above)")
            if len(r.get("parts", [])) > 1:       # (the mixed case: MB/s)
                lines.append("  " + " " * 30 + "parts: " + ", ".join(
                    f"{q['kind']} {q['mb_s']:.1f} MB/s" for q in r["parts"]))
        sw = per.get("sweep", {})
        if sw:
            lines.append(f"  sweep {unit(wl)}: " + "  ".join(
                f"{kb}: {_f(tput(r), '.1f', 0)}"
                for kb, r in sorted(sw.items(), key=lambda kv: int(kv[0]))))
        rt = res["ratios"].get(wl, {})
        lines.append("  ratios: " + "  ".join(
            f"{k.replace('_over_', '/')} {_f(rt.get(k), '.2f', 0)}"
            for k in ("d_over_b", "d_over_a", "d_over_c")))
        per_round = res.get("round_ratios", {}).get(wl)
        if per_round and len(per_round) > 1:
            lines.append("  each round: " + "  ".join(
                f"{k.replace('_over_', '/')} " + " / ".join(_f(rr.get(k), ".2f", 0)
                                                           for rr in per_round)
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
    wl_w = max([6] + [len(g["workload"]) for g in res["goals"]])
    for g in res["goals"]:
        v = g["value"]
        vs = "-" if v is None else (f"{100 * v:.1f}%" if g["figure"] == "observer_cost"
                                    else f"{v:.2f}")
        goal = g["goal"]
        if g["figure"] == "observer_cost":
            goal = f"<= {100 * float(goal.split()[1]):g}%"
        lines.append(f"  {g['figure']:16} {g['workload']:{wl_w}} {vs:>7}  [goal {goal}: "
                     f"{_mark(g['met'])}]  {g['what']}")
    lines.append(f"  {res['goals_met']} met, {res['goals_missed']} missed, "
                 f"{res['goals_not_measured']} not measured")
    for e in res.get("errors", []):
        lines.append(f"error: {e}")
    for note in res.get("not_covered", []):
        lines.append(f"not covered: {note}")
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


def host_check(args) -> None:
    """On the host, before the VM boots (it sees this root file system):
    db workloads asked for need db_bench."""
    check_workloads(args.workloads)


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
                   default=list(DEFAULT_WORKLOADS), metavar="NAME",
                   help=f"which workloads (default {' '.join(DEFAULT_WORKLOADS)}; also "
                        f"{' '.join(DB_WORKLOADS)}: db_bench ({DB_PACKAGE}) on a RocksDB of "
                        f"{DB_DISK_MB} MB, about 2-3 min each and a minute for the DB: with the "
                        "default five, raise --timeout)")
    p.add_argument("--sweep", type=cliutil.int_range(0, MAX_READ_AHEAD_KB), nargs="+",
                   action=_Unique, default=list(DEFAULT_SWEEP_KB), metavar="KB",
                   help="read_ahead_kb values for (b) (default "
                        f"{' '.join(map(str, DEFAULT_SWEEP_KB))}; (a)'s run is the 128)")
    p.add_argument("--seed", type=cliutil.seed, default=DEFAULT_SEED,
                   help=f"fio's and db_bench's random seed, the same for every policy "
                        f"(default {DEFAULT_SEED})")
    p.add_argument("--repeat", type=cliutil.positive_int(MAX_REPEAT), default=1, metavar="N",
                   help="run every (workload, policy, setting) N times, round after round "
                        "in the one boot (each agent started once per round), and judge the "
                        "medians; each round's figures and ratios are shown beside them "
                        "(default 1; a round of the default set takes 20-25 min under "
                        "emulation: raise --timeout)")
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
        self._ino = os.stat(mnt).st_ino  # any of the disk's (the counters used are the device's)
        self.db: Path | None = None       # the built RocksDB, pristine (read-only runs)
        self.db_listing: dict = {}
        self.db_error = "not built"

    def write_files(self, workloads) -> None:
        from . import prefetch_record as P  # noqa: PLC0415
        need = {f for wl in workloads for *_, f, _ in WORKLOADS[wl]["parts"]}
        for f in sorted(need):
            self.files[f] = self.mnt / f
            P.write_file(self.files[f], self.size_mb(f))
        if self.files:
            self._ino = os.stat(next(iter(self.files.values()))).st_ino

    def build_db(self) -> dict:
        """The db workloads' RocksDB, built here (outside the cgroup) by
        db_bench fillseq; returns what it is. Its caches are dropped by the
        first run's fresh_cache."""
        db = self.mnt / DB_DIR
        log(f"building the RocksDB for the db workloads: {DB_KEYS} keys of {DB_KEY_BYTES} + "
            f"{DB_VALUE_BYTES} B, about {DB_DISK_MB} MB (db_bench fillseq, outside the cgroup)")
        t0 = time.monotonic()
        try:
            p = subprocess.run(db_build_argv(db, self.seed), capture_output=True, text=True)
            if p.returncode != 0:
                raise IobridgeError(f"db_bench fillseq failed ({p.returncode}): "
                                    f"{err_tail(p.stderr)}")
            fill = parse_db_bench("fillseq", p.stdout, p.stderr)
            if fill["ops"] != DB_KEYS:
                raise IobridgeError(f"db_bench fillseq wrote {fill['ops']} keys, not {DB_KEYS}")
        except Exception as err:
            self.db_error = f"its build failed: {err}"[:400]
            raise
        listing = db_listing(db)
        info = {"keys": DB_KEYS, "key_bytes": DB_KEY_BYTES, "value_bytes": DB_VALUE_BYTES,
                "size_mb": round(sum(size for size, _ in listing.values()) / 2**20, 1),
                "sst_files": sum(1 for n in listing if n.endswith(".sst")),
                "build_s": round(time.monotonic() - t0, 1), "fill_mb_s": fill["mb_s"],
                "build": shlex.join(db_build_argv(db, self.seed))}
        self.db, self.db_listing = db, listing
        log(f"  built in {info['build_s']:.1f} s: {info['size_mb']:.1f} MB in "
            f"{info['sst_files']} SST files")
        return info

    def db_for(self, wl: str) -> Path:
        """The DB a run of db workload `wl` opens: the pristine one, read-only;
        for readrandomwriterandom (it writes) a fresh copy of it."""
        if self.db is None:
            raise IobridgeError(f"no RocksDB: {self.db_error}")
        if WORKLOADS[wl]["db"] != "readrandomwriterandom":
            return self.db
        restore_db(self.db, self.mnt / DB_RW_DIR, self.db_listing)
        return self.mnt / DB_RW_DIR

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
        spec = WORKLOADS[wl]
        db = self.db_for(wl) if "db" in spec else None    # a copy's writes synced by the remount
        P.set_read_ahead_kb(kb, NULLB)
        self.fresh_cache()
        c0 = _dev_counters(self.obs, self.fs_dev, self._ino) if self.obs else None
        st0 = _agent_counters(agent)
        procs = []
        t0 = time.monotonic()
        with CpuMeter(agent.pid if agent else None) as cpu:
            if db is not None:
                procs.append((f"db_bench {spec['db']}", P.start_argv(
                    db_run_argv(spec["db"], db, self.runtime_s, self.seed))))
            for i, (kind, bs, f, rw) in enumerate(spec["parts"]):
                extra = BENCH_FIO_OPTS + (BENCH_FIO_RANDOM_OPTS if kind == "rand" else ())
                procs.append((kind, P.start(kind, bs, self.files[f], self.seed + i,
                                            run_s=self.runtime_s, size_mb=self.size_mb(f),
                                            rw=rw, fio_extra=extra)))
            outs = [(kind, *p.communicate(), p.returncode) for kind, p in procs]
        wall = time.monotonic() - t0
        ra_end = int(Path(f"/sys/block/{NULLB}/queue/read_ahead_kb").read_text())
        c1 = _dev_counters(self.obs, self.fs_dev, self._ino) if self.obs else None
        P.drop_caches()
        c2 = _dev_counters(self.obs, self.fs_dev, self._ino) if self.obs else None
        parts = []
        for kind, so, se, rc in outs:
            if rc != 0:
                raise IobridgeError(f"{wl} ({kind}) at {kb} KiB failed ({rc}): {err_tail(se)}")
            if db is not None:
                parts.append({"kind": kind, **parse_db_bench(spec["db"], so, se)})
                continue
            rd, _wr, secs = P.throughput(kind, so, self.runtime_s)
            parts.append({"kind": kind, "mb_s": round(rd, 3), "seconds": round(secs, 2)})
        mb = [q["mb_s"] for q in parts]
        out = {"mb_s": None if None in mb else round(sum(mb), 3), "parts": parts,
               "start_kb": kb, "ra_kb_end": ra_end, "wall_s": round(wall, 2)}
        if db is not None:
            out["ops_s"] = parts[0]["ops_s"]
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
    not_covered = check_workloads(wls)
    for note in not_covered:
        log(note)
    dbs = [w for w in wls if w in DB_WORKLOADS]
    res: dict = {
        "benchmark": "prefetch", "kernel": os.uname().release, "cpus": os.cpu_count(),
        "setup": {"device": f"null_blk memory backed, {P.COMPLETION_NS // 1000} us per request "
                            "(timer), ext4", "file_mb": P.FILE_MB,
                  "memory_max_mb": P.MEMORY_MB, "mixed_random_mb": MIXED_RANDOM_MB,
                  "runtime_s": args.runtime, "sweep_kb": sweep, "seed": args.seed,
                  "workloads": {w: WORKLOADS[w]["how"] for w in wls},
                  "fio_options": " ".join(BENCH_FIO_OPTS),
                  "fio_random_options": " ".join(BENCH_FIO_RANDOM_OPTS),
                  "figures": "observer counter deltas on the test disk from before the run to "
                             "after the caches were dropped at its end"},
        "not_covered": not_covered,
        "runs": {},
        "agents": {}, "errors": [],
    }
    rounds = getattr(args, "repeat", 1)
    res["setup"]["rounds"] = rounds
    n_runs = rounds * len(wls) * (1 + len([k for k in sweep if k != DEFAULT_KB]) + 2)
    done = [0]

    def one(bed, runs, wl, policy, kb, agent=None):
        done[0] += 1
        log(f"[{(time.monotonic() - t_start) / 60:5.1f} min] run {done[0]}/{n_runs}: {wl}, "
            f"{POLICY_LABELS.get(policy, policy)}" + (f", read_ahead_kb {kb}" if policy in "ab"
                                                       else ""))
        try:
            r = bed.run(wl, kb, agent)
        except Exception as err:      # noqa: BLE001 - the other runs still say something
            runs[wl]["errors"][policy if policy != "b" else f"b{kb}"] = str(err)[:400]
            log(f"  failed: {err}")
            return None
        log(f"  {_f(tput(r), '.1f', 0)} {unit(wl)}, hit {_pct(r.get('hit_ratio'), 0)}%, wasted "
            f"{r.get('wasted_mb', 0):.1f} MB" + (f", agent CPU {r['agent_cpu_percent']:.1f}%"
                                                 if r.get("agent_cpu_percent") is not None
                                                 else ""))
        return r

    def no_runs() -> dict:
        return {w: {"sweep": {}, "errors": {}} for w in wls}

    def one_round(bed, rnd: int) -> dict:
        """Every workload under every policy once: {workload: {"a", "sweep",
        "c", "d", "errors"}}; each agent started once."""
        runs = no_runs()
        for wl in wls:
            runs[wl]["a"] = r = one(bed, runs, wl, "a", DEFAULT_KB)
            if DEFAULT_KB in sweep:
                runs[wl]["sweep"][DEFAULT_KB] = r
        for wl in wls:
            for kb in sweep:
                if kb != DEFAULT_KB:
                    runs[wl]["sweep"][kb] = one(bed, runs, wl, "b", kb)
        if DEFAULT_KB not in sweep:      # (a) is a static setting too
            for wl in wls:
                runs[wl]["sweep"][DEFAULT_KB] = runs[wl]["a"]
        for policy, device_only in (("c", True), ("d", False)):
            log(f"[{(time.monotonic() - t_start) / 60:5.1f} min] starting the agent for "
                f"{POLICY_LABELS[policy]} (BCC compiles: a minute or more)")
            agent = None
            info = res["agents"].setdefault(policy, {"device_only": device_only, "starts_s": []})
            try:
                agent, start_s = _start_agent(device_only)
                info["start_s"] = round(start_s, 1)
                info["starts_s"].append(round(start_s, 1))
                for wl in wls:
                    runs[wl][policy] = one(bed, runs, wl, policy, DEFAULT_KB, agent)
                st = agent.status() or {}
                pf = st.get("prefetch") or {}
                info.update({k: pf.get(k) for k in ("counters", "classifier_info", "device_only")})
            except Exception as err:      # noqa: BLE001
                res["errors"].append(f"policy {policy}{where(rnd)}: {err}"[:600])
                log(f"policy {policy} failed: {err}")
                for wl in wls:
                    runs[wl].setdefault(policy, None)
                    runs[wl]["errors"].setdefault(policy, f"agent: {err}"[:200])
            finally:
                if agent is not None:
                    rc = agent.stop()
                    info["exit"] = rc
                    if rc != 0:
                        res["errors"].append(f"policy {policy}{where(rnd)}: the agent exited "
                                             f"{rc}: {agent.log()[-400:]}")
                    P.set_read_ahead_kb(DEFAULT_KB, NULLB)
        return runs

    def where(rnd: int) -> str:
        return f" (round {rnd + 1})" if rounds > 1 else ""

    all_rounds: list[dict] = []
    P.setup_cgroup()
    nullb_mb = 3 * P.FILE_MB + MIXED_RANDOM_MB + 64      # 3 files of FILE_MB at most
    if dbs:       # the DB, and the copy readrandomwriterandom writes into with room to grow
        nullb_mb += DB_DISK_MB + (DB_DISK_MB + 32 if "db-readrandomwriterandom" in dbs else 0)
    with P.data_fs(nullb_mb, NULLB) as (mnt, fs_dev):
        bed = Bed(mnt, fs_dev, args.runtime, args.seed)
        files = list(wls) + (["rand"] if not args.no_observer_cost and "rand" not in wls else [])
        log(f"writing the data files ({nullb_mb} MB null_blk)")
        bed.write_files(files)
        if dbs:
            try:
                res["setup"]["db"] = bed.build_db()
                res["setup"]["db"]["runs"] = {w: shlex.join(db_run_argv(
                    WORKLOADS[w]["db"], bed.mnt / (DB_RW_DIR if w == "db-readrandomwriterandom"
                                                   else DB_DIR), args.runtime, args.seed))
                    for w in dbs}
            except Exception as err:      # noqa: BLE001 - the other workloads still run
                res["errors"].append(f"RocksDB build: {err}"[:600])
                log(f"RocksDB build failed: {err}")
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
            for rnd in range(rounds):
                if rounds > 1:
                    log(f"round {rnd + 1} of {rounds}")
                all_rounds.append(one_round(bed, rnd))
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
    res["runs"] = merge_rounds(all_rounds) if all_rounds else no_runs()
    if rounds > 1:
        res["round_ratios"] = round_ratios(all_rounds)
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
