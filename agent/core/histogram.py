"""Log-linear latency histograms as the BPF observer keeps them.

Slot layout (IOBRIDGE_LAT_* in kmodule/iobridge_abi.h): values below
2^SUB_BITS ns get one slot each; above, each power of two [2^k, 2^(k+1)) is
split into 2^SUB_BITS equal slots. bpf/observer.bpf.c computes the slot in
the kernel; this module maps slots back to value ranges and percentiles.
"""

from __future__ import annotations

import numpy as np

from .abi import LAT_SLOTS as SLOTS
from .abi import LAT_SUB_BITS as SUB_BITS
_SUB = 1 << SUB_BITS


def slot_of(ns: int) -> int:
    """The slot a value of `ns` nanoseconds falls in (mirrors the BPF code)."""
    if ns < _SUB:
        return int(ns)
    k = int(ns).bit_length() - 1
    slot = (k - SUB_BITS + 1) * _SUB + ((int(ns) >> (k - SUB_BITS)) & (_SUB - 1))
    return min(slot, SLOTS - 1)


def slot_bounds(slot: int) -> tuple[int, int]:
    """[low, high) of the values that land in `slot`."""
    if slot < _SUB:
        return slot, slot + 1
    k = slot // _SUB + SUB_BITS - 1
    width = 1 << (k - SUB_BITS)
    low = (1 << k) + (slot % _SUB) * width
    return low, low + width


# [SLOTS, 2]: each slot's [low, high) (percentiles; metrics' bucket folding)
SLOT_BOUNDS = np.array([slot_bounds(s) for s in range(SLOTS)], dtype=np.float64)


def percentiles(hist, qs) -> list[float | None]:
    """Percentiles (0..100) of the values counted in `hist`, in ns.

    Linear interpolation inside the slot that holds the rank, so the error is
    at most one slot's width (12.5% of the value). None if the histogram is
    empty.
    """
    counts = np.asarray(hist, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return [None for _ in qs]
    cum = np.cumsum(counts)
    out = []
    for q in qs:
        if not 0 <= q <= 100:
            raise ValueError(f"percentile {q} is outside 0..100")
        rank = q / 100.0 * total
        slot = int(np.searchsorted(cum, rank, side="left"))
        slot = min(slot, len(counts) - 1)
        while counts[slot] == 0 and slot < len(counts) - 1:   # rank 0 -> first non-empty
            slot += 1
        before = cum[slot] - counts[slot]
        frac = (rank - before) / counts[slot] if counts[slot] else 0.0
        low, high = SLOT_BOUNDS[slot]
        out.append(float(low + (high - low) * min(max(frac, 0.0), 1.0)))
    return out


def from_samples(samples_ns) -> np.ndarray:
    """A histogram of the given values (for tests and offline use)."""
    hist = np.zeros(SLOTS, dtype=np.uint64)
    for v in samples_ns:
        hist[slot_of(int(v))] += 1
    return hist
