"""The prefetch unit: one observe/act unit of the agent (like a bpftune
tuner). Every window (prefetch.window_s, default 1 s) it closes the
page-cache observer's feature window (kernel/cachestat.py), classifies each
stream, device and file, with a classifier object (`classify(feats,
has_writes, direction)` -> class index or None, and `describe()`: the ONNX
prefetch model's LearnedClassifier by default, or the rule-based
RuleClassifier; classifier_for picks one from config prefetch.model), and
acts through kernel/readahead.py:

- a device whose active files show one pattern (or none classified) gets
  the class's read_ahead_kb (core/prefetch_features.CLASS_READAHEAD_KB,
  scaled by feedback), and its active files are advised NORMAL so that
  already-open files re-copy the new value;
- where files on one device differ (a sequential scanner beside a random
  reader), each file is advised on its own: SEQUENTIAL, RANDOM, or NORMAL
  for a reverse scan; and the device is set for the class among its files
  that reads ahead the most (with its feedback and growth), since a file
  advised RANDOM reads no more than it asks for whatever the device's
  value (left as it was, the device kept whatever an earlier window of one
  pattern had set: 32 KiB for a scanner beside a random reader in `bench
  prefetch`, 0.57x the kernel default's throughput);
- a reverse scan gets WILLNEED, in chunks, for the extent below it (Linux's
  readahead does nothing for backward scans);
- a sequential scan whose pages are not re-read gets its consumed pages
  dropped (DONTNEED), so it does not evict a random reader's working set:
  at each window, and every DROP_TICK_S between windows behind its
  readahead front (the page it last inserted, read from the observer's
  open window), since a scanner fills a memory-limited cgroup many times
  over within one window.

Per-device only (`prefetch.device_only`, default off; KML-like, what
`iobridge bench prefetch` compares as policy (c)): each device is classified
from its own window alone and gets its class's read_ahead_kb, with no
feedback, no per-file advice, no WILLNEED and no drop-behind; its active
files are still advised NORMAL after a change, since an open file keeps the
value it copied at open otherwise (the device's value reaching the file is
what a per-device setting means).

A check on the classifier: a scan verdict (sequential or reverse) on a
window whose steps average a tenth of the range read or more is taken as
random (core/prefetch_features.WindowStats.step_over_range, about 1/3 for
random reads of a file of any size): KML's features grow with the file's
size, and a model fitted on one size can call a random reader of another a
scan. Not in device-only mode (KML has no such check).

Feedback (on top of the classifier): a stream whose prefetched pages were
evicted unused in the window gets less readahead next window (a device's
value is halved, a file's advice steps down SEQUENTIAL -> NORMAL ->
RANDOM; both recover one step per clean window); a device set for
sequential streams (its own class, or its files' one class) whose
prefetched pages were used (three in four or more), none evicted unused,
gets 1024 KiB at once, in the window that sets it for them (a class's value
comes from a short sweep and can be far too small: the shipped model's
sequential class has 32 KiB; growing in steps left an 8 s scan three
windows short of it), and loses the growth in the first window where fewer
are used or when set for another class; a stream whose pages
refault gets its drop-behind stopped for good.

Every change is logged at debug level with its reason (old -> new, which
stream, which features). In shadow mode the unit decides and logs, and
changes nothing. Before its first change to a device or a process's file,
the unit records the original setting in a state file (written atomically,
like the pins: state the agent must undo after a kill -9), restores them
all on stop, and a start finding a record left by a killed agent restores
from it first.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..core import prefetch_features as PF
from ..core.errors import IobridgeError
from ..core.outfiles import atomic_output
from ..kernel import blockdev
from ..kernel import cachestat as cs
from ..kernel.readahead import Actuators, FileGone

log = logging.getLogger("iobridge.prefetch")

MODES = ("off", "shadow", "on")
RECORD_VERSION = 1
MAX_FILES = 64               # files considered per window (most insertions first)
FORGET_WINDOWS = 30          # a stream idle this long loses its feedback state
# A file whose counters did not move for this many windows (and that has no
# stream state, no forced setting and no drop-behind) has its entry deleted
# from the observer's map. Each window reads every entry (two syscalls and a
# conversion each); with every file the page cache touched since the start
# kept (compilers' headers, libraries, past runs' files) that cost grew to
# most of the agent's CPU under emulation.
PRUNE_IDLE_WINDOWS = 10
WASTE_FRACTION = 0.10        # unused evictions over prefetched pages that cut readahead
MIN_WASTE_PAGES = 8
MIN_SCALE = 1 / 16
# A device set for sequential streams whose prefetched pages are used, none
# evicted unused, gets MAX_GROWN_KB: a class's readahead comes from a short,
# noisy sweep (the shipped model's sequential class got 32 KiB), while fio
# and db_bench sequential reads ran fastest at 1024 KiB here. At once, in
# the window whose evidence shows it (the kernel's own readahead used): in
# steps of 4x, 32 -> 1024 KiB took three windows after the first, and an
# 8 s scan in bench prefetch ran at 0.82x the best static setting. Waste
# halves it again.
GROW_USED_FRACTION = 0.75    # used over prefetched pages in the window
MIN_GROW_PAGES = 64          # prefetched in the window (256 KiB)
MAX_GROWN_KB = 1024
REREAD_FACTOR = 1.25         # reads over insertions above which pages count as re-read
MIN_DROP_PAGES = 256         # drop-behind in pieces of at least 1 MiB
# Between windows, a scan set for drop-behind has what its readahead front
# left behind dropped every DROP_TICK_S: once a window let a scanner at
# 60-90 MB/s fill a 48 MB cgroup between drops, and a random reader beside
# it (24 MB) kept no page until it read it again (0 hits in bench prefetch's
# mixed case under every policy). The pages kept below the front: the
# readahead the reader may still be in (SEQUENTIAL doubles the device's
# value, and the kernel reads one window ahead of the one being read: up
# to 4x behind the front), and one more for margin.
DROP_TICK_S = 0.1
KEEP_BEHIND_FRONT = 5        # x the device's readahead, in pages
MAX_WILLNEED_PAGES = 4096    # 16 MiB ahead of a reverse scan per window at most
PAGE_KB = 4
# A scan's steps are a few pages (or a readahead chunk) against the range it
# covers; random reads step about 1/3 of it (WindowStats.step_over_range).
# A scan verdict on a window stepping this much or more is taken as random:
# the shipped model, fitted on 192 MB files, called a random reader of a
# 24 MB file reverse or sequential (KML's features grow with the file), and
# its flapping advice and WILLNEED cost that reader a fifth of its reads.
MIN_RANDOM_STEP = 0.1
# A file's advice steps, from least to most readahead (feedback moves along it).
LADDER = ("random", "normal", "sequential")
# Each class's per-file advice where files on a device differ; a reverse
# scan keeps NORMAL and gets WILLNEED instead (readahead only goes forward).
CLASS_ADVICE = {"random": "random", "random+write": "random", "sequential": "sequential",
                "reverse": "normal"}


def classifier_for(model, check: bool = True):
    """The classifier config prefetch.model names: "rules" -> RuleClassifier,
    a path -> LearnedClassifier of that ONNX model, checked as kind prefetch
    (with `check`: a missing, broken or wrong-kind model raises
    ModelCheckError with the reason)."""
    from .config import is_rules  # noqa: PLC0415
    if is_rules(model):
        from ..core.prefetch_rules import RuleClassifier  # noqa: PLC0415
        return RuleClassifier()
    from ..core.prefetch_model import LearnedClassifier  # noqa: PLC0415 (onnxruntime: slow import)
    return LearnedClassifier(model, check=check)


def classifier_info(classifier) -> dict:
    """What status shows of a classifier: its name, and a model's path and sha256."""
    sha = getattr(classifier, "sha256", None)
    return {"name": getattr(classifier, "name", type(classifier).__name__),
            "path": str(classifier.path) if sha else None, "sha256": sha}


