"""Models: ONNX file + model card, validation and timing.

Two kinds, told by the card's task: "admission" (this module's graph
contract below) and "prefetch" (core/prefetch_card.py). check_model checks
each against its own schema; a caller that needs one kind (the agent's
admission model, the prefetch replay's learned policy) passes `expect`, and
a model of the other kind is refused as "a model of the wrong kind".

A model is FILE.onnx plus FILE.card.json next to it (same stem). The graph
contract (see features.py): one float32 input named "features" of shape
[N, NUM_FEATURES] taking raw feature values in the schema's units, and a
float32 output "probabilities" [N, 2] whose column 1 is P(slow); a row is
"avoid" when P(slow) >= the card's decision threshold.

Card fields (JSON): card_version, task ("admission"), schema_version,
features [{name, unit}] in input order, input/outputs, normalisation,
decision_threshold, model (kind, layers), training (data, labeling, split),
evaluation (held-back figures), training_time_s, tools (versions), created,
and model_sha256: the sha256 of the .onnx file the card was written for
(card_version 2; check_model refuses a card of another model).

check_model runs the graph only after its operators passed ALLOWED_OPS (no
control flow), and then in a child process killed after CHECK_TIMEOUT_S.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np

from . import cliutil
from . import features as F
from . import prefetch_features as PF
from .errors import IobridgeError
from .infiles import json_loads, read_input

CARD_VERSION = 2
CARD_SUFFIX = ".card.json"
REQUIRED_CARD_FIELDS = ("card_version", "task", "schema_version", "features",
                        "training", "evaluation", "tools", "model_sha256")
KINDS = ("admission", "prefetch")
ADMISSION_REQUIRED = ("decision_threshold",)

# Types of the card's fields (JSON names); fields not listed are free-form.
_INT, _NUM, _STR, _LIST, _OBJ = "an integer", "a number", "a string", "an array", "an object"
CARD_FIELD_TYPES = {
    "card_version": _INT, "task": _STR, "name": _STR, "schema_version": _INT,
    "features": _LIST, "baseline": _OBJ, "input": _OBJ, "outputs": _OBJ,
    "normalisation": _STR, "decision_threshold": _NUM, "decision_rule": _STR,
    "model": _OBJ, "training": _OBJ, "evaluation": _OBJ, "table_rows": _OBJ,
    "notes": _LIST, "training_time_s": _NUM, "pipeline_time_s": _NUM, "tools": _OBJ,
    "created": _STR, "model_sha256": _STR, "classes": _LIST, "min_events": _INT,
}

# Operators a model may use: those of the graphs `iobridge train` exports
# (skl2onnx: the MLP behind its StandardScaler, --kind gbdt's tree ensemble)
# and the shipped models. No control flow (Loop, Scan, If), no subgraphs, no
# custom domains: a graph of these ops runs in time bounded by its size.
ALLOWED_OPS = {
    "": frozenset({"Add", "ArgMax", "Cast", "Concat", "Identity", "MatMul", "Relu",
                   "Reshape", "Sigmoid", "Softmax", "Sub"}),
    "ai.onnx.ml": frozenset({"ArrayFeatureExtractor", "Scaler", "TreeEnsembleClassifier"}),
}
_CONTROL_FLOW = {"Loop", "Scan", "If", "SequenceMap"}

# Seconds the test inference (session creation + one run on the synthetic
# rows) may take in its child process before it is killed. The shipped
# models need about 0.05 s on a host but took more than 3 s in the emulated
# test VM (a 3 s bound refused them there). The allow-list already rules out
# loops; this bound is the second guard. A reload stalls the agent's tick
# loop this long at most.
CHECK_TIMEOUT_S = 30.0
_IMPORT_ALLOWANCE_S = 60.0   # the child's own start (numpy, onnxruntime) is not counted


class ModelCheckError(IobridgeError):
    """A model or card that failed validation."""


def card_path(model_path) -> Path:
    p = Path(model_path)
    return p.with_name(p.name[:-len(".onnx")] + CARD_SUFFIX if p.name.endswith(".onnx")
                       else p.name + CARD_SUFFIX)


def model_sha256(data: bytes) -> str:
    """The hash a card records for its model (`model_sha256`)."""
    return hashlib.sha256(data).hexdigest()


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


def _json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return _INT
    if isinstance(v, float):      # JSON's NaN, Infinity and 1e400 are not numbers a card uses
        return _NUM if math.isfinite(v) else "a non-finite number"
    if isinstance(v, str):
        return _STR
    if isinstance(v, list):
        return _LIST
    if isinstance(v, dict):
        return _OBJ
    return type(v).__name__


def _is(v, expected: str) -> bool:
    t = _json_type(v)
    return t == expected or (expected == _NUM and t == _INT)


def _wrong_type(cp, field: str, expected: str, v) -> ModelCheckError:
    shown = json.dumps(v)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return ModelCheckError(f"card {cp}: field {field!r} should be {expected}, found "
                           f"{_json_type(v)} ({shown})")


def read_card(path) -> dict:
    """FILE.card.json of the model FILE.onnx, parsed (not yet checked)."""
    path = Path(path)
    cp = card_path(path)
    if not cp.exists() and not cp.is_symlink():
        raise ModelCheckError(f"{path}: model card {cp} is missing",
                              "every model needs its card next to it")
    try:
        text = read_input(cp).decode("utf-8")
        card = json_loads(text)
    except OSError as e:
        raise ModelCheckError(f"card {cp}: cannot read it: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ModelCheckError(f"card {cp}: not valid JSON: not UTF-8 text ({e.reason} at "
                              f"byte {e.start})") from None
    except ValueError as e:
        raise ModelCheckError(f"card {cp}: not valid JSON: {e}") from None
    if not isinstance(card, dict):
        raise ModelCheckError(f"card {cp}: should be a JSON object, found {_json_type(card)}")
    return card


def check_quickly(path, expect: str | None = None) -> None:
    """The checks that take no time: the model file exists, its card is
    valid and was written for it. The agent runs them before its slow
    start-up work (BPF compiles, the full check) so that the common
    mistakes show at once; check_model repeats them with the rest."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise ModelCheckError(f"{path}: no such file")
    card = read_card(path)
    check_card(card, card_path(path), expect=expect)
    try:
        raw = read_input(path)
    except OSError as e:
        raise ModelCheckError(f"{path}: cannot read the model: {e.strerror or e}") from None
    if card["model_sha256"] != model_sha256(raw):
        # It will fail: the full check now gives the most specific reason
        # (not ONNX, a bad graph, or a card written for another model).
        check_model(path, card, data=raw, expect=expect)


