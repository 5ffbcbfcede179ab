"""Host test: `iobridge status` on stale and malformed status files (issue 14,
item 5).

Running (exit 0) only when the file's pid exists, is the agent that wrote it
(recorded process start time, or an iobridge command line for files without
one) and the file is fresh for the settings it records; a stale file is
"not running" (exit 3, with the reason); a malformed one is one error line
naming the file (exit 4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest

from iobridge import cli
from iobridge.core import clock
from iobridge.daemon import agent as daemon

HOUR_NS = 3600 * 10**9


def an_hour_ago() -> int:
    """CLOCK_MONOTONIC an hour ago, or the boot if this host has been up for
    less (a fresh CI machine): stale either way, never negative."""
    return max(0, clock.now_ns() - HOUR_NS)


def _status(**over) -> dict:
    """A status file as the agent writes it, fresh, for this process."""
    st = {"pid": psutil.Process().pid, "pid_create_time": psutil.Process().create_time(),
          "written_ns": clock.now_ns(), "status_interval_s": daemon.STATUS_INTERVAL_S,
          "tick_ms": 250.0, "max_silence_ms": 2000.0}
    st.update(over)
    return {k: v for k, v in st.items() if v is not None}


def _write(tmp_path, st) -> str:
    path = tmp_path / "status.json"
    path.write_text(st if isinstance(st, str) else json.dumps(st))
    return str(path)


def _status_cli(capsys, path, *extra) -> tuple[int, str, str]:
    rc = cli.main(["status", "--status-file", path, *extra])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


@pytest.fixture
def sleeper():
    """A live process that is not an iobridge agent."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def test_exit_codes_are_distinct_and_documented():
    assert len({daemon.STATUS_RUNNING, daemon.STATUS_NOT_RUNNING, daemon.STATUS_UNREADABLE}) == 3
    parser = dict(cli.build_parser()._subparsers._group_actions[0].choices)["status"]
    text = parser.format_help()
    assert "Exit status: 0 running; 3 not running" in " ".join(text.split())
    assert "4 the status file cannot be read" in " ".join(text.split())


def test_fresh_file_of_the_agent_that_wrote_it_is_running(tmp_path):
    st = daemon.read_status(_write(tmp_path, _status()))
    assert st["agent_alive"] and "stale_reason" not in st and 0 <= st["status_age_s"] < 5


def test_stale_file_naming_pid_1_an_hour_later_is_not_running(tmp_path, capsys):
    path = _write(tmp_path, _status(pid=1, pid_create_time=None,
                                    written_ns=an_hour_ago()))
    rc, out, err = _status_cli(capsys, path, "--json")
    st = json.loads(out)
    assert rc == 3 and st["agent_alive"] is False and st["stale_reason"] and err == ""
    # pid 1 with the start time of another process: not the agent, even when fresh
    path = _write(tmp_path, _status(pid=1, pid_create_time=12345.0))
    st = daemon.read_status(path)
    assert not st["agent_alive"] and "not the agent that wrote the file" in st["stale_reason"]


def test_an_old_file_of_a_live_agent_is_stale(tmp_path):
    limit = daemon.stale_after_s(_status())
    assert limit == daemon.STALE_INTERVALS * daemon.STATUS_INTERVAL_S + 2.0
    st = daemon.read_status(_write(tmp_path, _status(
        written_ns=clock.now_ns() - int((limit + 1) * 1e9))))
    assert not st["agent_alive"] and "not rewritten for" in st["stale_reason"]
    # a longer heartbeat limit or status period recorded in the file stretches it
    st = daemon.read_status(_write(tmp_path, _status(
        max_silence_ms=10_000.0, written_ns=clock.now_ns() - int((limit + 1) * 1e9))))
    assert st["agent_alive"]
    st = daemon.read_status(_write(tmp_path, _status(
        status_interval_s=10.0, written_ns=clock.now_ns() - int((limit + 1) * 1e9))))
    assert st["agent_alive"]


def test_a_file_from_before_this_boot_is_stale(tmp_path):
    st = daemon.read_status(_write(tmp_path, _status(written_ns=clock.now_ns() + HOUR_NS)))
    assert not st["agent_alive"] and "before this boot" in st["stale_reason"]


def test_a_live_process_that_is_not_an_agent(tmp_path, sleeper):
    # no recorded start time (an older agent's file): the command line decides
    st = daemon.read_status(_write(tmp_path, _status(pid=sleeper.pid, pid_create_time=None)))
    assert not st["agent_alive"] and "not an iobridge agent" in st["stale_reason"]


