"""Pure logic of the agent daemon: target listing, the tick (sampling, recompute,
keep-alive) against stand-ins for the kernel maps, status text."""

from __future__ import annotations

import collections
import time
from pathlib import Path

import numpy as np
import pytest

from iobridge.core import abi
from iobridge.daemon import agent as daemon
from iobridge.core import decision


def test_status_lines_give_ids_legs_and_kernel_devs():
    from iobridge.kernel.dmioctl import TargetLine
    mirror = daemon.target_of("mirror", [TargetLine(
        0, 204800, "iobridge",
        "3 8 least_inflight 2 AF 0 0 0 0 251:0 10 5 0 0 1 7 3 251:16 4 5 0 0 0 0 4")])
    assert mirror.name == "mirror" and mirror.target_id == 3 and mirror.legs == ("251:0", "251:16")
    assert mirror.incarnation == 8
    assert mirror.kdevs == ((251 << 20) | 0, (251 << 20) | 16)
    other = daemon.target_of("other", [TargetLine(
        0, 2048, "iobridge", "0 5 round_robin 3 AAA 1 2 3 4 7:0 0 0 0 0 0 0 0 "
        "7:1 0 0 0 0 0 0 0 7:2 0 0 0 0 0 0 0")])
    assert len(other.kdevs) == 3
    # not a target iobridge manages: another type, several lines, no table
    assert daemon.target_of("lin", [TargetLine(0, 8, "linear", "7:0 0")]) is None
    assert daemon.target_of("two", [TargetLine(0, 8, "iobridge", "x")] * 2) is None
    assert daemon.target_of("none", []) is None


class FixedModel:
    threshold = 0.5

    def __init__(self, p):
        self.p = p

    def p_slow(self, rows):
        return np.resize(np.asarray(self.p, dtype=np.float32), len(rows))


class FakeSnapshot:
    def __init__(self, completed, lat_us):
        self.completed = np.asarray(completed)
        self.lat_us = lat_us
        self.retries = 0

    def new_samples(self, seen):
        return [(np.full(int(min(c - s, 3)), self.lat_us[i]), np.full(int(min(c - s, 3)), 40.0),
                 np.full(int(min(c - s, 3)), self.lat_us[i]))
                for i, (c, s) in enumerate(zip(self.completed, seen))]


class FakeLegMap:
    """Stands in for the kernel's leg feature map: completions and latency."""

    def __init__(self, n):
        self.done = np.zeros(n, dtype=np.int64)
        self.lat_us = np.full(n, 100.0)

    def assign(self, devs):
        return {d: i for i, d in enumerate(devs)}

    def completed(self, slots):
        return self.done[slots].copy()

    retries = 0

    def read(self, slots):
        return FakeSnapshot(self.done[slots], self.lat_us[slots])

    def new_samples(self, slots, seen):
        snap = self.read(slots)
        return snap.new_samples(seen), snap.completed


class FakePolicy:
    def __init__(self):
        self.published, self.extended, self.beats = [], 0, 0
        self.hedge_us = []                # per publish: hedge_us as passed (None: zeros)
        self.entries = None

    def publish(self, target, penalty, edges, service, probe_after, expires, top_lat=None,
                hedge_us=None, in_range=False):
        self.published.append((target, penalty.copy(), service.copy(), np.array(expires)))
        self.hedge_us.append(None if hedge_us is None else np.array(hedge_us))

    def extend(self, target, legs, expires):
        self.extended += 1

    def heartbeat(self, now, published_ns=None, max_silence_ns=None):
        self.beats += 1

    def clear(self, target):
        pass

    attached, attach_error = True, None

    def attach(self):
        if self.attach_error:
            raise self.attach_error
        self.attached = True

    def detach(self):
        self.attached = False


def fake_agent(n_legs=2, recompute_ms=1.0, **settings):
    from iobridge.daemon import config

    cfg = config.Config(recompute_ms=recompute_ms, **settings)
    agent = daemon.Agent(cfg, notifier=object())
    agent.maker = decision.TableMaker(FixedModel([0.9]), probe_after_ns=cfg.probe_after_ns)
    agent.legmap, agent.policy = FakeLegMap(n_legs), FakePolicy()
    kdevs = tuple((251 << 20) | i for i in range(n_legs))
    agent._targets = [daemon.Target("mirror", 3, 1, tuple(f"251:{i}" for i in range(n_legs)), kdevs)]
    return agent


