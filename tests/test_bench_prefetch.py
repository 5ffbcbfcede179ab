"""Host tests of `iobridge bench prefetch` (agent/lab/prefetch_bench.py):
the figures from observer deltas, the best static setting, the ratios and
issue 11's goals, the rendering of a fixed result, and the options. The
benchmark itself runs only in the test VM (no VM test: a benchmark is not
a timed test)."""

from __future__ import annotations

import json

import pytest

from iobridge import cli
from iobridge.lab import bench
from iobridge.lab import prefetch_bench as B


def delta(**kw) -> dict:
    base = {"reads": 0, "hits": 0, "insertions": 0, "ra_pages": 0, "ra_used": 0,
            "ra_unused_removed": 0, "refaults": 0}
    return {**base, **kw}


def run(mb_s, wasted_pages=0, cpu=None, **kw) -> dict:
    r = {"mb_s": mb_s, "parts": [{"kind": "seq", "mb_s": mb_s, "seconds": 10.0}],
         "start_kb": 128, "ra_kb_end": 128,
         **B.figures(delta(reads=1000, hits=900, insertions=512, ra_pages=400, ra_used=300,
                           ra_unused_removed=wasted_pages, refaults=7))}
    if cpu is not None:
        r["agent_cpu_percent"] = cpu
    r.update(kw)
    return r


def result(d_mb=None, d_wasted=256, workloads=B.DEFAULT_WORKLOADS) -> dict:
    """A fixed result as run_in_vm returns it (before summarize)."""
    res = {"benchmark": "prefetch", "kernel": "6.1.0-test", "cpus": 2,
           "setup": {"device": "null_blk memory backed, 100 us per request (timer), ext4",
                     "file_mb": 192, "memory_max_mb": 48, "runtime_s": 10.0,
                     "sweep_kb": [0, 32, 128, 512, 1024]},
           "runs": {}, "errors": [], "not_covered": [B.DB_MISSING],
           "observer_cost": {"without_mb_s": [10.0, 10.0], "with_mb_s": [9.9, 9.7],
                             "without_mean_mb_s": 10.0, "with_mean_mb_s": 9.8,
                             "cost": B.observer_cost([10.0, 10.0], [9.9, 9.7])}}
    for i, wl in enumerate(workloads):
        a = run(10.0 + i, wasted_pages=1024)
        res["runs"][wl] = {
            "a": a, "sweep": {0: run(5.0), 32: run(9.0), 128: a, 512: run(12.0 + i),
                              1024: run(12.0 + i)},
            "c": run(11.0 + i, cpu=1.0), "errors": {},
            "d": run(d_mb if d_mb is not None else 14.0 + 2 * i, wasted_pages=d_wasted, cpu=2.5)}
    return res


# ------------------------------------------------------------ pure logic

def test_figures_from_observer_deltas():
    f = B.figures(delta(reads=200, hits=150, insertions=1024, ra_pages=512, ra_used=384,
                        ra_unused_removed=128, refaults=9),
                  delta(ra_unused_removed=64))
    assert f["hit_ratio"] == 0.75 and f["ra_accuracy"] == 0.75
    assert f["wasted_mb"] == 0.5 and f["wasted_in_run_mb"] == 0.25
    assert f["device_read_mb"] == 4.0 and f["refaults"] == 9
    empty = B.figures(delta())
    assert empty["hit_ratio"] is None and empty["ra_accuracy"] is None and empty["wasted_mb"] == 0


def test_best_static_takes_the_fastest_and_ties_to_the_smaller_setting():
    assert B.best_static({0: {"mb_s": 5}, 512: {"mb_s": 9}, 1024: {"mb_s": 9}})[0] == 512
    assert B.best_static({0: None, 32: {"mb_s": 3}})[0] == 32       # a failed run is left out
    assert B.best_static({}) == (None, None)


def test_ratios_and_wasted_ratio_edge_cases():
    r = B.ratios({"a": {"mb_s": 10, "wasted_mb": 4}, "b": {"mb_s": 20},
                  "c": {"mb_s": 16}, "d": {"mb_s": 19, "wasted_mb": 1}})
    assert r == {"d_over_a": 1.9, "d_over_b": 0.95, "d_over_c": 19 / 16, "wasted_d_over_a": 0.25}
    assert B.ratios({"a": {"mb_s": 10}, "d": None})["d_over_a"] is None
    # (a) wasted nothing: (d) meets the goal only by wasting nothing too
    assert B.ratios({"a": {"wasted_mb": 0}, "d": {"wasted_mb": 0}})["wasted_d_over_a"] == 0.0
    assert B.ratios({"a": {"wasted_mb": 0}, "d": {"wasted_mb": 2}})["wasted_d_over_a"] is None


