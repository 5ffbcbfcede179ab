import json


from iobridge import cli
from iobridge.offline import policies as P
from iobridge.offline.devmodel import DeviceParams
from iobridge.core.model import card_path, check_model
from iobridge.offline.simulate import simulate
from iobridge.offline.trace import import_cloudphysics, read_trace, write_trace
from offline_helpers import shared_trace


def test_train_on_a_recorded_trace_writes_checked_model_and_card(tmp_path, capsys):
    # a "recorded" trace: per-leg I/Os with measured latency and queue length
    cp = import_cloudphysics(shared_trace("cloudPhysicsIO.csv"))
    rec = simulate(cp, 2, P.Random(), DeviceParams(), seed=5, record=True).records
    src = tmp_path / "rec.parquet"
    write_trace(src, rec)
    assert read_trace(src).has_latency
    out = tmp_path / "m.onnx"
    assert cli.main(["train", "-q", "--trace", str(src), "--out", str(out),
                     "--max-epochs", "3", "--train-fraction", "0.6"]) == 0
    card = check_model(out)
    assert json.loads(card_path(out).read_text()) == card
    d = card["training"]["data"][0]
    assert d["latency"] == "measured (recorded trace)"
    # split by time: fitting rows all precede the split, held-back rows follow it
    issue = rec["issue_ns"]
    assert d["train_ios"] == int((issue < d["split_ns"]).sum())
    assert d["held_back_ios"] == len(rec) - d["train_ios"]
    assert card["training"]["fit_rows"] <= d["train_ios"]
    ev = card["evaluation"]
    assert ev["held_back_all_ios"]["rows"] == d["held_back_ios"]
    assert ev["held_back_all_ios"]["slow_rows"] > 0 and 0.5 < ev["roc_auc"] <= 1.0
    assert "held-back part: accuracy" in capsys.readouterr().out


def test_train_rejects_bad_output_name(tmp_path, capsys):
    assert cli.main(["train", "--trace", str(shared_trace("cloudPhysicsIO.csv")),
                     "--out", str(tmp_path / "m.bin")]) == 2
    assert "expected a file name ending in .onnx" in capsys.readouterr().err