def wait_published(agent, ticks: int = 500) -> bool:
    """Tick until the background recompute has been published."""
    for _ in range(ticks):
        if agent.policy.published and agent._pending is None:
            return True
        time.sleep(0.002)
        agent.tick()
    return bool(agent.policy.published)


def test_heartbeat_goes_on_while_a_recompute_runs():
    class SlowModel(FixedModel):
        def p_slow(self, rows):
            time.sleep(0.3)               # inference as slow as under emulation
            return super().p_slow(rows)

    agent = fake_agent()
    agent.maker = decision.TableMaker(SlowModel([0.9]))
    for _ in range(8):
        agent.legmap.done += 3
        agent.tick()
    beats, t0 = agent.policy.beats, time.monotonic()
    for _ in range(5):
        agent.tick()
    assert time.monotonic() - t0 < 0.2, "a tick waited for the inference"
    assert agent.policy.beats == beats + 5
    assert wait_published(agent)


class RecordingNotifier:
    """Stands in for sd_notify: what the agent told systemd, in order."""

    def __init__(self, watchdog_s=None):
        self.sent, self.watchdog_s = [], watchdog_s

    def __getattr__(self, name):
        if name == "watchdog_interval_s":
            return lambda: self.watchdog_s
        return lambda *a: self.sent.append(name)


def test_a_reload_checks_the_model_off_the_tick_loop(tmp_path, monkeypatch):
    """The model check runs a test inference in a child process for up to
    30 s: in the tick loop, the heartbeat and systemd's watchdog (10 s in
    the unit) stopped for that long. The loop goes on ticking and pinging,
    and the reload takes effect when the check is done."""
    from iobridge.daemon import config
    agent = fake_agent()
    agent.cfg = config.Config(status_file=tmp_path / "status.json", tick_ms=20)
    agent.notify = RecordingNotifier(watchdog_s=0.1)
    checked = []

    def slow_check(cfg):
        time.sleep(1.0)                      # a model check under emulation
        checked.append(time.monotonic())
        return FixedModel([0.1]), decision.TableMaker(FixedModel([0.1]))

    monkeypatch.setattr(agent, "_load_model", slow_check)
    monkeypatch.setattr(agent, "write_status", lambda: None)     # not under test here
    agent._reload = True                     # as SIGHUP sets it
    t0 = time.monotonic()
    agent.run(duration_s=1.6)
    assert checked and agent.counters["reloads"] == 1
    # ticks and watchdog pings went on during the check
    pings_during = agent.notify.sent[:agent.notify.sent.index("ready", 1)].count("watchdog")
    assert agent.counters["ticks"] >= 20 and pings_during >= 5, agent.notify.sent
    assert agent.notify.sent[:2] == ["ready", "reloading"] and "ready" in agent.notify.sent[2:]
    assert checked[0] - t0 >= 1.0


def _reloaded(agent, cfg, model=None):
    """A prepared reload of `cfg` put in force (as the tick loop does)."""
    import concurrent.futures
    done = concurrent.futures.Future()
    model = model or FixedModel([0.9])
    done.set_result((cfg, model, decision.TableMaker(model)))
    return agent._apply_reload(done)


def test_a_reload_switches_shadow_mode_and_the_table_follows(caplog):
    """Into shadow: the routing program is detached at once (the module
    default decides) and nothing is published or extended, while the agent
    goes on deciding; out of it: attached again and a fresh table published."""
    agent = fake_agent()
    agent.notify = RecordingNotifier()

    def tick_until(done, ticks=500):
        for _ in range(ticks):
            if done():
                return True
            agent.legmap.done += 3
            time.sleep(0.002)
            agent.tick()
        return done()

    assert tick_until(lambda: agent.policy.published and agent._pending is None)
    with caplog.at_level("INFO", logger="iobridge.agent"):
        assert _reloaded(agent, agent.cfg.replace(shadow=True))
    assert agent.cfg.shadow and not agent.policy.attached
    assert "module default decides every read" in caplog.text
    published, extended = len(agent.policy.published), agent.policy.extended
    recomputes = agent.counters["recomputes"]
    assert tick_until(lambda: agent.counters["recomputes"] > recomputes  # still deciding
                      and agent._pending is None)
    assert (len(agent.policy.published), agent.policy.extended) == (published, extended)
    assert _reloaded(agent, agent.cfg.replace(shadow=False))
    assert not agent.cfg.shadow and agent.policy.attached
    assert tick_until(lambda: len(agent.policy.published) > published)