def _kind_name(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def wrong_kind(cp, task: str, expect: str) -> ModelCheckError:
    """The refusal of a model of one kind where the other is needed."""
    use = ("`iobridge replay --task prefetch --policy learned:FILE`" if task == "prefetch"
           else "the agent's --model / config model")
    return ModelCheckError(
        f"card {cp}: model of the wrong kind: {_kind_name(task)} model (task {task!r}) where "
        f"{_kind_name(expect)} model is needed",
        f"give {_kind_name(expect)} model; {_kind_name(task)} model is for {use}")


def check_card(card: dict, cp, raw: bytes | None = None, expect: str | None = None) -> None:
    """Card version, fields and their types, task, feature schema and
    threshold (`cp` names the card in messages); `expect`: the kind the
    caller needs (None: either). The tie to the model (model_sha256) is
    checked by check_model."""
    if not isinstance(card, dict):
        raise ModelCheckError(f"card {cp}: should be a JSON object, found {_json_type(card)}")
    ver = card.get("card_version")
    if "card_version" not in card:
        raise ModelCheckError(f"card {cp}: lacks field 'card_version'",
                              "write it with `iobridge train`")
    if not _is(ver, _INT):
        raise _wrong_type(cp, "card_version", _INT, ver)
    if ver == 1:
        have = (f"; this model's sha256 is {model_sha256(raw)}" if raw is not None else "")
        raise ModelCheckError(
            f"card {cp}: card_version 1 does not record the model's sha256 (this iobridge "
            f"reads card_version {CARD_VERSION}){have}",
            "run `iobridge train` again, or, if the card belongs to this model, set "
            f"\"model_sha256\" to that hash and \"card_version\" to {CARD_VERSION} in the card")
    if ver != CARD_VERSION:
        raise ModelCheckError(f"card {cp}: unknown card_version {ver} (this iobridge reads "
                              f"card_version {CARD_VERSION})",
                              "write the card with this iobridge's `iobridge train`")
    missing = [k for k in REQUIRED_CARD_FIELDS if k not in card]
    if missing:
        raise ModelCheckError(f"card {cp}: lacks fields {missing}")
    for k, expected in CARD_FIELD_TYPES.items():
        if k in card and not _is(card[k], expected):
            raise _wrong_type(cp, k, expected, card[k])
    h = card["model_sha256"]
    if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
        raise ModelCheckError(f"card {cp}: field 'model_sha256' should be 64 lower-case hex "
                              f"digits, found {h[:70]!r}")
    for i, f in enumerate(card["features"]):
        if not _is(f, _OBJ):
            raise _wrong_type(cp, f"features[{i}]", _OBJ, f)
        if not _is(f.get("name"), _STR):
            raise _wrong_type(cp, f"features[{i}].name", _STR, f.get("name"))
    for k in ("roc_auc", "accuracy", "precision", "recall"):
        v = card["evaluation"].get(k)
        if v is not None and not _is(v, _NUM):
            raise _wrong_type(cp, f"evaluation.{k}", f"{_NUM} or null", v)
    if card["task"] not in KINDS:
        raise ModelCheckError(f"card {cp}: task is {card['task']!r}, expected one of "
                              f"{', '.join(repr(k) for k in KINDS)}")
    if expect is not None and card["task"] != expect:
        raise wrong_kind(cp, card["task"], expect)
    if card["task"] == "prefetch":
        from . import prefetch_card as PM
        PM.check_card_fields(card, cp, ModelCheckError)
        return
    missing = [k for k in ADMISSION_REQUIRED if k not in card]
    if missing:
        raise ModelCheckError(f"card {cp}: lacks fields {missing}")
    if card["schema_version"] != F.SCHEMA_VERSION:
        raise ModelCheckError(
            f"card {cp}: card feature schema version {card['schema_version']}, this iobridge "
            f"uses feature schema version {F.SCHEMA_VERSION}",
            "retrain the model with this iobridge (`iobridge train`)")
    names = [f.get("name") for f in card["features"]]
    if names != list(F.FEATURE_NAMES):
        raise ModelCheckError(f"card {cp}: card features {names} differ from schema "
                              f"v{F.SCHEMA_VERSION} features {list(F.FEATURE_NAMES)}")
    thr = card["decision_threshold"]
    if not 0.0 < thr < 1.0:
        raise ModelCheckError(f"card {cp}: card decision_threshold {thr!r} is not in (0, 1)")


def _check_operators(proto, path) -> None:
    """Only ALLOWED_OPS, no subgraphs, no local functions."""
    import onnx
    if len(proto.functions):
        raise ModelCheckError(f"{path}: model defines local functions "
                              f"({proto.functions[0].name!r}, ...), which iobridge does not run")
    sub = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    for node in proto.graph.node:
        dom = "" if node.domain in ("", "ai.onnx") else node.domain
        what = f"operator {node.op_type}" + (f" of domain {dom}" if dom else "") + \
            (f" (node {node.name!r})" if node.name else "")
        if node.op_type in _CONTROL_FLOW or any(a.type in sub for a in node.attribute):
            raise ModelCheckError(f"{path}: {what} is control flow or has a subgraph, which "
                                  "iobridge does not run (its time is not bounded)")
        if node.op_type not in ALLOWED_OPS.get(dom, ()):
            allowed = ", ".join(sorted(f"{d + '.' if d else ''}{o}"
                                       for d, ops in ALLOWED_OPS.items() for o in ops))
            raise ModelCheckError(f"{path}: {what} is not allowed (allowed: the operators "
                                  f"`iobridge train` exports: {allowed})")


# The test inference runs in a child process: it loads the graph into ONNX
# Runtime and runs it once, at most CHECK_TIMEOUT_S seconds counted after its
# imports (SIGALRM's default action ends it even inside ONNX Runtime); the
# parent kills it as well if it outlives that plus its start-up. It writes
# one JSON line with the graph's interface before the run, one after.
_PROBE = r"""
import base64, io, json, signal, sys
import numpy as np
import onnxruntime as ort
limit, n, w, in_name, out_name = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
data = sys.stdin.buffer.read()
x = np.frombuffer(data[:n * w * 4], dtype=np.float32).reshape(n, w)
raw = data[n * w * 4:]
def emit(d):
    sys.stdout.write(json.dumps(d) + "\n")
    sys.stdout.flush()
signal.signal(signal.SIGALRM, signal.SIG_DFL)
signal.setitimer(signal.ITIMER_REAL, limit)
try:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(raw, so, providers=["CPUExecutionProvider"])
except Exception as e:
    emit({"error": "load", "message": str(e)})
    sys.exit(0)
emit({"inputs": [[i.name, i.type, list(i.shape)] for i in sess.get_inputs()],
      "outputs": [[o.name, o.type, list(o.shape)] for o in sess.get_outputs()]})
try:
    p = sess.run([out_name], {in_name: x})[0]
    buf = io.BytesIO()
    np.save(buf, np.asarray(p), allow_pickle=False)
except Exception as e:
    emit({"error": "run", "message": str(e)})
    sys.exit(0)
emit({"result": base64.b64encode(buf.getvalue()).decode()})
"""


def _ort_message(msg: str) -> str:
    """ONNX Runtime's exception text, one line without its source location."""
    import re
    m = re.search(r"Opset (\d+) is under development.*support for domain (\S+) is till "
                  r"opset (\d+)", msg, re.S)
    if m:
        return (f"opset {m.group(1)} of domain {m.group(2)} is newer than it supports "
                f"(up to {m.group(3)})")
    msg = re.sub(r"^\s*\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", msg)
    msg = re.sub(r"^/\S+:\d+ .*?\)\s+", "", msg)          # source file and function
    msg = " ".join(msg.split())
    return msg if len(msg) <= 200 else msg[:197] + "..."


def _probe(raw: bytes, x: np.ndarray, path, timeout_s: float,
           names: tuple[str, str] = (F.INPUT_NAME, F.PROBA_OUTPUT)):
    """(interface dict or None, result array or None, failure message or None)."""
    import signal
    import subprocess
    import sys
    args = [sys.executable, "-P", "-c", _PROBE, repr(float(timeout_s)), str(len(x)),
            str(x.shape[1]), *names]
    payload = np.ascontiguousarray(x, dtype=np.float32).tobytes() + raw
    timed_out = False
    try:
        r = subprocess.run(args, input=payload, capture_output=True,
                           timeout=timeout_s + _IMPORT_ALLOWANCE_S)
        out, err, rc = r.stdout, r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:       # run() has killed it
        out, err, rc, timed_out = e.stdout or b"", e.stderr or b"", None, True
    except OSError as e:
        raise ModelCheckError(f"{path}: cannot start the test inference "
                              f"({sys.executable}): {e.strerror or e}") from None
    lines = []
    for line in out.decode("utf-8", "replace").splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            pass
    iface = next((d for d in lines if "inputs" in d), None)
    fail = next((d for d in lines if "error" in d), None)
    res = next((d for d in lines if "result" in d), None)
    import onnxruntime
    ort = f"ONNX Runtime {onnxruntime.__version__}"
    if fail and fail["error"] == "load":
        return None, None, f"{ort} cannot load it: {_ort_message(fail['message'])}"
    if timed_out or rc == -signal.SIGALRM:
        return iface, None, (f"test inference did not finish within {timeout_s:g} s "
                             "(killed)")
    if fail:
        return iface, None, f"test inference failed: {_ort_message(fail['message'])}"
    if rc != 0 or res is None:
        if rc is not None and rc < 0:
            why = f"was killed by {signal.Signals(-rc).name}"
        else:
            tail = err.decode("utf-8", "replace").strip().splitlines()
            why = f"exited with status {rc}" + (f": {tail[-1][:160]}" if tail else "")
        return iface, None, f"the test inference process {why}"
    import base64
    import io
    p = np.load(io.BytesIO(base64.b64decode(res["result"])), allow_pickle=False)
    return iface, p, None


def check_model(path, card: dict | None = None, *, data: bytes | None = None,
                timeout_s: float | None = None, expect: str | None = None) -> dict:
    """Validate an ONNX model (admission or prefetch, by its card's task)
    and its card. Returns the card.
    Raises ModelCheckError with a specific message on the first failure.
    `data`: the model's bytes (default: read from `path`, which then names
    the model in messages); `card`: its card (default: FILE.card.json);
    `timeout_s`: the test inference's bound (default CHECK_TIMEOUT_S);
    `expect`: the kind needed ("admission" or "prefetch"; None: either)."""
    return _check(path, card, data, timeout_s, expect)[0]


def _interface(card: dict):
    """(input name, output name, synthetic rows, input width, output
    columns, schema words) of the card's kind."""
    if card["task"] == "prefetch":
        from . import prefetch_card as PM
        return (PM.INPUT_NAME, PM.PROBA_OUTPUT, PM.synthetic_rows(), PF.NUM_MODEL_INPUTS,
                len(PF.PREFETCH_CLASSES),
                f"inputs of prefetch feature schema v{PF.SCHEMA_VERSION}")
    return (F.INPUT_NAME, F.PROBA_OUTPUT, synthetic_rows(), F.NUM_FEATURES, 2,
            f"features of schema v{F.SCHEMA_VERSION}")


def _check(path, card, raw, timeout_s, expect=None):
    """check_model's work; returns (card, the model bytes checked)."""
    import onnx
    timeout_s = CHECK_TIMEOUT_S if timeout_s is None else timeout_s
    path = Path(path)
    if raw is None:
        if not path.exists() and not path.is_symlink():
            raise ModelCheckError(f"{path}: no such file")
        try:
            raw = read_input(path)
        except OSError as e:
            raise ModelCheckError(f"{path}: cannot read the model: {e.strerror or e}") from None
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
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelCheckError(f"{path}: ONNX checker failed: {first[:160]}") from None
    _check_operators(proto, path)

    # card
    cp = card_path(path)
    if card is None:
        card = read_card(path)
    check_card(card, cp, raw, expect)

    # graph interface and test inference, in a child process with a time bound
    in_name, out_name, x, width, ncols, words = _interface(card)
    iface, p, fail = _probe(raw, x, path, timeout_s, (in_name, out_name))
    if iface is None and fail:
        raise ModelCheckError(f"{path}: {fail}")
    ins = iface["inputs"] if iface else []
    if len(ins) != 1:
        raise ModelCheckError(f"{path}: graph has {len(ins)} inputs, expected 1 "
                              f"({in_name!r})")
    name, typ, shape = ins[0]
    if name != in_name:
        raise ModelCheckError(f"{path}: graph input is named {name!r}, expected "
                              f"{in_name!r}")
    if typ != "tensor(float)":
        raise ModelCheckError(f"{path}: input {name!r} has type {typ}, expected "
                              "tensor(float)")
    if len(shape) != 2 or shape[1] != width:
        raise ModelCheckError(
            f"{path}: input {name!r} has shape {shape}, expected [N, {width}] "
            f"(input width must be the {width} {words})")
    outs = {o[0]: o for o in iface["outputs"]}
    if out_name not in outs:
        raise ModelCheckError(f"{path}: graph has no output {out_name!r} "
                              f"(outputs: {sorted(outs)})")
    _, otyp, oshape = outs[out_name]
    if otyp != "tensor(float)":
        raise ModelCheckError(f"{path}: output {out_name!r} has type {otyp}, "
                              "expected tensor(float)")
    if len(oshape) != 2 or (isinstance(oshape[1], int) and oshape[1] != ncols):
        raise ModelCheckError(f"{path}: output {out_name!r} has shape {oshape}, "
                              f"expected [N, {ncols}]")
    if fail:
        raise ModelCheckError(f"{path}: {fail}")
    if p.shape != (len(x), ncols):
        raise ModelCheckError(f"{path}: test inference gave {out_name!r} shape "
                              f"{p.shape}, expected ({len(x)}, {ncols})")
    bad = ~np.isfinite(p)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ModelCheckError(f"{path}: graph emits NaN/Inf on synthetic input "
                              f"(row {row} of {len(x)}: {x[row].tolist()})")
    if (p < -1e-5).any() or (p > 1 + 1e-5).any():
        raise ModelCheckError(f"{path}: {out_name!r} outside [0, 1] on synthetic input")

    # the card is this model's
    have = model_sha256(raw)
    if card["model_sha256"] != have:
        raise ModelCheckError(
            f"{path}: card {cp} was written for a different model (sha256 "
            f"{card['model_sha256']} != {have})",
            "put the card written with this model beside it, or run `iobridge train` again")
    return card, raw


class AdmissionModel:
    """A validated model ready for batched inference: p_slow(rows)."""

    def __init__(self, path, check: bool = True, onnx_bytes: bytes | None = None,
                 card: dict | None = None):
        self.path = Path(path) if path else None
        if onnx_bytes is None:
            if check:      # the bytes checked are the bytes run
                self.card, data = _check(self.path, None, None, None, expect="admission")
            else:
                data = self.path.read_bytes()
                self.card = json.loads(card_path(path).read_text())
            self.sess = _session(None, data)
        else:
            data = onnx_bytes
            self.card = card or {}
            self.sess = _session(None, onnx_bytes)
        self.threshold = float(self.card.get("decision_threshold", 0.5))
        self.sha256 = model_sha256(data)                 # names the model in force
        self.input_name = self.sess.get_inputs()[0].name
        outs = [o.name for o in self.sess.get_outputs()]
        self.output_name = F.PROBA_OUTPUT if F.PROBA_OUTPUT in outs else outs[-1]

    def p_slow(self, rows: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(rows, dtype=np.float32)
        return self.sess.run([self.output_name], {self.input_name: x})[0][:, 1]


def bench(path, batch: int = 32, runs: int = 2000, warmup: int = 100) -> dict:
    if read_card(path).get("task") == "prefetch":
        from . import prefetch_card as PC
        _, raw = _check(Path(path), None, None, None, expect="prefetch")
        sess = _session(None, raw)
        x = PC.synthetic_rows(batch, seed=1)

        def run(rows):
            return sess.run([PC.PROBA_OUTPUT], {PC.INPUT_NAME: rows})
    else:
        run, x = AdmissionModel(path).p_slow, synthetic_rows(batch, seed=1)
    for _ in range(warmup):
        run(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        run(x)
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
    if card["task"] == "prefetch":
        classes = ", ".join(f"{c['name']} {c['readahead_kb']} KB" for c in card["classes"])
        print(f"{args.file}: OK (task prefetch, prefetch feature schema "
              f"v{card['schema_version']}, {len(card['features'])} inputs, classes {classes}"
              + (f", held-back accuracy {ev['accuracy']:.3f}"
                 if isinstance(ev.get("accuracy"), (int, float)) else "") + ")")
        return 0
    print(f"{args.file}: OK (task {card['task']}, feature schema v{card['schema_version']}, "
          f"{F.NUM_FEATURES} features, threshold {card['decision_threshold']:.3f}"
          + (f", held-back ROC AUC {ev['roc_auc']:.3f}"
             if isinstance(ev.get("roc_auc"), (int, float)) else "") + ")")
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
    p = sub.add_parser("model", help="validate and time models (admission or prefetch; ONNX + card)",
                       **cliutil.examples(
                           ("iobridge model check models/admission-default.onnx",
                            "is the shipped model valid for this iobridge?"),
                           ("iobridge model bench models/admission-default.onnx",
                            "inference time per batch of 32")))
    msub = p.add_subparsers(dest="model_cmd", metavar="SUBCOMMAND")
    msub.required = True
    pc = msub.add_parser(
        "check", help="validate FILE.onnx and FILE.card.json",
        description="Checks either kind of model against its own schema (the card's task "
        "says which): ONNX checker; only the operators `iobridge train` exports "
        "(no control flow); one float32 input 'features' [N, "
        f"{F.NUM_FEATURES}] (admission) or [N, {PF.NUM_MODEL_INPUTS}] (prefetch: the "
        f"{PF.NUM_FEATURES} KML features, direction, "
        "has_writes); float32 output 'probabilities' [N, 2] (admission: column 1 = P(slow)) "
        f"or [N, {len(PF.PREFETCH_CLASSES)}] (prefetch: one column per class, "
        f"{', '.join(PF.PREFETCH_CLASSES)}); card version ({CARD_VERSION}), fields and their types, task, "
        f"feature names and schema version (this iobridge: admission v{F.SCHEMA_VERSION}, "
        f"prefetch v{PF.SCHEMA_VERSION}), a prefetch card's classes and their readahead; a test "
        "inference on synthetic rows with no NaN/Inf and probabilities in [0, 1], in a "
        f"child process killed after {CHECK_TIMEOUT_S:g} s; the card's model_sha256 is "
        "the model's. Exit status 0 if valid, 1 with the reason otherwise.",
        parents=[cliutil.json_parent()],
        **cliutil.examples(
            ("iobridge model check models/admission-default.onnx", "the shipped default model"),
            ("iobridge model check models/prefetch-default.onnx", "the shipped prefetch model"),
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
    pb.add_argument("--batch", type=cliutil.positive_int(100_000), default=32, help="rows per call (default 32)")
    pb.add_argument("--runs", type=cliutil.positive_int(1_000_000), default=2000, help="timed calls (default 2000, "
                    "after 100 warm-up calls)")
    pb.set_defaults(func=_cmd_bench)
