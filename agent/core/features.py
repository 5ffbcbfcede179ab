"""The admission feature schema: the one definition of what a model sees.

Heimdall's feature set (EuroSys'25), history length 3, per device (leg),
with the latency and throughput history expressed relative to the leg's own
baseline (schema v2), so that a model trained on one machine transfers to a
faster or slower one:

  index name                  unit     meaning
  0     io_type               0/1      0 = read, 1 = write
  1     size_bytes            bytes    request size
  2     queue_len             I/Os     I/Os in flight on the device at issue
  3-5   prev_queue_len_1..3   I/Os     queue_len at issue of the previous 3
                                       I/Os issued to this device (1 = latest)
  6-8   prev_latency_rel_1..3 x base   latency of the 3 I/Os that completed
                                       most recently before this issue, over
                                       the leg's baseline latency
  9-11  prev_tput_rel_1..3    x base   bytes / latency of those same 3 I/Os,
                                       over the leg's baseline throughput

The baseline (BaselineTracker) is what a fast I/O looks like on this leg
now: the BASELINE_LAT_QUANTILE of the latencies of the leg's last
BASELINE_WINDOW completions, and the BASELINE_TPUT_QUANTILE of their
throughputs. Training computes it causally from the trace
(device_features); the agent from the samples it reads from the kernel.

History that does not exist yet (start of a trace) is 0. Only information
available at issue time is used: the latency history comes from I/Os that
had *completed* before the issue, as the kernel observer can know it.

Models are fed these values; any normalisation lives inside the ONNX graph.
Changing names, order, units or the baseline requires bumping
SCHEMA_VERSION; the agent and `iobridge model check` refuse a model card
whose schema version differs.
"""

from __future__ import annotations

import numpy as np

from . import abi

SCHEMA_VERSION = 2
HISTORY = abi.HISTORY  # the kernel keeps this much history per leg

FEATURES: tuple[tuple[str, str], ...] = (
    ("io_type", "0=read,1=write"),
    ("size_bytes", "bytes"),
    ("queue_len", "I/Os in flight"),
    *((f"prev_queue_len_{i}", "I/Os in flight") for i in range(1, HISTORY + 1)),
    *((f"prev_latency_rel_{i}", "x leg baseline latency") for i in range(1, HISTORY + 1)),
    *((f"prev_tput_rel_{i}", "x leg baseline throughput") for i in range(1, HISTORY + 1)),
)

# The leg baseline (see the module doc).
BASELINE_WINDOW = 1024          # completions
BASELINE_LAT_QUANTILE = 0.25
BASELINE_TPUT_QUANTILE = 0.75
BASELINE_STEP = 128             # training: the baseline moves every this many completions
MIN_BASELINE_SAMPLES = 16       # fewer: no baseline yet
FEATURE_NAMES: tuple[str, ...] = tuple(n for n, _ in FEATURES)
FEATURE_UNITS: tuple[str, ...] = tuple(u for _, u in FEATURES)
NUM_FEATURES = len(FEATURES)

# Column slices, for code that fills rows.
COL_IO_TYPE, COL_SIZE, COL_QLEN = 0, 1, 2
COLS_PREV_QLEN = slice(3, 3 + HISTORY)
COLS_PREV_LAT = slice(3 + HISTORY, 3 + 2 * HISTORY)
COLS_PREV_TPUT = slice(3 + 2 * HISTORY, 3 + 3 * HISTORY)

# ONNX contract shared with the agent: one float32 input [N, NUM_FEATURES],
# output "probabilities" float32 [N, 2] whose column 1 is P(slow).
INPUT_NAME = "features"
PROBA_OUTPUT = "probabilities"
LABEL_OUTPUT = "label"


def schema_dict() -> dict:
    """The schema as recorded in a model card."""
    return {
        "schema_version": SCHEMA_VERSION,
        "features": [{"name": n, "unit": u} for n, u in FEATURES],
        "baseline": {"latency": f"quantile {BASELINE_LAT_QUANTILE} of the leg's last "
                                f"{BASELINE_WINDOW} completion latencies",
                     "throughput": f"quantile {BASELINE_TPUT_QUANTILE} of their throughputs",
                     "why": "latency inputs relative to each leg's own baseline, so that the "
                            "model transfers to faster or slower devices and hosts"},
    }


def device_features(issue_ns: np.ndarray, complete_ns: np.ndarray,
                    nbytes: np.ndarray, is_write: np.ndarray,
                    qlen: np.ndarray) -> np.ndarray:
    """Feature rows for the I/Os of ONE device, given in issue order.

    All arrays have one entry per I/O. Returns float32 [n, NUM_FEATURES].
    Latency history is causal: for I/O i only I/Os with
    complete_ns <= issue_ns[i] count, most recent completion first, and the
    baseline is the one known at issue (see causal_baseline).
    """
    n = len(issue_ns)
    out = np.zeros((n, NUM_FEATURES), dtype=np.float32)
    if n == 0:
        return out
    issue = np.asarray(issue_ns, dtype=np.int64)
    comp = np.asarray(complete_ns, dtype=np.int64)
    nb = np.asarray(nbytes, dtype=np.float64)
    q = np.asarray(qlen, dtype=np.float64)
    out[:, COL_IO_TYPE] = np.asarray(is_write, dtype=np.float32)
    out[:, COL_SIZE] = nb
    out[:, COL_QLEN] = q
    for k in range(1, HISTORY + 1):
        out[k:, COLS_PREV_QLEN.start + k - 1] = q[:-k] if k < n else []

    lat_us = (comp - issue) / 1000.0
    tput = np.divide(nb, lat_us, out=np.zeros(n), where=lat_us > 0)
    prev_lat, prev_tput = causal_last(issue, comp, [lat_us, tput], HISTORY)
    base_lat, base_tput = causal_baseline(issue, comp, lat_us, tput)
    out[:, COLS_PREV_LAT] = relative(prev_lat, base_lat[:, None])
    out[:, COLS_PREV_TPUT] = relative(prev_tput, base_tput[:, None])
    return out