def test_a_program_that_cannot_attach_keeps_shadow_mode_and_says_why(caplog):
    from iobridge.core.errors import IobridgeError
    agent = fake_agent(shadow=True)
    agent.notify = RecordingNotifier()
    agent.policy.attached = False
    agent.policy.attach_error = IobridgeError("cannot attach iobridge_route: refused")
    with caplog.at_level("INFO", logger="iobridge.agent"):
        assert _reloaded(agent, agent.cfg.replace(shadow=False, tick_ms=100))
    assert agent.cfg.shadow and not agent.policy.attached and agent.cfg.tick_ms == 100
    assert "shadow mode kept: cannot attach iobridge_route: refused" in caplog.text


def test_a_reload_keeps_an_unchanged_model_and_checks_a_changed_card(tmp_path, monkeypatch):
    """Same model and card bytes: the checked model stays (no test inference
    again); a card edited since: the full load and check."""
    import json
    import shutil

    from iobridge.core.model import AdmissionModel, card_path
    from iobridge.daemon import config
    model = tmp_path / "m.onnx"
    shutil.copy(config.DEFAULT_MODEL, model)
    shutil.copy(card_path(config.DEFAULT_MODEL), card_path(model))
    agent = fake_agent()
    agent.cfg = agent.cfg.replace(model=model, threshold=0.3)
    agent.model = AdmissionModel(model)
    loads = []
    monkeypatch.setattr(agent, "_load_model", lambda cfg: loads.append(cfg) or (None, None))
    agent.maker = agent._maker(agent.cfg, agent.model)
    cfg, kept, maker = agent._prepare_reload()
    assert kept is agent.model and maker is agent.maker and loads == []   # answers kept too
    agent.cfg = agent.cfg.replace(threshold=0.25)       # as if the file said so
    cfg, kept, maker = agent._prepare_reload()
    assert kept is agent.model and maker is not agent.maker and maker.threshold == 0.25
    card = json.loads(card_path(model).read_text())
    card["decision_threshold"] = 0.2
    card_path(model).write_text(json.dumps(card))
    agent._prepare_reload()
    assert len(loads) == 1


def test_a_start_refused_early_stops_quietly_and_leaves_the_status_file(tmp_path, caplog):
    """`iobridge run` as non-root: the error alone, no "agent stopped", and
    the status file of an agent that may be running is not removed."""
    from iobridge.daemon import config
    status = tmp_path / "status.json"
    status.write_text("{}")
    agent = daemon.Agent(config.Config(status_file=status), notifier=RecordingNotifier())
    with caplog.at_level("INFO"):
        agent.stop()
    assert "agent stopped" not in caplog.text and status.exists()


def test_agent_publishes_once_baselines_exist_then_only_keeps_the_table_alive():
    agent = fake_agent()
    agent.tick()                          # no completion yet: no baseline, nothing to build
    assert agent.policy.published == [] and agent.counters["recomputes"] == 0
    for _ in range(8):                    # 8 x 3 samples per leg: baselines are ready
        agent.legmap.done += 3
        time.sleep(0.002)
        agent.tick()
    published = wait_published(agent)     # inference runs off the tick loop
    n = agent.counters["recomputes"]
    assert published, "a table is published once every leg has a baseline"
    target, penalty, service, expires = agent.policy.published[-1]
    assert target == (3, 1) and penalty.shape == (2, abi.KEYS_PER_LEG)
    assert service.tolist() == [100_000, 100_000] and (expires > 0).all()
    for _ in range(5):                    # same latencies: the baseline holds, no recompute
        agent.legmap.done += 3
        time.sleep(0.002)
        agent.tick()
    assert agent.counters["recomputes"] == n
    assert agent.policy.extended >= 5     # ... but the table stays valid
    agent.legmap.lat_us[1] = 1000.0       # leg 1 turns slow for good: its baseline moves
    for _ in range(400):
        agent.legmap.done += 3
        agent.tick()
        if agent.counters["recomputes"] > n and agent.policy.published[-1][2][1] > 100_000:
            break
        time.sleep(0.002)
    assert agent.counters["recomputes"] > n
    assert agent.policy.published[-1][2][1] > 100_000


def test_a_leg_without_baseline_borrows_one_so_it_is_not_left_out():
    # Left out, a leg would get no reads, hence no samples, hence never a baseline.
    agent = fake_agent()
    for _ in range(8):
        agent.legmap.done[0] += 3         # only leg 0 completes anything
        time.sleep(0.002)
        agent.tick()
    assert wait_published(agent)
    _, penalty, service, expires = agent.policy.published[-1]
    assert (expires > 0).all() and service.tolist() == [100_000, 100_000]
    assert (penalty[1] == penalty[0]).all()


