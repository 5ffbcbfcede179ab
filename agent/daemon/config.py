"""The agent's configuration: a TOML file, validated whole before use.

    [agent]
    tick_ms = 250.0            # period of the heartbeat and of sampling leg state
    ttl_ticks = 12             # a published entry expires after this many ticks
                               # without the agent (3 s at the defaults)
    max_silence_ms = 2000      # the routing program ignores the table when the
                               # heartbeat is older than this (0 = never)
    recompute_ms = 1000        # the keyed table is recomputed at most this often,
                               # and only when a leg's baseline or the model changed
    shadow = false             # compute and log decisions, publish nothing (the
                               # module default decides); a reload switches it
    discover_interval_s = 10.0 # a full target listing (ioctls) this often; dm
                               # uevents trigger one at once in between
    status_file = "/run/iobridge/status.json"
    pin_dir = "/sys/fs/bpf/iobridge"
    log_level = "info"         # debug logs every decision change with its reason
    metrics_listen = ""        # Prometheus metrics on ADDR:PORT (e.g. "127.0.0.1:9464",
                               # IPv6 as "[::1]:9464"); "" = off (the default)

    [admission]
    model = "models/admission-default.onnx"  # relative paths: to the config file
    threshold = 0.08           # optional: overrides the model card's threshold
    probe_after_ms = 200       # an idle leg (nothing in flight, no completion for
                               # this long) gets one read, decided by the kernel
    targets = []               # dm names to manage; empty = every iobridge target
    hedging = "off"            # on: publish hedge deadlines learned from each leg's
                               # recent fast reads and the model's P(slow) (the target
                               # hedges a read past its deadline); off: none (restart only)

    [prefetch]
    mode = "off"               # off | shadow (decide and log, change nothing) | on:
                               # the prefetch unit (daemon/prefetch.py) sets devices'
                               # read_ahead_kb and advises open files
    window_s = 1.0             # its observe/decide/act period
    state_file = "/run/iobridge/prefetch-state.json"  # the original settings it
                               # changed, restored on stop or at the next start
    model = "models/prefetch-default.onnx"  # the classifier: an ONNX prefetch model
                               # (relative paths: to the config file), or "rules" for
                               # the rule-based stand-in for KML's MLP (RuleClassifier)
    device_only = false        # true: KML-like, per device only: the device's class
                               # (from its own window) sets its read_ahead_kb; no
                               # feedback, per-file advice, WILLNEED or drop-behind
                               # (iobridge bench prefetch's policy (c))

Every key is optional. An unknown section or key, a wrong type or a value
out of range is an error that names the key (ConfigError); nothing is
applied from a file with an error, so a bad reload leaves the running
configuration in force.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from ..core import resources
from ..core.clock import TICK_MS_MAX, TICK_MS_MIN
from ..core.decision import AGENT_PROBE_AFTER_MS, AGENT_RECOMPUTE_MS, AGENT_TICK_MS
from ..core.errors import IobridgeError
from ..core.infiles import read_input
from . import metrics

DEFAULT_MODEL = resources.data_dir("models") / "admission-default.onnx"
DEFAULT_PREFETCH_MODEL = resources.data_dir("models") / "prefetch-default.onnx"
# prefetch.model's value for the rule-based classifier instead of a model
PREFETCH_RULES = "rules"
LOG_LEVELS = ("debug", "info", "warning", "error")
PREFETCH_MODES = ("off", "shadow", "on")
HEDGING_MODES = ("off", "on")


class ConfigError(IobridgeError):
    """A configuration file or value that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Config:
    tick_ms: float = AGENT_TICK_MS
    ttl_ticks: int = 12
    max_silence_ms: float = 2000.0
    recompute_ms: float = AGENT_RECOMPUTE_MS
    shadow: bool = False
    discover_interval_s: float = 10.0
    status_file: Path = Path("/run/iobridge/status.json")
    pin_dir: Path = Path("/sys/fs/bpf/iobridge")
    log_level: str = "info"
    metrics_listen: str = ""
    model: Path = DEFAULT_MODEL
    threshold: float | None = None
    probe_after_ms: float | None = AGENT_PROBE_AFTER_MS
    targets: tuple[str, ...] = ()
    hedging: str = "off"
    prefetch_mode: str = "off"
    prefetch_window_s: float = 1.0
    prefetch_state_file: Path = Path("/run/iobridge/prefetch-state.json")
    prefetch_model: Path | str = DEFAULT_PREFETCH_MODEL   # or PREFETCH_RULES
    prefetch_device_only: bool = False
    source: Path | None = None      # the file it came from, for messages

    @property
    def tick_ns(self) -> int:
        return int(self.tick_ms * 1e6)

    @property
    def ttl_ns(self) -> int:
        return self.ttl_ticks * self.tick_ns

    @property
    def max_silence_ns(self) -> int:
        return int(self.max_silence_ms * 1e6)

    @property
    def recompute_ns(self) -> int:
        return int(self.recompute_ms * 1e6)

    @property
    def prefetch_rules(self) -> bool:
        """prefetch.model selects the rule-based classifier, not a model."""
        return is_rules(self.prefetch_model)

    @property
    def probe_after_ns(self) -> int:
        """0 = no probing (the kernel's convention)."""
        return 0 if self.probe_after_ms is None else int(self.probe_after_ms * 1e6)

    def replace(self, **changes) -> "Config":
        """A copy with `changes` applied and validated (for CLI overrides)."""
        new = dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})
        validate(new, "command line")
        return new


