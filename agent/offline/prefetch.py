"""Readahead policies for the page-cache simulator (pagecache.py).

A policy answers two questions, per device (a block trace's device is one
file): on a demand miss at page `index` with `req` pages of the request
left (`sync`), and when a page carrying the async marker is read (`async_`),
which window to read: (start, size, async_size) in pages, or None for
nothing beyond the request. The simulator reads the window's uncached pages
and puts the marker on page start + size - async_size. `done(dev, last)`
ends each read request; `tick(t_ns)` comes before every request and
`wrote(dev)` with every write; `inserted(dev, index)` with every page
entering the cache (read or write-allocated, as KML's page-cache hook sees
them), if `observes_insertions`.

Policies (names as given to --policy):
- none: no readahead; a miss reads the request's uncached pages only (what
  FADV_RANDOM does).
- fixed:KB: on every miss, the rest of the request plus KB more.
- linux[:KB]: Linux's on-demand readahead (mm/readahead.c, 6.1), max
  read_ahead_kb KB (default 128), see LinuxReadahead.
- kml: KML-like (sbu-fsl/kernel-ml): per device, every window of trace
  time, the 5 features of core/prefetch_features.py from the window's
  page-cache insertions, a workload class, and that class's readahead set
  as the device's read_ahead_kb under Linux's readahead. KML's MLP weights
  are not published with usable normalisation statistics, so the class
  comes from a rule-based stand-in (RuleClassifier), reported as such.
- learned[:PATH]: the same with an ONNX prefetch classifier
  (core/prefetch_model.LearnedClassifier) over the same features plus the
  window's direction and writes, and the class -> readahead map of its
  card; PATH (or --model) names the model, by default the shipped
  models/prefetch-default.onnx.
"""

from __future__ import annotations

from ..core import prefetch_features as PF
from ..core.prefetch_rules import RuleClassifier  # noqa: F401 (defined in core: the agent uses it too)
from ..core.errors import UsageError
from .pagecache import PAGE_SIZE

PAGES_PER_KB = 1024 / PAGE_SIZE
DEFAULT_READ_AHEAD_KB = 128       # Linux's default read_ahead_kb (VM_READAHEAD_PAGES)
MAX_READAHEAD_KB = PF.MAX_READAHEAD_KB
BASE_NAMES = ("none", "fixed", "linux", "kml", "learned")
DEFAULT_POLICIES = ("none", "fixed:128", "linux", "kml")


class Policy:
    """No readahead; the base of the others (see the module doc)."""
    name = "none"
    observes_insertions = False

    def reset(self, ndev: int, cached) -> None:
        """A fresh run over `ndev` devices; `cached(dev, page)` says whether
        a page is in the cache (Linux's readahead looks at the cache)."""
        self.cached = cached

    def sync(self, dev: int, index: int, req: int):
        return None

    def async_(self, dev: int, index: int, req: int):
        return None

    def done(self, dev: int, last: int) -> None:
        pass

    def tick(self, t_ns: int) -> None:
        pass

    def wrote(self, dev: int) -> None:
        pass

    def inserted(self, dev: int, index: int) -> None:
        pass

    def stats(self) -> dict:
        return {}


class Fixed(Policy):
    """On every miss, the rest of the request plus a fixed number of pages."""

    def __init__(self, kb: int):
        self.kb = kb
        self.pages = int(kb * PAGES_PER_KB)
        self.name = f"fixed:{kb}"

    def sync(self, dev, index, req):
        return (index, req + self.pages, 0)

    def stats(self):
        return {"readahead_kb": self.kb}


def _roundup_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def init_ra_size(req: int, max_pages: int) -> int:
    """Linux's first window for a request of `req` pages (get_init_ra_size):
    the request rounded up to a power of two, x4 while small (<= max/32),
    x2 while medium (<= max/4), else the maximum."""
    size = _roundup_pow2(req)
    if size <= max_pages // 32:
        return size * 4
    if size <= max_pages // 4:
        return size * 2
    return max_pages


def next_ra_size(cur: int, max_pages: int) -> int:
    """Linux's next window (get_next_ra_size): x4 below max/16, x2 up to
    max/2, then the maximum."""
    if cur < max_pages // 16:
        return 4 * cur
    if cur <= max_pages // 2:
        return 2 * cur
    return max_pages


class _RaState:
    __slots__ = ("start", "size", "async_size", "prev", "ra_pages")

    def __init__(self, ra_pages: int):
        self.start = self.size = self.async_size = 0
        self.prev = -1          # prev_pos starts at -1: nothing read yet
        self.ra_pages = ra_pages


