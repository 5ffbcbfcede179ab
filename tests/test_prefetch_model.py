"""The prefetch model: recordings, `iobridge train --task prefetch`, the
model card, `iobridge model check` for both kinds, LearnedClassifier and
replay's --policy learned. Recordings here are synthetic (made by the
test from index sequences of each class through the one feature
definition); the real ones come from agent/lab/prefetch_record.py in the VM."""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest

from iobridge import cli
from iobridge.core import prefetch_features as PF
from iobridge.core import prefetch_model as PM
from iobridge.core import prefetch_recording as R
from iobridge.core.model import AdmissionModel, ModelCheckError, bench, card_path, check_model
from iobridge.offline import prefetch as PP
from iobridge.offline.trace import OP_READ, Trace, _normalise_batch, write_trace
from offline_helpers import SHIPPED_MODEL

SHIPPED_PREFETCH = SHIPPED_MODEL.parent / "prefetch-default.onnx"
BEST_KB = {"random": 0, "random+write": 8, "sequential": 1024, "reverse": 32}
SWEEP = (0, 8, 32, 128, 1024)


def class_window(cls: str, rng) -> tuple[PF.WindowStats, bool]:
    """A window of page insertions like a workload of class `cls` makes."""
    w = PF.WindowStats()
    n = int(rng.integers(40, 400))
    if cls in ("random", "random+write"):
        for i in rng.integers(0, 200_000, n):
            w.add(int(i))
    elif cls == "sequential":
        start = int(rng.integers(0, 100_000))
        for i in range(start, start + n):
            w.add(i)
    else:            # a backward reader of 4-page blocks: each block forward
        top = int(rng.integers(10_000, 100_000))
        for b in range(n // 4):
            for k in range(4):
                w.add(top - 4 * b + k)
    return w, cls == "random+write"


def make_recording(path, seed: int, windows_per_run: int = 6, classes=PF.PREFETCH_CLASSES,
                   end: bool = True) -> str:
    rng = np.random.default_rng(seed)
    head = R.header(f"seed{seed}", seed, {c: {"class": c, "how": "synthetic"} for c in classes},
                    SWEEP, PF.WINDOW_S, kernel="test")
    w = R.RecordingWriter(path, head)
    for cls in classes:
        for kb in SWEEP:
            for t in range(windows_per_run):
                win, writes = class_window(cls, rng)
                for scope in R.SCOPES:
                    w.write({"type": "window", "workload": cls, "class": cls,
                             "read_ahead_kb": kb, "scope": scope, "t": t,
                             "features": list(win.features(kb)), "direction": win.direction,
                             "has_writes": writes})
            mb = 100.0 - abs(np.log2(kb + 4) - np.log2(BEST_KB[cls] + 4)) * 5
            w.write({"type": "run", "workload": cls, "class": cls, "read_ahead_kb": kb,
                     "read_mb_s": mb, "write_mb_s": 0.0, "seconds": 5.0})
    if end:
        w.close()
    else:                         # a recorder that died: no end line
        w.f.close()
        w.tmp.rename(path)
    return str(path)


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    d = tmp_path_factory.mktemp("rec")
    return [make_recording(d / f"r{s}.jsonl.gz", s) for s in (1, 2, 3)]


@pytest.fixture(scope="module")
def trained(recordings, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "p.onnx"
    assert cli.main(["train", "-q", "--task", "prefetch", "--data", recordings[0],
                     "--data", recordings[1], "--data", recordings[2], "-o", str(out),
                     "--seed", "3", "--max-epochs", "200"]) == 0
    return out


def test_training_writes_a_checked_prefetch_model_and_card(trained, recordings):
    card = check_model(trained)
    assert json.loads(card_path(trained).read_text()) == card
    assert card["task"] == "prefetch" and card["schema_version"] == PF.SCHEMA_VERSION
    assert [f["name"] for f in card["features"]] == list(PF.MODEL_INPUT_NAMES)
    assert [c["name"] for c in card["classes"]] == list(PF.PREFETCH_CLASSES)
    # each class gets the setting its sweep found best
    assert {c["name"]: c["readahead_kb"] for c in card["classes"]} == BEST_KB
    # held back by recording (the last id), not by row; separable data: high accuracy
    assert card["evaluation"]["held_back_recordings"] == ["seed3"]
    parts = {d["recording"]: d["part"] for d in card["training"]["data"]}
    assert parts == {"seed1": "fitted", "seed2": "fitted", "seed3": "held back"}
    held = card["evaluation"]["held_back"]
    assert held["rows"] == 4 * len(SWEEP) * 6 * 2
    assert card["evaluation"]["accuracy"] >= 0.95
    assert card["training"]["fit_rows"] == 2 * held["rows"]
    assert card["min_events"] == PF.MIN_EVENTS and card["model"]["seed"] == 3
    assert "prefetch_record" in card["training"]["regenerate"]


def test_training_is_deterministic_for_a_seed(trained, recordings, tmp_path):
    again = tmp_path / "again.onnx"
    assert cli.main(["train", "-q", "--task", "prefetch", "--data", recordings[2],
                     "--data", recordings[0], "--data", recordings[1], "-o", str(again),
                     "--seed", "3", "--max-epochs", "200"]) == 0
    assert again.read_bytes() == trained.read_bytes()
    other = tmp_path / "other.onnx"
    assert cli.main(["train", "-q", "--task", "prefetch", "--data", recordings[0],
                     "--data", recordings[1], "--data", recordings[2], "-o", str(other),
                     "--seed", "4", "--max-epochs", "200"]) == 0
    assert other.read_bytes() != trained.read_bytes()


def test_learned_classifier_agrees_with_the_graph_and_has_rule_interface(trained):
    import onnxruntime as ort
    lc = PM.LearnedClassifier(trained)
    rc = PP.RuleClassifier()
    for name in ("classify", "describe"):
        assert callable(getattr(lc, name)) and callable(getattr(rc, name))
    assert len(lc.class_readahead_kb) == len(rc.class_readahead_kb) == len(PF.PREFETCH_CLASSES)
    sess = ort.InferenceSession(str(trained), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(9)
    agree = 0
    for cls in PF.PREFETCH_CLASSES:
        for _ in range(10):
            w, writes = class_window(cls, rng)
            f = w.features(128)
            got = lc.classify(f, writes, w.direction)
            x = np.asarray([PF.model_row(f, writes, w.direction)], dtype=np.float32)
            want = int(np.argmax(sess.run(["probabilities"], {"features": x})[0][0]))
            assert got == want
            agree += PF.PREFETCH_CLASSES[got] == cls
    assert agree >= 36
    # too few insertions: no decision, as the rule-based classifier
    small = PF.WindowStats()
    for i in range(5):
        small.add(i)
    assert lc.classify(small.features(128), False, 1.0) is None
    assert rc.classify(small.features(128), False, 1.0) is None
    assert "held-back accuracy" in lc.describe()


def test_model_check_both_kinds_and_the_wrong_kind_is_refused(trained, capsys):
    assert check_model(trained, expect="prefetch")["task"] == "prefetch"
    assert check_model(SHIPPED_MODEL, expect="admission")["task"] == "admission"
    with pytest.raises(ModelCheckError, match="model of the wrong kind: a prefetch model "
                       r"\(task 'prefetch'\) where an admission model is needed"):
        AdmissionModel(trained)                 # what the agent loads
    with pytest.raises(ModelCheckError, match="model of the wrong kind: an admission model"):
        PM.LearnedClassifier(SHIPPED_MODEL)
    assert cli.main(["model", "check", str(trained)]) == 0
    out = capsys.readouterr().out
    assert "OK (task prefetch" in out and "sequential 1024 KB" in out
    r = bench(trained, batch=8, runs=20)
    assert r["batch"] == 8 and 0 < r["median_us"] <= r["p99_us"]


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(schema_version=9), "prefetch feature schema version 9"),
    (lambda c: c["features"].pop(), "differ from the prefetch model inputs"),
    (lambda c: c["classes"].reverse(), "differ from the prefetch classes"),
    (lambda c: c["classes"][0].update(readahead_kb=6), "readahead_kb 6"),
    (lambda c: c.pop("min_events"), r"lacks fields \['min_events'\]"),
    (lambda c: c.update(task="eviction"), "task is 'eviction', expected one of"),
])
def test_bad_prefetch_cards_are_refused(trained, tmp_path, edit, message):
    dst = tmp_path / "p.onnx"
    shutil.copy(trained, dst)
    card = json.loads(card_path(trained).read_text())
    edit(card)
    card_path(dst).write_text(json.dumps(card))
    with pytest.raises(ModelCheckError, match=message):
        check_model(dst)