def test_a_gone_process(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    st = daemon.read_status(_write(tmp_path, _status(pid=proc.pid)))
    assert not st["agent_alive"]


def test_text_report_of_a_stale_file_says_why(tmp_path, capsys):
    full = json.loads(json.dumps(_status(pid=1, pid_create_time=None, written_ns=1)))
    full.update({"shadow": False, "ttl_ticks": 12, "recompute_ms": 200, "probe_after_ms": 200,
                 "program_attached": False, "pins": [], "last_published_ns": None,
                 "model": {"path": "m.onnx", "threshold": 0.1, "sha256": "ab" * 32},
                 "routing": None, "counters": {}, "timing_us": daemon.PhaseTimes().summary(),
                 "discovery_error": None, "targets": []})
    rc, out, _ = _status_cli(capsys, _write(tmp_path, full))
    assert rc == 3 and out.startswith("agent pid 1 NOT RUNNING (stale status: ")


def test_no_status_file_is_not_running(tmp_path, capsys):
    rc, out, err = _status_cli(capsys, str(tmp_path / "none.json"))
    assert rc == 3 and out == "" and "the agent is not running" in err


@pytest.mark.parametrize("content,what", [
    ("{not json", "malformed JSON"),
    ("", "malformed JSON"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"pid": 1}), "no field 'written_ns'"),
    (json.dumps(_status(tick_ms=None)), "no field 'tick_ms'"),
    (json.dumps(_status(pid="1")), "field 'pid' = '1'"),
    (json.dumps(_status(pid=0)), "field 'pid' = 0"),
    (json.dumps(_status(written_ns=1.5)), "field 'written_ns' = 1.5"),
    (json.dumps(_status(max_silence_ms=True)), "field 'max_silence_ms' = True"),
])
@pytest.mark.parametrize("as_json", [False, True])
def test_malformed_status_file_is_one_error_line_naming_it(content, what, as_json, tmp_path,
                                                           capsys):
    path = _write(tmp_path, content)
    rc, out, err = _status_cli(capsys, path, *(["--json"] if as_json else []))
    lines = err.strip().splitlines()
    assert rc == 4 and out == "" and len(lines) == 1, err
    assert lines[0].startswith(f"iobridge: error: {path}: not an agent status file: ")
    assert what in lines[0]


def test_a_status_missing_report_fields_is_malformed_in_text_form(tmp_path, capsys):
    """Liveness fields present, the rest missing: --json prints what there is,
    the text report is a malformed-file error, not a traceback."""
    path = _write(tmp_path, _status())
    rc, out, err = _status_cli(capsys, path)
    assert rc == 4 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith(f"iobridge: error: {path}: not an agent status file: missing or malformed")
    rc, out, _ = _status_cli(capsys, path, "--json")
    assert rc == 0 and json.loads(out)["agent_alive"]


def test_a_stale_status_missing_report_fields_is_not_running_in_both_forms(tmp_path, capsys):
    """A stale file is "not running" (exit 3) with and without --json, however
    much of it is left: the text report falls back to its first line."""
    path = _write(tmp_path, _status(pid=1, pid_create_time=None,
                                    written_ns=an_hour_ago()))
    rc, out, err = _status_cli(capsys, path)
    assert rc == 3 and err == "" and out.startswith("agent pid 1 NOT RUNNING (stale status: ")
    assert len(out.strip().splitlines()) == 1
    rc, out, _ = _status_cli(capsys, path, "--json")
    assert rc == 3 and json.loads(out)["agent_alive"] is False


@pytest.mark.parametrize("make", ["fifo", "dev-zero", "deep-json"])
@pytest.mark.parametrize("as_json", [False, True])
def test_a_status_path_that_is_no_status_file_is_one_line_at_once(make, as_json, tmp_path,
                                                                 capsys):
    """A FIFO would block the read, /dev/zero never ends, JSON nested 100,000
    deep overflows the parser's stack: each is exit 4 and one error line."""
    if make == "fifo":
        path = str(tmp_path / "status.json")
        os.mkfifo(path)
        what = "not a regular file: a FIFO (named pipe)"
    elif make == "dev-zero":
        path, what = "/dev/zero", "not a regular file: a character device"
    else:
        path, what = _write(tmp_path, "[" * 100_000 + "]" * 100_000), "nested too deeply"
    rc, out, err = _status_cli(capsys, path, *(["--json"] if as_json else []))
    assert rc == 4 and out == "" and len(err.strip().splitlines()) == 1 and what in err


def test_unreadable_status_file(tmp_path, capsys):
    path = tmp_path / "dir.json"
    path.mkdir()
    rc, out, err = _status_cli(capsys, str(path))
    assert rc == 4 and f"cannot read the agent status {path}" in err


def test_status_from_the_shell_prints_no_traceback(tmp_path):
    path = _write(tmp_path, "{broken")
    r = subprocess.run([sys.executable, "-m", "iobridge.cli", "status", "--status-file", path],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 4 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"iobridge: error: {path}: not an agent status file: malformed JSON "
        "(Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"]
