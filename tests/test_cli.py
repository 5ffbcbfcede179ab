"""Host test: the command line's shared conventions.

Every command's --help ends with an examples section of real command lines
(each one parses), every command that prints a report takes --json from the
one shared parent parser (iobridge.core.cliutil), and --version names the
release pyproject.toml declares.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tomllib

import pytest

import iobridge
from iobridge import cli
from iobridge.core import cliutil, resources

# Commands that print a report, with the arguments they require.
REPORT_COMMANDS = {
    "observe": [],
    "cachestat": [],
    "record": ["--out", "t.parquet"],
    "trace info": ["t.parquet"],
    "train": ["--trace", "t.parquet", "--out", "m.onnx"],
    "model check": ["m.onnx"],
    "model bench": ["m.onnx"],
    "replay": ["--trace", "t.parquet"],
    "bench hook": [],
    "bench agent": [],
    "bench prefetch": [],
    "bench tick": [],
    "status": [],
    "vm info": [],
}
SHELL_OPERATORS = {"&&", "||", "|", ";"}


def all_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """(command path, parser) for the top level and every (sub)command."""
    out = []

    def walk(path: str, parser: argparse.ArgumentParser) -> None:
        out.append((path, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(f"{path} {name}", child)

    walk("iobridge", cli.build_parser())
    return out


PARSERS = all_parsers()


def example_lines(parser: argparse.ArgumentParser) -> list[str]:
    """The command lines of the parser's examples epilog."""
    help_text = parser.format_help()
    assert "\nexamples:\n" in help_text
    section = help_text.split("\nexamples:\n", 1)[1]
    return [line.strip() for line in section.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_the_walk_sees_every_command():
    paths = {p for p, _ in PARSERS}
    for cmd in [*REPORT_COMMANDS, "run", "vm run", "vm test", "trace import", "trace export"]:
        assert f"iobridge {cmd}" in paths


@pytest.mark.parametrize("path,parser", PARSERS, ids=[p for p, _ in PARSERS])
def test_help_has_examples_that_parse(path, parser):
    lines = example_lines(parser)
    assert len(lines) >= 1, f"{path}: no example"
    assert any(path in line for line in lines), f"{path}: no example runs {path}"
    for line in lines:
        words = shlex.split(line, comments=True)
        for i, word in enumerate(words):     # the first command of a shell line
            if word in SHELL_OPERATORS:
                words = words[:i]
                break
        if words[:1] == ["sudo"]:
            words = words[1:]
        if words[:1] != ["iobridge"] or "--help" in words or "--version" in words \
                or "COMMAND" in words:
            continue        # another tool's command line (fio, systemctl, a script)
        try:
            cli.build_parser().parse_args(words[1:])
        except SystemExit:
            pytest.fail(f"{path}: example does not parse: {line}")


@pytest.mark.parametrize("cmd", REPORT_COMMANDS)
def test_report_commands_take_json(cmd):
    parser = cli.build_parser()
    args = [*cmd.split(), *REPORT_COMMANDS[cmd]]
    assert parser.parse_args([*args, "--json"]).json is True
    assert parser.parse_args(args).json is False


def test_json_is_defined_once():
    """Every --json in the tree is the shared parent's action."""
    shared = [a for a in cliutil.json_parent()._actions if "--json" in a.option_strings]
    assert len(shared) == 1
    found = []
    for path, parser in PARSERS:
        for action in parser._actions:
            if "--json" in action.option_strings:
                assert action is shared[0], f"{path} defines its own --json"
                found.append(path)
    assert len(found) == len(REPORT_COMMANDS), found


def test_version():
    proc = subprocess.run([sys.executable, "-m", "iobridge", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"iobridge {iobridge.__version__}"
    root = resources.checkout_root()
    if root is not None:
        declared = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
        assert declared == iobridge.__version__, "pyproject.toml and iobridge.__version__ differ"


def test_a_reader_that_goes_away_is_no_error():
    """`iobridge ... | head`: the pipe closes before the output is written.
    No traceback (and no "Exception ignored" at exit), exit 141 as for a
    writer killed by SIGPIPE."""
    proc = subprocess.Popen([sys.executable, "-m", "iobridge", "--version"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()         # before the interpreter has even started
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert err == ""


@pytest.mark.parametrize("stdout", ["/dev/full", "closed"])
@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["status", "--json"]])
def test_output_that_cannot_be_written_is_one_error_line(stdout, argv, tmp_path):
    """stdout on a full disk (/dev/full) or closed (`>&-`): exit 1 and one
    error line, no traceback (and no "Exception ignored" at exit)."""
    status = tmp_path / "status.json"
    status.write_text('{"pid": 1, "written_ns": 0, "tick_ms": 250, "max_silence_ms": 0}')
    argv = [*argv, "--status-file", str(status)] if argv[0] == "status" else argv
    out = open(stdout, "wb") if stdout != "closed" else None
    try:
        proc = subprocess.run([sys.executable, "-m", "iobridge", *argv], stdout=out,
                              stderr=subprocess.PIPE, text=True, timeout=60,
                              **({} if out else {"pass_fds": ()}),
                              preexec_fn=None if out else (lambda: os.close(1)))
    finally:
        if out:
            out.close()
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "iobridge: error: cannot write the output to standard output: "
        + ("No space left on device" if out else "it is closed")]


@pytest.mark.parametrize("argv", [
    ["replay", "--trace", "t.parquet", "--plot", ""],
    ["bench", "tick", "--output", ""],
])
def test_an_empty_output_file_name_is_a_usage_error(argv, capsys):
    """`--plot ""` is a name the user gave, not "no plot": refused before the work."""
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "iobridge: error: the output file name is empty (give a file name to write)"]


def test_examples_epilog_keeps_its_lines():
    p = argparse.ArgumentParser(prog="x", description="word " * 40,
                                **cliutil.examples(("x --a", "one"), ("x --b 2", "two")))
    text = p.format_help()
    assert "    x --a    # one\n    x --b 2  # two" in text
    # the description is still wrapped
    assert max(len(line) for line in text.split("examples:")[0].splitlines()) < 100
    long = cliutil.examples(("x " + "y" * 80, "long"))["epilog"]
    assert long == "examples:\n    # long\n    x " + "y" * 80
