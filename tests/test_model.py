import json
import shutil

import numpy as np
import pytest
from onnx import TensorProto, helper

from iobridge import cli
from iobridge.core import features as F
from iobridge.core.model import ModelCheckError, bench, card_path, check_model
from offline_helpers import SHIPPED_MODEL


def _copy_shipped(tmp_path, name="m"):
    dst = tmp_path / f"{name}.onnx"
    shutil.copy(SHIPPED_MODEL, dst)
    card = json.loads(card_path(SHIPPED_MODEL).read_text())
    card_path(dst).write_text(json.dumps(card))
    return dst, card


@pytest.mark.parametrize("name, source, records, latency", [
    # The default: recorded at bio level in the test VM (scripts/train-default-model.sh).
    ("admission-default.onnx", "vm-legs.parquet", None, "measured"),
    # Trained on the public CloudPhysics trace driven through the device model.
    ("admission-cloudphysics.onnx", "cloudPhysicsIO.csv", 113_872, "device model"),
])
def test_shipped_models_pass_check_and_their_cards_are_complete(name, source, records, latency):
    card = check_model(SHIPPED_MODEL.parent / name)
    assert card["task"] == "admission" and card["schema_version"] == F.SCHEMA_VERSION
    assert [f["name"] for f in card["features"]] == list(F.FEATURE_NAMES)
    ev = card["evaluation"]
    for k in ("accuracy", "precision", "recall", "roc_auc"):
        assert 0.0 <= ev[k] <= 1.0
    data = card["training"]["data"]
    assert data[0]["file"] == source
    assert data[0]["records"] == records if records else data[0]["records"] > 100_000
    assert latency in data[0]["latency"]
    assert card["training_time_s"] > 0 and card["tools"]["onnxruntime"]


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_wrong_input_width_is_rejected(tmp_path):
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from iobridge.offline.train import to_onnx
    rng = np.random.default_rng(0)
    X = rng.random((200, 10)).astype(np.float32)
    est = Pipeline([("clf", MLPClassifier((4,), max_iter=5))]).fit(X, X[:, 0] > 0.5)
    dst, card = _copy_shipped(tmp_path)
    dst.write_bytes(to_onnx(est, 10))
    with pytest.raises(ModelCheckError, match=r"shape \[None, 10\], expected \[N, 12\]"):
        check_model(dst)


def test_card_schema_version_mismatch_is_rejected(tmp_path):
    dst, card = _copy_shipped(tmp_path)
    card["schema_version"] = 99
    card_path(dst).write_text(json.dumps(card))
    with pytest.raises(ModelCheckError,
                       match=r"card feature schema version 99, this iobridge uses feature "
                             rf"schema version {F.SCHEMA_VERSION}"):
        check_model(dst)


def test_graph_emitting_nan_is_rejected(tmp_path):
    x = helper.make_tensor_value_info(F.INPUT_NAME, TensorProto.FLOAT, [None, F.NUM_FEATURES])
    y = helper.make_tensor_value_info(F.PROBA_OUTPUT, TensorProto.FLOAT, [None, 2])
    w = helper.make_tensor("w", TensorProto.FLOAT, [F.NUM_FEATURES, 2],
                           [0.0] * (2 * F.NUM_FEATURES))
    nan = helper.make_tensor("nan", TensorProto.FLOAT, [1, 2], [float("nan"), float("nan")])
    g = helper.make_graph([helper.make_node("MatMul", [F.INPUT_NAME, "w"], ["z"]),
                           helper.make_node("Add", ["z", "nan"], [F.PROBA_OUTPUT])],
                          "nan", [x], [y], [w, nan])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    dst, _ = _copy_shipped(tmp_path)
    dst.write_bytes(m.SerializeToString())
    with pytest.raises(ModelCheckError, match=r"graph emits NaN/Inf on synthetic input"):
        check_model(dst)


def test_non_onnx_file_is_rejected(tmp_path):
    dst, _ = _copy_shipped(tmp_path)
    dst.write_text("this is not a model\n")
    with pytest.raises(ModelCheckError, match=r"m\.onnx: not an ONNX model"):
        check_model(dst)


def test_missing_card_and_cli_message(tmp_path, capsys):
    dst = tmp_path / "lonely.onnx"
    shutil.copy(SHIPPED_MODEL, dst)
    with pytest.raises(ModelCheckError, match=r"model card .*lonely\.card\.json is missing"):
        check_model(dst)
    assert cli.main(["model", "check", str(dst)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "is missing" in err
    assert cli.main(["model", "check", str(SHIPPED_MODEL)]) == 0
    assert "OK" in capsys.readouterr().out


def test_bench_times_batch_of_32():
    r = bench(SHIPPED_MODEL, batch=32, runs=200)
    assert r["batch"] == 32 and 0 < r["median_us"] <= r["p99_us"]


def test_quick_check_names_the_common_mistakes_at_once(tmp_path, monkeypatch):
    """check_quickly (run by the agent before its BPF compiles) passes the
    shipped model without the test inference, and gives the full check's
    specific reason for a missing file, a bad card or another model's bytes."""
    from iobridge.core import model as M
    probes = []
    real_probe = M._probe
    monkeypatch.setattr(M, "_probe", lambda *a: probes.append(1) or real_probe(*a))
    M.check_quickly(SHIPPED_MODEL)
    assert probes == []                          # nothing slow for a model that matches its card
    with pytest.raises(ModelCheckError, match=r"nothere\.onnx: no such file"):
        M.check_quickly(tmp_path / "nothere.onnx")
    dst, card = _copy_shipped(tmp_path)
    dst.write_text("this is not a model\n")
    with pytest.raises(ModelCheckError, match=r"m\.onnx: not an ONNX model"):
        M.check_quickly(dst)
    dst, card = _copy_shipped(tmp_path)
    card["schema_version"] = 99
    card_path(dst).write_text(json.dumps(card))
    with pytest.raises(ModelCheckError, match=r"card feature schema version 99"):
        M.check_quickly(dst)
