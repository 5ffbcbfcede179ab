"""The page-cache observer on the real kernel: exact counts for a file of
known size on a fresh ext4 (a loop device: tmpfs has no readahead), random
against sequential readahead, prefetched pages removed unread, the event
stream, and `iobridge cachestat`'s output and refusals."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
from conftest import drop, make_file, run

import iobridge
from iobridge.core import cachestat_abi as cabi
from iobridge.kernel import cachestat as cs

PAGE = 4096
CHUNK = 128 << 10       # a common buffered read size (32 pages)
PROGRAMS = {fn for pair in cs.KPROBE_PROGRAMS.values() for fn in pair if fn}
# The command runs from the same iobridge as these tests (a worktree's, when
# the guest's venv has another one installed).
CLI_ENV = {**os.environ,
           "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(iobridge.__file__)))}


@pytest.fixture(scope="module")
def observer():
    """One loaded observer (with the event stream) shared by the tests that
    only read its counters: a BCC compile takes about a minute under emulation."""
    with cs.CacheObserver(stream=True) as obs:
        print(f"cachestat compile time in the VM: {obs.compile_seconds:.1f}s; {obs.hooks}")
        yield obs


def read_all(path) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            n += len(chunk)
    return n


def file_counters(obs, dev: int, ino: int) -> cs.Counters:
    return obs.snapshot()[1].get((dev, ino), cs.Counters.empty())


def delta_of(obs, dev, ino, action) -> dict:
    before = file_counters(obs, dev, ino)
    action()
    d = file_counters(obs, dev, ino).minus(before).values
    return d


def drain(obs) -> list:
    """Every event the ring holds now (a poll stops after about 0.5 s)."""
    out = []
    while len(batch := obs.poll_events(timeout_ms=0)):
        out.extend(batch)
    return out


def test_cold_read_warm_read_and_drop_count_exactly(observer, ext4):
    pages = 1024                          # 4 MiB
    path = ext4.mnt / "seq"
    ino = make_file(path, pages)
    assert observer.plan["insertion"][0] == "tracepoint"

    cold = delta_of(observer, ext4.dev, ino, lambda: read_all(path))
    warm = delta_of(observer, ext4.dev, ino, lambda: read_all(path))
    dropped = delta_of(observer, ext4.dev, ino, lambda: drop(path))
    print("cold:", cold)
    print("warm:", warm)
    print("drop:", dropped)

    # Cold: every page inserted once, each inside a readahead window, and
    # each handed to a read once.
    assert cold["insertions"] == pages
    assert cold["window_pages"] == pages
    assert cold["ra_requested"] >= pages
    assert cold["ra_windows"][cabi.RA_SYNC] >= 1 and cold["ra_windows"][cabi.RA_ASYNC] >= 1
    assert cold["reads"] == pages
    # The first window holds what the first read asked for (32 pages); after
    # it, async readahead runs ahead of the reader: all prefetched.
    assert pages - 2 * CHUNK // PAGE <= cold["ra_pages"] <= pages - CHUNK // PAGE
    assert cold["removed_used"] + cold["removed_unused"] + cold["removed_untracked"] == 0

    # Warm: all hits, nothing inserted, nothing prefetched.
    assert warm["insertions"] == 0 and warm["ra_pages"] == 0
    assert warm["reads"] == pages and warm["hits"] == pages

    # Dropped: every page removed, each known and used; every prefetched page
    # was used before it went (accuracy 1).
    assert dropped["removed_used"] == pages
    assert dropped["removed_unused"] == 0 and dropped["removed_untracked"] == 0
    assert dropped["ra_unused_removed"] == 0
    total = file_counters(observer, ext4.dev, ino).values
    assert total["ra_used"] == total["ra_pages"] == cold["ra_pages"]


def test_a_scan_that_wraps_inside_a_window_reads_as_forward(observer, ext4):
    """A looping reader back at its file's start inside one window: the
    kernel keeps the largest backward step, and the window's direction
    leaves that wrap out (a forward scan), where (last - first) / range of
    the same aggregates says reverse."""
    pages = 1024
    path = ext4.mnt / "wrap"
    ino = make_file(path, pages)
    observer.next_window()
    with open(path, "rb", buffering=0) as f:
        f.seek(pages * 3 // 4 * PAGE)
        while f.read(CHUNK):
            pass
        f.seek(0)
        for _ in range(pages // 4 * PAGE // CHUNK):
            f.read(CHUNK)
    closed = observer.next_window()
    win = observer.snapshot(closed)[1][(ext4.dev, ino)].window
    feats = cs.window_features(win, 128)
    unwrapped = win["last"] / (win["hi"] - win["lo"])
    print(f"wrap window: n {win['n']}, lo {win['lo']}, hi {win['hi']}, last {win['last']}, "
          f"max_back {win['max_back']}, max_fwd {win['max_fwd']}: direction "
          f"{feats['direction']:+.3f} ((last - first) / range {unwrapped:+.3f})")
    assert win["n"] >= pages // 2
    assert win["max_back"] >= pages // 2, "the wrap is the largest backward step"
    assert unwrapped < 0
    assert feats["direction"] >= 0.9


def test_random_reads_get_little_readahead_next_to_sequential(observer, ext4):
    pages, n = 4096, 256
    seq, rnd = ext4.mnt / "seq", ext4.mnt / "rnd"
    seq_ino, rnd_ino = make_file(seq, pages), make_file(rnd, pages)

    def sequential():
        with open(seq, "rb", buffering=0) as f:
            for _ in range(n * PAGE // CHUNK):
                f.read(CHUNK)

    def randomly():
        fd = os.open(rnd, os.O_RDONLY)
        try:
            for i in random.Random(1).sample(range(1, pages), n):
                os.pread(fd, PAGE, i * PAGE)
        finally:
            os.close(fd)

    s = delta_of(observer, ext4.dev, seq_ino, sequential)
    r = delta_of(observer, ext4.dev, rnd_ino, randomly)
    print("sequential:", s)
    print("random:", r)
    assert r["reads"] == n
    assert r["insertions"] >= r["reads"] - r["hits"], "each miss inserted its page"
    assert s["ra_pages"] >= n * 0.8, "a sequential reader is mostly prefetched"
    assert r["ra_pages"] <= n * 0.1, "random reads are read as is"
    assert r["ra_pages"] * 8 <= s["ra_pages"]


def test_prefetched_pages_dropped_unread_are_wasted_and_streamed(observer, ext4):
    path = ext4.mnt / "willneed"
    ino = make_file(path, 256)
    ra = 32                # WILLNEED is capped near the readahead size (128 KiB here)
    drain(observer)
    dropped_before = observer.dropped_events()
    fd = os.open(path, os.O_RDONLY)
    try:
        d = delta_of(observer, ext4.dev, ino,
                     lambda: os.posix_fadvise(fd, 64 * PAGE, ra * PAGE, os.POSIX_FADV_WILLNEED))
        gone = delta_of(observer, ext4.dev, ino, lambda: drop(path))
    finally:
        os.close(fd)
    print("willneed:", d, "drop:", gone)
    assert d["insertions"] == ra and d["ra_pages"] == ra and d["window_pages"] == ra
    assert d["ra_windows"][cabi.RA_FORCED] >= 1 and d["reads"] == 0
    assert gone["removed_unused"] == ra and gone["ra_unused_removed"] == ra
    assert gone["removed_used"] == 0
    ev = [e for e in drain(observer) if int(e["ino"]) == ino and int(e["dev"]) == ext4.dev]
    kinds = [int(e["kind"]) for e in ev]
    inserts = [e for e in ev if int(e["kind"]) == cabi.CEV_INSERT]
    assert len(inserts) == ra
    assert sorted(int(e["index"]) for e in inserts) == list(range(64, 64 + ra))
    assert all(int(e["flags"]) & cabi.PAGE_READAHEAD for e in inserts)
    assert kinds.count(cabi.CEV_REMOVE) == ra
    assert cabi.CEV_WINDOW in kinds
    assert observer.dropped_events() == dropped_before


def attached_programs() -> list[str]:
    """Names of the loaded BPF programs that are ours (bpftool prog)."""
    progs = json.loads(run(["bpftool", "prog", "show", "--json"]).stdout or "[]")
    return sorted(p.get("name", "") for p in progs if p.get("name", "") in
                  {n[:15] for n in PROGRAMS} | {"tracepoint__fil"})


def cli(args, env=None, user=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "iobridge.cli", "cachestat", *args]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**CLI_ENV, **(env or {})})


def test_non_root_fails_in_one_line_and_attaches_nothing():
    before = attached_programs()
    proc = cli(["--count", "1"], user=65534)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("iobridge: error: observing the page cache needs root")
    assert proc.stdout == ""
    assert attached_programs() == before


def test_a_missing_required_hook_is_named_and_nothing_attached():
    before = attached_programs()
    proc = cli(["--count", "1"], env={cs.HIDE_ENV: "page_cache_ra_unbounded"})
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert ("this kernel lacks page-cache hooks the observer needs: readahead (kprobe "
            "page_cache_ra_unbounded)") in proc.stderr
    assert attached_programs() == before


def test_json_output_parses_and_shows_the_file(ext4, tmp_path):
    path = ext4.mnt / "json"
    ino = make_file(path, 512)
    reader = tmp_path / "reader.sh"
    # The reader waits for the command to attach, then reads the file once.
    reader.write_text(f"while ! grep -q attached {tmp_path}/err; do sleep 0.2; done\n"
                      f"sleep 0.5; cat {path} > /dev/null\n")
    with open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "iobridge.cli", "cachestat", "--json",
                                 "--events", "--interval", "1", "--top", "50"], stdout=subprocess.PIPE,
                                stderr=err, text=True, env=CLI_ENV)
    try:
        subprocess.run(["bash", str(reader)], check=True, timeout=300)
        lines, events = [], []
        for line in proc.stdout:
            obj = json.loads(line)
            if "event" in obj:
                events.append(obj["event"])
                continue
            lines.append(obj)
            seen = sum(f["insertions"] for r in lines for f in r["files"] if f["ino"] == ino)
            if seen >= 512 or len(lines) >= 60:
                break
        proc.send_signal(2)
        proc.communicate(timeout=60)   # drain: a full pipe would block its last writes
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (tmp_path / "err").read_text()
    assert "page-cache hooks:" in (tmp_path / "err").read_text()
    for r in lines:
        assert {"time", "interval_s", "devices", "files", "dropped_events"} <= set(r)
    rows = [f for r in lines for f in r["files"] if f["ino"] == ino]
    assert sum(f["insertions"] for f in rows) == 512
    assert rows[0]["path"] in (None, str(path))
    devs = {d["dev"] for r in lines for d in r["devices"].values()}
    assert "%d:%d" % cs.blockdev.kdev_split(ext4.dev) in devs
    feats = [f["window"] for f in rows if f["window"]["events"]]
    print("per interval, the file's insertions, window events and contended updates:",
          [(f["insertions"], f["window"]["events"], f["window"].get("contended")) for f in rows])
    assert feats and all(set(cs.PF.FEATURE_NAMES) <= set(w) for w in feats)
    assert sum(w["events"] for w in feats) == 512
    # --events: one insert record per page of the file, unless the kernel
    # counted it as dropped (reported in every report line)
    mine = [e for e in events if e["ino"] == ino and e["event"] == "insert"]
    dropped = lines[-1]["dropped_events"]
    print(f"events: {len(events)} in all, {len(mine)} inserts of the file, {dropped} dropped")
    assert len(mine) + dropped >= 512 and len(mine) <= 512
    if dropped == 0:
        assert sorted(e["index"] for e in mine) == list(range(512))
    progs = json.loads(run(["bpftool", "prog", "show", "--json"]).stdout or "[]")
    assert not [p for p in progs if proc.pid in [x.get("pid") for x in p.get("pids", [])]]


@pytest.fixture
def memcg():
    """A memory cgroup (v2) to charge a reader's page cache to: its path."""
    root = "/sys/fs/cgroup"
    if run(["stat", "-f", "-c", "%T", root]).stdout.strip() != "cgroup2fs":
        run(["mount", "-t", "cgroup2", "none", root])
    with open(f"{root}/cgroup.subtree_control", "w") as f:
        f.write("+memory")
    path = f"{root}/iobt-cache{os.getpid()}"
    os.mkdir(path)
    yield path
    os.rmdir(path)


