"""Host test: `iobridge bench tick`, the agent's tick and table recompute
measured on the host against in-memory stand-ins for the kernel maps
(agent/lab/tickbench.py), and its command line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from iobridge import cli
from iobridge.core import abi
from iobridge.core import decision as D
from iobridge.core.model import AdmissionModel
from iobridge.lab import bench, tickbench
from iobridge.kernel import dmtarget
from offline_helpers import SHIPPED_MODEL


@pytest.fixture(scope="module")
def tiny_result():
    return tickbench.measure(legs=[2], change_rate_hz=5.0, duration_s=0.3, seed=3)


def test_a_tiny_run_with_two_legs_gives_measured_figures(tiny_result):
    res = tiny_result
    json.dumps(res)                                    # JSON-able as it is
    assert res["benchmark"] == "tick" and list(res["results"]) == ["2"]
    cost, default = res["results"]["2"]["cost"], res["results"]["2"]["default"]
    # the cost run recomputed and published, and timed it
    assert cost["recomputes"] > 0 and cost["ticks"] > cost["recomputes"]
    rc = cost["recompute_us"]
    assert rc["n"] > 0 and 0 < rc["p50"] <= rc["p99"] and rc["mean"] > 0
    assert rc["n"] == cost["recompute_with_model_us"]["n"] + cost["recompute_from_cache_us"]["n"]
    assert cost["build_us"]["mean"] > 0 and cost["publish_us"]["mean"] > 0
    # the last table's recompute repeated back to back, timed apart
    warm = cost["recompute_warm_us"]
    assert warm["n"] == tickbench.WARM_REPEATS and 0 < warm["p50"] <= warm["p99"]
    assert 0 < cost["tick_us"]["p50"] <= cost["tick_us"]["p99"]
    assert cost["ticks_per_s"] > 0 and cost["recomputes_per_s"] > 0
    assert cost["changes"] > 0 and cost["published_legs"] == 2
    # the default-settings run is Agent.run(): about one tick per 250 ms
    assert default["tick_ms"] == 250.0 and default["recompute_ms"] == 1000.0
    assert default["ticks"] >= 1 and default["overruns"] <= default["ticks"]
    assert default["wall_s"] >= 0.25 and default["published_legs"] == 2
    assert 0 < default["agent_cpu_s"] <= default["process_cpu_s"]
    assert default["cpu_share"] == pytest.approx(default["agent_cpu_s"] / default["wall_s"], rel=0.01)
    assert default["cpu_share_with_recompute_every_period_est"] > default["cpu_share"]
    # 8 legs were not run: the goals are not judged
    assert res["goal_met"] == {"recompute": None, "cpu": None}
    text = tickbench.render(res)
    assert "not measured" in text and "recompute us mean" in text and "CPU share" in text


def test_the_stand_ins_are_written_and_read_by_the_real_code():
    legmap = tickbench.memory_leg_map()
    devs = [(259 << 20) | 0, (259 << 20) | 1]
    slots = legmap.assign(devs)
    rng = np.random.default_rng(0)
    legs = tickbench.SyntheticLegs(legmap, [slots[d] for d in devs], 0.0, rng, 1_000_000)
    legs.advance(2_000_000)
    samples, done = legmap.new_samples([slots[d] for d in devs], [0, 0])
    assert all(n >= abi.HISTORY for n in done)
    for lat, tput, per_read in samples:
        assert len(lat) == abi.HISTORY and all(10 < x < 10_000 for x in lat)
        assert all(t > 0 for t in tput)
        assert all(0 < p <= x for p, x in zip(per_read, lat))
    assert legmap.read([slots[d] for d in devs]).stable.all()   # seq even after each write
    policy = tickbench.memory_policy()
    pen = np.full((2, abi.KEYS_PER_LEG), 1234, dtype=np.int64)
    edges = np.tile(np.arange(1, abi.NUM_LAT_BUCKETS, dtype=np.int64) * 1000, (2, 1))
    policy.publish(dmtarget.TargetRef(5, 41), pen, edges, np.array([100_000, 90_000]), 0, 777)
    block = policy.entries[abi.leg_index(5, 0):abi.leg_index(5, 0) + 2]
    assert block["expires_ns"].tolist() == [777, 777] and (block["penalty_ns"] == 1234).all()
    assert block["target_incarnation"].tolist() == [41, 41]
    policy.heartbeat(42)
    assert policy.agent.heartbeat_ns == 42 and policy.agent.ticks == 1
    policy.close()
    legmap.close()


def test_cli_parses_defaults_and_options():
    args = cli.build_parser().parse_args(["bench", "tick"])
    assert args.legs == [2, 8] and args.duration == 5.0 and args.change_rate_hz == 0.5
    assert args.json is False and args.output is None and not hasattr(args, "in_vm")
    args = cli.build_parser().parse_args(
        ["bench", "tick", "--legs", "8", "--duration", "0.5", "--change-rate-hz", "0",
         "--json", "--output", "t.json"])
    assert args.legs == [8] and args.duration == 0.5 and args.change_rate_hz == 0.0
    assert args.json and args.output == "t.json"
    # the VM benches keep their options
    args = cli.build_parser().parse_args(["bench", "hook", "--in-vm", "--timeout", "60"])
    assert args.in_vm and args.timeout == 60


@pytest.mark.parametrize("argv", [
    ["--legs", "1"], ["--legs", "9"], ["--legs", "2", "x"], ["--duration", "0"],
    ["--duration", "-3"], ["--duration", "nan"], ["--change-rate-hz", "-1"],
    ["--change-rate-hz", "inf"], ["--in-vm"]])
def test_bad_input_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "tick", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "error:" in err and "Traceback" not in err


def test_bad_input_from_the_shell_exits_2_without_traceback():
    r = subprocess.run([sys.executable, "-m", "iobridge.cli", "bench", "tick", "--legs", "9"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert "2 to 8" in r.stderr and "Traceback" not in r.stderr


def test_the_bench_runs_on_the_host_and_json_prints_only_json(monkeypatch, tmp_path, capsys):
    from iobridge.lab import vm

    def no_vm(*_a, **_k):
        raise AssertionError("bench tick must not boot the VM")

    seen = {}

    def fake_run(args):
        seen["legs"], seen["json"] = args.legs, args.json
        return {"benchmark": "tick", "figure": 1.5}

    monkeypatch.setattr(vm, "run", no_vm)
    monkeypatch.setattr(tickbench, "run", fake_run)
    assert "run_on_host" in bench.BENCHES["tick"]
    assert all("run_on_host" not in bench.BENCHES[b] for b in ("hook", "agent"))
    out = tmp_path / "tick.json"
    assert cli.main(["bench", "tick", "--legs", "2", "--json", "--output", str(out)]) == 0
    assert seen == {"legs": [2], "json": True}
    printed = capsys.readouterr().out
    assert json.loads(printed) == {"benchmark": "tick", "figure": 1.5}
    assert json.loads(out.read_text()) == {"benchmark": "tick", "figure": 1.5}
    # An existing --output: refused before the bench runs, unless --force.
    seen.clear()
    assert cli.main(["bench", "tick", "--legs", "2", "--output", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and seen == {}
    assert cli.main(["bench", "tick", "--legs", "2", "--json", "--output", str(out), "--force"]) == 0


def test_a_built_table_is_within_the_entry_fields_and_published_as_it_is():
    """The agent publishes a TableMaker's table without clipping
    (in_range=True): its values are built within the u32 fields, even for
    a leg whose service time is 10 s; written as they are, they equal what
    the clipping writer writes."""
    mk = D.TableMaker(AdmissionModel(SHIPPED_MODEL))
    t = mk.build(0, [D.LegBaseline(10_000_000.0, 0.5, 50_000_000.0), D.LegBaseline(100.0, 40.0, 2000.0)])
    for a in (t.penalty_ns, t.lat_edges_ns, t.service_ns, t.top_lat_ns):
        assert a.min() >= 0 and a.max() <= 0xFFFFFFFF
    assert t.lat_edges_ns[0].max() == 0xFFFFFFFF and t.service_ns[0] == 0xFFFFFFFF
    policy = tickbench.memory_policy()
    blocks = []
    for target, in_range in ((1, True), (2, False)):
        policy.publish(dmtarget.TargetRef(target, 1), t.penalty_ns, t.lat_edges_ns, t.service_ns, 0,
                       777, t.top_lat_ns, in_range=in_range)
        blocks.append(policy.entries[abi.leg_index(target, 0):abi.leg_index(target, 0) + 2].copy())
    assert blocks[0].tobytes() == blocks[1].tobytes()
    policy.close()
