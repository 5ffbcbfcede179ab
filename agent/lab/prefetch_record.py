"""Record prefetch training data in the test VM: workloads of known class
run while read_ahead_kb is swept, the page-cache observer's per-device and
per-file feature windows (kernel/cachestat.py, features from
core/prefetch_features.py) written with each window's workload class, and
each run's throughput (format: core/prefetch_recording.py).

Usage (in the VM, as root; see scripts/train-prefetch-model.sh):
  python -m iobridge.lab.prefetch_record OUT_DIR --seed 201 --seed 202

Test bed: a null_blk disk (memory backed, 100 us completion time through
its timer) with ext4, one data file of FILE_MB, and the workloads run in a
cgroup whose memory.max (MEMORY_MB) is well below the file, so the data
does not fit and readahead decides what the device reads.

Workloads (one class each; block sizes chosen per seed, so two seeds do
not record the same runs): fio buffered sequential reads (class
sequential), fio buffered random reads (random), fio buffered random reads
and writes 70/30 (random+write), and a backward reader in Python (reverse:
fio has no backward pattern). Every (workload, read_ahead_kb) pair runs
once per seed, RUN_S seconds, after the page cache was dropped, in an order
shuffled by the seed. has_writes: the window saw writes from the
workload's processes (their wchar, /proc/PID/io) or on the device.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..core import prefetch_features as PF
from ..core import prefetch_recording as R
from ..kernel import blockdev
from ..kernel import cachestat as cs
from . import testbed

SWEEP_KB = (0, 8, 32, 128, 320, 480, 1024)
RUN_S = 4
FILE_MB = 192
MEMORY_MB = 48
NULLB = "nullb_pfrec"
NULLB_MB = 320
COMPLETION_NS = 100_000
CGROUP = Path("/sys/fs/cgroup/iobridge-pfrec")
# block sizes (KiB) per workload, one picked per seed
BLOCK_KB = {"seq": (8, 32, 64), "rand": (4, 8), "randrw": (4, 8), "rev": (8, 32)}
WCHAR_MIN = 64 << 10
CLASS = {"seq": "sequential", "rand": "random", "randrw": "random+write", "rev": "reverse"}

REVERSE_READER = r"""
import json, os, sys, time
path, bs, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fd = os.open(path, os.O_RDONLY)
size = os.fstat(fd).st_size
pos = size - bs
done = 0
t0 = time.monotonic()
while time.monotonic() - t0 < seconds:
    done += len(os.pread(fd, bs, pos))
    pos -= bs
    if pos < 0:
        pos = size - bs
print(json.dumps({"read_bytes": done, "seconds": time.monotonic() - t0}))
"""


def log(msg: str) -> None:
    print(f"prefetch_record: {msg}", file=sys.stderr, flush=True)


def setup_cgroup(memory_mb: int | None = None) -> None:
    """The memory-limited cgroup the workloads run in (memory.max
    `memory_mb`, default MEMORY_MB)."""
    memory_mb = MEMORY_MB if memory_mb is None else memory_mb
    root = Path("/sys/fs/cgroup")
    if not (root / "cgroup.controllers").exists():
        subprocess.run(["mount", "-t", "cgroup2", "none", str(root)], check=True)
    if "memory" not in (root / "cgroup.subtree_control").read_text().split():
        (root / "cgroup.subtree_control").write_text("+memory\n")
    CGROUP.mkdir(exist_ok=True)
    (CGROUP / "memory.max").write_text(f"{memory_mb << 20}\n")


def in_cgroup():
    (CGROUP / "cgroup.procs").write_text(f"{os.getpid()}\n")


def cgroup_wchar() -> int:
    total = 0
    try:
        pids = (CGROUP / "cgroup.procs").read_text().split()
    except OSError:
        return 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/io").read_text().splitlines():
                if line.startswith("wchar:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def dev_writes() -> int:
    return int(Path(f"/sys/block/{NULLB}/stat").read_text().split()[4])


def set_read_ahead_kb(kb: int, name: str = NULLB) -> None:
    (Path("/sys/block") / name / "queue" / "read_ahead_kb").write_text(f"{kb}\n")


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def start(kind: str, bs_kb: int, path: Path, seed: int, run_s: float | None = None,
          size_mb: int | None = None, rw: str | None = None,
          fio_extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start workload `kind` on `path` in the cgroup for `run_s` seconds
    (default RUN_S) over its first `size_mb` (default FILE_MB); `rw` replaces
    the kind's fio rw= (e.g. "read:28k", a strided read); `fio_extra`: more
    fio options (ignored by the reverse reader, which is not fio)."""
    run_s = RUN_S if run_s is None else run_s
    size_mb = FILE_MB if size_mb is None else size_mb
    if kind == "rev":
        cmd = [sys.executable, "-c", REVERSE_READER, str(path), str(bs_kb * 1024), f"{run_s:g}"]
    else:
        rw = rw or {"seq": "read", "rand": "randread", "randrw": "randrw"}[kind]
        cmd = ["fio", "--name=pfrec", f"--filename={path}", f"--rw={rw}", f"--bs={bs_kb}k",
               "--ioengine=psync", "--direct=0", f"--size={size_mb}M", f"--runtime={run_s:g}",
               "--time_based", f"--randseed={seed}", "--output-format=json"]
        if kind == "randrw":
            cmd.append("--rwmixread=70")
        cmd += fio_extra
    return start_argv(cmd)