def test_pages_reclaimed_and_read_again_are_refaults(observer, ext4, memcg):
    pages = 1024
    path = ext4.mnt / "refault"
    ino = make_file(path, pages)

    def read_in_cgroup():
        run(["sh", "-c", f"echo $$ > {memcg}/cgroup.procs && exec cat {path} > /dev/null"])

    first = delta_of(observer, ext4.dev, ino, read_in_cgroup)

    def reclaim():
        # Reclaim half of the cgroup's page cache (only the file's pages are
        # charged to it). Not all of it: the shadow-node shrinker, which the
        # same reclaim runs, keeps shadow entries in proportion to the pages
        # still on the LRU, so emptying the cgroup also drops every shadow
        # (seen: 1024 pages reclaimed with 64 MiB asked, 0 refaults after).
        try:
            with open(f"{memcg}/memory.reclaim", "w") as f:
                f.write(str(pages * PAGE // 2))
        except OSError:
            pass          # EAGAIN: less than asked could be reclaimed

    def vmstat_refaults() -> int:
        # the cgroup's own count: /proc/vmstat's also counts other
        # processes' refaults meanwhile
        with open(f"{memcg}/memory.stat") as f:
            return sum(int(v) for k, v in (line.split() for line in f)
                       if k == "workingset_refault_file")

    evicted = delta_of(observer, ext4.dev, ino, reclaim)
    k0 = vmstat_refaults()
    again = delta_of(observer, ext4.dev, ino, read_in_cgroup)
    kernel_refaults = vmstat_refaults() - k0
    print("first:", first, "reclaim:", evicted, "again:", again,
          "kernel's workingset_refault_file:", kernel_refaults)
    assert first["insertions"] == pages and first["refaults"] == 0
    reclaimed = evicted["removed_used"] + evicted["removed_unused"]
    assert reclaimed > 0 and evicted["removed_untracked"] == 0
    # read back, every reclaimed page comes in over its shadow entry: a
    # refault each (seen: 724 reclaimed, 724 refaults). The kernel's
    # workingset_refault_file counted 717 there: it skips refaults it cannot
    # attribute, so it is a lower bound, not the same count.
    assert again["insertions"] == reclaimed
    assert again["refaults"] == reclaimed
    assert kernel_refaults <= again["refaults"]
