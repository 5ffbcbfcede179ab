"""The agent end to end on the VM kernel: `iobridge run` as a separate
process (as systemd runs it), the real module and BPF programs, fio as the
client, and a leg with real slow periods (dm-delay reloaded on a schedule).

Each test that starts the agent pays for BCC compiling the observer and the
routing program (about a minute under emulation).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run

from iobridge.core import abi
from iobridge.kernel import dmtarget
from iobridge.daemon.config import DEFAULT_MODEL, Config
from iobridge.lab.experiment import AgentProcess, ReplicaSet, run_policy

pytestmark = pytest.mark.vm

PIN_DIR = Config.pin_dir


@pytest.fixture
def replicas(iobridge_module):
    rs = ReplicaSet(name="iob_t", size_mb=256, slow_ms=20, normal_mean_s=0.6,
                    slow_mean_s=0.4, seed=3).create()
    yield rs
    rs.remove()


@pytest.fixture
def agents():
    """Start agents with agents(args...); every one is stopped at the end."""
    started: list[AgentProcess] = []

    def factory(*args: str, env: dict | None = None, workdir=None) -> AgentProcess:
        a = AgentProcess(list(args), env=env, workdir=workdir)
        started.append(a)
        return a.start()

    yield factory
    for a in started:
        a.stop(signal.SIGKILL if a.proc and a.proc.poll() is None else signal.SIGTERM)
    if PIN_DIR.exists():   # a killed agent leaves its pins; don't leak them to the next test
        shutil.rmtree(PIN_DIR, ignore_errors=True)


def routed(name: str) -> tuple[int, int]:
    """(reads routed by the table, reads left to the module default) so far."""
    st = dmtarget.status(name)
    return sum(leg.hook_routed for leg in st.legs), sum(leg.default_routed for leg in st.legs)


def route_programs_attached() -> list[str]:
    """Names of loaded BPF programs called iobridge_route (bpftool)."""
    progs = json.loads(run(["bpftool", "-j", "prog", "show"]).stdout)
    return [p["name"] for p in progs if p.get("name", "").startswith("iobridge_route")]


def iobridge(*args: str, user: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "iobridge.cli", *args]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------ learned vs default

def test_learned_policy_beats_the_module_default_at_qd1(replicas, agents):
    seed, runtime = 11, 12
    default = run_policy(replicas, "default", 1, runtime, seed)
    agent = agents()
    learned = run_policy(replicas, "learned", 1, runtime, seed, agent.pid)
    print(json.dumps({"default": default, "learned": learned}, indent=1))
    assert default["errors"] == 0 and learned["errors"] == 0
    assert learned["hook_routed"] > 0.5 * learned["ios"], "the table routed few reads"
    # Margin: the learned p99 must be under half the default's.
    assert learned["p99_us"] < 0.5 * default["p99_us"], (learned["p99_us"], default["p99_us"])
    # Reads the slow leg served while slow, per second of slow time, must drop by half.
    rate = {r["policy"]: r["slow_leg_reads_while_slow"] / max(r["slow_seconds"], 0.1)
            for r in (default, learned)}
    assert default["slow_seconds"] > 1 and learned["slow_seconds"] > 1
    assert rate["learned"] < 0.5 * rate["default"], rate


# ------------------------------------------------------------------ fail-safe

def test_stall_expires_kill_falls_back_restart_resumes(replicas, agents):
    fio = subprocess.Popen(["fio", "--name=bg", f"--filename={replicas.dev}", "--rw=randread",
                            "--bs=4k", "--direct=1", "--ioengine=libaio", "--iodepth=4",
                            "--time_based", "--runtime=600", "--output-format=json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        agent = agents()

        def delta(seconds: float) -> tuple[int, int]:
            h0, d0 = routed(replicas.name)
            time.sleep(seconds)
            h1, d1 = routed(replicas.name)
            return h1 - h0, d1 - d0

        hook, _ = delta(2)
        assert hook > 0, "the agent's table routed nothing"

        # Stalled agent (SIGSTOP): entries expire, the module default decides.
        agent.send(signal.SIGSTOP)
        time.sleep(0.5)
        hook, dflt = delta(2)
        assert hook == 0 and dflt > 0, (hook, dflt)
        agent.send(signal.SIGCONT)
        time.sleep(0.5)
        hook, _ = delta(2)
        assert hook > 0, "routing by the table did not resume after SIGCONT"

        # Killed agent: its programs go with it; reads keep flowing by default.
        agent.send(signal.SIGKILL)
        agent.proc.wait(10)
        time.sleep(0.5)
        hook, dflt = delta(2)
        assert hook == 0 and dflt > 0, (hook, dflt)
        assert route_programs_attached() == []
        assert PIN_DIR.exists(), "a killed agent cannot unpin: its pins should still be there"

        # A restarted agent replaces the leftovers and routes again.
        again = agents()
        assert "removed pins left by a previous agent" in again.log()
        hook, _ = delta(2)
        assert hook > 0
        assert again.stop() == 0
        assert "STOPPING=1" in again.messages
    finally:
        fio.send_signal(signal.SIGINT)
        out, err = fio.communicate(60)
    job = json.loads(out[out.find("{"):])["jobs"][0]
    assert job["error"] == 0 and job["read"]["total_ios"] > 0, err
    # Nothing left behind by the clean stop.
    assert not PIN_DIR.exists()
    assert route_programs_attached() == []
    # Maps this test process holds itself (other tests' fixtures) do not count.
    maps = [m.get("name", "") for m in json.loads(run(["bpftool", "-j", "map", "show"]).stdout)
            if os.getpid() not in [p.get("pid") for p in m.get("pids", [])]]
    assert not [m for m in maps if m.startswith(("iobridge_", "leg_features", "leg_slots"))], maps
    assert dmtarget.status(replicas.name).health == "AA"


# ------------------------------------------------------------------ running agent

def test_status_reload_target_loss_and_notify(replicas, agents, tmp_path):
    cfg = tmp_path / "iobridge.toml"
    cfg.write_text(f'[admission]\nmodel = "{DEFAULT_MODEL}"\n')
    agent = agents("--config", str(cfg), env={"WATCHDOG_USEC": "1000000"}, workdir=tmp_path)
    assert "READY=1" in agent.messages
    st = agent.wait_status(lambda s: s["targets"] and s["counters"]["published"] > 0)

    # iobridge status, both forms
    proc = iobridge("status", "--json", "--status-file", str(agent.status_file))
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)
    assert st["agent_alive"] and st["program_attached"]
    assert [t["name"] for t in st["targets"]] == ["iob_t"]
    assert len(st["targets"][0]["legs"]) == 2
    assert st["table_age_ms"] is not None and st["table_age_ms"] < 2000
    sha = st["model"]["sha256"]
    assert sorted(Path(p).name for p in st["pins"]) == sorted(
        ["iobridge_decisions", "iobridge_agent", "iobridge_route_stats",
         "iobridge_decision_age", "leg_features"])
    text = iobridge("status", "--status-file", str(agent.status_file)).stdout
    assert "target iob_t (id" in text and "routing program attached" in text
    time.sleep(1.2)
    assert agent.messages.count("WATCHDOG=1") >= 2

    # SIGHUP with a config naming a missing model, then a corrupt one: refused.
    cfg.write_text('[admission]\nmodel = "missing.onnx"\n')
    agent.send(signal.SIGHUP)
    agent.wait_status(lambda s: s["counters"]["reload_failures"] == 1)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    shutil.copy(str(DEFAULT_MODEL)[:-5] + ".card.json", tmp_path / "bad.card.json")
    cfg.write_text(f'[admission]\nmodel = "{bad}"\n')
    agent.send(signal.SIGHUP)
    st = agent.wait_status(lambda s: s["counters"]["reload_failures"] == 2)
    assert st["model"]["sha256"] == sha and st["counters"]["reloads"] == 0
    assert "reload refused" in agent.log() and "not an ONNX model" in agent.log()
    # ... and a good one is taken.
    cfg.write_text(f'[agent]\ntick_ms = 2\n[admission]\nmodel = "{DEFAULT_MODEL}"\n')
    agent.send(signal.SIGHUP)
    st = agent.wait_status(lambda s: s["counters"]["reloads"] == 1)
    assert st["tick_ms"] == 2 and agent.proc.poll() is None

    # The target disappears while the agent runs: it lets go and keeps running.
    dmtarget.remove(replicas.name)
    st = agent.wait_status(lambda s: s["targets"] == [], timeout_s=10)
    assert st["counters"]["targets_removed"] == 1 and agent.proc.poll() is None
    assert "iob_t (id" in agent.log() and "is gone" in agent.log()

    assert agent.stop() == 0
    assert "STOPPING=1" in agent.messages
    assert not PIN_DIR.exists() and route_programs_attached() == []
    assert not agent.status_file.exists()


def test_shadow_mode_decides_but_publishes_nothing(replicas, agents):
    agent = agents("--shadow")
    h0, _ = routed(replicas.name)
    run(["fio", "--name=s", f"--filename={replicas.dev}", "--rw=randread", "--bs=4k",
         "--direct=1", "--runtime=3", "--time_based"])
    st = agent.wait_status(lambda s: s["counters"]["ticks"] > 100 and s["targets"])
    h1, _ = routed(replicas.name)
    assert h1 == h0
    assert st["shadow"] and not st["program_attached"] and route_programs_attached() == []
    legs = st["targets"][0]["legs"]
    assert all(leg["p_slow"] is not None and len(leg["p_slow"]) == abi.NUM_SIZE_BUCKETS
               for leg in legs)
    assert agent.stop() == 0


# ------------------------------------------------------------------ refused at start

def test_bad_model_config_permission_and_missing_module(iobridge_module, tmp_path):
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x00garbage")
    shutil.copy(str(DEFAULT_MODEL)[:-5] + ".card.json", tmp_path / "corrupt.card.json")
    proc = iobridge("run", "--model", str(bad))
    assert proc.returncode != 0 and "not an ONNX model" in proc.stderr, proc.stderr

    wrong = tmp_path / "schema.onnx"
    shutil.copy(DEFAULT_MODEL, wrong)
    card = json.loads(Path(str(DEFAULT_MODEL)[:-5] + ".card.json").read_text())
    card["schema_version"] = 99
    (tmp_path / "schema.card.json").write_text(json.dumps(card))
    proc = iobridge("run", "--model", str(wrong))
    assert proc.returncode != 0 and "feature schema version 99" in proc.stderr, proc.stderr

    cfg = tmp_path / "typo.toml"
    cfg.write_text("[agent]\ntik_ms = 1\n")
    proc = iobridge("run", "--config", str(cfg))
    assert proc.returncode != 0 and "unknown key agent.tik_ms" in proc.stderr, proc.stderr

    proc = iobridge("run", user="65534")
    assert proc.returncode != 0 and "needs root" in proc.stderr, proc.stderr

    # Without the module (nothing uses it between tests): a clear refusal.
    assert run(["rmmod", abi.MODULE_NAME], check=False).returncode == 0
    try:
        proc = iobridge("run")
        assert proc.returncode != 0 and f"kernel module {abi.MODULE_NAME} is not loaded" in proc.stderr
    finally:
        run(["insmod", str(abi.KMODULE_DIR / "dm-iobridge.ko")])
    assert not PIN_DIR.exists() and route_programs_attached() == []
