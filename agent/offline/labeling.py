"""Heimdall-style period-based labels, and the split by time.

For the I/Os of ONE device in issue order, with latency L[i] (us) and
throughput T[i] = bytes / latency (MB/s):

1. Thresholds (unless given): the latency threshold is the knee of the
   latency distribution and the throughput threshold the knee of the
   throughput distribution (`knee()`, a Kneedle-style point of maximum
   distance from the chord of the sorted values). The latency threshold
   may also be given per I/O: `relative_lat_threshold()` makes it K x the
   device's baseline latency known at the I/O's issue (the baseline of the
   feature schema, features.causal_baseline), so that one K labels
   recordings of fast and slow devices alike, where one threshold in
   microseconds would call every I/O of a slow device slow.
2. A slow period starts at an I/O whose throughput has dropped below the
   throughput threshold while its latency is above the latency threshold.
3. The period continues until the next `recover` (3) I/Os all have
   throughput at or above the median throughput; those I/Os are fast and
   the period ends just before them.
   With mixed request sizes, throughput is compared within groups of
   similar requests (size bucket and operation, `groups`): each I/O's
   throughput is divided by its group's median, a documented deviation that
   keeps small, fast requests from holding periods open.
4. Noise filtering: a period of `min_period - 1` (3) I/Os or fewer is not a
   slow period, and a slow-looking I/O outside any period (latency above the
   threshold) is noise. Both get label 0 and keep = False: training skips
   them, evaluation counts them as fast (the conservative choice).

Splits are by time, never random: `time_split` gives the issue time that
separates the earlier (training) part from the later (held-back) part.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core import features as F


def knee(values: np.ndarray, tail: str = "high") -> float:
    """Knee of a distribution: the sorted value farthest from the chord.

    tail="high": knee where a heavy upper tail starts (latency);
    tail="low": knee where a lower tail ends (throughput).
    Values are sorted, x = rank and y = value are both scaled to [0, 1];
    the knee maximises x - y for "high" (convex curve) and y - x for "low"
    (concave start). Returns the value at the knee.
    """
    v = np.sort(np.asarray(values, dtype=np.float64))
    v = v[np.isfinite(v)]
    if len(v) == 0:
        raise ValueError("knee of an empty distribution")
    if len(v) < 3 or v[-1] == v[0]:
        return float(v[-1] if tail == "high" else v[0])
    x = np.linspace(0.0, 1.0, len(v))
    y = (v - v[0]) / (v[-1] - v[0])
    d = x - y if tail == "high" else y - x
    return float(v[int(np.argmax(d))])


@dataclass
class Labels:
    slow: np.ndarray          # uint8, 1 = inside a slow period
    keep: np.ndarray          # bool, False = noise (excluded from training)
    lat_threshold_us: float | np.ndarray    # one value, or one per I/O
    tput_threshold_mbps: float
    median_tput_mbps: float
    periods: list[tuple[int, int]]   # [start, end) indices of kept periods


def relative_throughput(tput: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Throughput divided by the median throughput of its group."""
    out = np.empty(len(tput))
    for g in np.unique(groups):
        m = groups == g
        med = np.median(tput[m])
        out[m] = tput[m] / med if med > 0 else 1.0
    return out


def baseline_latency_us(issue_ns, complete_ns, nbytes) -> np.ndarray:
    """Per I/O, the device's baseline latency (us) known at its issue: the
    baseline of the feature schema (features.causal_baseline), computed
    from the same latencies and throughputs as features.device_features."""
    issue = np.asarray(issue_ns, dtype=np.int64)
    comp = np.asarray(complete_ns, dtype=np.int64)
    nb = np.asarray(nbytes, dtype=np.float64)
    lat_us = (comp - issue) / 1000.0
    tput = np.divide(nb, lat_us, out=np.zeros(len(lat_us)), where=lat_us > 0)
    base, _ = F.causal_baseline(issue, comp, lat_us, tput)
    return base


def relative_lat_threshold(issue_ns, complete_ns, nbytes, k: float) -> np.ndarray:
    """Per-I/O latency thresholds (us): k x the baseline latency known at
    issue (baseline_latency_us). For label_periods(lat_threshold_us=...)."""
    if not k > 0:
        raise ValueError(f"relative latency threshold must be positive, got {k}")
    return float(k) * baseline_latency_us(issue_ns, complete_ns, nbytes)


def label_periods(latency_us, nbytes, lat_threshold_us=None,
                  tput_threshold_mbps: float | None = None, recover: int = 3,
                  min_period: int = 4, groups=None) -> Labels:
    """Label the I/Os of one device (issue order). See the module docstring.

    `lat_threshold_us`: None (the knee), one number, or one number per I/O
    (e.g. relative_lat_threshold: K x the device's baseline).
    `groups` (optional, one id per I/O, e.g. size bucket and operation):
    throughput is then taken relative to the median of the I/O's group, so
    that small requests, whose bytes/latency is low even when the device is
    fast, do not look slow (the thresholds and median are then unitless).
    """
    lat = np.asarray(latency_us, dtype=np.float64)
    nb = np.asarray(nbytes, dtype=np.float64)
    n = len(lat)
    if n != len(nb):
        raise ValueError("latency and size arrays differ in length")
    if np.any(lat <= 0):
        raise ValueError("latencies must be positive")
    tput = nb / lat
    if groups is not None:
        tput = relative_throughput(tput, np.asarray(groups))
    if lat_threshold_us is None:
        lat_thr = knee(lat, "high")
    elif np.ndim(lat_threshold_us) == 0:
        lat_thr = float(lat_threshold_us)
    else:
        lat_thr = np.asarray(lat_threshold_us, dtype=np.float64)
        if lat_thr.shape != (n,):
            raise ValueError(f"per-I/O latency thresholds: expected {n} values, "
                             f"got shape {lat_thr.shape}")
    tput_thr = knee(tput, "low") if tput_threshold_mbps is None else float(tput_threshold_mbps)
    med = float(np.median(tput)) if n else 0.0
    slow = np.zeros(n, dtype=np.uint8)
    keep = np.ones(n, dtype=bool)
    periods: list[tuple[int, int]] = []
    recovered = tput >= med
    starts = (lat > lat_thr) & (tput < tput_thr)
    i = 0
    while i < n:
        if not starts[i]:
            i += 1
            continue
        # find end: first j > i with recovered[j : j+recover] all True
        j = i + 1
        while j < n:
            if j + recover <= n and recovered[j:j + recover].all():
                break
            j += 1
        end = j  # period is [i, end)
        if end - i >= min_period:
            slow[i:end] = 1
            periods.append((i, end))
        else:
            keep[i:end] = False
        i = end
    noise = (lat > lat_thr) & (slow == 0)
    keep &= ~noise
    return Labels(slow, keep, lat_thr, tput_thr, med, periods)


def time_split(issue_ns, train_fraction: float = 0.5) -> int:
    """Issue time (ns) separating the earlier `train_fraction` of the trace's
    time span from the held-back later part (rows with issue_ns >= split)."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError("train_fraction must be in (0, 1)")
    t = np.asarray(issue_ns)
    lo, hi = int(t.min()), int(t.max())
    return lo + int((hi - lo) * train_fraction)
