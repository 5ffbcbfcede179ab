"""The agent's learned hedge deadlines (issue 12 item 2), without a kernel:
read samples from stand-in leg bio events, deadlines in the published table,
status and the -vv log, the setting and the command-line option."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
from test_daemon_logic import fake_agent, wait_published

from iobridge import cli
from iobridge.core import abi
from iobridge.core import hedging as H
from iobridge.daemon import agent as daemon

EVENT = np.dtype(abi.IoEvent)
KDEV = [(251 << 20) | i for i in range(2)]     # fake_agent's legs


def events(dev: int, n: int, lat_us: float, op: int = abi.OP_READ, nbytes: int = 4096,
           error: int = 0) -> np.ndarray:
    """n leg bio events as bpf/observer.bpf.c streams them."""
    ev = np.zeros(n, dtype=EVENT)
    ev["issue_ns"] = 1_000_000
    ev["complete_ns"] = 1_000_000 + int(lat_us * 1000)
    ev["dev"], ev["bytes"], ev["op"], ev["error"] = dev, nbytes, op, error
    ev["level"] = abi.EVENT_LEG_BIO
    ev["leg"] = -1
    return ev


class FakeObserver:
    """Stands in for the observer's ring of leg bio events: what each poll drains."""

    def __init__(self):
        self.queue: list[np.ndarray] = []
        self.polls = 0

    def poll_events(self, timeout_ms=100, max_seconds=0.5):
        self.polls += 1
        ev = np.concatenate(self.queue) if self.queue else np.zeros(0, dtype=EVENT)
        self.queue = []
        return ev


def hedging_agent(hedging="on"):
    agent = fake_agent(hedging=hedging)
    agent.observer = FakeObserver()
    return agent


def run_ticks(agent, ticks=8, reads=None):
    """Ticks with completions for the baselines; `reads(tick)` -> events to drain."""
    for i in range(ticks):
        agent.legmap.done += 3
        if reads is not None:
            agent.observer.queue.append(reads(i))
        time.sleep(0.002)
        agent.tick()


def settle(agent, ticks: int = 500) -> None:
    """Tick until the reads drained so far are in the published deadlines."""
    assert wait_published(agent)
    for _ in range(ticks):
        if agent._pending is None and not agent._deadlines_due():
            return
        time.sleep(0.002)
        agent.tick()
    raise AssertionError("the deadlines never caught up with the reads")


def test_hedging_on_publishes_deadlines_from_reads_only():
    """Reads of 100 us, as many writes of 10 us, failed reads of 5 us: counted,
    the writes would put the baseline quantile at 10 us and every read would
    be slow (past 8x that), leaving the fastest write's 10 us as the
    deadline. Read samples only: every deadline is the reads' 100 us."""
    agent = hedging_agent()
    run_ticks(agent, reads=lambda i: np.concatenate([
        events(KDEV[0], 10, 100.0), events(KDEV[1], 10, 100.0),
        events(KDEV[0], 10, 10.0, op=abi.OP_WRITE), events(KDEV[1], 10, 10.0, op=abi.OP_WRITE),
        events(KDEV[0], 2, 5.0, error=1), events((7 << 20) | 0, 5, 1.0)]))   # not a leg
    settle(agent)
    hedge = agent.policy.hedge_us[-1]
    assert hedge.shape == (2, abi.KEYS_PER_LEG) and (hedge == 100).all()
    assert all(agent._reads[d].n == 80 for d in KDEV) and agent.counters["read_samples"] == 160
    lat, nbytes = agent._reads[KDEV[0]].held()
    assert (lat == 100.0).all() and (nbytes == 4096).all()


def test_too_few_reads_publish_zeros_then_new_reads_refresh_the_deadlines():
    """Deadlines follow the reads between model recomputes (the replay's rule):
    the table in force gets them without another inference."""
    agent = hedging_agent()
    run_ticks(agent, reads=lambda i: events(KDEV[i % 2], 1, 100.0))    # 8 reads in all
    settle(agent)
    assert (agent.policy.hedge_us[-1] == 0).all(), "fewer than MIN_SAMPLES: never hedge"
    view = daemon.hedge_view(agent._table, agent._hedge_basis, 0)
    assert view["on"] is False and view["fast_samples"] == 8 and view["fit"] is None
    assert "never hedge: 8 fast reads" in daemon.hedge_reason(view)
    recomputes = agent.counters["recomputes"]
    # leg 0 alone gets enough reads; leg 1 still has 4, so it takes the target's
    run_ticks(agent, ticks=4, reads=lambda i: events(KDEV[0], 10, 200.0))
    settle(agent)
    assert agent.counters["recomputes"] == recomputes, "no model recompute for new reads"
    hedge = agent.policy.hedge_us[-1]
    assert (hedge > 0).all()
    own, pooled = (daemon.hedge_view(agent._table, agent._hedge_basis, r) for r in (0, 1))
    assert own["on"] and not own["pooled"] and own["fast_samples"] == 44
    assert pooled["on"] and pooled["pooled"] and pooled["fast_samples"] == 48
    assert agent.counters["deadline_updates"] >= 2


