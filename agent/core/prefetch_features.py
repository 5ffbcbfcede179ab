"""The prefetch feature schema: the one definition of what a prefetch
classifier sees (the offline replay's `kml` and `learned` policies now, the
BPF observer and the agent later).

KML's per-device readahead features (sbu-fsl/kernel-ml, arXiv 2111.11554),
computed over one window of time (1 s in KML) from the page-cache insertions
of that window, in insertion order (KML hooks the page cache's add; on 6.1
the tracepoint filemap:mm_filemap_add_to_page_cache gives the same index):

  index name                      unit            meaning
  0     events                    insertions      pages inserted in the window
  1     index_var_over_range      pages           population variance of the
                                                  page indices (M2 / n) over
                                                  their range (max - min)
  2     index_var_n1_over_range   pages           the same with n - 1
                                                  (M2 / (n - 1) / range)
  3     mean_abs_delta_index      pages           sum of |index_i - index_i-1|
                                                  over consecutive insertions,
                                                  divided by n (KML divides by
                                                  n, not by the n - 1 deltas)
  4     readahead_over_1024       sectors / 1024  the device's readahead in
                                                  512-byte sectors (what
                                                  BLKRAGET reports) over 1024:
                                                  128 KiB -> 0.25

Where KML divides by zero (a window whose indices are all equal, or of one
insertion) the value here is 0: a window of one page has no spread. KML
drops indices above 1e6 (ext4 superblock accesses on its test file system);
block traces address whole devices, so nothing is dropped here.

KML z-scores the features with running statistics before its MLP; any such
normalisation belongs inside a model (as for admission models), which takes
these raw values.

The model's output is one of PREFETCH_CLASSES; each class maps to the
readahead KML's offline sweep found best for it (CLASS_READAHEAD_KB).
Changing names, order, units, classes or the window requires bumping
SCHEMA_VERSION.
"""

from __future__ import annotations

SCHEMA_VERSION = 1
WINDOW_S = 1.0                       # KML's window

FEATURES: tuple[tuple[str, str], ...] = (
    ("events", "page-cache insertions"),
    ("index_var_over_range", "pages"),
    ("index_var_n1_over_range", "pages"),
    ("mean_abs_delta_index", "pages"),
    ("readahead_over_1024", "512-byte sectors / 1024"),
)
FEATURE_NAMES: tuple[str, ...] = tuple(n for n, _ in FEATURES)
FEATURE_UNITS: tuple[str, ...] = tuple(u for _, u in FEATURES)
NUM_FEATURES = len(FEATURES)

# KML's workload classes, in its output order, and the readahead (KiB) each
# one gets (KML's sweep on RocksDB db_bench).
PREFETCH_CLASSES: tuple[str, ...] = ("random", "random+write", "sequential", "reverse")
CLASS_READAHEAD_KB: tuple[int, ...] = (8, 8, 320, 480)

SECTOR = 512
MAX_READAHEAD_KB = 1 << 20        # 1 GiB: a larger readahead is a typo, not a setting


def readahead_feature(readahead_kb: float) -> float:
    """Feature 4 from a readahead in KiB (KML feeds sectors / 1024)."""
    return readahead_kb * 1024 / SECTOR / 1024


