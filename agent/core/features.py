"""The admission feature schema: the one definition of what a model sees.

Heimdall's feature set (EuroSys'25), history length 3, per device (leg):

  index name                 unit     meaning
  0     io_type              0/1      0 = read, 1 = write
  1     size_bytes           bytes    request size
  2     queue_len            I/Os     I/Os in flight on the device at issue
  3-5   prev_queue_len_1..3  I/Os     queue_len at issue of the previous 3
                                      I/Os issued to this device (1 = latest)
  6-8   prev_latency_us_1..3 us       latency of the 3 I/Os that completed
                                      most recently before this issue
  9-11  prev_tput_mbps_1..3  MB/s     bytes / latency of those same 3 I/Os
                                      (1 MB/s = 1 byte/us)

History that does not exist yet (start of a trace) is 0. Only information
available at issue time is used: the latency history comes from I/Os that
had *completed* before the issue, as the kernel observer can know it.

Models are fed raw values in these units; any normalisation lives inside
the ONNX graph. Changing names, order or units requires bumping
SCHEMA_VERSION; the agent and `iobridge model check` refuse a model card
whose schema version differs.
"""

from __future__ import annotations

import numpy as np

from . import abi

SCHEMA_VERSION = 1
HISTORY = abi.HISTORY  # the kernel keeps this much history per leg

FEATURES: tuple[tuple[str, str], ...] = (
    ("io_type", "0=read,1=write"),
    ("size_bytes", "bytes"),
    ("queue_len", "I/Os in flight"),
    *((f"prev_queue_len_{i}", "I/Os in flight") for i in range(1, HISTORY + 1)),
    *((f"prev_latency_us_{i}", "microseconds") for i in range(1, HISTORY + 1)),
    *((f"prev_tput_mbps_{i}", "MB/s (bytes per microsecond)") for i in range(1, HISTORY + 1)),
)
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
    }


def device_features(issue_ns: np.ndarray, complete_ns: np.ndarray,
                    nbytes: np.ndarray, is_write: np.ndarray,
                    qlen: np.ndarray) -> np.ndarray:
    """Feature rows for the I/Os of ONE device, given in issue order.

    All arrays have one entry per I/O. Returns float32 [n, NUM_FEATURES].
    Latency history is causal: for I/O i only I/Os with
    complete_ns <= issue_ns[i] count, most recent completion first.
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
    out[:, COLS_PREV_LAT] = prev_lat
    out[:, COLS_PREV_TPUT] = prev_tput
    return out


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
