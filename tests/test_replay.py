import json

import numpy as np
import pytest

from iobridge import cli
from iobridge.offline import policies as P
from iobridge.core.errors import IobridgeError
from iobridge.offline.labeling import time_split
from iobridge.offline.devmodel import DeviceParams
from iobridge.offline.replay import format_table, run_replay
from iobridge.offline.trace import (OP_READ, Trace, _normalise_batch, import_cloudphysics,
                                    write_trace)
from offline_helpers import shared_trace


@pytest.fixture(scope="module")
def cloudphysics():
    return import_cloudphysics(shared_trace("cloudPhysicsIO.csv"))


@pytest.fixture(scope="module")
def cp_report(cloudphysics):
    return run_replay(cloudphysics, 2, list(P.POLICY_NAMES), max_epochs=5, seed=0)


def test_cloudphysics_two_legs_reports_every_policy_on_held_back_part(cloudphysics, cp_report):
    rep = cp_report
    assert list(rep["policies"]) == list(P.POLICY_NAMES)
    split = time_split(cloudphysics["issue_ns"], 0.5)
    later_reads = int(((cloudphysics["issue_ns"] >= split) & (cloudphysics["op"] == OP_READ)).sum())
    earlier_reads = int(((cloudphysics["issue_ns"] < split) & (cloudphysics["op"] == OP_READ)).sum())
    assert rep["split_ns"] == split and rep["eval_part"]["reads"] == later_reads
    assert rep["train_part"]["reads"] == earlier_reads
    for name, s in rep["policies"].items():
        assert s["reads"] == later_reads, name
        assert sum(s["reads_per_leg"]) == s["reads"] + s["extra_ios"], name
        assert s["p50_us"] <= s["p99_us"] <= s["p999_us"] <= s["max_us"], name
        assert (s["extra_ios"] > 0) == (name in P.HEDGING), name
        if name in P.HEDGING:     # every hedging policy reports its extra reads
            h = s["hedging"]
            assert h["extra_reads"] == s["extra_ios"] and h["won"] <= h["extra_reads"]
            assert h["budget"] == (None if name == "hedged" else 0.05)
            assert h["extra_reads"] <= 0.05 * s["reads"] + 16 or name == "hedged"
        else:
            assert "hedging" not in s, name
    assert rep["policies"]["primary"]["reads_per_leg"] == [later_reads, 0]
    # learned models were fitted on the training part only
    for key in ("heimdall_model", "linnos_model"):
        assert rep[key]["trained_on"] == "training part"
    n_train = int((cloudphysics["issue_ns"] < split).sum())
    assert 0 < rep["heimdall_model"]["train_rows"] < 2 * n_train
    assert rep["fallbacks"] == {} and not any("fallback" in s for s in rep["policies"].values())
    # the table policy went through the keyed table: a few batched builds (when
    # a baseline moved), every read after the warm-up routed by the table
    d = rep["policies"]["table"]["details"]
    assert 0 < d["inference_calls"] < later_reads / 100
    assert d["default_routed_reads"] == d["no_valid_table_reads"] < 100
    assert d["routed_fraction"] > 0.99
    # the per-I/O policies ran their model once per read, with the same rule
    for name in ("heimdall", "linnos"):
        h = rep["policies"][name]["details"]
        assert h["inference_calls"] + h["default_routed_reads"] == later_reads
    # the report shows P(slow) per key of the newest table, per leg
    keys = d["keys"]
    assert len(keys["legs"]) == 2
    for leg in keys["legs"]:
        for fb in (0, 1):
            row = leg[f"inflight_bucket_{fb}"]
            assert len(row["p_slow"]) == len(row["penalty_us"]) == 8
            assert all(0 <= p <= 1 for p in row["p_slow"])
    text = format_table(rep)
    assert "P(slow) and penalty (us) per latency bucket" in text
    # busy periods exist in the device model and hedging cuts the tail they cause
    assert rep["policies"]["primary"]["p999_us"] > 1000
    assert rep["policies"]["hedged"]["p999_us"] < rep["policies"]["primary"]["p999_us"] / 2
    # the learned deadlines were published with the table, per leg and key
    for name in ("hedged-learned", "table-hedged"):
        d = rep["policies"][name]["details"]
        assert d["deadline_updates"] > 10, name
        assert all(leg["min_us"] > 0 for leg in d["deadlines"]["legs"]), name
        assert rep["policies"][name]["p999_us"] < rep["policies"]["leastinflight"]["p999_us"] / 2
        assert f"{name}: deadlines recomputed" in text
    assert "hedging         budget  deadlines  extra reads" in text


