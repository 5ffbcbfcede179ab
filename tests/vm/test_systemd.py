"""The unit file under a real systemd: Debian 12's systemd 252 service
manager drives systemd/iobridge.service as shipped: `systemctl start`
returns at READY and reads are routed by the table, `systemctl reload`
takes a new model in the same process, a SIGSTOPped agent is aborted by the
watchdog and replaced (Restart=on-failure), `systemctl stop` leaves no
program attached, no pin and no status file.

Why not systemd as the VM's init (vng --systemd): the guest boots over the
host's root, and on a host that is a Docker container (this project's CI)
that root holds /.dockerenv, so systemd 252 treats the VM as a container:
PID 1 ignores the kernel command line's units and starts console-getty
instead of the serial getty that vng's drop-in turns into the test command,
which therefore never runs (seen on 6.1; with `container=` on the command
line PID 1 detected qemu, but its generators still took the VM for a
container). So the same systemd binary runs here as root's service manager
(`systemd --user`, started by the fixture with a session bus), which reads
the unit's Type=notify, WatchdogSec, TimeoutAbortSec, ExecReload, Restart
and sandboxing as PID 1 would. Two differences, both in the test's own
config, not the unit: RuntimeDirectory= is made under $XDG_RUNTIME_DIR
rather than /run, so the status file goes there; and with no journald in the
VM the manager logs to the kernel log (watchdog, restarts) and the agent's
output goes to a file. virtme-ng's /dev lacks /dev/kmsg: the fixture makes
it, as every host has it. And two sandbox settings are turned off in the
test's drop-in, both for the same reason: their mounts inside the unit's
namespace fail on virtme-ng's root (a 9p/virtiofs export of the host's root
with overlays on top), "unit-root/dev/kmsg" and "unit-root/home: No such
file or directory", status 226/NAMESPACE, before the agent runs:
ProtectKernelLogs= and ProtectHome=. Every other setting is the shipped
unit's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iobridge.core import resources
from iobridge.daemon.config import Config
from iobridge.kernel import dmtarget
from iobridge.lab import workload
from iobridge.lab.experiment import ReplicaSet, warm_up

from conftest import run

pytestmark = pytest.mark.vm

UNIT_SRC = resources.checkout_root() / "systemd" / "iobridge.service"
RUNTIME = Path("/run/user/0")                    # root's $XDG_RUNTIME_DIR
UNIT = Path("/etc/systemd/user/iobridge.service")  # the user manager's /etc/systemd/system
DROPIN = Path("/etc/systemd/user/iobridge.service.d/vm.conf")
CONFIG = Path("/etc/iobridge/iobridge.toml")
BIN = Path("/usr/local/bin/iobridge")
STATUS = RUNTIME / "iobridge" / "status.json"    # RuntimeDirectory=iobridge, under a user manager
AGENT_LOG = Path("/run/iobridge-systemd-test.log")  # the agent's stdout and stderr
PIN_DIR = Config.pin_dir
MODELS = resources.data_dir("models")
# BCC compiles the agent's programs before READY: minutes under emulation.
START_TIMEOUT_S = 420


MANAGER_ENV = {"XDG_RUNTIME_DIR": str(RUNTIME),
               "DBUS_SESSION_BUS_ADDRESS": f"unix:path={RUNTIME}/bus"}


def systemctl(*args: str, timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(["systemctl", "--user", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **MANAGER_ENV})


def prop(name: str) -> str:
    return systemctl("show", "-p", name, "--value", "iobridge").stdout.strip()


def journal() -> str:
    """The service manager's log lines (no journald in the VM: it logs to
    the kernel log) and the agent's own output."""
    lines = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=60).stdout
    manager = "\n".join(line for line in lines.splitlines() if "systemd[" in line or
                        "iobridge.service" in line)
    try:
        agent = AGENT_LOG.read_text(errors="replace")
    except OSError:
        agent = "(no agent output)"
    return f"{manager}\n--- agent output:\n{agent[-2000:]}"


def agent_status() -> dict:
    try:
        return json.loads(STATUS.read_text())
    except (OSError, ValueError):
        return {}


def wait_for(what: str, cond, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s; unit "
                                 f"{prop('ActiveState')}/{prop('SubState')}; journal:\n"
                                 f"{journal()[-3000:]}")
        time.sleep(1)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_config(model: Path) -> None:
    CONFIG.write_text(f'[agent]\nstatus_file = "{STATUS}"\n'
                      f'[admission]\nmodel = "{model}"\n')