def dev_label(dev: int) -> str:
    return "%d:%d" % blockdev.kdev_split(dev)


def stream_label(key) -> str:
    return f"device {dev_label(key)}" if isinstance(key, int) else \
        f"file {dev_label(key[0])}:{key[1]}"


@dataclass
class Window:
    """One stream's closed window, as the decision rules see it."""
    key: object                  # dev (int) or (dev, ino)
    feats: tuple                 # PF.FEATURE_NAMES order
    direction: float
    has_writes: bool = False     # the observer does not see writes: always False now
    insertions: int = 0
    reads: int = 0
    ra_pages: int = 0
    ra_wasted: int = 0           # readahead pages evicted unused in the window
    refaults: int = 0
    lo: int | None = None        # lowest and last page index inserted (absolute)
    last: int | None = None
    ra_used: int = 0             # prefetched pages first used in the window
    step_over_range: float = 0.0   # WindowStats.step_over_range: ~1/3 random, ~0 a scan

    def readahead_used(self) -> bool | None:
        """Whether the pages prefetched in the window were used (3 in 4 or
        more); None when too few were prefetched to tell."""
        if self.ra_pages < MIN_GROW_PAGES:
            return None
        return self.ra_used >= GROW_USED_FRACTION * self.ra_pages

    def brief(self) -> str:
        f = self.feats
        return (f"events {f[0]:.0f}, var/range {f[1]:.2f}, mean|delta| {f[3]:.2f}, "
                f"ra {f[4]:.3f}, direction {self.direction:+.2f}")


def window_of(key, delta: cs.Counters, readahead_kb: float) -> Window:
    """A Window from the observer's counters over one window (`delta`, with
    the closed window's aggregates)."""
    wf = cs.window_features(delta.window, readahead_kb)
    v = delta.values
    w = delta.window
    lo = last = None
    if w and w["n"]:
        lo, last = w["base"] + w["lo"], w["base"] + w["last"]
    return Window(key, tuple(wf[n] for n in PF.FEATURE_NAMES), wf["direction"], False,
                  v["insertions"], v["reads"], v["ra_pages"], v["ra_unused_removed"],
                  v["refaults"], lo, last, v["ra_used"], wf["step_over_range"])


