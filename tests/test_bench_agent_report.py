"""Host tests: `iobridge bench agent`'s goals and report for the hedging
comparison (--hedging), from synthetic run figures (no VM)."""

from iobridge.lab import experiment as E


def _run(policy, qd, p999, iops, hedging=None, issued=0, reads=1000):
    r = {"policy": policy, "iodepth": qd, "iops": iops, "mean_us": 200.0, "p50_us": 150.0,
         "p99_us": 900.0, "p999_us": p999, "slow_leg_reads_while_slow": 3,
         "reads_while_slow": 100, "slow_seconds": 1.5, "hook_routed": reads, "default_routed": 0,
         "route": None, "agent_cpu_percent": 5.0, "slow_periods": True}
    if hedging is not None:
        r["hedging"] = hedging
        r["hedges"] = {"issued": issued, "won": issued // 2, "lost": issued - issued // 2,
                       "refused": 4}
    return r


def _result(on_p999_qd16: float, issued_qd16: int) -> dict:
    runs = [_run("default", 1, 9000.0, 900.0), _run("learned", 1, 8000.0, 950.0)]
    hedged = [_run("learned", 1, 8000.0, 950.0, False), _run("learned", 1, 2000.0, 940.0, True, 40),
              _run("learned", 16, 9000.0, 3000.0, False),
              _run("learned", 16, on_p999_qd16, 2990.0, True, issued_qd16)]
    ratios = {}
    for qd in (1, 16):
        off, on = (next(r for r in hedged if r["iodepth"] == qd and r["hedging"] == h)
                   for h in (False, True))
        ratios[qd] = {k: on[k] / off[k] for k in ("p99_us", "p999_us", "mean_us", "iops")}
        ratios[qd]["extra_read_fraction"] = on["hedges"]["issued"] / 1000
    return {"runs": runs, "ratios": E.ratios(runs, (1,)),
            "setup": {"slow_ms": 8, "normal_mean_s": 1.0, "slow_mean_s": 0.1, "seed": 7,
                      "runtime_s": 15, "completion_us": 100},
            "hedging": {"runs": hedged, "ratios": ratios, "budget_pct": 5,
                        "tolerance": E.HEDGE_TOLERANCE, "deadlines": {}}}


def test_hedging_goals_met_and_reported():
    res = _result(on_p999_qd16=3000.0, issued_qd16=50)
    goals = E.summarize(res)
    assert goals["hedged_p999_us@1"]["met"] and goals["hedged_p999_us@1"]["value"] == 0.25
    assert goals["hedged_p999_us@16"]["met"]
    assert goals["hedged_iops"]["met"] and goals["hedged_extra_reads"]["met"]
    res["goals"] = goals
    text = E.render(res)
    assert "hedged reads: learned routing, the target hedging within 5% of reads" in text
    assert "hedged: issued 40, won 20, lost 20, refused 4" in text
    assert "QD 1: hedged / not: " in text and "p99.9 0.25  [goal <= 0.5: met]" in text


def test_hedging_goals_missed_say_so():
    # p99.9 not halved at QD16, and 8% extra reads against a 5% budget + 1%.
    goals = E.summarize(_result(on_p999_qd16=6000.0, issued_qd16=80))
    assert goals["hedged_p999_us@16"]["met"] is False
    assert goals["hedged_extra_reads"] == {"value": 0.08, "goal": "<= 0.06", "met": False}


def test_each_depth_line_marks_its_own_figures():
    # QD1 meets the IOPS and extra-read goals, QD16 misses both: the QD1 line
    # says met, the QD16 line and the summary say missed.
    res = _result(on_p999_qd16=6000.0, issued_qd16=80)
    res["hedging"]["runs"][3]["iops"] = 2000.0
    res["hedging"]["ratios"][16]["iops"] = 2000.0 / 3000.0
    res["goals"] = E.summarize(res)
    lines = E.render(res).splitlines()
    qd1 = next(line for line in lines if line.startswith("QD 1: hedged / not: "))
    qd16 = next(line for line in lines if line.startswith("QD 16: hedged / not: "))
    assert "IOPS 0.99  [goal >= 0.95: met]" in qd1 and qd1.endswith("[goal <= 0.06: met]")
    assert "IOPS 0.67  [goal >= 0.95: MISSED]" in qd16
    assert qd16.endswith("[goal <= 0.06: MISSED]")
    summary = next(line for line in lines if line.startswith("goals (issues 10 and 12)"))
    assert "hedged_iops" in summary and "hedged_extra_reads" in summary


def test_the_routed_line_shows_every_run_its_goal_judges():
    # The goal takes the lowest routed fraction of every learned run, the
    # transfer check's too: the line must show that run, or it reads
    # "100%, 100% [MISSED]".
    res = _result(on_p999_qd16=3000.0, issued_qd16=50)
    slow = _run("learned", 1, 9000.0, 500.0, reads=944)
    slow["default_routed"] = 56
    res["transfer"] = {"completion_us": 1000, "slow_ms": 8, "runs": [slow],
                       "ratios": {}}
    res["goals"] = E.summarize(res)
    assert res["goals"]["routed_fraction"] == {"value": 0.944, "goal": ">= 0.95", "met": False}
    line = next(line for line in E.render(res).splitlines()
                if line.startswith("reads routed by the table"))
    assert "QD 1 100.0%" in line and "QD 1 at 1000 us 94.4%" in line
    assert line.endswith("[goal >= 0.95: MISSED]")
