"""Training the prefetch model: `iobridge train --task prefetch --data REC...`.

1. Each recording (core/prefetch_recording.py, made by lab/prefetch_record.py
   in the VM) is read and checked; its windows with at least
   prefetch_features.MIN_EVENTS insertions become rows of the model inputs
   (prefetch_features.MODEL_INPUTS) labelled with their workload's class.
2. Split by recording (one recording = one seed of the recorder), never by
   row: windows of one run are near copies of each other, and a row split
   would put copies on both sides. The recordings named by --held-back (by
   default the last by id) are held back; the others are fitted.
3. Class -> readahead: from the fitted recordings' sweep, per class the
   read_ahead_kb with the best mean throughput (read + write MB/s) over the
   runs of that class (ties to the smaller setting).
4. Model: KML's MLP shape, hidden layers 15 and 5 (sklearn MLPClassifier,
   ReLU, Adam) behind a StandardScaler, both inside the ONNX graph so the
   caller feeds raw values (`--kind gbdt`: gradient-boosted trees instead);
   deterministic for a seed. Exported with skl2onnx; the card (kind
   "prefetch", core/prefetch_card.py) records the inputs, the classes and
   their readahead, the held-back accuracy and the recordings.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..core import prefetch_features as PF
from ..core import prefetch_card as PM
from ..core import prefetch_recording as R
from ..core.errors import IobridgeError, UsageError
from ..core.model import CARD_VERSION, card_path, check_model, model_sha256
from . import train as T          # the admission trainer's options and output helpers
from .progress import Progress

MLP_HIDDEN = (15, 5)             # KML's 5 -> 15 -> 5 -> 4
DEFAULT_MAX_EPOCHS = 300
REGENERATE = ("scripts/train-prefetch-model.sh: records in the test VM with "
              "`python -m iobridge.lab.prefetch_record DIR --seed S...` (agent/lab/"
              "prefetch_record.py) into /work/prefetch-recordings (kept out of git), then "
              "trains with `iobridge train --task prefetch`")


def rows_of(rec: R.Recording, scopes) -> tuple[np.ndarray, np.ndarray]:
    """Input rows and class labels of a recording's decidable windows."""
    X, y = [], []
    for w in rec.windows:
        if w["scope"] in scopes and w["features"][0] >= PF.MIN_EVENTS:
            X.append(PF.model_row(w["features"], w["has_writes"], w["direction"]))
            y.append(PF.PREFETCH_CLASSES.index(w["class"]))
    return (np.asarray(X, dtype=np.float32).reshape(-1, PF.NUM_MODEL_INPUTS),
            np.asarray(y, dtype=np.int64))


def class_readahead(recs: list[R.Recording]) -> tuple[list[int], dict, list[str]]:
    """(readahead KB per class, mean MB/s per class and setting, notes)."""
    sums: dict = {}
    for rec in recs:
        for r in rec.runs:
            k = (r["class"], int(r["read_ahead_kb"]))
            mb = float(r["read_mb_s"]) + float(r.get("write_mb_s") or 0.0)
            s = sums.setdefault(k, [0.0, 0])
            s[0] += mb
            s[1] += 1
    table = {c: {} for c in PF.PREFETCH_CLASSES}
    for (c, kb), (tot, n) in sorted(sums.items()):
        table[c][kb] = round(tot / n, 3)
    best, notes = [], []
    for i, c in enumerate(PF.PREFETCH_CLASSES):
        if table[c]:
            top = max(table[c].values())
            best.append(min(kb for kb, v in table[c].items() if v == top))
        else:
            best.append(PF.CLASS_READAHEAD_KB[i])
            notes.append(f"no sweep runs of class {c} in the fitted recordings: its readahead "
                         f"is KML's ({PF.CLASS_READAHEAD_KB[i]} KB)")
    return best, table, notes


def _estimator(kind: str, max_epochs: int, seed: int):
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    if kind == "mlp":
        from sklearn.neural_network import MLPClassifier
        clf = MLPClassifier(hidden_layer_sizes=MLP_HIDDEN, activation="relu", solver="adam",
                            learning_rate_init=3e-3, max_iter=max_epochs, random_state=seed,
                            tol=1e-6, n_iter_no_change=max_epochs)
    elif kind == "gbdt":
        from sklearn.ensemble import GradientBoostingClassifier
        clf = GradientBoostingClassifier(n_estimators=50, max_depth=3, random_state=seed)
    else:
        raise UsageError(f"unknown model kind {kind!r}", "use mlp or gbdt")
    return Pipeline([("scale", StandardScaler()), ("clf", clf)])