@dataclass
class Stream:
    """What the unit remembers of one stream between windows."""
    cls: str | None = None
    scale: float = 1.0           # device: multiple of the class's readahead (> 1: grown)
    grow: bool = False           # device: this window's evidence allows growth
    ra_cls: str | None = None    # device: the class its read_ahead_kb is set for now
    demote: int = 0              # file: steps down the LADDER
    advice: str | None = None    # file: the advice it last got from us
    drop_behind: bool = True     # off for good once its pages refault
    dropped_to: int = 0          # file: pages below this were dropped
    drop_now: bool = False       # file: set for drop-behind by this window (ticks drop too)
    willneed_low: int | None = None   # file: lowest page WILLNEED already asked for
    seen: int = 0                # window number last seen


@dataclass
class Action:
    kind: str                    # device_ra, advise, willneed, dontneed
    key: object
    old: object
    new: object
    reason: str
    extent: tuple = ()           # (first page, pages) for willneed / dontneed

    def line(self) -> str:
        ext = f" pages {self.extent[0]}+{self.extent[1]}" if self.extent else ""
        return (f"prefetch: {stream_label(self.key)}: {self.kind} {self.old} -> {self.new}"
                f"{ext}: {self.reason}")


def _cls_name(c) -> str | None:
    return None if c is None else PF.PREFETCH_CLASSES[c]


