"""Training the admission model: label, featurise, fit, export ONNX + card.

Pipeline for `iobridge train --trace T... --out M.onnx`:

1. Each trace is loaded. A trace with measured latency and queue length
   (recorded by `iobridge record`) is used as is, one labeled sequence per
   (device, leg). A trace without latency (the public traces) is driven
   through the device model (devmodel.py) with `--legs` legs and reads
   routed at random, and each leg's I/Os become one sequence.
2. Each sequence is labeled (labeling.label_periods) and featurised
   (features.device_features) in issue order. Label thresholds are the
   knees of each sequence's distributions unless given: the latency one in
   us (--lat-threshold-us) or relative to the device's causal baseline
   (--lat-threshold-rel K), the throughput one relative to the median of
   similar I/Os (--tput-threshold).
3. Split by time per trace: the earlier --train-fraction is for fitting
   (its last 20% chooses the decision threshold that maximises F1), the
   later part is held back and gives the card's figures.
4. Default model: Heimdall's MLP 12 -> 128 -> 16 -> 1 (sklearn
   MLPClassifier, ReLU, Adam) behind a StandardScaler, both inside the ONNX
   graph so the agent feeds raw features; `--kind gbdt` fits gradient-
   boosted trees (100 trees of depth 3) instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..core import cliutil
from ..core import decision as D
from ..core import features as F
from . import policies as P
from ..core.abi import (NUM_INFLIGHT_BUCKETS, NUM_LAT_BUCKETS, NUM_SIZE_BUCKETS,
                        SIZE_BUCKET_MAX_BYTES)
from ..core.errors import IobridgeError, UsageError
from ..core.model import AdmissionModel, CARD_VERSION, card_path, check_model, model_sha256
from ..core.outfiles import atomic_output, check_output
from .devmodel import DeviceParams
from .labeling import baseline_latency_us, knee, label_periods, time_split
from .progress import Progress
from .simulate import simulate
from .trace import OP_READ, OP_WRITE, Trace, describe, load_any

VAL_FRACTION = 0.2


@dataclass
class Dataset:
    X: np.ndarray
    y: np.ndarray
    keep: np.ndarray
    issue_ns: np.ndarray
    is_read: np.ndarray
    labeling: list = field(default_factory=list)


def _groups(rec: Trace):
    dev = rec["device"]
    leg = rec["leg"]
    keys = sorted(set(zip(dev.tolist(), leg.tolist())))
    for d, l in keys:
        idx = np.flatnonzero((dev == d) & (leg == l))
        idx = idx[np.argsort(rec["issue_ns"][idx], kind="stable")]
        name = str(d) if l < 0 or d == f"leg{l}" else f"{d}/leg{l}"
        yield name, idx


def _check_measured(rec: Trace, what: str) -> None:
    if not rec.has_latency:
        raise IobridgeError(f"{what}: trace has I/Os without latency")
    if np.any(rec["qlen"] < 0):
        raise IobridgeError(f"{what}: trace has I/Os without queue length at issue",
                            "record with a recorder that fills qlen")


def heimdall_dataset(records: list[Trace], thresholds: dict | None = None,
                     group_by_qlen: bool = False) -> Dataset:
    """Labels and features for every (device, leg) sequence of the records.
    `thresholds` overrides the knees: lat_threshold_us (one latency in us),
    or lat_threshold_rel (K: K x each I/O's baseline latency, the feature
    schema's causal baseline), and tput_threshold_mbps."""
    thresholds = dict(thresholds or {})
    lat_rel = thresholds.pop("lat_threshold_rel", None)
    if lat_rel is not None and thresholds.get("lat_threshold_us") is not None:
        raise UsageError("give one latency threshold: in us or relative to the baseline")
    parts = []
    info = []
    for rec in records:
        _check_measured(rec, rec.meta.get("source", "trace"))
        for name, idx in _groups(rec):
            if len(idx) < 8:
                continue
            issue = rec["issue_ns"][idx]
            comp = issue + rec["latency_ns"][idx]
            nb = rec["bytes"][idx]
            lat_us = np.maximum(rec["latency_ns"][idx] / 1000.0, 1e-3)
            # "Similar I/Os" for the throughput comparison: same size bucket
            # and operation, and optionally the same queue-length class (0, 1,
            # 2-3, 4-7, ...): with a closed-loop client at a fixed depth the
            # queue is the client's choice, and a deeper queue's lower per-I/O
            # throughput is not a slow period. Off by default, because where
            # slow periods make the queue grow, grouping by it hides them.
            grp = np.searchsorted(np.asarray(SIZE_BUCKET_MAX_BYTES), nb) * 8 + rec["op"][idx]
            if group_by_qlen:
                qcls = np.minimum(np.ceil(np.log2(rec["qlen"][idx] + 1.0)), 7).astype(np.int64)
                grp = grp * 8 + qcls
            seq = {"sequence": name, "ios": int(len(idx))}
            if lat_rel is not None:
                base = baseline_latency_us(issue, comp, nb)
                lat_thr = np.maximum(lat_rel * base, 1e-3)
                seq["lat_threshold_rel"] = lat_rel
                seq["baseline_lat_us"] = {k: round(float(f(base)), 2) for k, f in
                                          (("min", np.min), ("median", np.median),
                                           ("max", np.max))}
            else:
                lat_thr = thresholds.get("lat_threshold_us")
            lab = label_periods(lat_us, nb, lat_threshold_us=lat_thr, groups=grp,
                                tput_threshold_mbps=thresholds.get("tput_threshold_mbps"))
            X = F.device_features(issue, comp, nb, rec["op"][idx] == OP_WRITE, rec["qlen"][idx])
            parts.append((X, lab.slow, lab.keep, issue, rec["op"][idx] == OP_READ))
            if lat_rel is None:
                seq["lat_threshold_us"] = round(lab.lat_threshold_us, 2)
            seq.update({"rel_tput_threshold": round(lab.tput_threshold_mbps, 4),
                        "slow_periods": len(lab.periods),
                        "slow_fraction": round(float(lab.slow.mean()), 5)})
            info.append(seq)
    if not parts:
        raise IobridgeError("no sequence with enough I/Os to label")
    cat = [np.concatenate([p[i] for p in parts]) for i in range(5)]
    return Dataset(cat[0], cat[1].astype(np.int64), cat[2], cat[3], cat[4], info)


def linnos_dataset(records: list[Trace]):
    """LinnOS inputs and per-I/O labels (latency above the knee) for reads."""
    Xs, ys, ts = [], [], []
    for rec in records:
        _check_measured(rec, rec.meta.get("source", "trace"))
        for _, idx in _groups(rec):
            issue = rec["issue_ns"][idx]
            lat_ns = rec["latency_ns"][idx]
            q = rec["qlen"][idx].astype(np.float64)
            n = len(idx)
            pq = np.zeros((n, P.LINNOS_HISTORY))
            for k in range(1, P.LINNOS_HISTORY + 1):
                pq[k:, k - 1] = q[:-k] if k < n else []
            (pl,) = F.causal_last(issue, issue + lat_ns, [lat_ns / 1000.0], P.LINNOS_HISTORY)
            rd = rec["op"][idx] == OP_READ
            Xs.append(P.linnos_rows(q[rd], pq[rd], pl[rd]))
            ys.append(lat_ns[rd] / 1000.0)
            ts.append(issue[rd])
    X = np.concatenate(Xs); lat = np.concatenate(ys); t = np.concatenate(ts)
    if len(lat) < 8:
        raise IobridgeError("not enough reads to train the LinnOS-style model")
    thr = knee(lat, "high")
    return X, (lat > thr).astype(np.int64), t, thr


def metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    from sklearn.metrics import roc_auc_score
    y = np.asarray(y).astype(bool)
    pred = np.asarray(p) >= threshold
    tp = int((pred & y).sum()); fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum()); tn = int((~pred & ~y).sum())
    n = len(y)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    auc = float(roc_auc_score(y, p)) if 0 < y.sum() < n else None
    return {"rows": n, "slow_rows": int(y.sum()), "accuracy": (tp + tn) / n if n else 0.0,
            "precision": prec, "recall": rec,
            "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
            "roc_auc": auc, "threshold": threshold,
            "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn}}


def best_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Decision threshold maximising F1 on (y, p); 0.5 without positives."""
    y = np.asarray(y).astype(bool)
    if not y.any():
        return 0.5
    cands = np.unique(np.clip(np.quantile(p, np.linspace(0.5, 0.999, 200)), 1e-4, 1 - 1e-4))
    best, bf = 0.5, -1.0
    for c in cands:
        pred = p >= c
        tp = (pred & y).sum()
        f1 = 2 * tp / (pred.sum() + y.sum()) if pred.sum() + y.sum() else 0.0
        if f1 > bf:
            best, bf = float(c), f1
    return best


def _estimator(kind: str, hidden: tuple, max_epochs: int, seed: int):
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    if kind == "mlp":
        from sklearn.neural_network import MLPClassifier
        clf = MLPClassifier(hidden_layer_sizes=hidden, activation="relu", solver="adam",
                            batch_size=256, learning_rate_init=1e-3, max_iter=max_epochs,
                            random_state=seed, tol=1e-5, n_iter_no_change=max_epochs)
    elif kind == "gbdt":
        # GradientBoostingClassifier: skl2onnx 1.20 cannot export scikit-learn
        # 1.9's HistGradientBoostingClassifier
        from sklearn.ensemble import GradientBoostingClassifier
        clf = GradientBoostingClassifier(n_estimators=100, max_depth=3, learning_rate=0.1,
                                         subsample=0.5, random_state=seed)
    else:
        raise UsageError(f"unknown model kind {kind!r}", "use mlp or gbdt")
    return Pipeline([("scale", StandardScaler()), ("clf", clf)])


def _fit(est, X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X, y)
    return est


def to_onnx(est, width: int) -> bytes:
    from skl2onnx import to_onnx as sk_to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    onx = sk_to_onnx(est, initial_types=[(F.INPUT_NAME, FloatTensorType([None, width]))],
                     options={id(est): {"zipmap": False}}, target_opset=17)
    names = [o.name for o in onx.graph.output]
    if F.PROBA_OUTPUT not in names:
        raise IobridgeError(f"ONNX export produced outputs {names}, expected {F.PROBA_OUTPUT!r}")
    return onx.SerializeToString()


@dataclass
class TrainResult:
    model: AdmissionModel
    onnx_bytes: bytes
    threshold: float
    validation: dict
    train_rows: int
    seconds: float
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"threshold": self.threshold, "train_rows": self.train_rows,
                "training_time_s": round(self.seconds, 2), "evaluation": self.validation,
                **self.extra}


def _fit_with_threshold(X, y, t, kind, hidden, max_epochs, seed, width):
    """Fit on the earlier 80% (by time) of (X, y), choose the threshold on the
    later 20%, export. Returns (est, onnx bytes, threshold, val metrics)."""
    # time of the row at the (1 - VAL_FRACTION) quantile: earlier rows fit,
    # later rows validate (a split by time that keeps enough validation rows
    # when arrivals are bursty)
    cut = int(np.sort(t)[int(len(t) * (1.0 - VAL_FRACTION))]) if len(t) > 1 else 0
    fit_m = t < cut
    val_m = ~fit_m
    if fit_m.sum() < 10 or val_m.sum() < 10:
        raise IobridgeError(f"too few rows to train ({len(t)})")
    if not y[fit_m].any():
        raise IobridgeError("the training part has no slow I/Os: nothing to learn",
                            "use a longer trace or one with slow periods")
    if y[fit_m].all():
        raise IobridgeError("every I/O of the training part is labelled slow: nothing to learn",
                            "raise --lat-threshold-us or --lat-threshold-rel, or leave them out "
                            "for the knee of the latency distribution")
    est = _fit(_estimator(kind, hidden, max_epochs, seed), X[fit_m], y[fit_m])
    onx = to_onnx(est, width)
    m = AdmissionModel(None, onnx_bytes=onx, card={"decision_threshold": 0.5})
    pv = m.p_slow(X[val_m])
    thr = best_threshold(y[val_m], pv)
    m.threshold = thr
    return m, onx, thr, metrics(y[val_m], pv, thr), int(fit_m.sum())


def train_heimdall_on_records(records: list[Trace], kind: str = "mlp", max_epochs: int = 30,
                              thresholds: dict | None = None, group_by_qlen: bool = False,
                              seed: int = 0) -> TrainResult:
    t0 = time.perf_counter()
    ds = heimdall_dataset(records, thresholds, group_by_qlen)
    k = ds.keep
    m, onx, thr, val, n = _fit_with_threshold(ds.X[k], ds.y[k], ds.issue_ns[k], kind,
                                              (128, 16), max_epochs, seed, F.NUM_FEATURES)
    return TrainResult(m, onx, thr, val, n, time.perf_counter() - t0,
                       {"labeling": ds.labeling})


def train_linnos_on_records(records: list[Trace], max_epochs: int = 30, seed: int = 0) -> TrainResult:
    t0 = time.perf_counter()
    X, y, t, lat_thr = linnos_dataset(records)
    m, onx, thr, val, n = _fit_with_threshold(X, y, t, "mlp", (256,), max_epochs, seed,
                                              P.LINNOS_WIDTH)
    return TrainResult(m, onx, thr, val, n, time.perf_counter() - t0,
                       {"latency_threshold_us": lat_thr})


# ---------------------------------------------------------------- iobridge train

# The rows of the decision table the card shows P(slow) for: reads of the
# smallest size bucket on an idle or nearly idle leg, at every latency bucket.
CARD_TABLE_INFLIGHT = (0, 1)


def table_rows_p_slow(model, lat_us: float = 100.0, tput: float = 40.0) -> dict:
    """P(slow) the model gives the decision table's rows (core/decision.key_rows)
    of a leg with this baseline: reads of BUCKET_SIZE_BYTES[0], per in-flight
    bucket of CARD_TABLE_INFLIGHT, at every latency bucket (LAT_REP_REL x
    the baseline latency). The table avoids a leg by these; a useful model
    has them low at 1-2x and rising with the latency."""
    base = D.LegBaseline(lat_us=lat_us, tput=tput, slow_lat_us=D.SLOW_LAT_FLOOR_REL * lat_us)
    p = np.asarray(model.p_slow(D.key_rows(base)), dtype=np.float64).reshape(
        NUM_SIZE_BUCKETS, NUM_INFLIGHT_BUCKETS, NUM_LAT_BUCKETS)
    return {"baseline": {"lat_us": lat_us, "tput_bytes_per_us": tput},
            "size_bytes": D.BUCKET_SIZE_BYTES[0],
            "lat_rel": list(D.LAT_REP_REL),
            "p_slow_by_inflight": {str(D.INFLIGHT_REP[i]): [round(float(v), 4) for v in p[0, i]]
                                   for i in CARD_TABLE_INFLIGHT}}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tool_versions() -> dict:
    import onnx, onnxruntime, skl2onnx, sklearn
    return {"python": platform.python_version(), "numpy": np.__version__,
            "scikit-learn": sklearn.__version__, "skl2onnx": skl2onnx.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def measured_records(trace: Trace, legs: int, params: DeviceParams, seed: int,
                     progress=None) -> tuple[Trace, dict]:
    """The trace itself if it has measured latency, else its replay through
    the device model with random routing over `legs` legs."""
    if trace.has_latency and np.all(trace["qlen"] >= 0):
        return trace, {"latency": "measured (recorded trace)"}
    rec = simulate(trace.sorted(), legs, P.Random(), params, seed, record=True,
                   progress=progress, label="device model").records
    rec.meta["source"] = trace.meta.get("source", "trace")
    return rec, {"latency": f"device model (agent/devmodel.py), {legs} legs, reads routed "
                            f"uniformly at random, writes to every leg, seed {seed}",
                 "device_model": params.as_dict()}


def train_admission(trace_paths: list[str], out: str, *, legs: int = 2, kind: str = "mlp",
                    train_fraction: float = 0.7, max_epochs: int = 30, seed: int = 0,
                    params: DeviceParams = DeviceParams(), load_opts: dict | None = None,
                    progress=None, thresholds: dict | None = None,
                    group_by_qlen: bool = False, notes: list[str] | None = None,
                    force: bool = False) -> dict:
    """Train, then write OUT.onnx and OUT.card.json as a pair or not at all.
    `force`: overwrite an existing model and card (else they are refused
    before the training starts)."""
    progress = progress or Progress(False)
    out = Path(out)
    if out.suffix != ".onnx":
        raise UsageError(f"--out {out}: expected a file name ending in .onnx")
    _check_outputs(out, trace_paths, force)     # before the long work
    t_start = time.perf_counter()
    train_recs, test_recs, data = [], [], []
    for path in trace_paths:
        progress.phase(f"loading {path}")
        tr = load_any(path, **(load_opts or {}))
        rec, how = measured_records(tr, legs, params, seed, progress)
        if not len(rec):
            raise IobridgeError(f"{path}: no reads or writes to learn from "
                                f"({len(tr)} records: {describe(tr)['ops']})")
        split = time_split(rec["issue_ns"], train_fraction)
        early = rec["issue_ns"] < split
        if early.all() or not early.any():
            raise IobridgeError(f"{path}: too short to split by time: the earlier "
                                f"{train_fraction:g} of its time span holds {int(early.sum())} "
                                f"of its {len(rec)} I/Os", "use a longer trace")
        train_recs.append(rec.take(np.flatnonzero(early)))
        test_recs.append(rec.take(np.flatnonzero(~early)))
        p = Path(path)
        data.append({"file": p.name, "sha256": _sha256(p), "records": len(tr),
                     "import": tr.meta, **how,
                     "split_ns": split, "train_ios": int(early.sum()),
                     "held_back_ios": int((~early).sum())})
    progress.phase(f"labeling and training ({kind})")
    t_fit = time.perf_counter()
    res = train_heimdall_on_records(train_recs, kind=kind, max_epochs=max_epochs, seed=seed,
                                    thresholds=thresholds, group_by_qlen=group_by_qlen)
    fit_s = time.perf_counter() - t_fit
    progress.phase("evaluating on the held-back part")
    test = heimdall_dataset(test_recs, thresholds, group_by_qlen)
    p = res.model.p_slow(test.X)
    ev_all = metrics(test.y, p, res.threshold)
    ev_reads = metrics(test.y[test.is_read], p[test.is_read], res.threshold)
    hidden = "12 -> 128 -> 16 -> 1 (ReLU hidden layers, logistic output; the graph " \
        "emits [1 - p, p])" if kind == "mlp" else \
        "gradient-boosted trees, 100 trees of depth 3"
    card = {
        "card_version": CARD_VERSION,
        "task": "admission",
        "name": out.stem,
        **F.schema_dict(),
        "input": {"name": F.INPUT_NAME, "dtype": "float32", "shape": ["N", F.NUM_FEATURES]},
        "outputs": {F.PROBA_OUTPUT: "float32 [N, 2], column 1 = P(slow)",
                    F.LABEL_OUTPUT: "int64 [N], argmax class (ignore; use the threshold)"},
        "normalisation": "StandardScaler inside the graph: feed raw feature values in the "
                         "schema's units",
        "decision_threshold": res.threshold,
        "decision_rule": "avoid the leg for this size bucket when P(slow) >= decision_threshold",
        "model": {"kind": kind, "layers": hidden, "max_epochs": max_epochs, "seed": seed},
        "training": {
            "data": data,
            "counting": "train_ios / held_back_ios / rows count per-leg I/O records: a "
                        "mirrored write appears once per leg",
            "labeling": {"method": "Heimdall period-based (agent/offline/labeling.py): latency "
                                   "and throughput thresholds at the knee of each sequence's "
                                   "distributions (unless overridden; lat_threshold_rel K: a "
                                   "latency above K x the device's baseline latency known at "
                                   "issue, the feature schema's causal baseline), throughput "
                                   "relative to "
                                   "the median of I/Os of the same size bucket and operation "
                                   "(and queue-length class if group_by_qlen), period ends after 3 I/Os above median "
                                   "throughput, periods of <= 3 I/Os and isolated slow I/Os "
                                   "are noise (excluded from fitting, counted as fast in "
                                   "evaluation)",
                         "threshold_overrides": thresholds or None,
                         "group_by_qlen": group_by_qlen,
                         "sequences": res.extra["labeling"]},
            "split": f"by time per trace: first {train_fraction:.0%} of each trace's time "
                     f"span for fitting (the I/Os in its last {VAL_FRACTION:.0%} by "
                     f"time choose the threshold maximising F1), the rest held back",
            "fit_rows": res.train_rows,
            "validation": res.validation,
        },
        "evaluation": {"held_back_all_ios": ev_all, "held_back_reads": ev_reads,
                       "accuracy": ev_all["accuracy"], "precision": ev_all["precision"],
                       "recall": ev_all["recall"], "roc_auc": ev_all["roc_auc"]},
        "table_rows": table_rows_p_slow(res.model),
        **({"notes": list(notes)} if notes else {}),
        "training_time_s": round(fit_s, 2),
        "pipeline_time_s": round(time.perf_counter() - t_start, 2),
        "tools": _tool_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    card["model_sha256"] = model_sha256(res.onnx_bytes)
    card = {k: card[k] for k in ("card_version", "task", "name", "model_sha256")} | card
    check_model(out, card, data=res.onnx_bytes)      # checked before anything is written
    _check_outputs(out, trace_paths, force)          # again: nothing appeared meanwhile
    write_model_and_card(out, res.onnx_bytes, card)
    return card


def write_card(path, card: dict) -> None:
    Path(path).write_text(json.dumps(card, indent=2, default=float) + "\n")


def _check_outputs(out: Path, sources, force: bool) -> None:
    """check_output for the model and its card."""
    for p in (out, card_path(out)):
        check_output(p, force, sources)


def write_model_and_card(out, onnx_bytes: bytes, card: dict) -> None:
    """Both files or neither: each is written to a temporary file beside it
    (atomic_output); on any failure both are removed. The model is renamed
    into place first, then the card; if the card's rename fails, the new
    model is removed again. A reader between the two renames sees a card of
    another model, which the sha256 in the card makes check_model refuse."""
    out = Path(out)
    placed = False
    try:
        with atomic_output(card_path(out)) as tmp_card:
            write_card(tmp_card, card)
            with atomic_output(out) as tmp_model:
                tmp_model.write_bytes(onnx_bytes)
            placed = True
    except BaseException:
        if placed:
            try:
                os.unlink(os.path.realpath(out))
            except OSError:
                pass
        raise


def _thresholds(args) -> dict:
    """Label threshold overrides: the knee of a raw distribution lands inside
    the fast mode when slow I/Os are tens of times slower (seen on the VM's
    slow-period traces), so they can be set between the modes instead."""
    out = {}
    if args.lat_threshold_us is not None and args.lat_threshold_rel is not None:
        raise UsageError("--lat-threshold-us and --lat-threshold-rel exclude each other")
    if args.lat_threshold_us is not None:
        if args.lat_threshold_us <= 0:
            raise UsageError("--lat-threshold-us must be positive")
        out["lat_threshold_us"] = args.lat_threshold_us
    if args.lat_threshold_rel is not None:
        if not args.lat_threshold_rel > 1:
            raise UsageError("--lat-threshold-rel is a multiple of the baseline latency: "
                             "a number above 1")
        out["lat_threshold_rel"] = args.lat_threshold_rel
    if args.tput_threshold is not None:
        if not 0 < args.tput_threshold < 1:
            raise UsageError("--tput-threshold is relative to the median: a number in (0, 1)")
        out["tput_threshold_mbps"] = args.tput_threshold
    return out


def _cmd_train(args) -> int:
    if args.task == "prefetch":      # train_prefetch.register_cli routes it there
        raise UsageError("--task prefetch is handled by iobridge.offline.train_prefetch")
    if args.data or args.held_back:
        raise UsageError(f"--{'data' if args.data else 'held-back'} is an option of "
                         "--task prefetch", "add --task prefetch")
    if not args.trace:
        raise UsageError("the admission task needs traces: --trace T (repeatable)")
    if args.max_epochs is None:
        args.max_epochs = 30
    if not 0.0 < args.train_fraction < 1.0:
        raise UsageError("--train-fraction must be between 0 and 1 (exclusive)")
    if not 1 <= args.legs <= 8:
        raise UsageError("--legs must be 1..8")
    prog = Progress(not args.quiet)
    card = train_admission(args.trace, args.out, legs=args.legs, kind=args.kind,
                           train_fraction=args.train_fraction, max_epochs=args.max_epochs,
                           seed=args.seed, progress=prog,
                           load_opts={"time_unit": args.time_unit, "duration_s": args.duration},
                           thresholds=_thresholds(args), group_by_qlen=args.group_by_qlen,
                           notes=args.note, force=args.force)
    ev = card["evaluation"]
    auc = ev["roc_auc"]
    if args.json:
        print(json.dumps({"model": str(args.out), "card_file": str(card_path(args.out)),
                          "card": card}, indent=2))
        return 0
    print(f"wrote {args.out} and {card_path(args.out)}")
    print(f"held-back part: accuracy {ev['accuracy']:.4f}, precision(slow) "
          f"{ev['precision']:.4f}, recall(slow) {ev['recall']:.4f}, ROC AUC "
          + (f"{auc:.4f}" if auc is not None else "n/a (one class)")
          + f" over {ev['held_back_all_ios']['rows']} I/Os "
          f"({ev['held_back_all_ios']['slow_rows']} slow); threshold "
          f"{card['decision_threshold']:.3f}; training time {card['training_time_s']} s")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser(
        "train", help="train an admission or prefetch model; writes ONNX + model card",
        description="Admission (default): label traces with Heimdall's period-based method, "
        "train the admission model on the earlier part of each trace (split by time), "
        "evaluate on the held-back later part, export ONNX and write MODEL.card.json beside "
        "it. Traces without measured latency are driven through the device model first. "
        "Prefetch (--task prefetch): a classifier of page-cache feature windows (KML's "
        "features plus direction and writes) into random, random+write, sequential and "
        "reverse, trained on recordings made while sweeping read_ahead_kb "
        "(agent/lab/prefetch_record.py), split by recording, each class mapped to the "
        "readahead its sweep found best.",
        parents=[cliutil.json_parent()],
        **cliutil.examples(
            ("iobridge train --trace cloudPhysicsIO.csv --out models/cp.onnx",
             "Heimdall's MLP on a CloudPhysics trace"),
            ("iobridge train --trace a.parquet --trace b.parquet --out m.onnx --kind gbdt",
             "gradient boosting on two recorded traces"),
            ("iobridge train --trace legs.parquet --out m.onnx --group-by-qlen",
             "a closed-loop fio recording"),
            ("iobridge train --trace legs.parquet --out m.onnx --lat-threshold-rel 8",
             "legs of different speeds: slow from 8 x each leg's baseline latency"),
            ("iobridge train --trace t.parquet --out m.onnx --json -q",
             "the model card as JSON, no progress"),
            ("scripts/train-default-model.sh", "how models/admission-default.onnx is built"),
            ("iobridge train --task prefetch --data a.jsonl.gz --data b.jsonl.gz -o p.onnx",
             "a prefetch model; the last recording is held back"),
            ("scripts/train-prefetch-model.sh", "how models/prefetch-default.onnx is built")))
    p.add_argument("--task", choices=["admission", "prefetch"], default="admission",
                   help="admission (default): from traces (--trace); prefetch: from "
                   "recordings (--data)")
    p.add_argument("--data", action="append", metavar="REC",
                   help="prefetch: a recording (.jsonl.gz from agent/lab/prefetch_record.py), "
                   "repeatable, two or more")
    p.add_argument("--held-back", action="append", metavar="ID",
                   help="prefetch: a recording id to hold back for the card's accuracy "
                   "(repeatable; default: the last id)")
    p.add_argument("--trace", action="append", metavar="T",
                   help="trace file, repeatable (.parquet, CloudPhysics .csv, ARC "
                   ".lis[.zst], fio iolog)")
    p.add_argument("--out", "-o", required=True, help="output model, e.g. models/NAME.onnx")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing model and its card (written as a pair)")
    p.add_argument("--kind", choices=["mlp", "gbdt"], default="mlp",
                   help="mlp: Heimdall's 12-128-16-1 MLP (default); gbdt: gradient boosting")
    p.add_argument("--legs", type=cliutil.int_range(1, 8), default=2,
                   help="legs of the device model for traces without latency (default 2)")
    p.add_argument("--train-fraction", type=cliutil.fraction, default=0.7,
                   help="earlier fraction of each trace's time span used for training "
                   "(default 0.7); the rest is held back for the card's figures")
    p.add_argument("--max-epochs", type=cliutil.positive_int(10_000), default=None,
                   help="MLP epochs (default 30; prefetch 300)")
    p.add_argument("--seed", type=cliutil.seed, default=0, help="random seed (default 0)")
    p.add_argument("--time-unit", choices=["s", "ms", "us", "ns"], default=None,
                   help="CloudPhysics time column unit (default s)")
    p.add_argument("--duration", type=cliutil.seconds, default=None, metavar="SECONDS",
                   help="ARC traces: spread arrivals over this many seconds (default 3600)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.add_argument("--lat-threshold-us", type=cliutil.positive_float(1e8), metavar="US",
                   help="labeling: latency above which a slow period may start, one value for "
                   "every device (default: the knee of each device's latency distribution)")
    p.add_argument("--lat-threshold-rel", type=cliutil.float_range(1, 1e6, lo_open=True), metavar="K",
                   help="labeling: a slow period may start at a latency above K x the "
                   "device's baseline latency (the feature schema's: quantile "
                   f"{F.BASELINE_LAT_QUANTILE:g} of its last {F.BASELINE_WINDOW} completion "
                   "latencies, known at issue); for training sets mixing devices of "
                   "different speeds. Excludes --lat-threshold-us")
    p.add_argument("--note", action="append", metavar="TEXT",
                   help="a remark for the model card's notes (repeatable)")
    p.add_argument("--group-by-qlen", action="store_true",
                   help="labeling: compare throughput only among I/Os of the same queue-length "
                   "class too (for closed-loop recordings at fixed queue depths)")
    p.add_argument("--tput-threshold", type=cliutil.fraction, metavar="R",
                   help="labeling: throughput, relative to the median of similar I/Os, below "
                   "which a slow period may start (default: the knee)")
    p.set_defaults(func=_cmd_train)