def test_hedging_off_publishes_no_deadlines_and_drains_nothing():
    agent = hedging_agent("off")
    run_ticks(agent, reads=lambda i: events(KDEV[0], 20, 100.0))
    assert wait_published(agent)
    assert agent.observer.polls == 0 and agent.counters["read_samples"] == 0
    assert all(h is None for h in agent.policy.hedge_us)        # RoutePolicy writes zeros
    assert agent._table.hedge_us is None and agent.counters["deadline_updates"] == 0
    assert agent._table_view(agent._table)[0]["hedge"] == {"on": False}


def test_status_and_debug_log_say_why_a_deadline_is_what_it_is(caplog):
    agent = hedging_agent()
    rng = np.random.default_rng(1)
    with caplog.at_level(logging.DEBUG, logger="iobridge.agent"):
        run_ticks(agent, reads=lambda i: np.concatenate([
            events(KDEV[0], 8, 100.0 + rng.uniform(0, 20), nbytes=4096),
            events(KDEV[0], 8, 300.0 + rng.uniform(0, 20), nbytes=65536),
            events(KDEV[1], 1, 100.0)]))
        settle(agent)
    view = agent._table_view(agent._table)[0]["hedge"]
    assert view["on"] and view["fast_samples"] == 128 and not view["pooled"]
    assert view["fit"]["a_us"] > 0 and view["fit"]["b_us_per_kib"] > 0
    assert list(view["deadline_4k_us"]) == [f"inflight_{n}" for n in abi.INFLIGHT_BUCKET_MIN]
    assert all(len(d) == abi.NUM_LAT_BUCKETS and min(d) >= 90
               for d in view["deadline_4k_us"].values())
    logged = [r.getMessage() for r in caplog.records if "hedge deadlines changed" in r.getMessage()]
    assert any(m.startswith("mirror leg 0: hedge deadlines changed on 192 key(s): 4k read, "
                            "idle, fast newest read 0 -> ") and
               "fast reads (its own): one takes" in m for m in logged), logged
    text = daemon.format_status(status_of(agent))
    assert "target mirror (id 3, incarnation 1), hedging on" in text
    assert "hedging on (128 read samples): from 128 fast reads (its own): one takes" in text
    assert "4k reads, 2-3 in flight: hedge deadline us per latency bucket [" in text
    assert "probe after 200 ms, hedging on" in text


def status_of(agent) -> dict:
    """What `iobridge status` reads, from the fake agent's own pieces."""
    st = {"pid": 1, "agent_alive": True, "status_age_s": 0.1, "shadow": False, "tick_ms": 250,
          "ttl_ticks": 12, "max_silence_ms": 2000, "recompute_ms": 1, "probe_after_ms": 200,
          "hedging": agent.cfg.hedging, "program_attached": True, "pins": [], "table_age_ms": 1,
          "model": {"path": "m.onnx", "threshold": 0.5, "sha256": "ab" * 32}, "routing": None,
          "counters": agent.counters, "timing_us": agent.times.summary(), "targets": []}
    view = agent._table_view(agent._table)
    for t, rows in agent._rows:
        legs = [{"dev": dev, "samples": 24, "read_samples": agent._reads[t.kdevs[i]].n,
                 **view[rows.start + i]} for i, dev in enumerate(t.legs)]
        st["targets"].append({"name": t.name, "target_id": t.target_id,
                              "incarnation": t.incarnation, "legs": legs,
                              "hedging": any(leg["hedge"]["on"] for leg in legs)})
    return st


def test_deadlines_are_the_replays_definition():
    """One definition: the agent's table carries hedging.target_deadlines."""
    agent = hedging_agent()
    run_ticks(agent, reads=lambda i: events(KDEV[0], 10, 100.0 + 10 * i))
    settle(agent)
    want, _ = H.target_deadlines([agent._reads[d] for d in KDEV], agent._table.p_slow,
                                 agent._table.valid)
    assert (agent.policy.hedge_us[-1] == want).all() and want.any()


@pytest.mark.parametrize("value, ok", [("on", True), ("off", True), ("maybe", False),
                                       ("ON", False)])
def test_run_takes_hedging_off_or_on(value, ok, capsys):
    parse = cli.build_parser().parse_args
    if ok:
        assert parse(["run", "--hedging", value]).hedging == value
        return
    with pytest.raises(SystemExit) as exc:
        parse(["run", "--hedging", value])
    assert exc.value.code == 2
    assert "argument --hedging: invalid choice" in capsys.readouterr().err


def test_run_leaves_hedging_to_the_config_unless_given():
    assert cli.build_parser().parse_args(["run"]).hedging is None


def test_a_reload_keeps_hedging_as_started(caplog):
    """The observer streams leg bios only when started with hedging on."""
    import concurrent.futures
    from test_daemon_logic import FixedModel, RecordingNotifier

    from iobridge.core import decision
    agent = hedging_agent()
    agent.notify = RecordingNotifier()
    done = concurrent.futures.Future()
    done.set_result((agent.cfg.replace(hedging="off", tick_ms=100), FixedModel([0.1]),
                     decision.TableMaker(FixedModel([0.1]))))
    with caplog.at_level(logging.WARNING, logger="iobridge.agent"):
        assert agent._apply_reload(done)
    assert agent.cfg.hedging == "on" and agent.cfg.tick_ms == 100
    assert "admission.hedging and the prefetch keys take effect at restart only" in caplog.text
