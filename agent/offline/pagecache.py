"""A page-cache simulator for prefetch replay: a block trace's reads through
a cache of a given size, with a readahead policy deciding what else to read.

Model (what `iobridge replay --task prefetch` reports on):

- Pages of PAGE_SIZE (4 KiB), keyed by (device, page index). A block trace
  has no files: each device of the trace's `device` column is one file
  (one readahead state, as a process reading the raw device through one
  open file would have). The device ends at the highest page the trace
  touches on it: readahead stops there, as Linux's stops at end of file.
- Two lists, as Linux's classic (non-MGLRU) file LRU, not one LRU: the
  cost of a wrong prefetch depends on it. New pages, demand-read or
  prefetched, enter the inactive list; a page accessed a second time while
  inactive moves to the active list (mark_page_accessed: the first access
  sets PG_referenced, the second activates). Eviction takes the oldest
  inactive page. Unread prefetched pages thus leave from the inactive list
  without pushing out the pages used twice. The active list may hold at
  most `ratio` times the inactive one (inactive_is_low: ratio 1 below
  1 GiB of cache, int_sqrt(10 x GiB) above); its oldest pages are demoted.
  Both lists are FIFO: Linux moves an unmapped page-cache page between
  lists on access, not within one (no PTE young bits to rotate on).
- A read of the same page as the device's previous page access does not
  count as a second access (filemap_read marks a folio accessed once when
  consecutive reads fall in it: 512-byte reads of one page are one use).
- Shadow entries: an evicted page leaves its eviction number behind; a
  demand miss on it within SHADOW_WINDOW_CACHES caches' worth of evictions
  is a refault (it would have hit in a cache that much larger). As in
  Linux's workingset_refault, a refault whose distance (evictions since)
  is at most the active list's size goes straight to the active list.
  A prefetch of a shadowed page drops the shadow without counting.
- Per page: prefetched or demand, used (accessed) before eviction, and an
  async-readahead marker (PG_readahead) that calls the policy when hit.
- Writes: write-allocate (`writes="allocate"`, the default): a written page
  enters the cache without a device read, as a buffered write puts it in
  the page cache; a write to a cached page leaves it as it is (partial-page
  writes are not read first). `writes="ignore"`: writes do not touch the
  cache. Either way they count toward the KML window's "has writes".
- No time: a prefetched page counts as a hit however soon after its read it
  is asked for (timeliness needs device latencies, not modelled here).

Counts: page requests (a read request covers each page it touches once),
hits, misses (demand pages read), prefetched pages, used prefetched pages,
wasted (prefetched pages evicted unused), unused prefetched pages still
cached at the end, refaults, device reads in pages and in requests (a run
of contiguous pages read at once is one request; no maximum request size).

The policy (prefetch.py) is asked on each demand miss (`sync`) and when a
marked page is read (`async_`) for a window (start, size, async_size); the
window is read except the pages already cached, and the page at
start + size - async_size (when async_size > 0) gets the marker if newly
read, as Linux's readahead marks it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np

from .progress import Progress
from .trace import OP_READ, OP_WRITE, Trace

PAGE_SIZE = 4096
SECTORS_PER_PAGE = PAGE_SIZE // 512
SHADOW_WINDOW_CACHES = 1      # shadow entries kept: one cache's worth of evictions
_DEV_SHIFT = 52               # key = device << 52 | page (pages < 2**51: 2**63 bytes)

# Page flags: the value each list keeps per page.
PREFETCHED = 1    # read by readahead, not accessed yet
MARKER = 2        # async readahead marker (PG_readahead)
REFERENCED = 4    # accessed once while inactive (PG_referenced)


@dataclass
class CacheCounts:
    page_requests: int = 0
    hits: int = 0
    misses: int = 0
    prefetched: int = 0
    used_prefetched: int = 0
    wasted: int = 0               # prefetched pages evicted before any use
    unused_at_end: int = 0        # prefetched pages still cached, never used
    refaults: int = 0
    refault_activations: int = 0
    evictions: int = 0
    activations: int = 0
    device_read_pages: int = 0
    device_read_requests: int = 0
    write_pages: int = 0          # pages of write requests
    write_allocated: int = 0      # of those, entered the cache without a read

    def as_dict(self) -> dict:
        return asdict(self)


def inactive_ratio(capacity_pages: int) -> int:
    """Active pages allowed per inactive page (Linux's inactive_is_low for
    file pages: 1 below 1 GiB, int_sqrt(10 x GiB) above)."""
    gib = capacity_pages * PAGE_SIZE >> 30
    return math.isqrt(10 * gib) if gib else 1


class PageCache:
    """The two lists, the shadow entries and the counts (see the module doc)."""

    def __init__(self, capacity_pages: int):
        if capacity_pages < 1:
            raise ValueError("a page cache holds at least one page")
        self.capacity = capacity_pages
        self.ratio = inactive_ratio(capacity_pages)
        self.inactive: OrderedDict[int, int] = OrderedDict()
        self.active: OrderedDict[int, int] = OrderedDict()
        self.shadow: OrderedDict[int, int] = OrderedDict()   # key -> eviction number
        self.shadow_max = SHADOW_WINDOW_CACHES * capacity_pages
        self.c = CacheCounts()
        self.on_insert = None     # callback(key) for each page entering the cache

    def __contains__(self, key: int) -> bool:
        return key in self.inactive or key in self.active

    def __len__(self) -> int:
        return len(self.inactive) + len(self.active)

    def access(self, key: int, mark: bool) -> int | None:
        """A demand access: None when absent, else the page's flags before it
        (MARKER set: the policy's async readahead is due). A prefetched page
        becomes used; `mark` (a new access, not the same page again) sets
        PG_referenced, or activates an inactive page that had it."""
        fl = self.inactive.get(key)
        if fl is None:
            fl = self.active.get(key)
            if fl is None:
                return None
            if fl & MARKER:
                self.active[key] = fl & ~MARKER
            return fl
        new = fl & ~(PREFETCHED | MARKER)
        if fl & PREFETCHED:
            self.c.used_prefetched += 1
        if mark:
            if fl & REFERENCED:
                del self.inactive[key]
                self._activate(key, new)
                return fl
            new |= REFERENCED
        if new != fl:
            self.inactive[key] = new
        return fl

    def take_marker(self, key: int) -> bool:
        """Clear the page's marker; True if it had one (and is still cached)."""
        for lst in (self.inactive, self.active):
            fl = lst.get(key)
            if fl is not None:
                if fl & MARKER:
                    lst[key] = fl & ~MARKER
                    return True
                return False
        return False

    def insert(self, key: int, flags: int, demand: bool) -> None:
        """A page entering the cache (not already in it)."""
        c = self.c
        dist = self.shadow.pop(key, None)
        if flags & PREFETCHED:
            c.prefetched += 1
        if dist is not None and demand:
            c.refaults += 1
            if c.evictions - dist <= len(self.active):
                c.refault_activations += 1
                self._make_room(1)
                self._activate(key, flags)
                self._notify(key)
                return
        self._make_room(1)
        self.inactive[key] = flags
        self._notify(key)

    def _notify(self, key: int) -> None:
        if self.on_insert is not None:
            self.on_insert(key)

    def _activate(self, key: int, flags: int) -> None:
        self.c.activations += 1
        self.active[key] = flags
        while len(self.active) > self.ratio * max(len(self.inactive), 1) and len(self.active) > 1:
            k, fl = self.active.popitem(last=False)      # demote the oldest
            self.inactive[k] = fl

    def _make_room(self, n: int) -> None:
        c = self.c
        while len(self.inactive) + len(self.active) + n > self.capacity:
            if self.inactive:
                k, fl = self.inactive.popitem(last=False)
            else:
                k, fl = self.active.popitem(last=False)
            if fl & PREFETCHED:
                c.wasted += 1
            c.evictions += 1
            self.shadow[k] = c.evictions
            if len(self.shadow) > self.shadow_max:
                self.shadow.popitem(last=False)

    def finish(self) -> CacheCounts:
        """The counts, with the unused prefetched pages still cached."""
        self.c.unused_at_end = sum(1 for lst in (self.inactive, self.active)
                                   for fl in lst.values() if fl & PREFETCHED)
        return self.c


@dataclass
class RequestArrays:
    """A trace's reads and writes as page ranges, in issue order."""
    issue_ns: np.ndarray      # int64
    dev: np.ndarray           # int64 device number (index into `devices`)
    first: np.ndarray         # int64 first page
    end: np.ndarray           # int64 one past the last page
    is_write: np.ndarray      # bool
    devices: list[str]
    dev_end: list[int]        # per device: one past the highest page the trace touches

    def __len__(self) -> int:
        return len(self.issue_ns)


def requests_of(trace: Trace) -> RequestArrays:
    """The trace's reads and writes (other operations dropped) as page
    ranges, sorted by issue time."""
    tr = trace.sorted()
    keep = np.flatnonzero((tr["op"] == OP_READ) | (tr["op"] == OP_WRITE))
    tr = tr.take(keep)
    devices, dev = np.unique(tr["device"].astype(str), return_inverse=True)
    start = tr["sector"].astype(np.int64)
    first = start // SECTORS_PER_PAGE
    # validated traces end within 2**63 bytes: (sector*512 + bytes - 1) // 4096 fits
    last = (start * 512 + tr["bytes"].astype(np.int64) - 1) // PAGE_SIZE
    end = np.maximum(last + 1, first + 1)
    dev = dev.astype(np.int64)
    dev_end = [int(end[dev == i].max()) for i in range(len(devices))]
    return RequestArrays(tr["issue_ns"].astype(np.int64), dev, first, end,
                         tr["op"] == OP_WRITE, [str(d) for d in devices], dev_end)


@dataclass
class SimResult:
    counts: CacheCounts
    seconds: float
    policy_stats: dict


def simulate_prefetch(reqs: RequestArrays, capacity_pages: int, policy, *,
                      writes: str = "allocate", progress: Progress | None = None,
                      label: str = "") -> SimResult:
    """Replay `reqs` through a fresh cache of `capacity_pages` with `policy`."""
    if writes not in ("allocate", "ignore"):
        raise ValueError(f"writes must be 'allocate' or 'ignore', not {writes!r}")
    t0 = time.perf_counter()
    cache = PageCache(capacity_pages)
    c = cache.c
    dev_end = reqs.dev_end

    def cached(d: int, page: int) -> bool:
        return ((d << _DEV_SHIFT) | page) in cache

    policy.reset(len(reqs.devices), cached)
    if policy.observes_insertions:
        mask = (1 << _DEV_SHIFT) - 1
        inserted = policy.inserted
        cache.on_insert = lambda key: inserted(key >> _DEV_SHIFT, key & mask)

    def read_window(d: int, base: int, win, demand: list[int]) -> None:
        """Read the demand pages and the window's uncached pages in one go
        (each run of contiguous pages one device request)."""
        pages = list(demand)
        dset = set(demand)
        mark_at = -1
        if win is not None:
            start, size, async_size = win
            start = max(start, 0)
            size = min(size, dev_end[d] - start)     # the device ends: as Linux at EOF
            if 0 < async_size <= size:
                mark_at = start + size - async_size
            for p in range(start, start + size):
                if p not in dset and (base | p) not in cache:
                    pages.append(p)
            pages.sort()
        if not pages:
            return
        runs = 1
        prev = pages[0] - 1
        for p in pages:
            if p != prev + 1:
                runs += 1
            prev = p
            flags = REFERENCED if p in dset else PREFETCHED
            if p == mark_at:
                flags |= MARKER
            cache.insert(base | p, flags, p in dset)
        c.device_read_requests += runs
        c.device_read_pages += len(pages)

    issue = reqs.issue_ns.tolist()
    devs = reqs.dev.tolist()
    firsts = reqs.first.tolist()
    ends = reqs.end.tolist()
    writes_l = reqs.is_write.tolist()
    last_key = {}
    n = len(issue)
    every = max(n // 200, 1)
    tick = policy.tick
    for r in range(n):
        if progress is not None and r % every == 0:
            progress.update(label, r, n)
        d = devs[r]
        a, p1 = firsts[r], ends[r]
        base = d << _DEV_SHIFT
        tick(issue[r])
        if writes_l[r]:
            policy.wrote(d)
            c.write_pages += p1 - a
            if writes == "allocate":
                for p in range(a, p1):
                    if (base | p) not in cache:
                        c.write_allocated += 1
                        cache.insert(base | p, 0, False)
            continue
        c.page_requests += p1 - a
        fresh: set[int] = set()      # pages read from the device for this request
        i = a
        prev_key = last_key.get(d)
        while i < p1:
            k = base | i
            if i in fresh:
                if cache.take_marker(k):
                    read_window(d, base, policy.async_(d, i, p1 - i), [])
                i += 1
                continue
            fl = cache.access(k, k != prev_key)
            prev_key = k
            if fl is not None:
                c.hits += 1
                if fl & MARKER:
                    read_window(d, base, policy.async_(d, i, p1 - i), [])
                i += 1
                continue
            # a demand miss: the request's uncached pages from here are read
            # now, with what the policy adds (the page itself is looked at
            # again as a fresh page: it may carry the marker)
            demand = [p for p in range(i, p1) if p not in fresh and (base | p) not in cache]
            c.misses += len(demand)
            fresh.update(demand)
            read_window(d, base, policy.sync(d, i, p1 - i), demand)
        last_key[d] = base | (p1 - 1)
        policy.done(d, p1 - 1)
    if progress is not None:
        progress.update(label, n, n)
    counts = cache.finish()
    return SimResult(counts, time.perf_counter() - t0, policy.stats())
