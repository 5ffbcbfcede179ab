"""Admission models: ONNX file + model card, validation and timing.

A model is FILE.onnx plus FILE.card.json next to it (same stem). The graph
contract (see features.py): one float32 input named "features" of shape
[N, NUM_FEATURES] taking raw feature values in the schema's units, and a
float32 output "probabilities" [N, 2] whose column 1 is P(slow); a row is
"avoid" when P(slow) >= the card's decision threshold.

Card fields (JSON): card_version, task ("admission"), schema_version,
features [{name, unit}] in input order, input/outputs, normalisation,
decision_threshold, model (kind, layers), training (data, labeling, split),
evaluation (held-back figures), training_time_s, tools (versions), created.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path

import numpy as np

from . import cliutil
from . import features as F
from .errors import IobridgeError

CARD_VERSION = 1
CARD_SUFFIX = ".card.json"
REQUIRED_CARD_FIELDS = ("card_version", "task", "schema_version", "features",
                        "decision_threshold", "training", "evaluation", "tools")


class ModelCheckError(IobridgeError):
    """A model or card that failed validation."""


def card_path(model_path) -> Path:
    p = Path(model_path)
    return p.with_name(p.name[:-len(".onnx")] + CARD_SUFFIX if p.name.endswith(".onnx")
                       else p.name + CARD_SUFFIX)


def synthetic_rows(n: int = 256, seed: int = 0) -> np.ndarray:
    """Plausible and extreme feature rows (units as in the schema)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, F.NUM_FEATURES), dtype=np.float32)
    x[:, F.COL_IO_TYPE] = rng.integers(0, 2, n)
    x[:, F.COL_SIZE] = 2.0 ** rng.integers(9, 21, n)
    x[:, F.COL_QLEN] = rng.integers(0, 64, n)
    x[:, F.COLS_PREV_QLEN] = rng.integers(0, 64, (n, F.HISTORY))
    x[:, F.COLS_PREV_LAT] = rng.lognormal(5, 1.5, (n, F.HISTORY))
    x[:, F.COLS_PREV_TPUT] = rng.lognormal(3, 2, (n, F.HISTORY))
    x[0] = 0.0                                   # empty history
    x[1] = [1, 1 << 24, 1024, 1024, 1024, 1024, 1e6, 1e6, 1e6, 1e4, 1e4, 1e4]
    return x


def _session(path: Path, data: bytes | None = None):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(data if data is not None else str(path), so,
                                providers=["CPUExecutionProvider"])