def to_onnx(est) -> bytes:
    from skl2onnx import to_onnx as sk_to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    onx = sk_to_onnx(est, initial_types=[(PM.INPUT_NAME,
                                          FloatTensorType([None, PF.NUM_MODEL_INPUTS]))],
                     options={id(est): {"zipmap": False}}, target_opset=17)
    names = [o.name for o in onx.graph.output]
    if PM.PROBA_OUTPUT not in names:
        raise IobridgeError(f"ONNX export produced outputs {names}, expected {PM.PROBA_OUTPUT!r}")
    return onx.SerializeToString()


def evaluate(y: np.ndarray, pred: np.ndarray) -> dict:
    k = len(PF.PREFETCH_CLASSES)
    conf = np.zeros((k, k), dtype=np.int64)
    np.add.at(conf, (y, pred), 1)
    per = {}
    for i, c in enumerate(PF.PREFETCH_CLASSES):
        rows, predicted = int(conf[i].sum()), int(conf[:, i].sum())
        per[c] = {"rows": rows, "recall": conf[i, i] / rows if rows else None,
                  "precision": conf[i, i] / predicted if predicted else None}
    n = len(y)
    return {"rows": n, "accuracy": float((y == pred).mean()) if n else None,
            "per_class": per,
            "confusion": {"rows_true_columns_predicted": list(PF.PREFETCH_CLASSES),
                          "counts": conf.tolist()}}