def is_rules(v) -> bool:
    return isinstance(v, str) and v == PREFETCH_RULES


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _listen(v) -> bool:
    if v == "":
        return True
    try:
        metrics.parse_listen(v)
    except ValueError:
        return False
    return True


# key -> (section, check, what it must be); check(value) -> bool
_KEYS = {
    "tick_ms": ("agent", lambda v: _number(v) and TICK_MS_MIN <= v <= TICK_MS_MAX,
                f"a number of ms from {TICK_MS_MIN:g} to {TICK_MS_MAX:g}"),
    "ttl_ticks": ("agent", lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1000,
                  "an integer from 1 to 1000"),
    "max_silence_ms": ("agent", lambda v: _number(v) and 0 <= v <= 60_000, "a number of ms from 0 to 60000"),
    "recompute_ms": ("agent", lambda v: _number(v) and 1 <= v <= 60_000, "a number of ms from 1 to 60000"),
    "shadow": ("agent", lambda v: isinstance(v, bool), "true or false"),
    "discover_interval_s": ("agent", lambda v: _number(v) and 0.05 <= v <= 3600,
                            "a number of seconds from 0.05 to 3600"),
    "status_file": ("agent", lambda v: isinstance(v, (str, Path)) and str(v) != "", "a path"),
    "pin_dir": ("agent", lambda v: isinstance(v, (str, Path)) and str(v).startswith("/sys/fs/bpf/"),
                "a directory under /sys/fs/bpf/"),
    "log_level": ("agent", lambda v: v in LOG_LEVELS, f"one of {', '.join(LOG_LEVELS)}"),
    "metrics_listen": ("agent", _listen, '"" (off) or ADDR:PORT with an IP address or localhost, '
                       f'e.g. "{metrics.EXAMPLE}" (IPv6 in brackets: "[::1]:9464")'),
    "model": ("admission", lambda v: isinstance(v, (str, Path)) and str(v).endswith(".onnx"),
              "the path of an .onnx file"),
    "threshold": ("admission", lambda v: v is None or (_number(v) and 0 < v < 1), "a number in (0, 1)"),
    "probe_after_ms": ("admission", lambda v: v is None or (_number(v) and 1 <= v <= 600_000),
                       "a number of ms from 1 to 600000"),
    "targets": ("admission", lambda v: isinstance(v, (list, tuple)) and all(isinstance(t, str) and t for t in v),
                "a list of device-mapper names"),
    "hedging": ("admission", lambda v: v in HEDGING_MODES, f"one of {', '.join(HEDGING_MODES)}"),
    "prefetch_mode": ("prefetch", lambda v: v in PREFETCH_MODES,
                      f"one of {', '.join(PREFETCH_MODES)}"),
    "prefetch_window_s": ("prefetch", lambda v: _number(v) and 0.05 <= v <= 3600,
                          "a number of seconds from 0.05 to 3600"),
    "prefetch_state_file": ("prefetch", lambda v: isinstance(v, (str, Path)) and str(v) != "",
                            "a path"),
    "prefetch_model": ("prefetch", lambda v: is_rules(v) or (isinstance(v, (str, Path))
                                                             and str(v).endswith(".onnx")),
                       f'the path of an .onnx prefetch model or "{PREFETCH_RULES}" (the '
                       "rule-based classifier)"),
    "prefetch_device_only": ("prefetch", lambda v: isinstance(v, bool), "true or false"),
}
SECTIONS = ("agent", "admission", "prefetch")
# Keys of [prefetch] are named without the prefix in the file (mode, not prefetch_mode).
_PREFIXED = ("prefetch",)


