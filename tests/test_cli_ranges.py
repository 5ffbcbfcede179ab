"""Host test: every numeric option has a range, and a value outside it is a
usage error (issue 14, item 2).

For each command, a matrix of bad values (0, -1, nan, inf, a huge value, a
non-number; 0 left out where it is a documented value) for each of its
numeric options: exit 2, one `error: argument --OPT` line on stderr, no
traceback. The values are only parsed (build_parser().parse_args), so no
command runs: no VM boots, no device is touched. The replay cases the issue
names run through cli.main on a real trace and stop at the parser at once.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time

import numpy as np
import pytest

from iobridge import cli
from iobridge.core import cliutil
from iobridge.offline import replay as R
from iobridge.offline.trace import Trace, _normalise_batch, write_trace

ALL = ("0", "-1", "nan", "inf", "1e30", "x")
NOT_ZERO = ("-1", "nan", "inf", "1e30", "x")       # options where 0 is a valid value
INT_HUGE = str(10**30)

# command (with the arguments it requires) -> {option: bad values}
MATRIX = {
    ("observe",): {"--interval": ALL, "--count": ALL + (INT_HUGE,)},
    ("cachestat",): {"--interval": ALL, "--count": ALL + (INT_HUGE,), "--top": NOT_ZERO + ("10001",)},
    ("record", "--out", "t.parquet"): {"--duration": ALL, "--ringbuf-pages": ALL + ("3", INT_HUGE)},
    ("trace", "info", "t.parquet"): {"--duration": ALL},
    ("trace", "import", "t.csv", "-o", "t.parquet"): {"--duration": ALL},
    ("trace", "export", "t.parquet", "-o", "t.iolog"): {"--duration": ALL, "--fio-version": ALL},
    ("train", "--trace", "t.parquet", "--out", "m.onnx"): {
        "--legs": ALL + ("9",), "--train-fraction": ALL + ("1",), "--max-epochs": ALL,
        "--seed": NOT_ZERO + (INT_HUGE,), "--duration": ALL, "--lat-threshold-us": ALL,
        "--lat-threshold-rel": ALL + ("1",), "--tput-threshold": ALL + ("1",)},
    ("model", "bench", "m.onnx"): {"--batch": ALL, "--runs": ALL},
    ("replay", "--trace", "t.parquet"): {
        "--legs": ALL + ("1", "9"), "--train-fraction": ALL + ("1",), "--recompute-us": ALL,
        "--tick-us": ALL, "--staleness-us": NOT_ZERO, "--ttl-us": ALL,
        "--probe-after-us": NOT_ZERO, "--hedge-percentile": ALL + ("100", "150"),
        "--hedge-budget": NOT_ZERO + ("1.5",),
        "--speed": ALL, "--channels": ALL + (INT_HUGE,), "--gc-every-write-mb": ALL,
        "--bg-per-s": NOT_ZERO + ("1e9",), "--seed": NOT_ZERO + (INT_HUGE,),
        "--max-epochs": ALL, "--duration": ALL,
        # --task prefetch (offline/prefetch_replay.py); read_ahead_kb 0 turns readahead off
        "--cache-mb": ALL + ("0.001",), "--read-ahead-kb": NOT_ZERO + (INT_HUGE,),
        "--window-s": ALL},
    ("bench", "hook"): {"--runtime": ALL, "--repeat": ALL, "--depths": ALL,
                        "--hook-calls": ALL + (INT_HUGE,), "--timeout": ALL},
    ("bench", "agent"): {"--runtime": ALL, "--depths": ALL, "--seed": NOT_ZERO + (INT_HUGE,),
                         "--slow-ms": ALL, "--tick-ms": ALL, "--transfer-completion-us": ALL,
                         "--timeout": ALL},
    ("bench", "prefetch"): {"--runtime": ALL + ("1",), "--sweep": NOT_ZERO + (INT_HUGE,),
                            "--repeat": ALL + ("21",),
                            "--seed": NOT_ZERO + (INT_HUGE,), "--timeout": ALL},
    ("bench", "tick"): {"--legs": ALL + ("1", "9"), "--change-rate-hz": NOT_ZERO,
                        "--duration": ALL, "--seed": NOT_ZERO + (INT_HUGE,)},
    ("run",): {"--tick-ms": ALL, "--duration": ALL},
    ("vm", "test"): {"--timeout": ALL},
    ("vm", "run"): {"--timeout": ALL, "--cpus": ALL},
}
CASES = [(cmd, opt, bad) for cmd, opts in MATRIX.items() for opt, values in opts.items()
         for bad in values]


def _parse_error(argv: list[str], capsys) -> str:
    """The one error line of a usage error (asserts exit 2, no traceback)."""
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("usage: ")
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize("cmd,opt,bad", CASES, ids=[f"{' '.join(c[:2])} {o}={b}" for c, o, b in CASES])
def test_a_bad_number_is_a_usage_error_naming_the_option(cmd, opt, bad, capsys):
    # "--opt=VALUE": a negative value is not taken for an option
    argv = list(cmd[:2]) if cmd[0] in ("bench", "model", "trace", "vm") else [cmd[0]]
    argv += [f"{opt}={bad}", *cmd[len(argv):]]
    if cmd[:2] == ("vm", "run"):
        argv += ["--", "true"]
    line = _parse_error(argv, capsys)
    assert f"error: argument {opt}" in line, line


def test_every_numeric_option_has_a_shared_range_type():
    """No option is left with a bare type=int / type=float (no range)."""
    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from walk(child, f"{path} {name}")
            elif action.type in (int, float) and action.choices is None:
                yield f"{path} {action.option_strings}"
    assert list(walk(cli.build_parser(), "iobridge")) == []


def test_the_matrix_covers_every_numeric_option():
    """Each option with a range type appears in MATRIX for its command."""
    covered = {(" ".join(c[:2]) if c[0] in ("bench", "model", "trace", "vm") else c[0], o)
               for c, opts in MATRIX.items() for o in opts}
    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{path} {name}".strip())
            elif action.type in (int, float) or getattr(action.type, "range", None):
                if (path, action.option_strings[0]) not in covered:
                    missing.append((path, action.option_strings[0]))
    walk(cli.build_parser(), "")
    assert missing == []


def test_good_values_still_parse():
    p = cli.build_parser()
    a = p.parse_args(["replay", "--trace", "t", "--legs", "8", "--hedge-percentile", "99.9",
                      "--bg-per-s", "0", "--gc-every-write-mb", "1", "--channels", "1",
                      "--probe-after-us", "0", "--seed", "0", "--speed", "4"])
    assert (a.legs, a.hedge_percentile, a.bg_per_s, a.gc_every_write_mb, a.channels) == \
        (8, 99.9, 0.0, 1.0, 1)
    a = p.parse_args(["record", "--out", "t.parquet", "--ringbuf-pages", "4096"])
    assert a.ringbuf_pages == 4096
    a = p.parse_args(["train", "--trace", "t", "--out", "m.onnx", "--legs", "1",
                      "--lat-threshold-rel", "8", "--tput-threshold", "0.2"])
    assert (a.legs, a.lat_threshold_rel, a.tput_threshold) == (1, 8.0, 0.2)
    a = p.parse_args(["run", "--tick-ms", "0.1", "--duration", "60"])
    assert (a.tick_ms, a.duration) == (0.1, 60.0)


@pytest.mark.parametrize("make,text,message", [
    (cliutil.int_range(2, 8), "1", "must be a whole number from 2 to 8, got 1"),
    (cliutil.int_range(2, 8), "2.5", "must be a whole number from 2 to 8, got '2.5'"),
    (cliutil.positive_float(10), "nan", "must be a number more than 0 and at most 10, got nan"),
    (cliutil.nonneg_float(10), "-inf", "must be a number from 0 to 10, got -inf"),
    (cliutil.percentile, "100", "must be a number more than 0 and less than 100, got 100"),
    (cliutil.fraction, "0", "must be a number more than 0 and less than 1, got 0"),
    (cliutil.power_of_two(1, 64), "48", "must be a power of two from 1 to 64, got 48"),
    (cliutil.seed, "-1", "must be a whole number from 0 to 4294967295, got -1"),
])
def test_shared_types_name_the_range(make, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match="^" + message.replace("(", r"\(")
                       .replace(")", r"\)") + "$"):
        make(text)


def test_shared_types_accept_their_bounds():
    assert cliutil.int_range(2, 8)("2") == 2 and cliutil.int_range(2, 8)(" 8 ") == 8
    assert cliutil.nonneg_float(10)("0") == 0.0 and cliutil.positive_float(10)("10") == 10.0
    assert cliutil.percentile("99.99") == 99.99 and cliutil.seconds("1e9") == 1e9
    assert cliutil.power_of_two(1, 64)("1") == 1 and cliutil.power_of_two(1, 64)("64") == 64
    assert math.isclose(cliutil.fraction("0.999"), 0.999)


# ----------------------------------------------------- replay: the hang cases

@pytest.fixture(scope="module")
def small_trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("ranges") / "t.parquet"
    n = 200
    op = np.zeros(n)
    op[::4] = 1                                    # writes too: GC busy periods
    write_trace(path, Trace(_normalise_batch({"issue_ns": np.arange(n, dtype=np.int64) * 1_000_000,
                                              "bytes": np.full(n, 4096), "op": op}),
                            {"source": "small"}))
    return path


@pytest.mark.parametrize("argv", [
    ["--gc-every-write-mb", "0"], ["--gc-every-write-mb=-1"], ["--gc-every-write-mb", "1e-9"],
    ["--bg-per-s", "1e9"], ["--channels", "0"], ["--hedge-percentile", "150"],
    ["--max-epochs", "0"], ["--legs", "1"], ["--speed", "1e-9"]])
def test_replay_hang_cases_stop_at_once_with_a_usage_error(argv, small_trace, capsys):
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as exc:
        cli.main(["replay", "-q", "--trace", str(small_trace), *argv])
    assert exc.value.code == 2 and time.monotonic() - t0 < 5
    err = capsys.readouterr().err
    assert f"error: argument {argv[0].split('=')[0]}: " in err and "Traceback" not in err


def test_replay_refuses_more_background_busy_periods_than_it_can_simulate(tmp_path, capsys):
    """A legal --bg-per-s over a very long trace would still spin for hours."""
    path = tmp_path / "long.parquet"
    issue = np.array([0, 10**15], dtype=np.int64)            # 10^6 s apart
    write_trace(path, Trace(_normalise_batch({"issue_ns": issue, "bytes": np.full(2, 4096),
                                              "op": np.zeros(2)}), {"source": "long"}))
    t0 = time.monotonic()
    assert cli.main(["replay", "-q", "--trace", str(path), "--bg-per-s", "100"]) == 2
    assert time.monotonic() - t0 < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("iobridge: error: the replay spans") and "--bg-per-s" in err[0]


def test_replay_speed_that_would_wrap_the_issue_times_is_refused(tmp_path, capsys):
    """--speed 0.01 divides issue times by 0.01: near 2**62 ns that passes
    int64 and would wrap to negative times, not slow the trace down."""
    path = tmp_path / "late.parquet"
    issue = np.array([2**62, 2**62 + 10**9], dtype=np.int64)
    write_trace(path, Trace(_normalise_batch({"issue_ns": issue, "bytes": np.full(2, 4096),
                                              "op": np.zeros(2)}), {"source": "late"}))
    assert cli.main(["replay", "-q", "--trace", str(path), "--speed", "0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("iobridge: error: --speed 0.01: the trace's last "
                                               "issue time") and "int64" in err[0]


def test_replay_legs_api_check_matches_the_option():
    with pytest.raises(R.UsageError, match="2 to 8 legs"):
        R.run_replay(Trace(_normalise_batch({"issue_ns": np.zeros(1, dtype=np.int64),
                                             "bytes": np.full(1, 4096), "op": np.zeros(1)}), {}),
                     1, ["primary"])


def test_a_bad_number_from_the_shell_exits_2_without_traceback():
    r = subprocess.run([sys.executable, "-m", "iobridge.cli", "replay", "--trace", "t.parquet",
                        "--gc-every-write-mb", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "iobridge replay: error: argument --gc-every-write-mb: must be a number from 1 to "
        "1000000, got 0")
