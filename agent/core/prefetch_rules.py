"""The rule-based prefetch classifier (a stand-in for KML's MLP), in core
because both the offline replay's `kml` policy (offline/prefetch.py) and the
agent's prefetch unit (daemon/prefetch.py) classify with it. A learned
classifier offers the same interface: classify(feats, has_writes,
direction) -> class index or None, and describe()."""

from __future__ import annotations

from . import prefetch_features as PF


class RuleClassifier:
    """A stand-in for KML's MLP (its trained weights and running
    normalisation statistics are not available): rules over the same 5
    features, plus two facts of the window KML's features do not carry
    (whether it had writes, and its direction, WindowStats.direction), since
    sign-free features cannot tell a forward scan from a backward one.

    The rules estimate the pages per contiguous run of insertions: indices
    spread evenly over a range R have variance R^2/12, so feature 1 (variance
    over range) is about R/12, while jumps between runs of L pages make the
    mean |delta| (feature 3) about R/(3L); L is then about 4 x f1 / f3
    (1 for random pages, the window's length for one scan).

    - fewer than MIN_EVENTS insertions: no decision (the device keeps its
      readahead);
    - runs of MIN_RUN_PAGES or more: a scan, "reverse" when the window
      moved backward over at least half its range (direction <= -0.5),
      else "sequential";
    - otherwise "random+write" when the window had writes, else "random"."""

    name = "kml-rules"
    MIN_EVENTS = PF.MIN_EVENTS
    class_readahead_kb = PF.CLASS_READAHEAD_KB     # KML's sweep
    MIN_RUN_PAGES = 4.0
    REVERSE_DIRECTION = -0.5

    @staticmethod
    def run_pages(feats) -> float:
        """Estimated pages per contiguous run (see the class doc)."""
        return 4.0 * feats[1] / feats[3] if feats[3] > 0 else float("inf")

    def classify(self, feats, has_writes: bool, direction: float) -> int | None:
        if feats[0] < self.MIN_EVENTS:
            return None
        if self.run_pages(feats) >= self.MIN_RUN_PAGES:
            backward = direction <= self.REVERSE_DIRECTION
            return PF.PREFETCH_CLASSES.index("reverse" if backward else "sequential")
        return PF.PREFETCH_CLASSES.index("random+write" if has_writes else "random")

    def describe(self) -> str:
        return (f"rule-based stand-in for KML's MLP: < {self.MIN_EVENTS} insertions keep the "
                f"readahead; runs of >= {self.MIN_RUN_PAGES:g} pages (estimated as 4 x "
                "variance-over-range / mean |delta index|) are a scan, reverse if the "
                f"window's direction is <= {self.REVERSE_DIRECTION:g} (it moved backward over "
                "half its range or more), else sequential; otherwise random "
                "(random+write if the window had writes)")