def train_prefetch(paths: list[str], out: str, *, kind: str = "mlp", seed: int = 0,
                   max_epochs: int = DEFAULT_MAX_EPOCHS, held_back: list[str] | None = None,
                   scopes=R.SCOPES, notes: list[str] | None = None, force: bool = False,
                   progress: Progress | None = None) -> dict:
    """Train on the recordings, write OUT.onnx and OUT.card.json as a pair
    or not at all; returns the card."""
    progress = progress or Progress(False)
    t0 = time.perf_counter()
    out = Path(out)
    if out.suffix != ".onnx":
        raise UsageError(f"--out {out}: expected a file name ending in .onnx")
    T._check_outputs(out, paths, force)          # before the long work
    recs = []
    for p in paths:
        progress.phase(f"reading {p}")
        recs.append(R.read_recording(p))
    ids = [r.id for r in recs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise UsageError(f"recording {dup[0]!r} given more than once "
                         f"({', '.join(str(r.path) for r in recs if r.id == dup[0])})",
                         "give each recording once")
    if len(recs) < 2:
        raise UsageError("--task prefetch needs at least two recordings: one or more is held "
                         "back whole for the card's accuracy (split by recording, not by row)",
                         "record with two or more seeds")
    held = list(held_back) if held_back else [sorted(ids)[-1]]
    unknown = [h for h in held if h not in ids]
    if unknown:
        raise UsageError(f"--held-back {unknown[0]!r}: no such recording (recordings: "
                         f"{', '.join(sorted(ids))})")
    fit_recs = [r for r in recs if r.id not in held]
    test_recs = [r for r in recs if r.id in held]
    if not fit_recs:
        raise UsageError("every recording is held back: nothing left to fit")

    def stack(rs):
        parts = [rows_of(r, scopes) for r in rs]
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

    Xf, yf = stack(fit_recs)
    Xt, yt = stack(test_recs)
    missing = [c for i, c in enumerate(PF.PREFETCH_CLASSES) if not (yf == i).any()]
    if missing:
        raise IobridgeError(f"the fitted recordings have no windows of class "
                            f"{', '.join(missing)} with at least {PF.MIN_EVENTS} insertions: "
                            "the model needs every class", "record every workload")
    if not len(yt):
        raise IobridgeError(f"the held-back recordings ({', '.join(held)}) have no windows "
                            f"with at least {PF.MIN_EVENTS} insertions to evaluate on")
    kb, sweep, kb_notes = class_readahead(fit_recs)
    progress.phase(f"fitting ({kind}) on {len(yf)} windows of {len(fit_recs)} recordings")
    import warnings
    t_fit = time.perf_counter()
    est = _estimator(kind, max_epochs, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(Xf, yf)
    fit_s = time.perf_counter() - t_fit
    onx = to_onnx(est)
    progress.phase(f"evaluating on {len(yt)} held-back windows")
    sess = _session(onx)
    ev = evaluate(yt, np.argmax(sess.run([PM.PROBA_OUTPUT], {PM.INPUT_NAME: Xt})[0], axis=1))
    fit_ev = evaluate(yf, np.argmax(sess.run([PM.PROBA_OUTPUT], {PM.INPUT_NAME: Xf})[0], axis=1))
    layers = (f"{PF.NUM_MODEL_INPUTS} -> {' -> '.join(map(str, MLP_HIDDEN))} -> "
              f"{len(PF.PREFETCH_CLASSES)} (ReLU hidden layers, softmax output; KML's 5 -> 15 "
              "-> 5 -> 4 with direction and has_writes added)" if kind == "mlp"
              else "gradient-boosted trees, 50 trees of depth 3 per class")
    data = [{"file": r.path.name, "sha256": T._sha256(r.path), "recording": r.id,
             "seed": r.header.get("seed"), "workloads": r.header.get("workloads"),
             "readahead_kb_sweep": r.header.get("readahead_kb_sweep"),
             "kernel": r.header.get("kernel"), "device": r.header.get("device"),
             "memory_max_mb": r.header.get("memory_max_mb"),
             "windows": len(r.windows), "runs": len(r.runs),
             "part": "held back" if r.id in held else "fitted"} for r in recs]
    card = {
        "card_version": CARD_VERSION,
        "task": PM.TASK,
        "name": out.stem,
        **PM.schema_dict(),
        "input": {"name": PM.INPUT_NAME, "dtype": "float32",
                  "shape": ["N", PF.NUM_MODEL_INPUTS]},
        "outputs": {PM.PROBA_OUTPUT: f"float32 [N, {len(PF.PREFETCH_CLASSES)}], one column "
                                     "per class in 'classes' order",
                    PM.LABEL_OUTPUT: "int64 [N], the argmax class"},
        "normalisation": "StandardScaler inside the graph: feed raw values in the units of "
                         "'features'",
        "classes": [{"name": c, "readahead_kb": kb[i], "sweep_mb_s": sweep[c]}
                    for i, c in enumerate(PF.PREFETCH_CLASSES)],
        "min_events": PF.MIN_EVENTS,
        "decision_rule": "every window (window_s) of a device or file: no decision below "
                         "min_events insertions; else the argmax class, and the readahead "
                         "is that class's readahead_kb",
        "model": {"kind": kind, "layers": layers, "max_epochs": max_epochs, "seed": seed},
        "training": {
            "data": data,
            "scopes": list(scopes),
            "split": "by recording (one recording per recorder seed), never by row: "
                     f"held back {', '.join(held)}; fitted "
                     f"{', '.join(r.id for r in fit_recs)}",
            "class_readahead": "per class, the read_ahead_kb with the best mean throughput "
                               "(read + write MB/s) over the fitted recordings' runs of that "
                               "class (ties to the smaller)",
            "fit_rows": int(len(yf)),
            "fit_rows_by_class": {c: int((yf == i).sum())
                                  for i, c in enumerate(PF.PREFETCH_CLASSES)},
            "fit_accuracy": fit_ev["accuracy"],
            "regenerate": REGENERATE,
        },
        "evaluation": {"accuracy": ev["accuracy"], "held_back": ev,
                       "held_back_recordings": held},
        **({"notes": list(kb_notes) + list(notes or [])} if kb_notes or notes else {}),
        "training_time_s": round(fit_s, 2),
        "pipeline_time_s": round(time.perf_counter() - t0, 2),
        "tools": T._tool_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    card["model_sha256"] = model_sha256(onx)
    card = {k: card[k] for k in ("card_version", "task", "name", "model_sha256")} | card
    check_model(out, card, data=onx, expect=PM.TASK)   # checked before anything is written
    T._check_outputs(out, paths, force)                # again: nothing appeared meanwhile
    T.write_model_and_card(out, onx, card)
    return card


def _session(onx: bytes):
    from ..core.model import _session as session
    return session(None, onx)


def _cmd_train_prefetch(args) -> int:
    if args.trace:
        raise UsageError("--trace is the admission task's input; --task prefetch trains on "
                         "recordings given with --data")
    if not args.data:
        raise UsageError("--task prefetch needs recordings: --data REC.jsonl.gz (two or more)",
                         "record them with scripts/train-prefetch-model.sh")
    prog = Progress(not args.quiet)
    card = train_prefetch(args.data, args.out, kind=args.kind, seed=args.seed,
                             max_epochs=args.max_epochs or DEFAULT_MAX_EPOCHS,
                             held_back=args.held_back, notes=args.note, force=args.force,
                             progress=prog)
    if args.json:
        print(json.dumps({"model": str(args.out), "card_file": str(card_path(args.out)),
                          "card": card}, indent=2))
        return 0
    ev = card["evaluation"]["held_back"]
    print(f"wrote {args.out} and {card_path(args.out)}")
    print(f"held-back recordings {', '.join(card['evaluation']['held_back_recordings'])}: "
          f"accuracy {ev['accuracy']:.4f} over {ev['rows']} windows; classes "
          + ", ".join(f"{c['name']} -> {c['readahead_kb']} KB" for c in card["classes"])
          + f"; training time {card['training_time_s']} s")
    return 0


def register_cli(sub) -> None:
    """`iobridge train` is train.py's parser (its --task, --data and
    --held-back options included); this routes --task prefetch here, so the
    admission trainer need not import this module."""
    parser = sub.choices["train"]
    admission = parser.get_default("func")

    def dispatch(args) -> int:
        return _cmd_train_prefetch(args) if args.task == "prefetch" else admission(args)

    parser.set_defaults(func=dispatch)