def test_an_admission_graph_under_a_prefetch_card_is_refused(trained, tmp_path):
    dst = tmp_path / "p.onnx"
    shutil.copy(SHIPPED_MODEL, dst)
    card = json.loads(card_path(trained).read_text())
    card_path(dst).write_text(json.dumps(card))
    with pytest.raises(ModelCheckError, match=r"expected \[N, 7\]"):
        check_model(dst)


def _train(argv, capsys):
    rc = cli.main(["train", "-q", "--task", "prefetch", *argv])
    err = capsys.readouterr().err
    return rc, err


def test_bad_recordings_are_one_error_and_nothing_is_written(tmp_path, recordings, capsys):
    out = str(tmp_path / "m.onnx")
    trunc = tmp_path / "trunc.jsonl.gz"
    trunc.write_bytes(open(recordings[0], "rb").read()[:-200])
    noend = make_recording(tmp_path / "noend.jsonl.gz", 5, windows_per_run=1, end=False)
    notgz = tmp_path / "plain.jsonl.gz"
    notgz.write_text("{}\n")
    badrow = tmp_path / "badrow.jsonl.gz"
    lines = gzip.open(recordings[0], "rt").read().splitlines()
    row = json.loads(lines[1])
    row["features"] = row["features"][:3]
    lines[1] = json.dumps(row)
    with gzip.open(badrow, "wt") as f:
        f.write("\n".join(lines) + "\n")
    cases = [
        ([str(tmp_path / "none.jsonl.gz"), recordings[1]], "no such recording"),
        ([str(trunc), recordings[1]], "truncated (the compressed stream ends early)"),
        ([noend, recordings[1]], "truncated: no end line"),
        ([str(notgz), recordings[1]], "not a gzip-compressed recording"),
        ([str(badrow), recordings[1]], "line 2: 'features' should be 5 finite numbers"),
        ([recordings[0]], "needs at least two recordings"),
        ([recordings[0], recordings[0]], "given more than once"),
    ]
    for data, message in cases:
        argv = [a for d in data for a in ("--data", d)] + ["-o", out]
        rc, err = _train(argv, capsys)
        assert rc in (1, 2) and message in err, (message, err)
        assert err.count("\n") == 1 and "Traceback" not in err
        assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.card.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_class_missing_from_the_fitted_recordings_is_an_error(tmp_path, capsys):
    a = make_recording(tmp_path / "a.jsonl.gz", 1, classes=("random", "sequential"))
    b = make_recording(tmp_path / "b.jsonl.gz", 2)
    rc, err = _train(["--data", a, "--data", b, "--held-back", "seed2", "-o",
                      str(tmp_path / "m.onnx")], capsys)
    assert rc == 1 and "no windows of class random+write, reverse" in err