def _file_key(attr: str) -> str:
    """The key's name as written in the file ("prefetch_mode" -> "mode")."""
    section = _KEYS[attr][0]
    return attr[len(section) + 1:] if section in _PREFIXED else attr


def _attr(section: str, key: str) -> str:
    return f"{section}_{key}" if section in _PREFIXED else key


def validate(cfg: Config, where: str) -> None:
    for key, (section, check, what) in _KEYS.items():
        value = getattr(cfg, key)
        if not check(value):
            shown = str(value) if isinstance(value, Path) else value   # as written, not PosixPath(...)
            raise ConfigError(f"{where}: {section}.{_file_key(key)} = {shown!r} is invalid: "
                              f"it must be {what}")
    if not cfg.shadow and not Path(cfg.model).is_file():
        raise ConfigError(f"{where}: admission.model = {str(cfg.model)!r}: no such file")
    # Only a prefetch unit that runs needs its model.
    if cfg.prefetch_mode != "off" and not cfg.prefetch_rules and \
            not Path(cfg.prefetch_model).is_file():
        raise ConfigError(f"{where}: prefetch.model = {str(cfg.prefetch_model)!r}: no such file",
                          f'give an .onnx prefetch model, or "{PREFETCH_RULES}" for the '
                          "rule-based classifier")


def load(path: Path | str | None) -> Config:
    """Read and validate a config file (None: the defaults)."""
    if path is None:
        cfg = Config()
        validate(cfg, "defaults")
        return cfg
    path = Path(path)
    try:
        data = tomllib.loads(read_input(path).decode())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist",
                          "pass --config FILE, or run without it for the defaults") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    values: dict = {}
    for section, body in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section [{section}]", f"sections: {', '.join(SECTIONS)}")
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: {section} must be a table ([{section}])")
        for key, value in body.items():
            attr = _attr(section, key)
            if attr not in _KEYS or _KEYS[attr][0] != section:
                known = [_file_key(k) for k, (s, *_) in _KEYS.items() if s == section]
                raise ConfigError(f"{path}: unknown key {section}.{key}", f"keys of [{section}]: {', '.join(known)}")
            values[attr] = value
    # Check types before building paths from the values.
    for key, value in values.items():
        section, check, what = _KEYS[key]
        if not check(value):
            raise ConfigError(f"{path}: {section}.{_file_key(key)} = {value!r} is invalid: "
                              f"it must be {what}")
    for key in ("status_file", "pin_dir", "prefetch_state_file"):
        if key in values:
            values[key] = Path(values[key])
    for key in ("model", "prefetch_model"):
        if key in values and not is_rules(values[key]):
            model = Path(values[key])
            values[key] = model if model.is_absolute() else (path.parent / model).resolve()
    if "targets" in values:
        values["targets"] = tuple(values["targets"])
    cfg = Config(**values, source=path)
    validate(cfg, str(path))
    return cfg