class WindowStats:
    """Running aggregates of one window's page-cache insertions, from which
    `features()` gives the schema's vector. Integers only (count, sum, sum
    of squares, min, max, sum of |delta|, first, last, largest step either
    way), kept exact, so the values do not depend on the order of
    floating-point updates: the same aggregates a BPF map can keep (with
    128-bit or scaled sums)."""

    __slots__ = ("n", "s1", "s2", "lo", "hi", "sad", "first", "last", "max_fwd", "max_back")

    def __init__(self):
        self.n = self.s1 = self.s2 = self.sad = self.max_fwd = self.max_back = 0
        self.lo = self.hi = self.first = self.last = None

    @classmethod
    def from_aggregates(cls, n: int, s1: int, s2: int, lo: int, hi: int, sad: int,
                        first: int, last: int, max_fwd: int = 0,
                        max_back: int = 0) -> "WindowStats":
        """A window from aggregates kept elsewhere (the BPF page-cache
        observer's struct iobridge_cache_window). The indices may all be
        shifted by one constant (the kernel keeps them relative to the
        window's first): the features and direction do not change."""
        w = cls()
        if n:
            w.n, w.s1, w.s2, w.lo, w.hi, w.sad = int(n), int(s1), int(s2), int(lo), int(hi), int(sad)
            w.first, w.last = int(first), int(last)
            w.max_fwd, w.max_back = int(max_fwd), int(max_back)
        return w

    def add(self, index: int) -> None:
        if self.n:
            delta = index - self.last
            if delta > 0:
                self.sad += delta
                if delta > self.max_fwd:
                    self.max_fwd = delta
            else:
                self.sad -= delta
                if -delta > self.max_back:
                    self.max_back = -delta
            if index < self.lo:
                self.lo = index
            elif index > self.hi:
                self.hi = index
        else:
            self.lo = self.hi = self.first = index
        self.last = index
        self.n += 1
        self.s1 += index
        self.s2 += index * index

    def features(self, readahead_kb: float) -> tuple[float, ...]:
        """The schema's vector (FEATURE_NAMES order) for this window."""
        n = self.n
        ra = readahead_feature(readahead_kb)
        if n == 0:
            return (0.0, 0.0, 0.0, 0.0, ra)
        rng = self.hi - self.lo
        m2_times_n = n * self.s2 - self.s1 * self.s1     # n * M2, exact
        var = m2_times_n / (n * n * rng) if rng else 0.0
        var1 = m2_times_n / (n * (n - 1) * rng) if rng and n > 1 else 0.0
        return (float(n), var, var1, self.sad / n, ra)

    @property
    def step_over_range(self) -> float:
        """Mean |step| between consecutive insertions over the range they
        span, the largest step left out (a scan's wrap): about 1/3 for
        random reads (the mean distance of two uniform points) whatever the
        file's size, near 0 for a scan, forward or backward (unit steps, or
        readahead chunks). Not a model input: KML's features grow with the
        file's size, so a model fitted on one size can call a random reader
        of another a scan; the agent checks its verdicts with this."""
        if self.n < 2 or self.hi == self.lo:
            return 0.0
        rest = self.sad - max(self.max_fwd, self.max_back)
        return rest / ((self.n - 1) * (self.hi - self.lo))

    @property
    def direction(self) -> float:
        """(last - first) / (max - min) index, from -1 (one backward scan)
        to 1 (one forward scan); 0 for a window of one index. Not a KML
        feature: KML's are sign-free, so the rule-based stand-in for its MLP
        uses this to tell reverse from sequential.

        A scan that wrapped inside the window (a looping reader back at the
        file's start, a backward one back at its end) made one jump against
        its way that outweighs all its other steps together; that jump is
        left out, and the rest is measured over the distance it moved. Else
        a looping sequential reader's window across its restart read as a
        reverse scan (-0.92 for a window of 4,000 insertions of a
        49,152-page file, wherever the restart fell), and its readahead was
        cut at every pass."""
        if self.n == 0:
            return 0.0
        moved, rng = self.last - self.first, self.hi - self.lo
        rest = self.sad - max(self.max_fwd, self.max_back)
        if self.max_back > rest and moved + self.max_back > 0:
            moved, rng = moved + self.max_back, rest        # a forward scan's wrap
        elif self.max_fwd > rest and moved - self.max_fwd < 0:
            moved, rng = moved - self.max_fwd, rest         # a backward scan's wrap
        return moved / rng if rng else 0.0


# What a learned prefetch classifier takes (core/prefetch_model.py): the
# schema's features, then two facts of the window that KML's sign-free
# features cannot carry and RuleClassifier uses as well: its direction
# (WindowStats.direction), since a forward and a backward scan have the same
# five features, and whether it had writes (random vs random+write).
MODEL_EXTRA: tuple[tuple[str, str], ...] = (
    ("direction", "(last - first) / (max - min) page index, -1..1, a wrap left out"),
    ("has_writes", "0 or 1: the window had writes"),
)
MODEL_INPUTS: tuple[tuple[str, str], ...] = FEATURES + MODEL_EXTRA
MODEL_INPUT_NAMES: tuple[str, ...] = tuple(n for n, _ in MODEL_INPUTS)
NUM_MODEL_INPUTS = len(MODEL_INPUTS)
# Fewer insertions than this in a window: no decision (the device or file
# keeps its readahead), for the rule-based and the learned classifier alike.
MIN_EVENTS = 16


def model_row(feats, has_writes: bool, direction: float) -> list[float]:
    """A learned classifier's input row (MODEL_INPUT_NAMES order)."""
    return [*map(float, feats), float(direction), 1.0 if has_writes else 0.0]