def test_goals_met_missed_and_not_measured():
    res = result()
    B.summarize(res)
    assert res["best_static"] == {wl: 512 for wl in B.DEFAULT_WORKLOADS}
    assert res["runs"]["seq"]["b"]["read_ahead_kb"] == 512
    by = {(g["figure"], g["workload"]): g for g in res["goals"]}
    assert set(by) == {("d_over_b", wl) for wl in B.DEFAULT_WORKLOADS} | {
        ("d_over_a", "rev"), ("d_over_a", "mixed"), ("d_over_c", "mixed"),
        ("wasted_d_over_a", "rand"), ("observer_cost", "rand")}
    assert all(g["met"] is True for g in res["goals"]), res["goals"]
    assert by[("observer_cost", "rand")]["value"] == pytest.approx(0.02)
    assert res["goals_met"] == len(res["goals"]) and res["goals_missed"] == 0

    res = result(d_mb=11.0, d_wasted=600)       # (d) slower than (b), wastes more than half
    res["runs"]["mixed"]["c"] = None
    res["runs"]["mixed"]["errors"]["c"] = "agent: did not start"
    res["observer_cost"]["cost"] = 0.05
    B.summarize(res)
    by = {(g["figure"], g["workload"]): g for g in res["goals"]}
    assert by[("d_over_b", "seq")]["met"] is False
    assert by[("wasted_d_over_a", "rand")]["met"] is False
    assert by[("d_over_c", "mixed")]["met"] is None and by[("d_over_c", "mixed")]["value"] is None
    assert by[("observer_cost", "rand")]["met"] is False
    assert res["goals_not_measured"] == 1 and res["goals_missed"] >= 3


def test_a_subset_of_workloads_is_judged_on_those_only():
    res = result()
    res["runs"] = {"rev": res["runs"]["rev"]}
    del res["observer_cost"]
    B.summarize(res)
    assert {(g["figure"], g["workload"]) for g in res["goals"]} == {("d_over_b", "rev"),
                                                                     ("d_over_a", "rev")}


def test_observer_cost():
    assert B.observer_cost([10, 10], [9, 9]) == pytest.approx(0.1)
    assert B.observer_cost([], [9]) is None


# ------------------------------------------------------------ rendering

def test_render_a_fixed_result_shows_every_figure_goal_and_what_is_not_covered():
    res = result(d_mb=11.0)
    res["runs"]["mixed"]["c"] = None
    res["runs"]["mixed"]["errors"]["c"] = "agent: did not start"
    res["seconds"] = 900.0
    B.summarize(res)
    text = B.render(res)
    assert "15.0 min in all" in text
    for wl in B.DEFAULT_WORKLOADS:
        assert f"\n{wl}: " in text
    for label in B.POLICY_LABELS.values():
        assert label in text
    # seq: (b) is 512 at 12.0 MB/s; (d) 11.0: 11/12 = 0.92
    seq = text.split("\nseq: ")[1].split("\n\n")[0]
    assert "(b) best static                  512     12.0   90.0    75.0" in seq
    assert "d/b 0.92" in seq and "sweep MB/s: 0: 5.0  32: 9.0  128: 10.0  512: 12.0" in seq
    assert "(c) KML-like, per device     agent: did not start" in text
    assert "d_over_b         seq       0.92  [goal >= 0.95: MISSED]" in text
    assert "d_over_c         mixed        -  [goal >= 1.1: not measured]" in text
    assert "observer_cost    rand      2.0%  [goal <= 3%: met]" in text
    assert "not covered: db_bench is not installed (rocksdb-tools: apt-get install " \
        "rocksdb-tools, or make setup): the db workloads cannot run" in text
    # the same from JSON (the sweep's keys are strings there)
    back = B.json_keys_to_int(json.loads(json.dumps(res)))
    assert B.render(back) == text
    assert bench.BENCHES["prefetch"]["render"](json.loads(json.dumps(res))) == text


def test_mixed_parts_are_shown():
    res = result()
    res["runs"]["mixed"]["d"]["parts"] = [{"kind": "seq", "mb_s": 8.0, "seconds": 10},
                                          {"kind": "rand", "mb_s": 7.5, "seconds": 10}]
    B.summarize(res)
    assert "parts: seq 8.0 MB/s, rand 7.5 MB/s" in B.render(res)


