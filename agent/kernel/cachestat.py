"""Page-cache observer: loads bpf/cachestat.bpf.c with BCC, reads its
per-device and per-file counters and KML feature windows, optionally drains
its per-event stream, and the `iobridge cachestat` command.

Each hook is resolved at start against the running kernel (tracepoints from
tracefs, functions from /proc/kallsyms), with a fallback where one exists;
the loader logs one line naming the hooks used and the ones missing, and
refuses to start, naming them, when a hook it cannot do without is missing
(insertion, removal, readahead windows). bcc's own `cachestat`, `cachetop`
and `readahead` (Debian 12's BCC 0.26) probe add_to_page_cache_lru,
mark_page_accessed, do_page_cache_ra and __page_cache_alloc, which 6.1
renamed or inlined: they do not attach there, or undercount.

Why reads come from filemap_get_pages: a hit is a folio handed to a read
call that was cached before the call began, which the returned batch and each
folio's insertion time tell; folio_mark_accessed says that a folio was used
(6.1's filemap_read marks every folio it copies from) but not whether the
read found it cached.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core import cachestat_abi as cabi
from ..core import cliutil
from ..core import prefetch_features as PF
from ..core.errors import IobridgeError
from . import blockdev, bpf, system

log = logging.getLogger(__name__)

PAGE_KB = 4
DEFAULT_RINGBUF_PAGES = 256
MAX_INTERVAL_S = 86400.0
MAX_COUNT = 1_000_000_000
MAX_TOP = 10_000
KRETPROBE_MAXACTIVE = 256          # tasks that may be inside a probed call at once
EVENT_DTYPE = np.dtype(cabi.CacheEvent)
# For tests of the refusal path: hooks to treat as missing (comma-separated).
HIDE_ENV = "IOBRIDGE_CACHESTAT_HIDE_HOOKS"
TRACEFS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))


@dataclass(frozen=True)
class Role:
    """One thing the observer watches, and the hooks that can give it, in
    order of preference (("tracepoint", "sys:event") or ("kprobe", "fn"))."""

    name: str
    required: bool
    choices: tuple[tuple[str, str], ...]


ROLES = (
    Role("readahead", True, (("kprobe", "page_cache_ra_unbounded"),)),
    Role("readahead-order", False, (("kprobe", "page_cache_ra_order"),)),
    Role("sync-ra", False, (("kprobe", "page_cache_sync_ra"),)),
    Role("async-ra", False, (("kprobe", "page_cache_async_ra"),)),
    Role("insertion", True, (("tracepoint", "filemap:mm_filemap_add_to_page_cache"),
                             ("kprobe", "filemap_add_folio"))),
    Role("read", False, (("kprobe", "filemap_get_pages"),)),
    Role("use", False, (("kprobe", "folio_mark_accessed"),)),
    Role("removal", True, (("tracepoint", "filemap:mm_filemap_delete_from_page_cache"),
                           ("kprobe", "__filemap_remove_folio"))),
    Role("refault", False, (("kprobe", "workingset_refault"),)),
)

# kprobe target -> (entry program, return program or None)
KPROBE_PROGRAMS = {
    "page_cache_ra_unbounded": ("on_ra_unbounded", "on_ra_return"),
    "page_cache_ra_order": ("on_ra_order", "on_ra_return"),
    "page_cache_sync_ra": ("on_sync_ra", None),
    "page_cache_async_ra": ("on_async_ra", None),
    "filemap_add_folio": ("on_add_folio", "on_add_folio_return"),
    "filemap_get_pages": ("on_get_pages", "on_get_pages_return"),
    "folio_mark_accessed": ("on_mark_accessed", None),
    "__filemap_remove_folio": ("on_remove_folio", None),
    "workingset_refault": ("on_refault", None),
}
# tracepoint -> the cflag that compiles its program in
TRACEPOINT_FLAGS = {
    "filemap:mm_filemap_add_to_page_cache": "-DIOBRIDGE_INSERT_TP",
    "filemap:mm_filemap_delete_from_page_cache": "-DIOBRIDGE_REMOVE_TP",
}


def _describe(how: str, target: str) -> str:
    return f"{how} {target}"


def resolve_hooks(symbols, tracepoints, hidden=frozenset()) -> tuple[dict, list]:
    """Pick a hook per role. `symbols`: function names in kallsyms;
    `tracepoints`: "sys:event" names; `hidden`: names to treat as absent.

    Returns ({role: (how, target)}, [missing optional roles]); raises an
    IobridgeError naming every missing required role and what would serve."""
    plan, missing, fatal = {}, [], []
    for role in ROLES:
        for how, target in role.choices:
            present = (target in tracepoints) if how == "tracepoint" else (target in symbols)
            if present and target not in hidden:
                plan[role.name] = (how, target)
                break
        else:
            (fatal if role.required else missing).append(role)
    if fatal:
        what = "; ".join(f"{r.name} ({' or '.join(_describe(*c) for c in r.choices)})"
                         for r in fatal)
        raise IobridgeError(f"this kernel lacks page-cache hooks the observer needs: {what}",
                            "cachestat supports Linux 5.18 and later (folio page cache)")
    return plan, [r.name for r in missing]


def hooks_line(plan: dict, missing: list) -> str:
    """The one line saying which hooks are used and which are missing."""
    used = ", ".join(f"{role}={how}:{target}" for role, (how, target) in plan.items())
    return f"page-cache hooks: {used}; missing: {', '.join(missing) if missing else 'none'}"


def kernel_symbols(path: Path = Path("/proc/kallsyms")) -> set[str]:
    """Names of the kernel's text symbols (exact names: a `.isra`/`.constprop`
    clone has other arguments, so it does not count)."""
    names = set()
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[1] in ("t", "T"):
                    names.add(parts[2])
    except OSError as err:
        raise IobridgeError(f"cannot read {path}: {err.strerror}") from err
    return names


def kernel_tracepoints(wanted) -> set[str]:
    """Which of the `wanted` "sys:event" tracepoints this kernel has."""
    out = set()
    for tp in wanted:
        sys_, ev = tp.split(":")
        if any((root / "events" / sys_ / ev).is_dir() for root in TRACEFS):
            out.add(tp)
    return out


def header_path() -> Path:
    return bpf.source_path("cachestat").parent / "cachestat.h"


def check_header_version(header: Path | None = None) -> None:
    header = header or header_path()
    found = bpf.header_version(header, "IOBRIDGE_CACHESTAT_VERSION")
    if found != cabi.VERSION:
        raise IobridgeError(f"layout mismatch: {header} has cachestat version {found}, "
                            f"the agent expects {cabi.VERSION}",
                            "use the agent and bpf/ from the same iobridge release")


# --------------------------------------------------------------- the report

@dataclass
class Counters:
    """Cumulative counters of one device or file (struct iobridge_cache_stats)."""

    values: dict
    ra_pages_setting: int = 0
    window: dict | None = None     # the last closed window's aggregates, if any

    @classmethod
    def from_leaf(cls, leaf, epoch: int | None = None) -> "Counters":
        vals = {}
        for name in cabi.COUNTERS:
            v = getattr(leaf, name)
            vals[name] = [int(x) for x in v] if name == "ra_windows" else int(v)
        win = None
        if epoch is not None:
            w = leaf.win[epoch & 1]
            if int(w.epoch) == epoch and int(w.n):
                win = {name: int(getattr(w, name)) for name, _ in cabi.CacheWindow._fields_}
        return cls(vals, int(leaf.ra_pages_setting), win)

    @classmethod
    def empty(cls) -> "Counters":
        return cls({n: [0] * cabi.RA_KINDS if n == "ra_windows" else 0 for n in cabi.COUNTERS})

    def minus(self, before: "Counters") -> "Counters":
        vals = {}
        for n, v in self.values.items():
            b = before.values[n]
            vals[n] = [x - y for x, y in zip(v, b)] if isinstance(v, list) else v - b
        return Counters(vals, self.ra_pages_setting, self.window)


def window_features(win: dict | None, readahead_kb: float) -> dict:
    """KML's features (core/prefetch_features.py, the one definition) and the
    run lengths of one closed window."""
    if not win:
        ws = PF.WindowStats()
        runs = {"seq_run_max": 0, "rev_run_max": 0, "seq_run_mean": 0.0, "rev_run_mean": 0.0,
                "seq_steps": 0, "rev_steps": 0}
    else:
        s2 = (win["s2_hi"] << 64) | win["s2_lo"]
        ws = PF.WindowStats.from_aggregates(win["n"], win["s1"], s2, win["lo"], win["hi"],
                                            win["sad"], 0, win["last"], win["max_fwd"],
                                            win["max_back"])

        def mean(steps, runs):
            return (steps + runs) / runs if runs else (1.0 if win["n"] else 0.0)
        runs = {"seq_run_max": win["seq_run_max"], "rev_run_max": win["rev_run_max"],
                "seq_run_mean": mean(win["seq_steps"], win["seq_runs"]),
                "rev_run_mean": mean(win["rev_steps"], win["rev_runs"]),
                "seq_steps": win["seq_steps"], "rev_steps": win["rev_steps"]}
    feats = dict(zip(PF.FEATURE_NAMES, ws.features(readahead_kb)))
    return {**feats, "direction": ws.direction, "step_over_range": ws.step_over_range, **runs,
            "contended": win["contended"] if win else 0}


def window_front(leaf, epoch: int) -> int | None:
    """The page index last inserted in a file's window of `epoch` while the
    kernel is still filling it (a forward scan's readahead front); None when
    that window has no insertion yet or an update holds its lock (the copy
    could mix two updates)."""
    w = leaf.win[epoch & 1]
    if (w.lock & 1) or w.epoch != (epoch & 0xFFFFFFFF) or not w.n:
        return None
    return int(w.base) + int(w.last)


def ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def report_row(delta: Counters, readahead_kb: float | None, total: Counters | None = None) -> dict:
    """One device's or file's figures for an interval: `delta` its counters
    over the interval (with the interval's window), `total` since start."""
    v = delta.values
    ra_kb = readahead_kb if readahead_kb is not None else delta.ra_pages_setting * PAGE_KB
    row = {k: v[k] for k in cabi.COUNTERS if k != "ra_windows"}
    row["ra_windows"] = dict(zip(cabi.RA_KIND_NAMES, v["ra_windows"]))
    row["misses"] = v["reads"] - v["hits"]
    row["hit_ratio"] = ratio(v["hits"], v["reads"])
    row["removed"] = v["removed_used"] + v["removed_unused"] + v["removed_untracked"]
    row["wasted_kb"] = v["ra_unused_removed"] * PAGE_KB
    tv = (total or delta).values
    # used / prefetched: readahead pages used so far over those prefetched
    row["ra_accuracy"] = ratio(tv["ra_used"], tv["ra_pages"])
    row["readahead_kb"] = ra_kb
    row["window"] = window_features(delta.window, ra_kb)
    return row


def device_readahead_kb(dev: int, sysfs: Path = Path("/sys/dev/block")) -> float | None:
    """read_ahead_kb of a block device (None for a file system without one)."""
    major, minor = blockdev.kdev_split(dev)
    try:
        return float((sysfs / f"{major}:{minor}" / "queue" / "read_ahead_kb").read_text())
    except (OSError, ValueError):
        return None


def dev_label(dev: int) -> str:
    return blockdev.name_of(dev)


def open_holders(want, proc: Path = Path("/proc"), skip_pid: int | None = None):
    """Yield (key, pid, fd, path) for every open descriptor, in /proc/PID/fd,
    of a file whose (dev, inode) key is in `want` (kernel dev_t encoding, as
    the observer keys files), but not process `skip_pid`'s. Processes and
    descriptors that go away during the scan are skipped. The one /proc scan
    both PathCache and the prefetch actuators (kernel/readahead.py) use."""
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit() and p != str(skip_pid)]
    except OSError:
        return
    for pid in pids:
        fd_dir = proc / pid / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(fd_dir / fd)
                key = (blockdev.kdev(os.major(st.st_dev), os.minor(st.st_dev)), st.st_ino)
                if key in want:
                    yield key, int(pid), int(fd), os.readlink(fd_dir / fd)
            except OSError:
                continue


class PathCache:
    """Paths of (dev, inode) pairs, looked up in open descriptors (/proc/*/fd)
    when asked for ones not seen yet, at most once per `min_gap_s`."""

    def __init__(self, proc: Path = Path("/proc"), min_gap_s: float = 5.0):
        self.proc, self.min_gap_s = proc, min_gap_s
        self.known: dict[tuple[int, int], str] = {}
        self._last = -1e9

    def lookup(self, files) -> dict:
        want = {f for f in files if f not in self.known}
        if want and time.monotonic() - self._last >= self.min_gap_s:
            self._last = time.monotonic()
            self._scan(want)
        return {f: self.known.get(f) for f in files}

    def _scan(self, want: set) -> None:
        for key, _pid, _fd, path in open_holders(want, self.proc):
            if key in want:
                self.known[key] = path
                want.discard(key)
                if not want:
                    return


# --------------------------------------------------------------- the loader

class CacheObserver:
    """The loaded page-cache observer. Use as a context manager."""

    def __init__(self, stream: bool = False, ringbuf_pages: int = DEFAULT_RINGBUF_PAGES):
        self.stream = stream
        self.ringbuf_pages = ringbuf_pages
        self.bpf = None
        self.plan: dict = {}
        self.missing: list = []
        self.compile_seconds: float | None = None
        self.epoch = 0
        self._ring: bpf.EventRing | None = None

    def open(self) -> "CacheObserver":
        what = "observing the page cache"
        system.require_root(what)
        system.require_bpf_kernel()
        system.import_bcc()
        check_header_version()
        hidden = frozenset(h for h in os.environ.get(HIDE_ENV, "").split(",") if h)
        wanted_tps = [t for r in ROLES for how, t in r.choices if how == "tracepoint"]
        self.plan, self.missing = resolve_hooks(kernel_symbols(), kernel_tracepoints(wanted_tps),
                                                hidden)
        line = hooks_line(self.plan, self.missing)
        (log.warning if self.missing else log.info)(line)
        cflags = [f"-DIOBRIDGE_RINGBUF_PAGES={self.ringbuf_pages}"]
        cflags += [TRACEPOINT_FLAGS[t] for how, t in self.plan.values() if how == "tracepoint"]
        self.bpf, self.compile_seconds = bpf.compile_program(
            "cachestat", "the page-cache observer", tuple(cflags), kernel_structs=True)
        try:
            for how, target in self.plan.values():
                if how != "kprobe":
                    continue
                entry, ret = KPROBE_PROGRAMS[target]
                self.bpf.attach_kprobe(event=target.encode(), fn_name=entry.encode())
                if ret:
                    self.bpf.attach_kretprobe(event=target.encode(), fn_name=ret.encode(),
                                              maxactive=KRETPROBE_MAXACTIVE)
            self._write_config()
            if self.stream:
                self._ring = bpf.EventRing(self.bpf, "events", EVENT_DTYPE)
        except Exception as err:
            self.close()
            if isinstance(err, IobridgeError):
                raise
            raise IobridgeError(f"could not attach the page-cache observer: {err}",
                                "run with -vv and check the kernel log (dmesg)") from err
        return self

    def _write_config(self) -> None:
        self.bpf[b"config"][ctypes.c_int(0)] = cabi.CacheConfig(epoch=self.epoch,
                                                                stream=int(self.stream))

    def close(self) -> None:
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()

    @property
    def hooks(self) -> str:
        return hooks_line(self.plan, self.missing)

    def next_window(self) -> int:
        """Close the current feature window (the kernel starts the next);
        returns the closed window's epoch, to pass to snapshot()."""
        closed = self.epoch
        self.epoch = (self.epoch + 1) & 0xFFFFFFFF
        self._write_config()
        return closed

    def snapshot(self, epoch: int | None = None) -> tuple[dict, dict]:
        """Cumulative counters per device {dev: Counters} and per file
        {(dev, ino): Counters}; with `epoch`, each carries that window."""
        devs = {int(k.value): Counters.from_leaf(v, epoch) for k, v in self.bpf[b"dev_stats"].items()}
        files = {(int(k.dev), int(k.ino)): Counters.from_leaf(v, epoch)
                 for k, v in self.bpf[b"file_stats"].items()}
        return devs, files

    def forget_files(self, keys) -> int:
        """Delete the per-file entries of `keys` ((dev, ino) pairs) from the
        kernel's map; returns how many there were. For files idle long enough
        that their counts no longer matter to the caller: every file the
        page cache touches gets an entry and keeps it, so without this a
        window's snapshot reads every file seen since the start. A file
        active again starts from zero."""
        table = self.bpf[b"file_stats"]
        n = 0
        for dev, ino in keys:
            try:
                del table[cabi.CacheFileKey(dev=dev, ino=ino)]
                n += 1
            except KeyError:
                pass
        return n

    def file_front(self, key) -> int | None:
        """The page index file `key` (dev, ino) last inserted in the open
        window (window_front), read from the map now; None without one."""
        try:
            leaf = self.bpf[b"file_stats"][cabi.CacheFileKey(dev=key[0], ino=key[1])]
        except KeyError:
            return None
        return window_front(leaf, self.epoch)

    def _percpu_sum(self, name: str) -> int:
        return bpf.percpu_sum(self.bpf, name)

    def dropped_events(self) -> int:
        return self._percpu_sum("dropped")

    def files_untracked(self) -> int:
        return self._percpu_sum("files_untracked")

    def poll_events(self, timeout_ms: int = 0, max_seconds: float = 0.5) -> np.ndarray:
        if not self.stream:
            raise IobridgeError("the page-cache observer was opened without --events")
        return self._ring.poll(timeout_ms, max_seconds)


# --------------------------------------------------------------------- CLI

def interval_report(prev: tuple[dict, dict], now: tuple[dict, dict], top: int,
                    paths: PathCache | None = None, totals: tuple[dict, dict] | None = None,
                    ra_kb_of=device_readahead_kb) -> dict:
    """Rows per device with activity and the top `top` files (by reads plus
    insertions) of one interval, from two snapshots."""
    (pdev, pfile), (ndev, nfile) = prev, now
    tdev, tfile = totals or now
    devices = {}
    for dev, c in sorted(ndev.items()):
        d = c.minus(pdev.get(dev, Counters.empty()))
        if any(d.values[k] for k in ("insertions", "reads", "marked", "removed_used",
                                     "removed_unused", "removed_untracked", "refaults")) \
                or d.window:
            devices[dev_label(dev)] = {"dev": "%d:%d" % blockdev.kdev_split(dev),
                                       **report_row(d, ra_kb_of(dev), tdev.get(dev))}
    rows = []
    for key, c in nfile.items():
        d = c.minus(pfile.get(key, Counters.empty()))
        activity = d.values["reads"] + d.values["insertions"] + d.values["removed_used"] \
            + d.values["removed_unused"] + d.values["removed_untracked"]
        if activity:
            rows.append((activity, key, d))
    rows.sort(key=lambda r: (-r[0], r[1]))
    rows = rows[:top]
    names = paths.lookup([k for _, k, _ in rows]) if paths else {}
    files = []
    for _, (dev, ino), d in rows:
        files.append({"file": "%d:%d:%d" % (*blockdev.kdev_split(dev), ino),
                      "device": dev_label(dev), "ino": ino, "path": names.get((dev, ino)),
                      **report_row(d, None, tfile.get((dev, ino)))})
    return {"devices": devices, "files": files}


def _pct(v) -> str:
    return f"{100 * v:6.1f}" if v is not None else f"{'-':>6}"


HEADER = (f"{'':<26} {'READS':>8} {'HIT%':>6} {'INSERTS':>8} {'RA_PAGES':>8} {'RA_WIN':>6} "
          f"{'RA_ACC%':>7} {'EVICT_U':>8} {'EVICT_UNU':>9} {'RA_WASTE':>8} {'REFAULTS':>8}")


def format_row(name: str, r: dict) -> str:
    wins = sum(r["ra_windows"].values())
    return (f"{name[:26]:<26} {r['reads']:8d} {_pct(r['hit_ratio'])} {r['insertions']:8d} "
            f"{r['ra_pages']:8d} {wins:6d} {_pct(r['ra_accuracy']):>7} {r['removed_used']:8d} "
            f"{r['removed_unused']:9d} {r['ra_unused_removed']:8d} {r['refaults']:8d}")


def format_event(e) -> dict:
    kind = int(e["kind"])
    flags = int(e["flags"])
    out = {"ts_ns": int(e["ts_ns"]), "event": cabi.CEV_NAMES[kind] if kind < len(cabi.CEV_NAMES)
           else str(kind), "dev": "%d:%d" % blockdev.kdev_split(int(e["dev"])),
           "ino": int(e["ino"]), "index": int(e["index"]), "pages": int(e["nr_pages"]),
           "tid": int(e["pid"])}
    if kind == cabi.CEV_WINDOW:
        out["ra"] = cabi.RA_KIND_NAMES[flags] if flags < cabi.RA_KINDS else str(flags)
    else:
        out["readahead"] = bool(flags & cabi.PAGE_READAHEAD)
        out["used"] = bool(flags & cabi.PAGE_USED)
        if kind == cabi.CEV_READ:
            out["hit"] = bool(flags & cabi.CEV_HIT)
    return out


def _cmd_cachestat(args) -> int:
    obs = CacheObserver(stream=args.events)
    stopping = []

    def on_term(*_):
        # Also a flag the loop checks: raised inside BCC's ring-buffer
        # callback, the exception is dropped by ctypes and the command went
        # on until a second signal (a test timed out waiting, 6.12).
        stopping.append(True)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGTERM, on_term)
    paths = PathCache()
    with obs:
        obs.next_window()
        prev = obs.snapshot()
        t_prev = time.monotonic()
        # Said once counting has begun: all page-cache activity from here on
        # is reported.
        print(f"iobridge cachestat: attached (compiled in {obs.compile_seconds:.1f}s); "
              f"{obs.hooks}; Ctrl-C to stop", file=sys.stderr, flush=True)
        n = 0
        try:
            while (args.count is None or n < args.count) and not stopping:
                if args.events:
                    end = time.monotonic() + args.interval
                    while time.monotonic() < end and not stopping:
                        _print_events(obs.poll_events(timeout_ms=100), args.json)
                else:
                    time.sleep(args.interval)
                closed = obs.next_window()
                now = obs.snapshot(closed)
                if args.events:
                    # The kernel emits an insertion's event before it counts
                    # it: every page a report counts as inserted has its
                    # event printed above it.
                    _print_events(obs.poll_events(timeout_ms=0), args.json)
                t_now = time.monotonic()
                n += 1
                rep = interval_report(prev, now, args.top, paths, totals=now)
                rep.update({"time": time.time(), "interval_s": round(t_now - t_prev, 3),
                            "dropped_events": obs.dropped_events(),
                            "files_untracked": obs.files_untracked()})
                if args.json:
                    print(json.dumps(rep), flush=True)
                else:
                    _print_report(rep)
                prev, t_prev = now, t_now
        except KeyboardInterrupt:
            pass
        if args.events:
            _print_events(obs.poll_events(timeout_ms=0), args.json)
        dropped = obs.dropped_events()
    if args.events and not args.json:
        print(f"events dropped in the kernel: {dropped}", file=sys.stderr)
    return 0