@pytest.fixture
def service_manager():
    """systemd 252 as root's service manager, with the session bus systemctl
    talks to it over; stopped at the end (it stops its units)."""
    marker = Path("/run/systemd/system")     # sd_booted(): the manager refuses without it
    made_marker = not marker.exists()
    marker.mkdir(parents=True, exist_ok=True)
    # virtme-ng's /dev has no kmsg; the manager logs there.
    kmsg = Path("/dev/kmsg")
    made_kmsg = not kmsg.exists()
    if made_kmsg:
        os.mknod(kmsg, 0o600 | stat.S_IFCHR, os.makedev(1, 11))
    RUNTIME.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **MANAGER_ENV, "SYSTEMD_LOG_TARGET": "kmsg"}
    bus = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--nopidfile",
                            f"--address={MANAGER_ENV['DBUS_SESSION_BUS_ADDRESS']}"], env=env)
    manager = subprocess.Popen(["/lib/systemd/systemd", "--user"], env=env)
    try:
        wait_for("the service manager up",
                 lambda: systemctl("is-system-running", timeout=30).stdout.strip()
                 in ("running", "degraded"), 60)
        yield manager
    finally:
        for proc in (manager, bus):
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if made_marker:
            marker.rmdir()
        if made_kmsg:
            kmsg.unlink()


@pytest.fixture
def installed_unit(iobridge_module, service_manager):
    BIN.parent.mkdir(parents=True, exist_ok=True)
    BIN.unlink(missing_ok=True)
    BIN.symlink_to(Path(sys.prefix) / "bin" / "iobridge")
    CONFIG.parent.mkdir(parents=True, exist_ok=True)
    write_config(MODELS / "admission-default.onnx")
    UNIT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(UNIT_SRC, UNIT)
    # Changed in a drop-in (the module doc says why): two mounts that fail
    # on virtme-ng's root, and the agent's output to a file (no journald).
    DROPIN.parent.mkdir(parents=True, exist_ok=True)
    DROPIN.write_text("[Service]\nProtectKernelLogs=no\nProtectHome=no\n"
                      f"StandardOutput=append:{AGENT_LOG}\nStandardError=append:{AGENT_LOG}\n")
    assert systemctl("daemon-reload").returncode == 0
    yield
    systemctl("stop", "iobridge")
    for p in (UNIT, DROPIN, CONFIG, BIN, AGENT_LOG):
        p.unlink(missing_ok=True)
    if PIN_DIR.exists():
        shutil.rmtree(PIN_DIR, ignore_errors=True)


@pytest.fixture
def replicas(iobridge_module):
    rs = ReplicaSet(name="iob_sd", size_mb=64).create()
    yield rs
    rs.remove()


def hook_routed(name: str) -> int:
    return sum(leg.hook_routed for leg in dmtarget.status(name).legs)


def route_program_ids() -> set[int]:
    """Ids of the loaded BPF programs called iobridge_route. Others than the
    agent's may be loaded (in a CI run of the whole suite one was, listed
    with no holding pid: test_dmtarget.py keeps a policy loaded for the
    session), so the test compares with the ids loaded before the unit
    started."""
    progs = json.loads(run(["bpftool", "-j", "prog", "show"]).stdout)
    return {p["id"] for p in progs if p.get("name", "").startswith("iobridge_route")}


def wait_programs_gone(ids: set[int], timeout_s: float = 15.0) -> float:
    """Seconds until none of `ids` is loaded. The kernel frees a program
    after its last holder closes it, through deferred work: on 6.12 under
    single-threaded TCG with a busy host core one was still listed as
    `systemctl stop` returned."""
    t0 = time.monotonic()
    while left := ids & route_program_ids():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"the agents' iobridge_route programs {sorted(left)} still "
                                 f"loaded {timeout_s:.0f} s after the agent exited")
        time.sleep(0.5)
    return time.monotonic() - t0