def test_rounds_are_judged_by_their_medians_and_each_round_is_shown():
    # three rounds whose (d) on seq did 14, 9 and 20 MB/s
    rounds = [result(d_mb=d)["runs"] for d in (14.0, 9.0, 20.0)]
    rounds[1]["seq"]["c"] = None
    rounds[1]["seq"]["errors"]["c"] = "agent: did not start"
    rounds[2]["seq"]["sweep"][512] = run(15.0)
    merged = B.merge_rounds(rounds)
    seq = merged["seq"]
    assert seq["d"]["mb_s"] == 14.0 and seq["d"]["rounds"] == [14.0, 9.0, 20.0]
    # a round that did not measure a policy is left out of its median, and shown
    assert seq["c"]["mb_s"] == 11.0 and seq["c"]["rounds"] == [11.0, None, 11.0]
    assert seq["errors"] == {"c (round 2)": "agent: did not start"}
    # each setting's median: 512 did 12, 12, 15
    assert seq["sweep"][512]["mb_s"] == 12.0 and seq["sweep"][512]["rounds"] == [12.0, 12.0, 15.0]
    # an even count takes the lower middle one, a real run's figures
    assert B.median_run([run(3.0), run(1.0)])["mb_s"] == 1.0
    assert B.median_run([None, None]) is None
    # one round is that round as it is
    one = result()["runs"]
    assert B.merge_rounds([one]) is one

    res = result()
    res["setup"]["rounds"] = 3
    res["runs"] = merged
    res["round_ratios"] = B.round_ratios(rounds)
    # each round's d/b against that round's best static: 14/12, 9/12, 20/15
    assert [round(r["d_over_b"], 3) for r in res["round_ratios"]["seq"]] == [1.167, 0.75, 1.333]
    B.summarize(res)
    assert res["ratios"]["seq"]["d_over_b"] == pytest.approx(14.0 / 12.0)
    text = B.render(res)
    assert "3 rounds of every run, medians" in text
    block = text.split("\nseq: ")[1].split("\n\n")[0]
    assert "rounds: 14.0 / 9.0 / 20.0 (the median's figures above)" in block
    assert "rounds: 11.0 / - / 11.0" in block
    assert "each round: d/b 1.17 / 0.75 / 1.33" in block
    back = B.json_keys_to_int(json.loads(json.dumps(res)))
    assert B.render(back) == text


# ------------------------------------------------------------ options

def parse(*argv):
    return cli.build_parser().parse_args(["bench", "prefetch", *argv])


def test_options_defaults_and_forwarding():
    args = parse()
    assert args.runtime == B.DEFAULT_RUNTIME_S and args.workloads == list(B.DEFAULT_WORKLOADS)
    assert args.workloads == ["seq", "stride", "rand", "rev", "mixed"]
    assert args.sweep == list(B.DEFAULT_SWEEP_KB) and args.timeout == 2400
    assert not args.no_observer_cost and args.repeat == 1
    args = parse("--runtime", "4", "--workloads", "rev", "mixed", "--sweep", "0", "1024",
                 "--no-observer-cost", "--seed", "3", "--repeat", "3")
    assert (args.runtime, args.workloads, args.sweep, args.seed) == (4.0, ["rev", "mixed"],
                                                                    [0, 1024], 3)
    captured = {}
    orig = bench._run
    try:
        bench._run = lambda a: captured.setdefault("fwd", a.forward) and 0
        args.func(args)
    finally:
        bench._run = orig
    fwd = captured["fwd"]
    assert fwd[fwd.index("--workloads") + 1:fwd.index("--workloads") + 3] == ["rev", "mixed"]
    assert "--no-observer-cost" in fwd and fwd[fwd.index("--runtime") + 1] == "4.0"
    assert fwd[fwd.index("--repeat") + 1] == "3"


@pytest.mark.parametrize("argv, message", [
    (("--runtime", "1"), "argument --runtime: must be"),
    (("--runtime", "nan"), "argument --runtime: must be"),
    (("--workloads", "dbbench"), "unknown workload 'dbbench': one of seq, stride, rand, rev, "
                                 "mixed, db-readseq, db-readreverse, db-readrandom, "
                                 "db-readrandomwriterandom"),
    (("--workloads", "rev", "rev"), "argument --workloads: rev given twice"),
    (("--sweep", "-1"), "argument --sweep: must be"),
    (("--sweep", "70000"), "argument --sweep: must be"),
    (("--sweep", "32", "32"), "argument --sweep: 32 given twice"),
    (("--repeat", "0"), "argument --repeat: must be"),
    (("--repeat", "21"), "argument --repeat: must be"),
    (("--workloads",), "expected at least one argument"),
])
def test_bad_options_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