def _print_events(events, as_json: bool) -> None:
    for e in events:
        ev = format_event(e)
        if as_json:
            print(json.dumps({"event": ev}))
        else:
            extra = " ".join(f"{k}={v}" for k, v in ev.items()
                             if k not in ("ts_ns", "event", "dev", "ino", "index", "pages"))
            print(f"{ev['ts_ns']} {ev['event']:<7} {ev['dev']}:{ev['ino']} "
                  f"index {ev['index']} pages {ev['pages']} {extra}")
    sys.stdout.flush()


def _print_report(rep: dict) -> None:
    print(time.strftime("%H:%M:%S"), HEADER)
    for name, r in rep["devices"].items():
        print("        ", format_row(name, r))
    if rep["files"]:
        for f in rep["files"]:
            label = f["path"] or f["file"]
            print("        ", format_row("  " + label, f))
    if rep["dropped_events"]:
        print(f"         (events dropped in the kernel so far: {rep['dropped_events']})")
    sys.stdout.flush()


def register_cli(sub) -> None:
    p = sub.add_parser(
        "cachestat", help="page-cache hits, readahead and evictions per device and file (BPF)",
        description="Attaches the page-cache observer (BPF: readahead, insertion, read, "
        "access, removal and refault hooks resolved on the running kernel) and prints, every "
        "interval, per device (the file system's device) and for the top files: folios read "
        "and the hit ratio (cached before the read began), pages inserted, readahead pages "
        "(prefetched beyond what the read asked for) and windows, readahead accuracy (used / "
        "prefetched, since start), pages removed used and unused, unused readahead removed "
        "(wasted) and refaults. --json adds KML's per-window features and run lengths. "
        "Needs root and the running kernel's headers; inside the test VM: "
        "iobridge vm run -- iobridge cachestat ...",
        parents=[cliutil.json_parent()],
        **cliutil.examples(
            ("sudo iobridge cachestat", "every second, until Ctrl-C"),
            ("sudo iobridge cachestat --interval 5 --count 3", "every 5 s, 3 times"),
            ("sudo iobridge cachestat --top 20", "the 20 busiest files too"),
            ("sudo iobridge cachestat --json --count 10", "10 JSON objects, one a line"),
            ("sudo iobridge cachestat --events", "every page-cache event as well"),
            ("iobridge vm run -- iobridge cachestat --count 5", "in the test VM")))
    p.add_argument("--interval", type=cliutil.positive_float(MAX_INTERVAL_S), default=1.0,
                   metavar="S", help="seconds between reports (default 1)")
    p.add_argument("--count", type=cliutil.positive_int(MAX_COUNT), default=None, metavar="N",
                   help="stop after N reports (default: until Ctrl-C)")
    p.add_argument("--top", type=cliutil.int_range(0, MAX_TOP), default=10, metavar="N",
                   help="show the N files with most activity per interval (default 10; 0: none)")
    p.add_argument("--events", action="store_true",
                   help="also print every page-cache event (ring buffer; drops are counted)")
    p.set_defaults(func=_cmd_cachestat)