def test_train_task_options_are_refused_across_tasks(tmp_path, recordings, capsys):
    out = str(tmp_path / "m.onnx")
    assert cli.main(["train", "--data", recordings[0], "-o", out]) == 2
    assert "--data is an option of --task prefetch" in capsys.readouterr().err
    assert cli.main(["train", "--task", "prefetch", "--trace", "t.parquet", "-o", out]) == 2
    assert "--trace is the admission task's input" in capsys.readouterr().err
    assert cli.main(["train", "-o", out]) == 2
    assert "the admission task needs traces" in capsys.readouterr().err


# ------------------------------------------------------------- replay

def _trace(tmp_path):
    fwd = list(range(0, 6000))
    back = list(range(20_000, 14_000, -1))
    pages = np.asarray(fwd + back)
    n = len(pages)
    tr = Trace(_normalise_batch({
        "issue_ns": np.arange(n, dtype=np.int64) * 2_000_000,
        "sector": pages * 8, "bytes": np.full(n, 4096), "op": np.full(n, OP_READ)}),
        {"source": "test"})
    src = tmp_path / "t.parquet"
    write_trace(src, tr)
    return src


def test_replay_policy_learned_runs_with_a_given_model(trained, tmp_path, capsys):
    src = _trace(tmp_path)
    assert cli.main(["replay", "--task", "prefetch", "-q", "--json", "--trace", str(src),
                     "--cache-mb", "4", "--policy", "linux", "--policy", f"learned:{trained}",
                     "--policy", "kml"]) == 0
    rep = json.loads(capsys.readouterr().out)
    row = rep["policies"][f"learned:{trained}"]
    d = row["details"]
    assert d["classifier"] == f"learned:{trained.name}"
    assert d["windows_by_class"]["sequential"] >= 8 and d["windows_by_class"]["reverse"] >= 8
    assert row["hits"] + row["misses"] == row["page_requests"] == 12_000
    assert "ONNX prefetch model" in d["classifier_rules"]
    # --model names the model of plain `learned`
    assert cli.main(["replay", "--task", "prefetch", "-q", "--json", "--trace", str(src),
                     "--cache-mb", "4", "--policy", "learned", "--model", str(trained)]) == 0
    again = json.loads(capsys.readouterr().out)["policies"]["learned"]
    assert again["hits"] == row["hits"] and again["prefetched_pages"] == row["prefetched_pages"]


@pytest.mark.parametrize("spec,code,message", [
    (f"learned:{SHIPPED_MODEL}", 1, "model of the wrong kind: an admission model"),
    ("learned:/nonexistent/p.onnx", 1, "no such file"),
    ("learned:", 2, "no model after 'learned:'"),
])
def test_replay_learned_refuses_bad_models(tmp_path, capsys, spec, code, message):
    src = _trace(tmp_path)
    assert cli.main(["replay", "--task", "prefetch", "-q", "--trace", str(src),
                     "--cache-mb", "4", "--policy", spec]) == code
    out, err = capsys.readouterr()
    assert message in err and out == "" and "Traceback" not in err


def test_shipped_prefetch_model_is_checked_and_is_the_default():
    card = check_model(SHIPPED_PREFETCH, expect="prefetch")
    assert card["evaluation"]["accuracy"] >= 0.8
    held = set(card["evaluation"]["held_back_recordings"])
    parts = {d["recording"]: d["part"] for d in card["training"]["data"]}
    assert held and all(parts[h] == "held back" for h in held)
    assert all(d["kernel"] and d["seed"] is not None for d in card["training"]["data"])
    assert PP.default_model_path() == str(SHIPPED_PREFETCH)
    assert PP.build_policy("learned").classifier.path == SHIPPED_PREFETCH
