import json

import numpy as np
import pytest

from iobridge import cli
from iobridge.core import decision as D
from iobridge.core import features as F
from iobridge.offline import policies as P
from iobridge.offline.devmodel import DeviceParams
from iobridge.core.model import card_path, check_model
from iobridge.offline.simulate import simulate
from iobridge.offline.train import heimdall_dataset
from iobridge.offline.trace import Trace, import_cloudphysics, read_trace, write_trace
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
    assert card["schema_version"] == F.SCHEMA_VERSION
    assert [f["name"] for f in card["features"]] == list(F.FEATURE_NAMES)
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
    # what the decision table would get from it, per latency bucket
    rows = card["table_rows"]
    assert "notes" not in card
    assert rows["lat_rel"] == list(D.LAT_REP_REL)
    assert set(rows["p_slow_by_inflight"]) == {"0", "1"}
    assert all(len(p) == len(D.LAT_REP_REL) and all(0 <= v <= 1 for v in p)
               for p in rows["p_slow_by_inflight"].values())
    assert "held-back part: accuracy" in capsys.readouterr().out


def test_train_rejects_bad_output_name(tmp_path, capsys):
    assert cli.main(["train", "--trace", str(shared_trace("cloudPhysicsIO.csv")),
                     "--out", str(tmp_path / "m.bin")]) == 2
    assert "expected a file name ending in .onnx" in capsys.readouterr().err


def recorded_qd1(device: str, fast_us: float, slow_factor: float, n: int = 3000,
                 seed: int = 0) -> Trace:
    """A recorded-looking QD1 trace of one device with slow periods
    slow_factor x its fast latency (60 I/Os every 400)."""
    rng = np.random.default_rng(seed)
    lat = fast_us * rng.uniform(0.9, 1.2, n)
    slow = (np.arange(n) % 400) >= 340
    lat[slow] *= slow_factor
    lat_ns = (lat * 1000).astype(np.int64)
    issue = np.concatenate([[0], np.cumsum(lat_ns[:-1] + 5_000)]).astype(np.int64)
    cols = {"issue_ns": issue, "complete_ns": issue + lat_ns, "latency_ns": lat_ns,
            "device": np.full(n, device, dtype=object), "sector": np.zeros(n, np.int64),
            "bytes": np.full(n, 4096, np.int64), "op": np.zeros(n, np.uint8),
            "qlen": np.zeros(n, np.int32), "leg": np.full(n, -1, np.int16)}
    return Trace(cols, {"source": "test"}), slow


