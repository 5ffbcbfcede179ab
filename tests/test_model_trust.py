"""Model trust (issue 14, item 4): a model's test inference is bounded in
time, its card is of a known version with well-typed fields and tied to the
model by its sha256, and `iobridge train` writes model and card as a pair or
not at all. Every refusal is one line on stderr, no traceback."""

import errno
import hashlib
import json
import os
import shutil
import time

import numpy as np
import pytest
from onnx import TensorProto, helper

from iobridge import cli
from iobridge.core import features as F
from iobridge.core import model as M
from iobridge.core.model import CARD_VERSION, ModelCheckError, card_path
from iobridge.offline import train as T
from iobridge.offline.trace import Trace, write_trace
from offline_helpers import SHIPPED_MODEL

CP_MODEL = SHIPPED_MODEL.parent / "admission-cloudphysics.onnx"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def refused(capsys, argv, code=1) -> str:
    """Runs the CLI, expects exit status `code` and one line on stderr."""
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("iobridge: error: "), err
    return err


def write_model(tmp_path, model_bytes: bytes, name="m", card=None, **changes):
    """model_bytes as NAME.onnx with the shipped card, tied to it, plus `changes`."""
    dst = tmp_path / f"{name}.onnx"
    dst.write_bytes(model_bytes)
    card = card if card is not None else json.loads(card_path(SHIPPED_MODEL).read_text())
    card["model_sha256"] = sha(model_bytes)
    card.update(changes)
    card_path(dst).write_text(json.dumps(card))
    return dst


def loop_model(trips: int = 10**12, opset: int = 17) -> bytes:
    """features [N, 12] -> probabilities [N, 2], through a Loop of `trips`
    iterations that carries a [1, 2] zero tensor along unchanged."""
    x = helper.make_tensor_value_info(F.INPUT_NAME, TensorProto.FLOAT, [None, F.NUM_FEATURES])
    y = helper.make_tensor_value_info(F.PROBA_OUTPUT, TensorProto.FLOAT, [None, 2])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Identity", ["v_in"], ["v_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 2])])
    inits = [helper.make_tensor("trips", TensorProto.INT64, [], [trips]),
             helper.make_tensor("cond", TensorProto.BOOL, [], [True]),
             helper.make_tensor("zero", TensorProto.FLOAT, [1, 2], [0.0, 0.0]),
             helper.make_tensor("w", TensorProto.FLOAT, [F.NUM_FEATURES, 2],
                                [0.0] * (2 * F.NUM_FEATURES))]
    g = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond", "zero"], ["carried"], body=body),
         helper.make_node("MatMul", [F.INPUT_NAME, "w"], ["z"]),
         helper.make_node("Add", ["z", "carried"], ["s"]),
         helper.make_node("Sigmoid", ["s"], [F.PROBA_OUTPUT])],
        "loop", [x], [y], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m.SerializeToString()