class LinuxReadahead(Policy):
    """On-demand readahead as mm/readahead.c does it (ondemand_readahead,
    6.1, order-0 pages), one file_ra_state per device. Behaviour modelled:

    - index 0 (start of file), a request longer than the maximum, or a miss
      at or right after the previous read's last page (sequential): a new
      window at the index, sized from the request (init_ra_size); its
      async part is what lies beyond the request.
    - a miss or marker hit at the expected page (the marker of the current
      window, or the page right after it): the window moves forward and
      grows (next_ra_size), all of it async.
    - a marker hit otherwise (interleaved streams): the window restarts at
      the first uncached page after the index, sized from the cached run
      it found plus the request, grown.
    - a miss with a run of cached pages just before it longer than the
      request (context readahead): a window of that run's length plus the
      request, doubled when the run reaches the start of the file, with
      async_size 1.
    - otherwise a random read: the request only, state untouched. Backward
      scans land here: Linux reads nothing ahead for them.
    - when the new window starts at the index and is all async, the next
      one is merged in at once (the read would hit its own marker).

    Not modelled: large folios (readahead order), a device's io_pages
    allowing requests above the maximum, and readahead being skipped while
    a marked page is under writeback."""

    def __init__(self, kb: int = DEFAULT_READ_AHEAD_KB, name: str | None = None):
        self.kb = kb
        self.name = name or ("linux" if kb == DEFAULT_READ_AHEAD_KB else f"linux:{kb}")

    def reset(self, ndev, cached):
        super().reset(ndev, cached)
        self.ra = [_RaState(int(self.kb * PAGES_PER_KB)) for _ in range(ndev)]
        self.windows = 0

    def sync(self, dev, index, req):
        return self._ondemand(dev, index, req, False)

    def async_(self, dev, index, req):
        return self._ondemand(dev, index, req, True)

    def done(self, dev, last):
        self.ra[dev].prev = last

    def _ondemand(self, dev, index, req, marker_hit):
        ra = self.ra[dev]
        mx = ra.ra_pages
        if mx == 0:          # readahead off: the request only, no async reads
            return None
        if index == 0:
            return self._initial(ra, index, req, mx)
        if index in (ra.start + ra.size - ra.async_size, ra.start + ra.size):
            ra.start += ra.size
            ra.size = next_ra_size(ra.size, mx)
            ra.async_size = ra.size
            return self._readit(ra, index, mx)
        if marker_hit:
            start = index + 1
            while start - index <= mx and self.cached(dev, start):
                start += 1
            if start - index > mx:
                return None
            ra.start = start
            ra.size = next_ra_size(start - index + req, mx)
            ra.async_size = ra.size
            return self._readit(ra, index, mx)
        # prev = -1 before the first read: only index 0 is then sequential
        if req > mx or 0 <= index - ra.prev <= 1:
            return self._initial(ra, index, req, mx)
        history = 0
        while history < mx and index - 1 - history >= 0 and self.cached(dev, index - 1 - history):
            history += 1
        if history > req:
            if history >= index:
                history *= 2
            ra.start = index
            ra.size = min(history + req, mx)
            ra.async_size = 1
            return self._readit(ra, index, mx)
        return None           # a random read: the request only

    def _initial(self, ra, index, req, mx):
        ra.start = index
        ra.size = init_ra_size(req, mx)
        ra.async_size = ra.size - req if ra.size > req else ra.size
        return self._readit(ra, index, mx)

    def _readit(self, ra, index, mx):
        if index == ra.start and ra.size == ra.async_size:
            add = next_ra_size(ra.size, mx)
            if ra.size + add <= mx:
                ra.async_size = add
                ra.size += add
            else:
                ra.size = mx
                ra.async_size = mx >> 1
        self.windows += 1
        return (ra.start, ra.size, ra.async_size)

    def stats(self):
        return {"read_ahead_kb": self.kb, "readahead_windows": self.windows}