def test_phase_times_percentiles():
    t = daemon.PhaseTimes()
    for ns in (1000,) * 99 + (1_000_000,):
        t.add("infer", ns)
    s = t.summary()["infer"]
    assert s["count"] == 100 and 0.9 <= s["p50_us"] <= 1.2 and s["p99_us"] <= 1.2


def test_format_status_renders_everything():
    st = {"pid": 1, "agent_alive": True, "status_age_s": 0.2, "shadow": False, "tick_ms": 20.0,
          "ttl_ticks": 5, "max_silence_ms": 50, "recompute_ms": 200, "probe_after_ms": 200,
          "program_attached": True, "pins": ["/x"],
          "table_age_ms": 0.7, "model": {"path": "m.onnx", "threshold": 0.08, "sha256": "ab" * 32},
          "routing": {"routed": 5, "default": 2, "silent": 1, "probes": 3}, "counters": {"ticks": 9},
          "timing_us": daemon.PhaseTimes().summary(), "discovery_error": None,
          "targets": [{"name": "mirror", "target_id": 0,
                       "target_hedges": {"hedge_us": 0, "budget_pct": 5, "issued": 7, "won": 4,
                                         "lost": 3, "refused": 2, "active": 0, "bounce_pages": 0},
                       "legs": [
              {"dev": "251:0", "samples": 40, "baseline": {"lat_us": 100.0, "tput_mbps": 40.0,
                                                            "slow_lat_us": 8000.0},
               "lat_edges_us": [150.0] * 7, "avoided_keys": 12,
               "p_slow_4k": {"inflight_0": [0.1] * 8, "inflight_1": [0.2] * 8},
               "penalty_4k_us": {"inflight_0": [1.0] * 8, "inflight_1": [2.0] * 8}},
              {"dev": "251:16", "samples": 3, "baseline": None}]}]}
    text = daemon.format_status(st)
    assert "leg 0 251:0: baseline 100.0 us, slow read 8000.0 us, 12 of 192 keys" in text
    assert "leg 1 251:16: no baseline yet (3 samples)" in text
    assert "hedges in the target: 7 issued, 4 won, 3 lost, 2 refused by its budget of 5% of reads" in text
    assert "5 reads by the table (3 probes), 2 by the module default (1 while the agent was silent)" in text


def test_read_status_without_agent(tmp_path):
    with pytest.raises(daemon.IobridgeError, match="the agent is not running"):
        daemon.read_status(tmp_path / "status.json")


def test_bpffs_check_uses_the_innermost_mount(monkeypatch):
    import psutil

    from iobridge.kernel import pins

    Part = collections.namedtuple("Part", "mountpoint fstype")
    mounts = [Part("/", "ext4"), Part("/sys", "sysfs"), Part("/sys/fs/bpf", "bpf"),
              Part("/sys/fs/bpfx", "tmpfs")]
    monkeypatch.setattr(psutil, "disk_partitions", lambda all=False: mounts)
    assert pins._is_bpffs(Path("/sys/fs/bpf")) and pins._is_bpffs(Path("/sys/fs/bpf/iobridge"))
    assert not pins._is_bpffs(Path("/sys/fs/bpfx/a")) and not pins._is_bpffs(Path("/sys/kernel"))


def test_uevents_that_may_change_the_target_list():
    from iobridge.kernel.uevents import is_relevant
    legs = {"iob_leg1"}
    assert is_relevant({"ACTION": "add", "SUBSYSTEM": "block", "DEVNAME": "dm-3"}, legs)
    assert is_relevant({"ACTION": "remove", "SUBSYSTEM": "block", "DEVNAME": "dm-3",
                        "DM_NAME": "iob_leg1"}, legs)
    # a resume with a new table: relevant unless it names a known non-target
    assert is_relevant({"ACTION": "change", "SUBSYSTEM": "block", "DEVNAME": "dm-4",
                        "DM_NAME": "rep"}, legs)
    assert not is_relevant({"ACTION": "change", "SUBSYSTEM": "block", "DEVNAME": "dm-5",
                            "DM_NAME": "iob_leg1"}, legs)
    assert not is_relevant({"ACTION": "change", "SUBSYSTEM": "block", "DEVNAME": "loop0"}, legs)
    assert not is_relevant({"ACTION": "add", "SUBSYSTEM": "bdi", "DEVNAME": "dm-3"}, legs)