def start_argv(cmd: list[str]) -> subprocess.Popen:
    """Start `cmd` in the cgroup (before it runs: every page it touches is
    charged there), stdout and stderr piped as text."""
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=in_cgroup)


def throughput(kind: str, out: str, run_s: float | None = None) -> tuple[float, float, float]:
    """(read MB/s, write MB/s, seconds) of a finished run (`run_s`: its
    length, if fio does not say)."""
    if kind == "rev":
        d = json.loads(out.strip().splitlines()[-1])
        return d["read_bytes"] / 2**20 / d["seconds"], 0.0, d["seconds"]
    job = json.loads(out[out.find("{"):])["jobs"][0]
    secs = job["job_runtime"] / 1000.0 if job.get("job_runtime") else \
        (RUN_S if run_s is None else run_s)
    return job["read"]["bw_bytes"] / 2**20, job["write"]["bw_bytes"] / 2**20, secs


def window_line(c: cs.Counters, prev: cs.Counters | None, kb: int, scope: str, **common) -> dict:
    wf = cs.window_features(c.window, kb)
    d = c.minus(prev or cs.Counters.empty()).values
    win = c.window or {"lo": 0, "hi": 0, "last": 0}
    return {"type": "window", **common, "read_ahead_kb": kb, "scope": scope,
            "features": [wf[n] for n in PF.FEATURE_NAMES], "direction": wf["direction"],
            "extent": [win["lo"], win["hi"], win["last"]],
            "seq_run_mean": wf["seq_run_mean"], "rev_run_mean": wf["rev_run_mean"],
            "insertions": d["insertions"], "reads": d["reads"], "hits": d["hits"],
            "ra_pages": d["ra_pages"], "ra_used": d["ra_used"], "refaults": d["refaults"],
            "contended": wf["contended"]}


def lookup(obs, epoch: int, fs_dev: int, ino: int):
    """(device Counters or None, file Counters or None) with window `epoch`:
    two map lookups, not a walk of every tracked file (which under
    emulation could take longer than a window)."""
    out = []
    for name, key in ((b"dev_stats", None), (b"file_stats", (fs_dev, ino))):
        t = obs.bpf[name]
        k = t.Key(fs_dev) if key is None else t.Key(dev=fs_dev, ino=ino)
        try:
            out.append(cs.Counters.from_leaf(t[k], epoch))
        except KeyError:
            out.append(None)
    return tuple(out)


def snapshot(obs, epoch, fs_dev: int, ino: int):
    global _walk
    if not _walk:
        try:
            return lookup(obs, epoch, fs_dev, ino)
        except Exception as e:       # noqa: BLE001 (fall back to the observer's own walk)
            log(f"direct map lookup failed ({type(e).__name__}: {e}); walking the maps")
            _walk = True
    devs, files = obs.snapshot(epoch)
    return devs.get(fs_dev), files.get((fs_dev, ino))


_walk = False


@contextlib.contextmanager
def data_fs(size_mb: int | None = None, name: str = NULLB):
    """The test bed's disk: null_blk `name` of `size_mb` (default NULLB_MB),
    memory backed, COMPLETION_NS per request through its timer, with a fresh
    ext4 mounted noatime; yields (mount point, the file system's dev_t as
    the observer keys it) and removes it all at the end."""
    dev = testbed.make_nullb(name, size_mb=NULLB_MB if size_mb is None else size_mb,
                             memory_backed=1, irqmode=2, completion_nsec=COMPLETION_NS)
    mnt = None
    try:
        # no lazy inode-table or journal init: its background writes would make
        # read-only windows look like windows with writes
        testbed.sh(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                    dev])
        mnt = Path(tempfile.mkdtemp(prefix="iobridge-pfrec-"))
        testbed.sh(["mount", "-o", "noatime", dev, str(mnt)])
        st = os.stat(mnt)
        yield mnt, blockdev.kdev(os.major(st.st_dev), os.minor(st.st_dev))
    finally:
        if mnt is not None:
            testbed.sh(["umount", str(mnt)], check=False)
        testbed.remove_nullb(name)