class KmlLike(LinuxReadahead):
    """KML-like per-device readahead tuning (see the module doc): Linux's
    readahead whose maximum is set, every `window_ns` of trace time, from
    the class `classifier` gives the window's features. A new maximum
    applies to the device's readahead state at once (as if the file were
    reopened or fadvise(NORMAL) re-copied it; an open file keeps the value
    it copied at open otherwise)."""

    observes_insertions = True

    def __init__(self, classifier, window_ns: int, kb: int = DEFAULT_READ_AHEAD_KB,
                 name: str = "kml"):
        super().__init__(kb, name)
        self.classifier = classifier
        self.window_ns = window_ns

    def reset(self, ndev, cached):
        super().reset(ndev, cached)
        self.win = [PF.WindowStats() for _ in range(ndev)]
        self.writes = [False] * ndev
        self.kb_now = [self.kb] * ndev
        self.window_end = None
        self.decisions = {c: 0 for c in PF.PREFETCH_CLASSES}
        self.undecided = 0
        self.changes = 0

    def inserted(self, dev, index):
        self.win[dev].add(index)

    def wrote(self, dev):
        self.writes[dev] = True

    def tick(self, t_ns):
        if self.window_end is None:
            self.window_end = t_ns + self.window_ns
            return
        if t_ns < self.window_end:
            return
        for dev, w in enumerate(self.win):
            if w.n == 0 and not self.writes[dev]:
                continue                # an idle window: nothing to judge
            cls = self.classifier.classify(w.features(self.kb_now[dev]), self.writes[dev],
                                           w.direction)
            if cls is None:
                self.undecided += 1
            else:
                self.decisions[PF.PREFETCH_CLASSES[cls]] += 1
                kb = self.classifier.class_readahead_kb[cls]
                if kb != self.kb_now[dev]:
                    self.changes += 1
                    self.kb_now[dev] = kb
                    self.ra[dev].ra_pages = int(kb * PAGES_PER_KB)
            self.win[dev] = PF.WindowStats()
            self.writes[dev] = False
        # the next window holds t_ns (idle windows in between are skipped)
        self.window_end += ((t_ns - self.window_end) // self.window_ns + 1) * self.window_ns

    def stats(self):
        return {"classifier": getattr(self.classifier, "name", "?"),
                "initial_read_ahead_kb": self.kb, "window_s": self.window_ns / 1e9,
                "windows_by_class": self.decisions, "windows_undecided": self.undecided,
                "read_ahead_changes": self.changes,
                "final_read_ahead_kb": list(self.kb_now),
                "readahead_windows": self.windows}


DEFAULT_MODEL_NAME = "prefetch-default.onnx"


def default_model_path() -> str:
    """The shipped prefetch model (models/prefetch-default.onnx)."""
    from ..core import resources
    return str(resources.data_dir("models") / DEFAULT_MODEL_NAME)


def load_prefetch_classifier(model_path: str | None = None):
    """The classifier of policy `learned`: the ONNX prefetch model at
    `model_path` (default: the shipped one), checked as a prefetch model;
    a model of another kind, or a missing or broken one, is a
    ModelCheckError naming it."""
    from ..core.prefetch_model import LearnedClassifier
    return LearnedClassifier(model_path or default_model_path())


def parse_policy(spec: str) -> tuple[str, int | str | None]:
    """'none', 'fixed:KB', 'linux', 'linux:KB', 'kml', 'learned',
    'learned:PATH' -> (base, KB, or PATH for learned); anything else is a
    UsageError naming it."""
    base, sep, arg = spec.partition(":")
    choices = "none, fixed:KB, linux, linux:KB, kml, learned, learned:MODEL.onnx"
    if base not in BASE_NAMES:
        raise UsageError(f"unknown prefetch policy {spec!r}", f"choose from {choices}")
    if base == "learned":
        if sep and not arg:
            raise UsageError(f"prefetch policy {spec!r}: no model after 'learned:'",
                             "learned:MODEL.onnx, or learned for the shipped model")
        return base, arg or None
    if base in ("none", "kml"):
        if sep:
            raise UsageError(f"prefetch policy {base} takes no size, got {spec!r}",
                             f"choose from {choices}")
        return base, None
    if not sep:
        if base == "fixed":
            raise UsageError("prefetch policy fixed needs a size: fixed:KB, e.g. fixed:128")
        return base, DEFAULT_READ_AHEAD_KB
    if not (arg.isascii() and arg.isdigit()):
        raise UsageError(f"prefetch policy {spec!r}: the size must be a whole number of KiB, "
                         f"got {arg!r}", f"e.g. {base}:128")
    kb = int(arg)
    page_kb = PAGE_SIZE // 1024
    if kb == 0 and base == "fixed":
        raise UsageError(f"prefetch policy {spec!r}: 0 KiB reads nothing ahead",
                         "use policy none for no readahead")
    if kb % page_kb or kb > MAX_READAHEAD_KB:
        raise UsageError(f"prefetch policy {spec!r}: the size must be a multiple of "
                         f"{page_kb} KiB (whole pages) up to {MAX_READAHEAD_KB} KiB",
                         f"e.g. {base}:128")
    return base, kb


def build_policy(spec: str, *, read_ahead_kb: int = DEFAULT_READ_AHEAD_KB,
                 window_s: float = PF.WINDOW_S, classifier=None) -> Policy:
    """The policy `spec` names (parse_policy); `read_ahead_kb` is the
    starting maximum of linux (without :KB), kml and learned; `classifier`
    the learned one's (load_prefetch_classifier; without it, learned loads
    the model its spec names, or the shipped one)."""
    base, kb = parse_policy(spec)
    if base == "none":
        return Policy()
    if base == "fixed":
        return Fixed(kb)
    if base == "linux":
        return LinuxReadahead(kb if ":" in spec else read_ahead_kb,
                              name=spec if ":" in spec else "linux")
    window_ns = int(window_s * 1e9)
    if base == "kml":
        return KmlLike(RuleClassifier(), window_ns, read_ahead_kb, name="kml")
    if classifier is None:
        classifier = load_prefetch_classifier(kb)      # kb: the spec's model path, if any
    return KmlLike(classifier, window_ns, read_ahead_kb, name=spec)