def test_unit_start_reload_watchdog_restart_stop(installed_unit, replicas):
    preloaded = route_program_ids()       # not the agent's (see route_program_ids)
    # start: systemctl returns once the agent sent READY=1 (Type=notify).
    t0 = time.monotonic()
    proc = systemctl("start", "iobridge")
    assert proc.returncode == 0, f"{proc.stderr}\n{journal()[-3000:]}"
    ready_s = time.monotonic() - t0
    assert (prop("ActiveState"), prop("SubState")) == ("active", "running")
    pid = int(prop("MainPID"))
    assert pid > 0 and prop("NRestarts") == "0"
    # The sandbox leaves the agent its uevent socket (RestrictAddressFamilies).
    assert "target discovery: dm uevents" in journal(), journal()[-3000:]

    # reads are routed by the table the agent publishes
    warm_up(agent_status, replicas, timeout_s=180)
    before = hook_routed(replicas.name)
    workload.fio_random_reads(replicas.dev, 4, 2)
    assert hook_routed(replicas.name) > before, dmtarget.status(replicas.name)
    agents_programs = route_program_ids() - preloaded
    assert agents_programs, "the agent's routing program is not loaded"
    default_sha = agent_status()["model"]["sha256"]
    assert default_sha == sha256(MODELS / "admission-default.onnx")

    # reload: a new model named in the config, taken by the same process
    other = MODELS / "admission-cloudphysics.onnx"
    write_config(other)
    proc = systemctl("reload", "iobridge")
    assert proc.returncode == 0, proc.stderr
    st = wait_for("the reloaded model in the agent's status",
                  lambda: (s := agent_status()).get("model", {}).get("sha256") == sha256(other)
                  and s, 60)
    assert st["counters"]["reloads"] == 1
    assert int(prop("MainPID")) == pid and prop("ActiveState") == "active"

    # watchdog: a stopped agent sends no WATCHDOG=1; systemd aborts it,
    # kills it (TimeoutAbortSec) and starts a new one (Restart=on-failure).
    # Meanwhile the kernel routes by its default (decisions expire).
    os.kill(pid, signal.SIGSTOP)
    t_stop = time.monotonic()
    new_pid = wait_for("a new agent process started by the watchdog restart",
                       lambda: (p := int(prop("MainPID") or 0)) not in (0, pid) and p, 120)
    restart_s = time.monotonic() - t_stop
    assert prop("NRestarts") == "1"
    wait_for("the restarted agent active again (READY)",
             lambda: prop("ActiveState") == "active" and prop("SubState") == "running",
             START_TIMEOUT_S)
    assert "watchdog timeout" in journal().lower()
    st = wait_for("the restarted agent's status", lambda: (s := agent_status()).get("pid")
                  == new_pid and s, 60)
    warm_up(agent_status, replicas, timeout_s=180)
    before = hook_routed(replicas.name)
    workload.fio_random_reads(replicas.dev, 4, 2)
    assert hook_routed(replicas.name) > before
    agents_programs |= route_program_ids() - preloaded

    # stop: SIGTERM, the agent detaches and unpins; nothing is left.
    proc = systemctl("stop", "iobridge")
    assert proc.returncode == 0, proc.stderr
    assert prop("ActiveState") == "inactive"
    assert not PIN_DIR.exists()
    gone_s = wait_programs_gone(agents_programs)
    assert not STATUS.exists()
    print(f"systemd: READY {ready_s:.0f} s after start; watchdog restart "
          f"{restart_s:.0f} s after SIGSTOP; new pid {new_pid}; routing program freed "
          f"{gone_s:.1f} s after stop")


def test_a_sandbox_without_netlink_stops_the_start_with_a_clear_error(installed_unit):
    """A unit hardened past what the agent needs (no AF_NETLINK, so no
    uevent socket) fails its start with one line saying so, before it
    compiles or attaches anything; Restart=no so systemd does not retry."""
    preloaded = route_program_ids()
    hardened = DROPIN.with_name("no-netlink.conf")
    hardened.write_text("[Service]\nRestart=no\nRestrictAddressFamilies=\n"
                        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6\n")
    try:
        assert systemctl("daemon-reload").returncode == 0
        t0 = time.monotonic()
        proc = systemctl("start", "iobridge")
        failed_s = time.monotonic() - t0
        out = journal()
        assert proc.returncode != 0, out[-3000:]
        assert prop("ActiveState") == "failed" and prop("Result") == "exit-code", out[-3000:]
        agent_out = AGENT_LOG.read_text(errors="replace")
        assert "cannot open the kernel's uevent socket" in agent_out, agent_out[-2000:]
        assert "AF_NETLINK" in agent_out and "Traceback" not in agent_out, agent_out[-2000:]
        assert not PIN_DIR.exists() and not STATUS.exists()
        assert route_program_ids() == preloaded
        print(f"no-netlink sandbox: start failed after {failed_s:.1f} s with: "
              f"{[line for line in agent_out.splitlines() if 'uevent' in line]}")
    finally:
        hardened.unlink(missing_ok=True)
        systemctl("reset-failed", "iobridge")
        systemctl("daemon-reload")