def write_file(path: Path, size_mb: int) -> None:
    """A data file of `size_mb`, written with direct I/O (not left cached)."""
    testbed.sh(["fio", "--name=layout", f"--filename={path}", f"--size={size_mb}M",
                "--rw=write", "--bs=1M", "--direct=1", "--ioengine=psync"])


def record_seed(obs, seed: int, out_dir: Path, data: Path, fs_dev: int) -> Path:
    rng = random.Random(seed)
    bs = {k: rng.choice(v) for k, v in BLOCK_KB.items()}
    how = {"seq": "fio rw=read bs={}k psync buffered",
           "rand": "fio rw=randread bs={}k psync buffered",
           "randrw": "fio rw=randrw rwmixread=70 bs={}k psync buffered",
           "rev": "python pread of {}k blocks from the end backward"}
    workloads = {f"{k}:{bs[k]}k": {"class": CLASS[k], "how": how[k].format(bs[k])}
                 for k in BLOCK_KB}
    runs = [(k, kb) for k in BLOCK_KB for kb in SWEEP_KB]
    rng.shuffle(runs)
    out = out_dir / f"prefetch-seed{seed}.jsonl.gz"
    head = R.header(f"seed{seed}", seed, workloads, SWEEP_KB, PF.WINDOW_S,
                    kernel=os.uname().release, device=f"null_blk {NULLB_MB} MB memory backed, "
                    f"completion {COMPLETION_NS // 1000} us (timer), ext4",
                    file_mb=FILE_MB, memory_max_mb=MEMORY_MB, run_s=RUN_S,
                    recorder="python -m iobridge.lab.prefetch_record (agent/lab/prefetch_record.py)")
    w = R.RecordingWriter(out, head)
    ino = os.stat(data).st_ino
    for i, (kind, kb) in enumerate(runs):
        name = f"{kind}:{bs[kind]}k"
        set_read_ahead_kb(kb)
        drop_caches()
        common = {"workload": name, "class": CLASS[kind], "seed": seed}
        proc = start(kind, bs[kind], data, seed * 100 + i)
        obs.next_window()
        t_closed = time.monotonic()
        pdev, pfile = snapshot(obs, None, fs_dev, ino)
        pw, pd = cgroup_wchar(), dev_writes()
        t = 0
        while proc.poll() is None:
            # windows of WINDOW_S whatever the time reading them took
            time.sleep(max(0.0, t_closed + PF.WINDOW_S - time.monotonic()))
            closed = obs.next_window()
            now_s = time.monotonic()
            length, t_closed = now_s - t_closed, now_s
            ndev, nfile = snapshot(obs, closed, fs_dev, ino)
            nw, nd = cgroup_wchar(), dev_writes()
            # more than a pipe's worth: fio and the reverse reader print their
            # figures (a few KiB) to stdout when they end
            has_writes = nw - pw > WCHAR_MIN or nd > pd
            for scope, now, before in (("device", ndev, pdev), ("file", nfile, pfile)):
                if now is not None and now.window:
                    w.write(window_line(now, before, kb, scope, t=t, has_writes=has_writes,
                                        window_s=round(length, 3), **common))
            pdev, pfile, pw, pd = ndev, nfile, max(nw, pw), nd
            t += 1
        so, se = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{name} at {kb} KB failed ({proc.returncode}): {se[-300:]}")
        rd, wr, secs = throughput(kind, so)
        w.write({"type": "run", **common, "read_ahead_kb": kb, "read_mb_s": rd,
                 "write_mb_s": wr, "seconds": secs, "windows": t})
        log(f"seed {seed} run {i + 1}/{len(runs)}: {name} at {kb} KB: read {rd:.1f} MB/s, "
            f"write {wr:.1f} MB/s, {t} windows")
    w.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, action="append", required=True)
    args = ap.parse_args(argv)
    failed = len(args.seed)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    setup_cgroup()
    with data_fs() as (mnt, fs_dev):
        data = mnt / "data"
        write_file(data, FILE_MB)
        with cs.CacheObserver() as obs:
            log(f"observer compiled in {obs.compile_seconds:.1f}s; {obs.hooks}")
            failed = 0
            for seed in args.seed:
                try:
                    log(f"wrote {record_seed(obs, seed, out_dir, data, fs_dev)}")
                except Exception as e:      # the other seeds may still be recorded
                    failed += 1
                    log(f"seed {seed} failed: {type(e).__name__}: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