def test_relative_latency_threshold_labels_devices_of_different_speeds():
    fast, slow_a = recorded_qd1("nvme", 100.0, 20.0)
    slowdev, slow_b = recorded_qd1("hdd", 2000.0, 20.0, seed=1)
    ds = heimdall_dataset([fast, slowdev], {"lat_threshold_rel": 5.0, "tput_threshold_mbps": 0.5})
    by = {s["sequence"]: s for s in ds.labeling}
    half = len(ds.y) // 2
    for name, truth, part in (("nvme", slow_a, slice(0, half)), ("hdd", slow_b, slice(half, None))):
        s = by[name]
        assert s["lat_threshold_rel"] == 5.0 and "lat_threshold_us" not in s
        assert s["slow_periods"] == int(truth.sum() // 60)
        # every slow I/O is in a period; a period may run on for a few I/Os
        # until three in a row are back above the median throughput
        assert ds.y[part][truth].all()
        assert truth.mean() <= s["slow_fraction"] < truth.mean() + 0.03
    assert 90 < by["nvme"]["baseline_lat_us"]["median"] < 110
    assert 1800 < by["hdd"]["baseline_lat_us"]["median"] < 2200
    # features are relative too: the same slow factor looks the same on both
    for part in (slice(0, half), slice(half, None)):
        lat_rel = ds.X[part, F.COLS_PREV_LAT.start][ds.y[part] == 1]
        assert np.median(lat_rel) > 10
    # one threshold in us between the fast device's modes makes every I/O of
    # the slower device slow-looking: its fast I/Os become noise
    ds = heimdall_dataset([fast, slowdev], {"lat_threshold_us": 1000.0,
                                            "tput_threshold_mbps": 0.5})
    assert ds.keep[half:][~slow_b].sum() < 0.05 * (~slow_b).sum()


def test_train_with_relative_threshold_records_it_in_the_card(tmp_path):
    src = tmp_path / "two.parquet"
    a, _ = recorded_qd1("nvme", 100.0, 20.0, n=4000)
    b, _ = recorded_qd1("hdd", 2000.0, 20.0, n=4000, seed=1)
    both = Trace({k: np.concatenate([a[k], b[k]]) for k in a.cols}, {"source": "test"})
    write_trace(src, both)
    out = tmp_path / "rel.onnx"
    assert cli.main(["train", "-q", "--trace", str(src), "--out", str(out), "--max-epochs", "3",
                     "--lat-threshold-rel", "5", "--tput-threshold", "0.5",
                     "--note", "two devices 20x apart"]) == 0
    card = check_model(out)
    lab = card["training"]["labeling"]
    assert lab["threshold_overrides"] == {"lat_threshold_rel": 5.0, "tput_threshold_mbps": 0.5}
    assert "baseline" in lab["method"]
    assert {s["sequence"] for s in lab["sequences"]} == {"nvme", "hdd"}
    assert all(s["lat_threshold_rel"] == 5.0 for s in lab["sequences"])
    assert card["evaluation"]["held_back_all_ios"]["slow_rows"] > 0
    assert card["notes"] == ["two devices 20x apart"]


def test_train_rejects_two_latency_thresholds(tmp_path, capsys):
    assert cli.main(["train", "--trace", str(shared_trace("cloudPhysicsIO.csv")),
                     "--out", str(tmp_path / "m.onnx"), "--lat-threshold-us", "2000",
                     "--lat-threshold-rel", "8"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:    # the parser's range (test_cli_ranges.py)
        cli.main(["train", "--trace", str(shared_trace("cloudPhysicsIO.csv")),
                  "--out", str(tmp_path / "m.onnx"), "--lat-threshold-rel", "0.5"])
    assert exc.value.code == 2
    assert "--lat-threshold-rel: must be a number more than 1" in capsys.readouterr().err


def test_train_on_a_trace_without_reads_or_writes_is_one_error(tmp_path, capsys):
    """Only "other" operations: nothing to simulate or learn from."""
    src = tmp_path / "other.csv"
    src.write_text("version,time,op,size,lbn\n" + "".join(f"1,{i},12,4096,{i}\n" for i in range(50)))
    assert cli.main(["train", "-q", "--trace", str(src), "--out", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"iobridge: error: {src}: no reads or writes to learn from "
                   "(50 records: {'other': 50})"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.csv"]


def test_train_with_every_io_labelled_slow_is_one_error(tmp_path, capsys):
    """A latency threshold below every latency makes one class: nothing to learn
    (the classifier would have one output column, not the two a model needs)."""
    src = tmp_path / "r.parquet"
    write_trace(src, recorded_qd1("nvme", 100.0, 20.0)[0])
    assert cli.main(["train", "-q", "--trace", str(src), "--out", str(tmp_path / "m.onnx"),
                     "--max-epochs", "1", "--lat-threshold-us", "0.5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "every I/O of the training part is labelled slow" in err[0]
    assert not (tmp_path / "m.onnx").exists()


def test_train_on_a_trace_too_short_to_split_is_one_error(tmp_path, capsys):
    """One I/O: the training part is empty (it was reported as 'I/Os without latency')."""
    src = tmp_path / "one.csv"
    src.write_text("version,time,op,size,lbn\n1,0,28,4096,8\n")
    assert cli.main(["train", "-q", "--trace", str(src), "--out", str(tmp_path / "m.onnx")]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"iobridge: error: {src}: too short to split by time: the earlier 0.7 of its time span "
        "holds 0 of its 1 I/Os (use a longer trace)"]