def sigmoid_model(opset: int = 17, op: str = "Sigmoid") -> bytes:
    """features -> MatMul -> `op` -> probabilities: the smallest valid graph."""
    x = helper.make_tensor_value_info(F.INPUT_NAME, TensorProto.FLOAT, [None, F.NUM_FEATURES])
    y = helper.make_tensor_value_info(F.PROBA_OUTPUT, TensorProto.FLOAT, [None, 2])
    w = helper.make_tensor("w", TensorProto.FLOAT, [F.NUM_FEATURES, 2],
                           [0.0] * (2 * F.NUM_FEATURES))
    g = helper.make_graph([helper.make_node("MatMul", [F.INPUT_NAME, "w"], ["z"]),
                           helper.make_node(op, ["z"], [F.PROBA_OUTPUT])],
                          "small", [x], [y], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m.SerializeToString()


# ------------------------------------------------------------- time bound

def test_loop_model_is_refused_quickly(tmp_path, capsys):
    dst = write_model(tmp_path, loop_model())
    t0 = time.monotonic()
    err = refused(capsys, ["model", "check", str(dst)])
    assert time.monotonic() - t0 < 30
    assert "m.onnx: operator Loop" in err and "control flow" in err
    # the agent's loading (iobridge run, SIGHUP reload) checks the same way
    t0 = time.monotonic()
    with pytest.raises(ModelCheckError, match="operator Loop"):
        M.AdmissionModel(dst)
    assert time.monotonic() - t0 < 30


def test_test_inference_is_killed_at_its_time_bound(tmp_path, capsys, monkeypatch):
    # Past the operator allow-list (skipped here), the Loop reaches the test
    # inference, which runs in a child process killed at CHECK_TIMEOUT_S.
    monkeypatch.setattr(M, "_check_operators", lambda proto, path: None)
    monkeypatch.setattr(M, "CHECK_TIMEOUT_S", 1.0)
    dst = write_model(tmp_path, loop_model())
    t0 = time.monotonic()
    err = refused(capsys, ["model", "check", str(dst)])
    assert time.monotonic() - t0 < 30
    assert "test inference did not finish within 1 s" in err
    # a short loop is fine: the bound is on time, not on the graph
    dst = write_model(tmp_path, loop_model(trips=3), name="short")
    assert cli.main(["model", "check", str(dst)]) == 0


def test_operator_outside_the_allow_list_is_refused(tmp_path, capsys):
    dst = write_model(tmp_path, sigmoid_model(op="Softsign"))
    err = refused(capsys, ["model", "check", str(dst)])
    assert "operator Softsign is not allowed" in err and "TreeEnsembleClassifier" in err
    # the same graph with an allowed operator passes
    dst = write_model(tmp_path, sigmoid_model(), name="ok")
    assert cli.main(["model", "check", str(dst)]) == 0


def test_opset_onnxruntime_lacks_is_refused(tmp_path, capsys):
    dst = write_model(tmp_path, sigmoid_model(opset=99))
    err = refused(capsys, ["model", "check", str(dst)])
    assert "m.onnx: ONNX Runtime" in err and "cannot load it" in err and "opset 99" in err


# ------------------------------------------------------------- the card

def test_shipped_models_pass_and_their_cards_carry_their_hash(capsys):
    for model in (SHIPPED_MODEL, CP_MODEL):
        assert cli.main(["model", "check", str(model)]) == 0
        assert f"{model}: OK" in capsys.readouterr().out
        card = json.loads(card_path(model).read_text())
        assert card["card_version"] == CARD_VERSION == 2
        assert card["model_sha256"] == sha(model.read_bytes())


@pytest.mark.parametrize("version, message", [
    (99, "unknown card_version 99 (this iobridge reads card_version 2)"),
    (0, "unknown card_version 0"),
])
def test_unknown_card_version_is_refused(tmp_path, capsys, version, message):
    dst = write_model(tmp_path, SHIPPED_MODEL.read_bytes(), card_version=version)
    assert message in refused(capsys, ["model", "check", str(dst)])


def test_card_version_1_without_hash_is_refused_with_the_fix(tmp_path, capsys):
    dst = write_model(tmp_path, SHIPPED_MODEL.read_bytes(), card_version=1)
    card = json.loads(card_path(dst).read_text())
    del card["model_sha256"]
    card_path(dst).write_text(json.dumps(card))
    err = refused(capsys, ["model", "check", str(dst)])
    assert "card_version 1 does not record the model's sha256" in err
    assert sha(SHIPPED_MODEL.read_bytes()) in err and "iobridge train" in err
    # the documented fix: the hash and card_version 2 in the card
    card.update(model_sha256=sha(SHIPPED_MODEL.read_bytes()), card_version=2)
    card_path(dst).write_text(json.dumps(card))
    assert cli.main(["model", "check", str(dst)]) == 0


@pytest.mark.parametrize("field, value, message", [
    ("decision_threshold", "0.5",
     "field 'decision_threshold' should be a number, found a string (\"0.5\")"),
    ("card_version", "2", "field 'card_version' should be an integer, found a string"),
    ("schema_version", 2.0, "field 'schema_version' should be an integer, found a number"),
    ("features", {"io_type": 1}, "field 'features' should be an array, found an object"),
    ("evaluation", [], "field 'evaluation' should be an object, found an array"),
    ("task", None, "field 'task' should be a string, found null"),
    ("model_sha256", 12, "field 'model_sha256' should be a string, found an integer"),
    ("decision_threshold", True,
     "field 'decision_threshold' should be a number, found a boolean (true)"),
])
def test_wrongly_typed_card_field_is_refused(tmp_path, capsys, field, value, message):
    dst = write_model(tmp_path, SHIPPED_MODEL.read_bytes(), **{field: value})
    err = refused(capsys, ["model", "check", str(dst)])
    assert f"card {card_path(dst)}: {message}" in err


@pytest.mark.parametrize("field, value", [
    ("evaluation", {"roc_auc": float("nan")}), ("decision_threshold", float("inf")),
    ("training_time_s", float("-inf"))])
def test_non_finite_card_numbers_are_refused(tmp_path, capsys, field, value):
    """JSON's NaN and Infinity (and 1e400, which parses as inf) are not numbers a card holds."""
    dst = write_model(tmp_path, SHIPPED_MODEL.read_bytes(), **{field: value})
    err = refused(capsys, ["model", "check", str(dst)])
    assert "found a non-finite number" in err


def test_card_nested_too_deeply_is_one_line(tmp_path, capsys):
    dst = write_model(tmp_path, SHIPPED_MODEL.read_bytes())
    card_path(dst).write_text("[" * 100_000 + "]" * 100_000)
    err = refused(capsys, ["model", "check", str(dst)])
    assert f"card {card_path(dst)}: not valid JSON: nested too deeply to parse" in err


@pytest.mark.parametrize("which", ["model", "card"])
def test_a_fifo_for_model_or_card_is_refused_at_once(tmp_path, capsys, which):
    """Opening a FIFO blocks until a writer comes: it is refused, not read."""
    dst = write_model(tmp_path, SHIPPED_MODEL.read_bytes())
    fifo = dst if which == "model" else card_path(dst)
    fifo.unlink()
    os.mkfifo(fifo)
    err = refused(capsys, ["model", "bench", str(dst), "--runs", "1"])
    assert "not a regular file: a FIFO (named pipe)" in err


def test_card_of_another_model_is_refused(tmp_path, capsys):
    dst = tmp_path / "m.onnx"
    shutil.copy(SHIPPED_MODEL, dst)
    shutil.copy(card_path(CP_MODEL), card_path(dst))    # the CloudPhysics model's card
    err = refused(capsys, ["model", "check", str(dst)])
    assert (f"card {card_path(dst)} was written for a different model (sha256 "
            f"{sha(CP_MODEL.read_bytes())} != {sha(SHIPPED_MODEL.read_bytes())})") in err
    with pytest.raises(ModelCheckError, match="written for a different model"):
        M.AdmissionModel(dst)


def test_unreadable_model_or_card_is_one_line(tmp_path, capsys):
    dst = write_model(tmp_path, SHIPPED_MODEL.read_bytes())
    card = card_path(dst)
    card.write_bytes(b"\xff\xfe{}")
    assert "not valid JSON: not UTF-8" in refused(capsys, ["model", "check", str(dst)])
    card.write_text("[1, 2]")
    assert "should be a JSON object, found an array" in refused(
        capsys, ["model", "check", str(dst)])
    card.unlink()
    card.mkdir()
    assert f"card {card}: cannot read it" in refused(capsys, ["model", "check", str(dst)])
    d = tmp_path / "dir.onnx"
    d.mkdir()
    assert "dir.onnx: cannot read the model" in refused(capsys, ["model", "check", str(d)])


# ------------------------------------------------------------- train --out

def small_recorded_trace(path, n=3000):
    """A recorded-looking QD1 trace with slow periods (60 I/Os every 400)."""
    rng = np.random.default_rng(0)
    lat = 100.0 * rng.uniform(0.9, 1.2, n)
    lat[(np.arange(n) % 400) >= 340] *= 20
    lat_ns = (lat * 1000).astype(np.int64)
    issue = np.concatenate([[0], np.cumsum(lat_ns[:-1] + 5_000)]).astype(np.int64)
    cols = {"issue_ns": issue, "complete_ns": issue + lat_ns, "latency_ns": lat_ns,
            "device": np.full(n, "nvme", dtype=object), "sector": np.zeros(n, np.int64),
            "bytes": np.full(n, 4096, np.int64), "op": np.zeros(n, np.uint8),
            "qlen": np.zeros(n, np.int32), "leg": np.full(n, -1, np.int16)}
    write_trace(path, Trace(cols, {"source": "test"}))
    return path


def train_argv(src, out):
    return ["train", "-q", "--trace", str(src), "--out", str(out), "--max-epochs", "2",
            "--lat-threshold-rel", "5", "--tput-threshold", "0.5"]


def test_train_writes_model_and_card_as_a_pair_or_not_at_all(tmp_path, capsys, monkeypatch):
    src = small_recorded_trace(tmp_path / "t.parquet")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "m.onnx"

    def no_space(path, card):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(T, "write_card", no_space)
    err = refused(capsys, train_argv(src, out))
    assert "cannot write" in err and "No space left on device" in err
    assert list(out_dir.iterdir()) == []               # no model, no card, no temporary file

    monkeypatch.undo()
    assert cli.main(train_argv(src, out)) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.card.json", "m.onnx"]
    card = json.loads(card_path(out).read_text())
    assert card["card_version"] == CARD_VERSION
    assert card["model_sha256"] == sha(out.read_bytes())
    assert cli.main(["model", "check", str(out)]) == 0


def test_train_refuses_an_existing_model_before_training(tmp_path, capsys, monkeypatch):
    src = small_recorded_trace(tmp_path / "t.parquet")
    out = tmp_path / "m.onnx"
    out.write_bytes(b"precious")
    monkeypatch.setattr(T, "train_heimdall_on_records",
                        lambda *a, **k: pytest.fail("trained despite an existing --out"))
    err = refused(capsys, train_argv(src, out), code=2)
    assert f"{out} exists" in err
    assert out.read_bytes() == b"precious" and not card_path(out).exists()
    # the trace itself as --out
    src2 = small_recorded_trace(tmp_path / "t.onnx")
    assert "is the input file" in refused(capsys, train_argv(src2, src2), code=2)


def test_train_force_overwrites_model_and_card_together(tmp_path, capsys):
    src = small_recorded_trace(tmp_path / "t.parquet")
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    card_path(out).write_text("{}")
    assert "pass --force" in refused(capsys, train_argv(src, out), code=2)
    assert cli.main(train_argv(src, out) + ["--force"]) == 0
    assert json.loads(card_path(out).read_text())["model_sha256"] == sha(out.read_bytes())
    assert cli.main(["model", "check", str(out)]) == 0