def relative(values, base):
    """values / base, 0 where the base is unknown (0) or the value is 0."""
    values = np.asarray(values, dtype=np.float64)
    base = np.broadcast_to(np.asarray(base, dtype=np.float64), values.shape)
    return np.divide(values, base, out=np.zeros(values.shape), where=base > 0)


def causal_baseline(issue_ns, complete_ns, lat_us, tput):
    """Per I/O, the leg baseline (latency us, throughput) known at its issue.

    Completions are taken in completion order; every BASELINE_STEP of them
    the baseline becomes the quantiles of the last BASELINE_WINDOW. An I/O
    issued before MIN_BASELINE_SAMPLES completions gets the first baseline
    (the start of a trace has no history to be causal with)."""
    issue = np.asarray(issue_ns, dtype=np.int64)
    comp = np.asarray(complete_ns, dtype=np.int64)
    n = len(issue)
    if n == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(comp, kind="stable")
    lat_c = np.asarray(lat_us, dtype=np.float64)[order]
    tput_c = np.asarray(tput, dtype=np.float64)[order]
    ends = np.arange(min(MIN_BASELINE_SAMPLES, n), n + 1, BASELINE_STEP)
    if ends[-1] != n:
        ends = np.append(ends, n)
    b_lat = np.array([np.quantile(lat_c[max(0, e - BASELINE_WINDOW):e], BASELINE_LAT_QUANTILE)
                      for e in ends])
    b_tput = np.array([np.quantile(tput_c[max(0, e - BASELINE_WINDOW):e], BASELINE_TPUT_QUANTILE)
                       for e in ends])
    known_at = comp[order][ends - 1]                 # when each baseline became known
    idx = np.searchsorted(known_at, issue, side="right") - 1
    idx = np.clip(idx, 0, len(ends) - 1)
    return b_lat[idx], b_tput[idx]


class BaselineTracker:
    """The running baseline of one leg, from latency samples as they come
    (the agent's view: it samples the kernel's newest completions)."""

    def __init__(self, window: int = BASELINE_WINDOW):
        self._lat = np.zeros(window)
        self._tput = np.zeros(window)
        self._per_read = np.zeros(window)
        self.n = 0          # samples seen (the ring holds min(n, window))

    def add(self, lat_us, tput, per_read_us=None) -> None:
        """Completions: latency, throughput and per-read latency (latency
        over the bios ahead of it at queue time + 1; the latency itself when
        not known)."""
        lat = np.atleast_1d(np.asarray(lat_us, dtype=np.float64))
        tp = np.atleast_1d(np.asarray(tput, dtype=np.float64))
        per = lat if per_read_us is None else \
            np.atleast_1d(np.asarray(per_read_us, dtype=np.float64))
        keep = lat > 0
        lat, tp, per = lat[keep], tp[keep], per[keep]
        window = len(self._lat)
        skip = max(len(lat) - window, 0)      # older than the ring holds
        idx = (self.n + skip + np.arange(len(lat) - skip)) % window
        self._lat[idx], self._tput[idx] = lat[skip:], tp[skip:]
        self._per_read[idx] = per[skip:]
        self.n += len(lat)

    @property
    def ready(self) -> bool:
        return self.n >= MIN_BASELINE_SAMPLES

    def _held(self):
        k = min(self.n, len(self._lat))
        return self._lat[:k], self._tput[:k]

    def latency_us(self) -> float:
        lat, _ = self._held()
        return float(np.quantile(lat, BASELINE_LAT_QUANTILE)) if len(lat) else 0.0

    def service_us(self) -> float:
        """The leg's service time per read: the low quantile of the per-read
        latencies (what a read adds to its queue), as latency_us() is of the
        latencies."""
        k = min(self.n, len(self._per_read))
        return float(np.quantile(self._per_read[:k], BASELINE_LAT_QUANTILE)) if k else 0.0

    def tput(self) -> float:
        _, tp = self._held()
        return float(np.quantile(tp, BASELINE_TPUT_QUANTILE)) if len(tp) else 0.0

    def slow_latency_us(self, above_us: float, min_count: int) -> float | None:
        """Median of the held latencies above `above_us`; None with fewer
        than min_count of them (jitter, not slow periods)."""
        lat, _ = self._held()
        slow = lat[lat > above_us]
        return float(np.median(slow)) if len(slow) >= min_count else None


def causal_last(issue_ns: np.ndarray, complete_ns: np.ndarray, values, k: int):
    """For each I/O i, the values of the k I/Os that completed most recently
    at or before issue_ns[i] (latest first; 0 where there are fewer).
    `values` is a list of per-I/O arrays; returns a list of [n, k] arrays."""
    issue = np.asarray(issue_ns, dtype=np.int64)
    comp = np.asarray(complete_ns, dtype=np.int64)
    order = np.argsort(comp, kind="stable")
    done = np.searchsorted(comp[order], issue, side="right")
    outs = [np.zeros((len(issue), k)) for _ in values]
    for j in range(1, k + 1):
        idx = done - j
        ok = idx >= 0
        src = order[np.clip(idx, 0, None)]
        for o, v in zip(outs, values):
            o[:, j - 1] = np.where(ok, np.asarray(v)[src], 0.0)
    return outs