def check_model(path, card: dict | None = None) -> dict:
    """Validate an ONNX admission model and its card. Returns the card.
    Raises ModelCheckError with a specific message on the first failure."""
    import onnx
    path = Path(path)
    if not path.exists():
        raise ModelCheckError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        proto = onnx.load_from_string(raw)
        if not proto.graph.node and not proto.graph.input:
            raise ValueError("empty graph")
    except Exception as e:
        raise ModelCheckError(f"{path}: not an ONNX model ({type(e).__name__}: "
                              f"{str(e)[:80]})", "pass the .onnx file written by "
                              "`iobridge train`") from None
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ModelCheckError(f"{path}: ONNX checker failed: {str(e).splitlines()[0][:160]}") from None

    # card
    if card is None:
        cp = card_path(path)
        if not cp.exists():
            raise ModelCheckError(f"{path}: model card {cp} is missing",
                                  "every model needs its card next to it")
        try:
            card = json.loads(cp.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelCheckError(f"{cp}: not valid JSON: {e}") from None
    missing = [k for k in REQUIRED_CARD_FIELDS if k not in card]
    if missing:
        raise ModelCheckError(f"{path}: model card lacks fields {missing}")
    if card["task"] != "admission":
        raise ModelCheckError(f"{path}: card task is {card['task']!r}, expected 'admission'")
    if card["schema_version"] != F.SCHEMA_VERSION:
        raise ModelCheckError(
            f"{path}: card feature schema version {card['schema_version']}, this iobridge "
            f"uses feature schema version {F.SCHEMA_VERSION}",
            "retrain the model with this iobridge (`iobridge train`)")
    names = [f.get("name") for f in card["features"]]
    if names != list(F.FEATURE_NAMES):
        raise ModelCheckError(f"{path}: card features {names} differ from schema "
                              f"v{F.SCHEMA_VERSION} features {list(F.FEATURE_NAMES)}")
    thr = card["decision_threshold"]
    if not isinstance(thr, (int, float)) or not 0.0 < thr < 1.0:
        raise ModelCheckError(f"{path}: card decision_threshold {thr!r} is not in (0, 1)")

    # graph interface
    sess = _session(path, raw)
    ins = sess.get_inputs()
    if len(ins) != 1:
        raise ModelCheckError(f"{path}: graph has {len(ins)} inputs, expected 1 "
                              f"({F.INPUT_NAME!r})")
    inp = ins[0]
    if inp.name != F.INPUT_NAME:
        raise ModelCheckError(f"{path}: graph input is named {inp.name!r}, expected "
                              f"{F.INPUT_NAME!r}")
    if inp.type != "tensor(float)":
        raise ModelCheckError(f"{path}: input {inp.name!r} has type {inp.type}, expected "
                              "tensor(float)")
    if len(inp.shape) != 2 or inp.shape[1] != F.NUM_FEATURES:
        raise ModelCheckError(
            f"{path}: input {inp.name!r} has shape {inp.shape}, expected [N, {F.NUM_FEATURES}] "
            f"(input width must be the {F.NUM_FEATURES} features of schema v{F.SCHEMA_VERSION})")
    outs = {o.name: o for o in sess.get_outputs()}
    if F.PROBA_OUTPUT not in outs:
        raise ModelCheckError(f"{path}: graph has no output {F.PROBA_OUTPUT!r} "
                              f"(outputs: {sorted(outs)})")
    po = outs[F.PROBA_OUTPUT]
    if po.type != "tensor(float)":
        raise ModelCheckError(f"{path}: output {F.PROBA_OUTPUT!r} has type {po.type}, "
                              "expected tensor(float)")
    if len(po.shape) != 2 or (isinstance(po.shape[1], int) and po.shape[1] != 2):
        raise ModelCheckError(f"{path}: output {F.PROBA_OUTPUT!r} has shape {po.shape}, "
                              "expected [N, 2]")

    # test inference
    x = synthetic_rows()
    try:
        p = sess.run([F.PROBA_OUTPUT], {F.INPUT_NAME: x})[0]
    except Exception as e:
        raise ModelCheckError(f"{path}: test inference failed: {str(e)[:160]}") from None
    if p.shape != (len(x), 2):
        raise ModelCheckError(f"{path}: test inference gave {F.PROBA_OUTPUT!r} shape "
                              f"{p.shape}, expected ({len(x)}, 2)")
    bad = ~np.isfinite(p)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ModelCheckError(f"{path}: graph emits NaN/Inf on synthetic input "
                              f"(row {row} of {len(x)}: {x[row].tolist()})")
    if (p < -1e-5).any() or (p > 1 + 1e-5).any():
        raise ModelCheckError(f"{path}: {F.PROBA_OUTPUT!r} outside [0, 1] on synthetic input")
    return card


class AdmissionModel:
    """A validated model ready for batched inference: p_slow(rows)."""

    def __init__(self, path, check: bool = True, onnx_bytes: bytes | None = None,
                 card: dict | None = None):
        self.path = Path(path) if path else None
        if onnx_bytes is None:
            self.card = check_model(path) if check else json.loads(card_path(path).read_text())
            self.sess = _session(self.path)
        else:
            self.card = card or {}
            self.sess = _session(None, onnx_bytes)
        self.threshold = float(self.card.get("decision_threshold", 0.5))
        data = onnx_bytes if onnx_bytes is not None else self.path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()   # names the model in force
        self.input_name = self.sess.get_inputs()[0].name
        outs = [o.name for o in self.sess.get_outputs()]
        self.output_name = F.PROBA_OUTPUT if F.PROBA_OUTPUT in outs else outs[-1]

    def p_slow(self, rows: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(rows, dtype=np.float32)
        return self.sess.run([self.output_name], {self.input_name: x})[0][:, 1]


def bench(path, batch: int = 32, runs: int = 2000, warmup: int = 100) -> dict:
    m = AdmissionModel(path)
    x = synthetic_rows(batch, seed=1)
    for _ in range(warmup):
        m.p_slow(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        m.p_slow(x)
        times.append(time.perf_counter_ns() - t0)
    times.sort()
    return {"model": str(path), "batch": batch, "runs": runs,
            "median_us": statistics.median(times) / 1000.0,
            "p99_us": times[int(0.99 * (len(times) - 1))] / 1000.0,
            "min_us": times[0] / 1000.0, "threads": 1}


# ---------------------------------------------------------------- CLI

def _cmd_check(args) -> int:
    card = check_model(args.file)
    if args.json:
        print(json.dumps({"file": str(args.file), "ok": True, "card": card}, indent=2))
        return 0
    ev = card.get("evaluation", {})
    print(f"{args.file}: OK (task {card['task']}, feature schema v{card['schema_version']}, "
          f"{F.NUM_FEATURES} features, threshold {card['decision_threshold']:.3f}"
          + (f", held-back ROC AUC {ev['roc_auc']:.3f}" if "roc_auc" in ev else "") + ")")
    return 0


def _cmd_bench(args) -> int:
    r = bench(args.file, args.batch, args.runs)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"{args.file}: batch {r['batch']}, {r['runs']} runs, 1 thread: median "
              f"{r['median_us']:.1f} us, p99 {r['p99_us']:.1f} us, min {r['min_us']:.1f} us")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("model", help="validate and time admission models (ONNX + card)",
                       **cliutil.examples(
                           ("iobridge model check models/admission-default.onnx",
                            "is the shipped model valid for this iobridge?"),
                           ("iobridge model bench models/admission-default.onnx",
                            "inference time per batch of 32")))
    msub = p.add_subparsers(dest="model_cmd", metavar="SUBCOMMAND")
    msub.required = True
    pc = msub.add_parser(
        "check", help="validate FILE.onnx and FILE.card.json",
        description="Checks: ONNX checker; one float32 input 'features' [N, "
        f"{F.NUM_FEATURES}]; float32 output 'probabilities' [N, 2]; card fields, task, "
        f"feature names and schema version (this iobridge: v{F.SCHEMA_VERSION}); a test "
        "inference on synthetic rows with no NaN/Inf and probabilities in [0, 1]. "
        "Exit status 0 if valid, 1 with the reason otherwise.",
        parents=[cliutil.json_parent()],
        **cliutil.examples(
            ("iobridge model check models/admission-default.onnx", "the shipped default model"),
            ("iobridge model check m.onnx --json", "the checked card as JSON"),
            ("iobridge model check m.onnx && sudo systemctl reload iobridge",
             "take a new model only if valid")))
    pc.add_argument("file", help="model .onnx (its card is FILE.card.json beside it)")
    pc.set_defaults(func=_cmd_check)
    pb = msub.add_parser("bench", help="time batched ONNX Runtime inference",
                         description="Runs the model on a batch of synthetic rows many "
                         "times with one ONNX Runtime thread and reports the median "
                         "and p99 wall time per call in microseconds.",
                         parents=[cliutil.json_parent()],
                         **cliutil.examples(
                             ("iobridge model bench models/admission-default.onnx",
                              "batches of 32 rows, 2000 calls"),
                             ("iobridge model bench m.onnx --batch 8 --runs 500", "8 legs' rows"),
                             ("iobridge model bench m.onnx --json", "as JSON")))
    pb.add_argument("file")
    pb.add_argument("--batch", type=int, default=32, help="rows per call (default 32)")
    pb.add_argument("--runs", type=int, default=2000, help="timed calls (default 2000, "
                    "after 100 warm-up calls)")
    pb.set_defaults(func=_cmd_bench)
