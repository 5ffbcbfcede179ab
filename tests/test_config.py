"""The agent's TOML config: defaults, overrides, and errors that name the key."""

from __future__ import annotations

import os

import pytest

from iobridge.daemon import config
from iobridge.daemon.config import ConfigError


def write(tmp_path, text):
    p = tmp_path / "iobridge.toml"
    p.write_text(text)
    return p


def test_defaults_are_valid_and_use_the_shipped_model():
    cfg = config.load(None)
    assert cfg.model == config.DEFAULT_MODEL and cfg.model.is_file()
    assert cfg.tick_ns == 250_000_000 and cfg.ttl_ns == 3_000_000_000
    assert cfg.max_silence_ns == 2_000_000_000 and cfg.probe_after_ns == 200_000_000
    assert cfg.recompute_ns == 1_000_000_000
    assert cfg.hedging == "off"           # the VM comparisons run without hedging


def test_file_values_and_relative_model_path(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"x")
    cfg = config.load(write(tmp_path, '[agent]\ntick_ms = 2\nttl_ticks = 3\nshadow = true\n'
                                      '[admission]\nmodel = "m.onnx"\ntargets = ["a", "b"]\n'
                                      'hedging = "on"\n'))
    assert cfg.tick_ns == 2_000_000 and cfg.ttl_ns == 6_000_000 and cfg.shadow
    assert cfg.model == (tmp_path / "m.onnx").resolve()
    assert cfg.targets == ("a", "b") and cfg.hedging == "on"
    assert cfg.source == tmp_path / "iobridge.toml"


@pytest.mark.parametrize("text, match", [
    ("[agent]\ntick_ms = 0\n", r"agent\.tick_ms = 0 is invalid"),
    ("[agent]\ntick_ms = \"fast\"\n", r"agent\.tick_ms = 'fast' is invalid"),
    ("[agent]\nttl_ticks = 2.5\n", r"agent\.ttl_ticks = 2\.5 is invalid: it must be an integer"),
    ("[agent]\nshadow = 1\n", r"agent\.shadow = 1 is invalid: it must be true or false"),
    ("[agent]\nlog_level = \"loud\"\n", r"agent\.log_level = 'loud'"),
    ("[agent]\npin_dir = \"/tmp/pins\"\n", r"agent\.pin_dir .* under /sys/fs/bpf/"),
    ("[agent]\ntick = 1\n", r"unknown key agent\.tick\b"),
    ("[admission]\ntick_ms = 1\n", r"unknown key admission\.tick_ms"),
    ("[agnet]\ntick_ms = 1\n", r"unknown section \[agnet\]"),
    ("[admission]\nthreshold = 1.5\n", r"admission\.threshold = 1\.5 is invalid"),
    ("[admission]\nmodel = \"nothere.onnx\"\n", r"admission\.model = .*nothere\.onnx.*: no such file"),
    ("[admission]\nmodel = \"model.pt\"\n", r"admission\.model = 'model\.pt' is invalid"),
    ("[admission]\ntargets = \"mirror\"\n", r"admission\.targets = 'mirror' is invalid: it must be a list"),
    ("[admission]\nhedging = \"always\"\n",
     r"admission\.hedging = 'always' is invalid: it must be one of off, on"),
    ("[admission]\nhedging = true\n", r"admission\.hedging = True is invalid: it must be one of off, on"),
    ("[agent]\nhedging = \"on\"\n", r"unknown key agent\.hedging"),
    ("[agent\ntick_ms = 1\n", r"not valid TOML"),
    ("agent = 3\n", r"agent must be a table"),
    ("a = " + "[" * 100_000 + "]" * 100_000 + "\n", r"not valid TOML: maximum recursion depth"),
])
def test_bad_values_name_the_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        config.load(write(tmp_path, text))


def test_a_config_path_that_is_no_regular_file_is_refused_at_once(tmp_path):
    """A FIFO would block the read until a writer comes."""
    fifo = tmp_path / "iobridge.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file: a FIFO"):
        config.load(fifo)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml")


def test_command_line_overrides_are_validated():
    cfg = config.load(None)
    assert cfg.replace(tick_ms=0.5, model=None).tick_ms == 0.5
    with pytest.raises(ConfigError, match=r"command line: agent\.tick_ms = -1"):
        cfg.replace(tick_ms=-1)
    assert cfg.replace(hedging="on").hedging == "on"
    with pytest.raises(ConfigError, match=r"command line: admission\.hedging = 'yes' is invalid"):
        cfg.replace(hedging="yes")