def test_replays_are_deterministic_and_independent_of_other_policies(cloudphysics):
    tr = cloudphysics.take(np.arange(20_000, 50_000))
    a = run_replay(tr, 2, ["primary"], seed=3)["policies"]["primary"]
    b = run_replay(tr, 2, ["random", "primary"], seed=3)["policies"]["primary"]
    a.pop("sim_seconds"), b.pop("sim_seconds")
    assert a == b


def test_table_entries_expire_to_the_module_default(cloudphysics):
    tr = cloudphysics.take(np.arange(20_000, 50_000))
    # a table lives 0.1 ms and is not kept alive (a stalled agent): most reads
    # find no table in force and go to the module default
    rep = run_replay(tr, 2, ["table"], max_epochs=3, recompute_ns=1_000_000, staleness_ns=0,
                     ttl_ns=100_000)
    d = rep["policies"]["table"]["details"]
    assert d["ttl_us"] == 100 and d["inference_calls"] > 0
    assert d["default_routed_reads"] == d["no_valid_table_reads"] > 0.5 * rep["eval_part"]["reads"]


def test_cli_json_and_plot(tmp_path, cloudphysics, capsys):
    src = tmp_path / "cp.parquet"
    write_trace(src, cloudphysics.take(np.arange(20_000, 40_000)))
    png = tmp_path / "cdf.png"
    assert cli.main(["replay", "-q", "--trace", str(src), "--legs", "3", "--policy", "primary",
                     "--policy", "leastinflight", "--policy", "hedged", "--json",
                     "--plot", str(png)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert list(rep["policies"]) == ["primary", "leastinflight", "hedged"]
    assert len(rep["policies"]["primary"]["reads_per_leg"]) == 3
    assert png.stat().st_size > 10_000
    assert cli.main(["replay", "-q", "--trace", str(src), "--policy", "nope"]) == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err
    # An existing plot: refused before the replay runs, unless --force.
    base = ["replay", "-q", "--trace", str(src), "--policy", "primary", "--plot", str(png)]
    before = png.read_bytes()
    assert cli.main(base) == 2
    assert "exists" in capsys.readouterr().err and png.read_bytes() == before
    assert cli.main(base + ["--force"]) == 0
    assert "primary" in capsys.readouterr().out and png.stat().st_size > 10_000
    # An image format matplotlib cannot write is refused before the replay
    # runs (as a bad path is), and leaves no file behind.
    bad = tmp_path / "cdf.nope"
    assert cli.main(["replay", "-q", "--trace", str(src), "--policy", "primary",
                     "--plot", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and f"cannot write {bad}: no image format .nope" in err
    assert not bad.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cdf.png", "cp.parquet"]


def test_trace_without_reads_is_an_error(cloudphysics):
    w = cloudphysics.take(np.flatnonzero(cloudphysics["op"] != OP_READ)[:1000])
    with pytest.raises(IobridgeError, match="no reads"):
        run_replay(w, 2, ["primary"])


def test_replay_uses_recorded_per_leg_latencies(capsys):
    from iobridge.offline.trace import Trace, _normalise_batch
    # recorded on 2 legs: leg 0 reads take 100 us, then 5 ms in the later half;
    # leg 1 reads always take 300 us. Reads alternate legs, 1 ms apart.
    n = 2000
    issue = np.arange(n, dtype=np.int64) * 1_000_000
    leg = np.arange(n) % 2
    lat = np.where(leg == 1, 300_000, np.where(issue < n * 500_000, 100_000, 5_000_000))
    rec = Trace(_normalise_batch({"issue_ns": issue, "bytes": np.full(n, 4096), "leg": leg,
                                  "latency_ns": lat, "complete_ns": issue + lat,
                                  "qlen": np.zeros(n), "op": np.zeros(n)}), {"source": "rec"})
    rep = run_replay(rec, 2, ["primary", "roundrobin", "leastinflight"])
    assert rep["latency_source"] == "recorded per-leg latencies"
    pol = rep["policies"]
    assert pol["primary"]["p50_us"] == pytest.approx(5000)
    assert pol["roundrobin"]["mean_us"] == pytest.approx((5000 + 300) / 2, rel=0.01)
    # leg 0 is busy 5 ms per read: least in-flight moves reads to leg 1
    assert pol["leastinflight"]["reads_per_leg"][1] > 0.7 * pol["leastinflight"]["reads"]
    with pytest.raises(IobridgeError, match="no recorded reads on leg 2"):
        run_replay(rec, 3, ["primary"])
    m = run_replay(rec, 2, ["primary"], latency="model")
    assert m["latency_source"] == "device model" and m["policies"]["primary"]["p50_us"] < 200


def test_table_with_staleness_keeps_the_previous_table_in_force(cloudphysics):
    # baselines checked every 100 us tick, rebuilds up to every 100 us, each
    # visible 500 us after it was built: the previous table stays in force
    # meanwhile, so only the warm-up (no baselines yet, then the first
    # table's staleness) goes to the default
    tr = cloudphysics.take(np.arange(20_000, 50_000))
    tr.cols["issue_ns"] = np.arange(len(tr), dtype=np.int64) * 70_000
    rep = run_replay(tr, 2, ["table"], max_epochs=3, recompute_ns=100_000,
                     staleness_ns=500_000, tick_ns=100_000)
    d = rep["policies"]["table"]["details"]
    assert d["inference_calls"] > 1 and d["staleness_us"] == 500 and d["ttl_us"] is None
    assert d["default_routed_reads"] == d["no_valid_table_reads"] < 50


def _steady_trace(n=4000):
    """Reads of 4 KiB every 1 ms: on a device model without busy periods
    every read takes the same time, so nothing is ever slow."""
    issue = np.arange(n, dtype=np.int64) * 1_000_000
    return Trace(_normalise_batch({"issue_ns": issue, "bytes": np.full(n, 4096),
                                   "op": np.zeros(n)}), {"source": "steady"})


def test_no_slow_io_in_training_reports_every_policy_with_fallback_reasons():
    rep = run_replay(_steady_trace(), 2, list(P.POLICY_NAMES), max_epochs=2,
                     params=DeviceParams(bg_per_s=0.0, gc_every_write_mb=1e18))
    assert list(rep["policies"]) == list(P.POLICY_NAMES)
    assert list(rep["fallbacks"]) == list(P.LEARNED)
    for name in P.LEARNED:
        s = rep["policies"][name]
        assert "no slow I/Os" in s["fallback"] and s["replayed_as"] == "leastinflight"
        assert s["fallback"] == rep["fallbacks"][name]
        assert s["reads_per_leg"] == rep["policies"]["leastinflight"]["reads_per_leg"]
    for name in ("heimdall_model", "linnos_model"):
        assert "no slow I/Os" in rep[name]["not_trained"]
    text = format_table(rep)
    for name in P.LEARNED:
        assert f"* {name}: " in text and f"\n{name}*" in text


def test_cli_no_slow_io_exits_0_with_reasons_in_text_and_json(tmp_path, capsys):
    src = tmp_path / "steady.parquet"
    write_trace(src, _steady_trace())
    base = ["replay", "-q", "--trace", str(src), "--no-busy", "--max-epochs", "2"]
    assert cli.main(base + ["--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert list(rep["policies"]) == list(P.POLICY_NAMES)
    assert set(rep["fallbacks"]) == set(P.LEARNED)
    assert all("not trained" in rep["policies"][n]["fallback"] for n in P.LEARNED)
    assert cli.main(base + ["--policy", "heimdall", "--policy", "primary"]) == 0
    out = capsys.readouterr().out
    assert "heimdall: not trained: the training part has no slow I/Os" in out
    assert "replayed as leastinflight" in out and "primary" in out


def test_a_held_back_part_without_reads_is_one_error(tmp_path, capsys):
    """Reads only early in the trace: no policy has anything to report (the
    text report was a KeyError traceback)."""
    src = tmp_path / "t.csv"
    src.write_text("version,time,op,size,lbn\n" + "".join(
        f"1,{i},{'28' if i < 50 else '2a'},4096,{i}\n" for i in range(100)))
    assert cli.main(["replay", "-q", "--trace", str(src), "--policy", "primary"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "iobridge: error: the held-back part of the trace (from 49500000000 ns, the later 0.5 "
        "of its time span) has no reads to replay (use a longer trace, or a smaller "
        "--train-fraction)"]