class Decider:
    """The decision and feedback rules, pure: windows in, actions out; the
    streams' state is kept here between windows."""

    def __init__(self, classifier, device_only: bool = False):
        self.classifier = classifier
        self.device_only = device_only    # KML-like: the device's read_ahead_kb only
        self.streams: dict = {}
        self.window_no = 0
        self.classified = 0          # stream windows the classifier gave a class

    def stream(self, key) -> Stream:
        s = self.streams.get(key)
        if s is None:
            s = self.streams[key] = Stream()
        s.seen = self.window_no
        return s

    def _classify(self, key, w: Window, is_file: bool, force: dict, notes: dict):
        """A stream's feedback notes (into `notes`), then its class, forced
        or the classifier's, kept on the stream and returned."""
        s = self.stream(key)
        notes[key] = self._feedback(w, s, is_file)
        if key in force:
            s.cls = force[key]
            return s.cls
        s.cls = _cls_name(self.classifier.classify(w.feats, w.has_writes, w.direction))
        self.classified += s.cls is not None
        if s.cls in ("sequential", "reverse") and w.step_over_range >= MIN_RANDOM_STEP:
            said, s.cls = s.cls, "random+write" if w.has_writes else "random"
            notes[key].append(f"the classifier said {said}, but steps average "
                              f"{w.step_over_range:.2f} of the range read: {s.cls}")
        return s.cls

    def class_kb(self, cls: str) -> int:
        """A class's readahead: the classifier's own map if it has one (a
        learned model's comes from its sweep), else KML's."""
        table = getattr(self.classifier, "class_readahead_kb", PF.CLASS_READAHEAD_KB)
        return table[PF.PREFETCH_CLASSES.index(cls)]

    def _feedback(self, w: Window, s: Stream, is_file: bool) -> list[str]:
        """Apply the feedback rules of one window to a stream; returns why.
        Growth is decided in _device, which knows the class set now."""
        why = []
        # not after a cut: a device recovering from waste only steps back up
        s.grow = (not is_file and s.scale >= 1 and not w.ra_wasted
                  and w.readahead_used() is True)
        if not is_file and s.scale > 1 and w.readahead_used() is False:
            # growth holds only while its evidence does (a random phase after
            # a scan must not inherit the scan's readahead)
            s.scale = 1.0
            why.append(f"only {w.ra_used} of {w.ra_pages} prefetched pages used: growth undone")
        if w.ra_wasted >= MIN_WASTE_PAGES and w.ra_wasted > WASTE_FRACTION * max(w.ra_pages, 1):
            if is_file:
                s.demote = min(s.demote + 1, len(LADDER) - 1)
            else:
                s.scale = max(s.scale / 2, MIN_SCALE)
            why.append(f"{w.ra_wasted} prefetched pages evicted unused (of {w.ra_pages} "
                       "prefetched): less readahead")
        elif w.ra_pages and not w.ra_wasted:
            if is_file and s.demote:
                s.demote -= 1
                why.append("no prefetched page evicted unused: one step more readahead")
            elif not is_file and s.scale < 1:
                s.scale = min(s.scale * 2, 1.0)
                why.append("no prefetched page evicted unused: readahead scale up")
        if w.refaults and s.drop_behind:
            s.drop_behind = False
            why.append(f"{w.refaults} refaults: drop-behind stopped")
        return why

    def decide(self, devs: dict, files: dict, device_kb: dict, force: dict | None = None) -> list:
        """Actions for one window. `devs` {dev: Window}, `files` {(dev, ino):
        Window}, `device_kb` {dev: read_ahead_kb now (None: no block device)},
        `force` {dev or (dev, ino): class name} overrides the classifier (an
        operator's or a test's decision; a forced file is advised on its own)."""
        self.window_no += 1
        force = force or {}
        for st in self.streams.values():
            st.drop_now = False          # each window decides it again
        if self.device_only:
            return self._decide_device_only(devs, files, device_kb, force)
        actions: list[Action] = []
        notes: dict = {}
        dev_cls: dict = {}
        for dev, w in devs.items():
            dev_cls[dev] = self._classify(dev, w, False, force, notes)
        for dev, c in force.items():
            if isinstance(dev, int) and dev not in dev_cls:
                dev_cls[dev] = c
                self.stream(dev).cls = c
        file_cls: dict = {}
        for key, w in files.items():
            c = self._classify(key, w, True, force, notes)
            if c is not None:
                file_cls[key] = c
        for key, c in force.items():
            if isinstance(key, tuple) and key not in file_cls:
                file_cls[key] = c
                self.stream(key).cls = c
        by_dev: dict = {}
        for key, c in file_cls.items():
            by_dev.setdefault(key[0], {})[key] = c
        for dev in sorted(set(dev_cls) | set(by_dev)):
            fc = by_dev.get(dev, {})
            differ = len({CLASS_ADVICE[c] for c in fc.values()}) > 1
            mixed = differ or any(k in force for k in fc)
            # The files' own windows say more than the device's, where
            # several streams interleave (two sequential scans look random
            # together); the device's class serves when no file has one.
            if dev in force:
                dominant = force[dev]
            elif fc and not mixed:
                dominant = max(fc.values(), key=list(fc.values()).count)
            elif differ:
                # each file is advised on its own below: the device serves
                # the one that reads ahead the most
                dominant = max(sorted(fc.values()), key=self.class_kb)
            else:
                dominant = dev_cls.get(dev)
            if dominant is not None and (not mixed or differ or dev in force):
                why = notes.get(dev, []) + (["files on it differ: set for the class that reads "
                                             "ahead most"] if differ and dev not in force else [])
                actions += self._device(dev, dominant, device_kb.get(dev), devs.get(dev), why,
                                        fc if not mixed else {})
            elif dev in self.streams:
                self.streams[dev].ra_cls = None   # the device is not set for one pattern
            if mixed:
                for key, c in sorted(fc.items()):
                    actions += self._file_advice(key, c, files.get(key), notes.get(key, []),
                                                 key in force)
            for key, c in sorted(fc.items()):
                w = files.get(key)
                if w is None or w.lo is None:
                    continue
                if c == "reverse":
                    actions += self._willneed(key, w, device_kb.get(dev))
                elif c == "sequential":
                    actions += self._drop_behind(key, w, device_kb.get(dev))
        for key, why in notes.items():
            if why and not any(a.key == key for a in actions):
                log.debug("prefetch: %s: %s (no change)", stream_label(key), "; ".join(why))
        self._forget()
        return actions

    def _decide_device_only(self, devs: dict, files: dict, device_kb: dict, force: dict) -> list:
        """KML-like: each device's class from its own window (or forced), its
        class's read_ahead_kb; no feedback and no per-file decisions (files
        are only advised NORMAL after a change, to take the device's value)."""
        actions: list[Action] = []
        for dev in sorted(set(devs) | {k for k in force if isinstance(k, int)}):
            s = self.stream(dev)
            if dev in force:
                s.cls = force[dev]
            else:
                w = devs[dev]
                s.cls = _cls_name(self.classifier.classify(w.feats, w.has_writes, w.direction))
                self.classified += s.cls is not None
            if s.cls is None:
                continue
            on_dev = sorted(k for k in files if k[0] == dev)
            for key in on_dev:
                self.stream(key)
            actions += self._device(dev, s.cls, device_kb.get(dev), devs.get(dev), [],
                                    dict.fromkeys(on_dev), follow_only=True)
        self._forget()
        return actions

    def _device(self, dev, cls, kb_now, w, why, files, follow_only: bool = False) -> list:
        if kb_now is None:
            return []          # no block device (tmpfs, ...): files only
        s = self.stream(dev)
        base = self.class_kb(cls)
        if cls != "sequential":
            s.scale = min(s.scale, 1.0)     # growth is for sequential streams only
        elif s.grow and w is not None and base * s.scale < MAX_GROWN_KB:
            s.scale = MAX_GROWN_KB / base
            why = why + [f"{w.ra_used} of {w.ra_pages} prefetched pages used, none evicted "
                         f"unused: readahead grown to {MAX_GROWN_KB} KiB"]
        s.grow = False
        s.ra_cls = cls
        kb = int(base * s.scale) // PAGE_KB * PAGE_KB
        if s.scale > 1:       # grown: only ever from a class value under the cap
            kb = min(kb, MAX_GROWN_KB)
        out = []
        feats = w.brief() if w else "no device window"
        if kb != kb_now:
            out.append(Action("device_ra", dev, kb_now, kb,
                              f"device class {cls} ({feats}); class readahead {base} KiB x "
                              f"scale {s.scale:g}" + (f"; {'; '.join(why)}" if why else "")))
            # open files keep the value they copied at open: NORMAL re-copies it
            for key in sorted(files):
                out.append(Action("advise", key, self.streams[key].advice or "as opened",
                                  "normal", f"follow device {dev_label(dev)}'s new "
                                  f"read_ahead_kb {kb}"))
                self.streams[key].advice = "normal"
        elif not follow_only:
            # files advised on their own earlier follow the device again
            for key in sorted(files):
                st = self.streams[key]
                if st.advice not in (None, "normal"):
                    out.append(Action("advise", key, st.advice, "normal",
                                      f"one pattern ({cls}) on device {dev_label(dev)}: "
                                      "the device's readahead serves it"))
                    st.advice = "normal"
        return out

    def _file_advice(self, key, cls, w, why, forced) -> list:
        s = self.stream(key)
        want = CLASS_ADVICE[cls]
        step = max(LADDER.index(want) - s.demote, 0)
        new = LADDER[step]
        if new == s.advice:
            return []
        feats = w.brief() if w else "no window"
        reason = (f"{'forced ' if forced else ''}class {cls} ({feats}); files on device "
                  f"{dev_label(key[0])} differ")
        if s.demote:
            reason += f"; stepped down {s.demote} for unused prefetches"
        if why:
            reason += "; " + "; ".join(why)
        old, s.advice = s.advice or "as opened", new
        return [Action("advise", key, old, new, reason)]

    def _willneed(self, key, w: Window, kb) -> list:
        """The extent the backward scan reaches next window: as many pages
        below its lowest index as it inserted this window."""
        s = self.stream(key)
        pages = min(max(int(w.insertions), 1), MAX_WILLNEED_PAGES)
        if s.willneed_low is not None and w.lo > s.willneed_low + 2 * pages:
            s.willneed_low = None          # a new pass, from higher up
        low = w.lo if s.willneed_low is None else min(w.lo, s.willneed_low)
        first = max(low - pages, 0)
        if first >= low:
            return []
        s.willneed_low = first
        return [Action("willneed", key, None, "willneed",
                       f"reverse scan ({w.brief()}) at page {w.lo}: the next "
                       f"{low - first} pages below it", (first, low - first))]

    def _drop_behind(self, key, w: Window, kb) -> list:
        s = self.stream(key)
        if not s.drop_behind:
            return []
        if w.reads > REREAD_FACTOR * max(w.insertions, 1):
            return []             # pages are being read again: keep them
        s.drop_now = True
        return self._drop_below(key, s, w.last, kb,
                                f"sequential scan ({w.brief()}), {w.reads} reads of "
                                f"{w.insertions} insertions: pages behind it not re-read")

    def droppers(self) -> list:
        """The files this window set for drop-behind (dropped between windows too)."""
        return sorted(k for k, s in self.streams.items() if s.drop_now)

    def drop_between(self, key, front: int | None, kb) -> list:
        """Between windows: the same drop for a file this window set for
        drop-behind, from its readahead front (`front`, the page it last
        inserted in the open window)."""
        s = self.streams.get(key)
        if s is None or not s.drop_now or front is None:
            return []
        return self._drop_below(key, s, front, kb, "drop-behind between windows")

    @staticmethod
    def _drop_below(key, s: Stream, front: int, kb, why: str) -> list:
        """DONTNEED for the pages more than KEEP_BEHIND_FRONT readahead
        windows below the scan's front, from where the last drop ended."""
        if front < s.dropped_to:
            s.dropped_to = 0               # the scan started again from lower down
        keep = KEEP_BEHIND_FRONT * int((kb or 128) // PAGE_KB)
        end = front - keep
        if end - s.dropped_to < MIN_DROP_PAGES:
            return []
        first, s.dropped_to = s.dropped_to, end
        return [Action("dontneed", key, None, "dontneed",
                       f"{why}: readahead front at page {front}, {keep} pages kept below it",
                       (first, end - first))]

    def _forget(self) -> None:
        old = [k for k, s in self.streams.items() if self.window_no - s.seen > FORGET_WINDOWS]
        for k in old:
            del self.streams[k]

    def classes(self) -> dict:
        out = {c: 0 for c in PF.PREFETCH_CLASSES}
        for s in self.streams.values():
            if s.cls is not None and s.seen == self.window_no:
                out[s.cls] += 1
        return out


# ------------------------------------------------------------- the record

class Record:
    """The original settings the unit changed, in a JSON file written
    atomically before each first change: device read_ahead_kb values, and
    per process descriptor (pid, fd, file) the advice it got. Per-file
    advice cannot be read back from the kernel: restoring a file means
    fadvise NORMAL on it, if that process still has it open (NORMAL
    re-copies the device's read_ahead_kb, so devices are restored first)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.devices: dict = {}      # "maj:min" -> {"dev": int, "read_ahead_kb": int}
        self.files: dict = {}        # "pid:fd" -> {"pid", "fd", "dev", "ino", "advice"}
        self.owner: dict = {}

    def data(self) -> dict:
        return {"version": RECORD_VERSION, "owner": self.owner, "devices": self.devices,
                "files": self.files}

    def save(self) -> None:
        """Write the record whole (or remove it when it holds nothing)."""
        if not (self.devices or self.files):
            self.remove()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(self.path) as tmp:
            Path(tmp).write_text(json.dumps(self.data(), indent=1))

    def remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    @classmethod
    def load(cls, path: Path) -> "Record | None":
        """The record at `path`, or None when there is none. A record that is
        not one (bad JSON, wrong version) is an error naming the file."""
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise IobridgeError(f"cannot read the prefetch record {path}: {err.strerror}") from None
        try:
            data = json.loads(text)
            if data.get("version") != RECORD_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {RECORD_VERSION}")
            rec = cls(path)
            rec.owner = dict(data.get("owner") or {})
            rec.devices = {k: {"dev": int(v["dev"]), "read_ahead_kb": int(v["read_ahead_kb"])}
                           for k, v in data["devices"].items()}
            rec.files = {k: {"pid": int(v["pid"]), "fd": int(v["fd"]), "dev": int(v["dev"]),
                             "ino": int(v["ino"]), "advice": str(v["advice"])}
                         for k, v in data["files"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise IobridgeError(f"{path} is not a prefetch record: {err}",
                                "remove it after checking the devices' read_ahead_kb by hand") \
                from None
        return rec

    def restore(self, act) -> dict:
        """Put every recorded setting back; returns counts. Devices first
        (a file's NORMAL copies the device's value). Gone devices and
        processes are skipped and said so; nothing is raised for them."""
        done = {"devices": 0, "files": 0, "gone": 0, "failed": 0}
        for label, d in sorted(self.devices.items()):
            try:
                act.set_read_ahead_kb(d["dev"], d["read_ahead_kb"])
                log.info("prefetch: device %s read_ahead_kb restored to %d", label,
                         d["read_ahead_kb"])
                done["devices"] += 1
            except IobridgeError as err:
                log.warning("prefetch: cannot restore device %s: %s", label, err)
                done["failed"] += 1
        for label, f in sorted(self.files.items()):
            try:
                act.advise(f["pid"], f["fd"], (f["dev"], f["ino"]), "normal")
                log.debug("prefetch: process %d fd %d (file %s:%d) advised NORMAL again "
                          "(was %s)", f["pid"], f["fd"], dev_label(f["dev"]), f["ino"], f["advice"])
                done["files"] += 1
            except FileGone as gone:
                log.debug("prefetch: not restoring %s: %s", label, gone)
                done["gone"] += 1
            except IobridgeError as err:
                log.warning("prefetch: cannot restore process %d fd %d: %s", f["pid"], f["fd"], err)
                done["failed"] += 1
        self.devices.clear()
        self.files.clear()
        return done


def _process_alive(pid: int, create_time: float | None) -> bool:
    import psutil  # noqa: PLC0415
    try:
        p = psutil.Process(pid)
        return create_time is not None and abs(p.create_time() - create_time) < 0.5 \
            and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# ---------------------------------------------------------------- the unit

class PrefetchUnit:
    """Observe, decide, act, once per window. `observer` is an open
    CacheObserver (the agent opens it; None only for a restore)."""

    def __init__(self, observer, classifier, mode: str, record_path: Path,
                 actuators=None, window_s: float = PF.WINDOW_S, force: dict | None = None,
                 device_only: bool = False):
        if mode not in MODES[1:]:
            raise IobridgeError(f"prefetch mode {mode!r}: must be shadow or on")
        self.obs = observer
        self.mode = mode
        self.window_s = window_s
        self.act = actuators or Actuators()
        self.decider = Decider(classifier, device_only)
        self.device_only = device_only
        self.classifier = classifier
        self.force = dict(force or {})
        self.record = Record(record_path)
        self.counters = {"windows": 0, "classified": 0, "actions": 0, "device_changes": 0, "file_advice": 0,
                         "willneed_calls": 0, "dropped_pages": 0, "gone": 0, "errors": 0,
                         "restores": 0, "restored_devices": 0, "restored_files": 0,
                         "forgotten_files": 0}
        self._prev: tuple[dict, dict] | None = None
        self._drop: dict = {}        # (dev, ino) -> (Holder, device KiB): drop between windows
        self._idle: dict = {}        # (dev, ino) -> windows its counters have not moved

    @property
    def shadow(self) -> bool:
        return self.mode == "shadow"

    # -- start, restore ------------------------------------------------------
    def recover(self) -> dict | None:
        """Restore what a killed agent left (its record), before anything
        else. Refuses when the record's owner is a live process."""
        rec = Record.load(self.record.path)
        if rec is None:
            return None
        owner = rec.owner
        if owner.get("pid") not in (None, os.getpid()) and \
                _process_alive(owner["pid"], owner.get("create_time")):
            raise IobridgeError(f"{rec.path} belongs to a running agent (pid {owner['pid']})",
                                "stop it first, or give this agent another prefetch.state_file")
        log.warning("prefetch: restoring the settings recorded by agent pid %s (not stopped "
                    "cleanly): %d device(s), %d file descriptor(s)", owner.get("pid"),
                    len(rec.devices), len(rec.files))
        done = rec.restore(self.act)
        self._count_restore(done)
        rec.remove()
        return done

    def prepare(self) -> None:
        """Before the observer: root, and the restore of a killed agent's record."""
        if os.geteuid() != 0:
            raise IobridgeError("the prefetch actuators need root (read_ahead_kb in sysfs, "
                                "pidfd_getfd on other processes' files)",
                                "run the agent as root, or with --prefetch off")
        self.recover()
        self.record.owner = {"pid": os.getpid(), "create_time": _create_time()}

    def attach(self, observer) -> None:
        """Start from the observer's counters now (its first window is the next)."""
        self.obs = observer
        self._prev = observer.snapshot()
        log.info("prefetch unit: %s, window %g s, %s, classifier: %s",
                 "shadow mode (decides and logs, changes nothing)" if self.shadow else "acting",
                 self.window_s, "per device only (device_only)" if self.device_only
                 else "per device and per file", self.classifier.describe())

    def start(self, observer=None) -> None:
        self.prepare()
        if observer is not None or self.obs is not None:
            self.attach(observer or self.obs)

    def stop(self) -> dict:
        """Restore every recorded setting and remove the record."""
        done = self.record.restore(self.act)
        self._count_restore(done)
        self.record.remove()
        if done["devices"] or done["files"]:
            log.info("prefetch: restored %d device(s) and %d file descriptor(s) (%d gone)",
                     done["devices"], done["files"], done["gone"])
        return done

    def _count_restore(self, done: dict) -> None:
        self.counters["restores"] += 1
        self.counters["restored_devices"] += done["devices"]
        self.counters["restored_files"] += done["files"]

    # -- one window ----------------------------------------------------------------
    def windows(self) -> tuple[dict, dict, dict]:
        """Close the observer's window: ({dev: Window}, {(dev, ino): Window},
        {dev: read_ahead_kb})."""
        closed = self.obs.next_window()
        now = self.obs.snapshot(closed)
        pdev, pfile = self._prev or ({}, {})
        self._prev = now
        ndev, nfile = now
        kb: dict = {}

        def kb_of(dev):
            if dev not in kb:
                try:
                    kb[dev] = self.act.read_ahead_kb(dev)
                except IobridgeError as err:
                    log.debug("prefetch: %s", err)
                    kb[dev] = None
            return kb[dev]

        devs = {}
        for dev, c in ndev.items():
            d = c.minus(pdev.get(dev, cs.Counters.empty()))
            if d.window or d.values["ra_unused_removed"] or d.values["refaults"]:
                devs[dev] = window_of(dev, d, kb_of(dev) or 0)
        rows, idle = [], []
        for key, c in nfile.items():
            p = pfile.get(key)
            if p is not None and c.window is None and c.values == p.values:
                n = self._idle[key] = self._idle.get(key, 0) + 1
                if n >= PRUNE_IDLE_WINDOWS and key not in self.decider.streams \
                        and key not in self.force and key not in self._drop:
                    idle.append(key)
                continue
            self._idle.pop(key, None)
            d = c.minus(p or cs.Counters.empty())
            if d.window or ((d.values["ra_unused_removed"] or d.values["refaults"])
                            and key in self.decider.streams):
                rows.append((-(d.window or {}).get("n", 0), key, d))
        rows.sort(key=lambda r: (r[0], r[1]))
        files = {key: window_of(key, d, kb_of(key[0]) or 0) for _, key, d in rows[:MAX_FILES]}
        for key in self.force:
            kb_of(key if isinstance(key, int) else key[0])
        if idle:
            self.counters["forgotten_files"] += self.obs.forget_files(idle)
            for key in idle:       # a later entry for it counts from zero
                del nfile[key]
                del self._idle[key]
        return devs, files, kb

    def step(self) -> list[Action]:
        devs, files, kb = self.windows()
        actions = self.decider.decide(devs, files, kb, self.force)
        self.counters["windows"] += 1
        self.counters["classified"] = self.decider.classified
        for a in actions:
            log.debug("%s%s", "[shadow] " if self.shadow else "", a.line())
        droppers = [] if self.shadow else self.decider.droppers()
        self._drop = {}
        if not self.shadow and (actions or droppers):
            keys = {a.key for a in actions if isinstance(a.key, tuple)} | set(droppers)
            holders = self.act.holders(keys) if keys else {}    # a /proc scan: only for files
            self.apply(actions, holders)
            # one descriptor serves: DONTNEED drops the file's cached pages;
            # the readahead kept below the front is the device's value now
            self._drop = {k: (holders[k][0], self.act.read_ahead_kb(k[0]))
                          for k in droppers if holders.get(k)}
        return actions

    def drop_tick(self) -> None:
        """Between windows: drop what each file set for drop-behind has left
        behind its readahead front. A file whose drop fails is left alone
        until the next window."""
        for key, (h, kb) in list(self._drop.items()):
            for a in self.decider.drop_between(key, self.obs.file_front(key), kb):
                log.debug("%s", a.line())
                try:
                    done = self._file_action(a, h)
                except IobridgeError as err:
                    self.counters["errors"] += 1
                    log.warning("prefetch: %s: dontneed not done: %s", stream_label(key), err)
                    done = False
                if not done:
                    self._drop.pop(key, None)

    # -- acting ------------------------------------------------------------------
    def apply(self, actions: list[Action], holders: dict | None = None) -> None:
        if holders is None:
            file_keys = {a.key for a in actions if isinstance(a.key, tuple)}
            holders = self.act.holders(file_keys) if file_keys else {}
        for a in actions:
            try:
                if a.kind == "device_ra":
                    self._set_device(a)
                else:
                    hs = holders.get(a.key, [])
                    if not hs:
                        log.debug("prefetch: %s: no process has it open now: %s skipped",
                                  stream_label(a.key), a.kind)
                        self.counters["gone"] += 1
                    for h in hs:
                        self._file_action(a, h)
            except IobridgeError as err:
                self.counters["errors"] += 1
                log.warning("prefetch: %s: %s not done: %s", stream_label(a.key), a.kind, err)

    def _set_device(self, a: Action) -> None:
        label = dev_label(a.key)
        added = label not in self.record.devices
        if added:
            self.record.devices[label] = {"dev": a.key, "read_ahead_kb": int(a.old)}
            self.record.save()
        try:
            self.act.set_read_ahead_kb(a.key, a.new)
        except IobridgeError:
            if added:           # nothing changed: nothing to restore
                del self.record.devices[label]
                self.record.save()
            raise
        self.counters["actions"] += 1
        self.counters["device_changes"] += 1

    def _file_action(self, a: Action, h) -> bool:
        """One file action on holder `h`; False when its process or
        descriptor went away (counted as gone, not an error)."""
        label = f"{h.pid}:{h.fd}"
        try:
            if a.kind == "advise":
                was = self.record.files.get(label)
                added = was is None
                self.record.files[label] = {"pid": h.pid, "fd": h.fd, "dev": a.key[0],
                                            "ino": a.key[1], "advice": a.new}
                # written before a descriptor's first change; a later change
                # of advice alone need not be (restoring is NORMAL whatever
                # the advice was): saving the record was 11-12% of the
                # agent's samples on db_bench
                if added or (was["dev"], was["ino"]) != a.key:
                    self.record.save()
                # pages a running scan may have prefetched ahead: up to twice
                # the largest window (SEQUENTIAL doubles the device's value)
                ahead = 4 * int((self.act.read_ahead_kb(a.key[0]) or 128) // PAGE_KB)
                try:
                    self.act.advise(h.pid, h.fd, a.key, a.new, ahead)
                except (FileGone, IobridgeError):
                    if added:
                        del self.record.files[label]
                        self.record.save()
                    raise
                self.counters["file_advice"] += 1
            elif a.kind == "willneed":
                chunk = max(int((self.act.read_ahead_kb(a.key[0]) or 128) // PAGE_KB), 1)
                self.counters["willneed_calls"] += self.act.willneed(
                    h.pid, h.fd, a.key, a.extent[0], a.extent[1], chunk)
            elif a.kind == "dontneed":
                self.act.dontneed(h.pid, h.fd, a.key, a.extent[0], a.extent[1])
                self.counters["dropped_pages"] += a.extent[1]
            self.counters["actions"] += 1
        except FileGone as gone:
            # the process exited or closed the file since the scan: not an error
            log.debug("prefetch: %s: %s skipped: %s", stream_label(a.key), a.kind, gone)
            self.counters["gone"] += 1
            return False
        return True

    # -- status ------------------------------------------------------------------
    def device_counters(self) -> dict:
        """{dev: cachestat.Counters}, the observer's cumulative counters per
        device as of the last closed window ({} before the first)."""
        return dict((self._prev or ({}, {}))[0])

    def classifier_info(self) -> dict:
        return classifier_info(self.classifier)

    def status(self) -> dict:
        return {"mode": self.mode, "window_s": self.window_s, "device_only": self.device_only,
                "classifier": self.classifier.describe(),
                "classifier_info": classifier_info(self.classifier),
                "record": str(self.record.path),
                "streams_per_class": self.decider.classes(),
                "changed_devices": sorted(self.record.devices),
                "changed_descriptors": len(self.record.files),
                "counters": dict(self.counters)}

    def run(self, stop) -> None:
        """Step every window until `stop` (a threading.Event) is set. A
        failing window is logged and counted; the next one runs."""
        next_t = time.monotonic() + self.window_s
        while True:
            wait = next_t - time.monotonic()
            if self._drop:
                wait = min(wait, DROP_TICK_S)
            if stop.wait(max(wait, 0)):
                break
            if time.monotonic() < next_t:
                try:
                    self.drop_tick()
                except Exception:    # noqa: BLE001 - the next window decides again
                    self.counters["errors"] += 1
                    self._drop = {}
                    log.exception("prefetch drop-behind between windows failed")
                continue
            next_t += self.window_s
            try:
                self.step()
            except Exception:    # noqa: BLE001 - one bad window must not stop the unit
                self.counters["errors"] += 1
                log.exception("prefetch window failed")
            if next_t < time.monotonic() - 10 * self.window_s:
                next_t = time.monotonic() + self.window_s


def _create_time() -> float:
    import psutil  # noqa: PLC0415
    return psutil.Process().create_time()
