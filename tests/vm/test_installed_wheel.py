"""The installed wheel runs the daemon: `iobridge run` from a fresh venv
holding the checkout's wheel (iobridge.lab.installed: installed with
--system-site-packages, outside the checkout), started from a directory
outside the checkout with no PYTHONPATH, against a two-leg iobridge target;
fio reads must be routed by the table it publishes, and SIGTERM must stop
it cleanly (exit 0, pins and status file removed).

`iobridge vm test` makes that venv on the host before it boots the VM (pip
alone needs minutes to start under emulation); a guest started otherwise
builds and installs it here. Then BCC compiles the agent's programs (about
two minutes under emulation).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from iobridge.core import resources
from iobridge.daemon.config import Config
from iobridge.kernel import dmtarget
from iobridge.lab import installed
from iobridge.lab.experiment import ReplicaSet, warm_up

pytestmark = pytest.mark.vm

PIN_DIR = Config.pin_dir
# BCC compiles two programs: ~1 min each under TCG on an idle host, several
# when other VMs share its CPUs; bounded to stay inside the VM's per-test
# time-out (600 s) with the rest of the test.
READY_TIMEOUT_S = 500


@pytest.fixture
def replicas():
    rs = ReplicaSet(name="iob_inst", size_mb=64).create()
    yield rs
    rs.remove()


def hook_routed(name: str) -> int:
    return sum(leg.hook_routed for leg in dmtarget.status(name).legs)


def read_status(path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def test_installed_wheel_runs_the_agent(replicas, tmp_path):
    t0 = time.monotonic()
    venv = installed.from_vm_host() or \
        installed.make_venv(installed.build_wheel(tmp_path), tmp_path / "venv")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for p in (venv.root, elsewhere):
        assert resources.checkout_root() not in p.resolve().parents
    env = venv.env()
    assert "PYTHONPATH" not in env
    where = venv.where(elsewhere)
    assert where["package"] == str(venv.package / "__init__.py") and where["checkout"] == "None"
    installed_s = time.monotonic() - t0

    status_file = tmp_path / "status.json"
    log_file = tmp_path / "agent.log"
    with open(log_file, "wb") as log:
        agent = subprocess.Popen([str(venv.iobridge), "-v", "run", "--status-file", str(status_file),
                                  "--duration", "900"],
                                 cwd=elsewhere, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            st = read_status(status_file)
            if st and st["program_attached"] and [t["name"] for t in st["targets"]] == [replicas.name]:
                break
            assert agent.poll() is None, f"the agent exited {agent.returncode}: " \
                                         f"{log_file.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"not ready in {READY_TIMEOUT_S} s: {st}; " \
                                                f"{log_file.read_text()[-2000:]}"
            time.sleep(0.2)
        ready_s = time.monotonic() - t0 - installed_s
        # Baselines come from completed reads: read until the table covers both legs.
        first_table_s = warm_up(lambda: read_status(status_file), replicas)
        st = read_status(status_file)
        # The daemon runs the installed package, its model and its BPF sources.
        assert os.readlink(f"/proc/{agent.pid}/cwd") == str(elsewhere)
        environ = open(f"/proc/{agent.pid}/environ", "rb").read().split(b"\0")
        assert not [e for e in environ if e.startswith(b"PYTHONPATH=")]
        assert st["model"]["path"] == str(venv.package / "_data" / "models" /
                                          "admission-default.onnx"), st["model"]

        before = hook_routed(replicas.name)
        fio = subprocess.run(["fio", "--name=r", f"--filename={replicas.dev}", "--rw=randread",
                              "--bs=4k", "--direct=1", "--ioengine=libaio", "--iodepth=4",
                              "--runtime=4", "--time_based", "--output-format=json"],
                             capture_output=True, text=True, timeout=120)
        assert fio.returncode == 0, fio.stderr
        job = json.loads(fio.stdout[fio.stdout.find("{"):])["jobs"][0]
        routed = hook_routed(replicas.name) - before
        print(json.dumps({"install_s": round(installed_s, 1), "ready_s": round(ready_s, 1),
                          "first_table_s": first_table_s,
                          "fio_reads": job["read"]["total_ios"], "hook_routed": routed}))
        assert job["error"] == 0 and job["read"]["total_ios"] > 0
        assert routed > 0, f"no read routed by the table: {dmtarget.status(replicas.name)}"

        agent.send_signal(signal.SIGTERM)
        assert agent.wait(60) == 0, log_file.read_text()[-2000:]
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
            shutil.rmtree(PIN_DIR, ignore_errors=True)
    assert not PIN_DIR.exists()
    assert not status_file.exists()
