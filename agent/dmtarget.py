"""Helpers for the iobridge device-mapper target: table, status, messages.

Status line of the target (`dmsetup status NAME`, after "START LEN iobridge"):

    <target_id> <policy> <nr_legs> <health> <retries> <read_failures>
    <write_failures> <hook_rejected>
    then per leg: <dev> <reads> <writes> <read_errors> <write_errors>
                  <inflight> <hook_routed> <default_routed>

health has one character per leg: A healthy, F failed (no reads),
S failed and stale (missed a write; no I/O at all).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

from . import abi
from .errors import IobridgeError, UsageError

POLICIES = ("least_inflight", "round_robin", "primary")
LEG_FIELDS = ("reads", "writes", "read_errors", "write_errors", "inflight",
              "hook_routed", "default_routed")


@dataclasses.dataclass
class LegStatus:
    dev: str
    state: str
    reads: int
    writes: int
    read_errors: int
    write_errors: int
    inflight: int
    hook_routed: int
    default_routed: int

    @property
    def healthy(self) -> bool:
        return self.state == "A"


@dataclasses.dataclass
class TargetStatus:
    target_id: int
    policy: str
    health: str
    retries: int
    read_failures: int
    write_failures: int
    hook_rejected: int
    legs: list[LegStatus]


def _dmsetup(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(["dmsetup", *args], capture_output=True, text=True)
    except FileNotFoundError as err:
        raise IobridgeError("dmsetup not found", "install the dmsetup package") from err
    if check and proc.returncode != 0:
        raise IobridgeError(f"dmsetup {' '.join(args)} failed: "
                            f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def device_sectors(dev: str) -> int:
    """Size of a block device in 512-byte sectors."""
    fd = os.open(dev, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END) // 512
    finally:
        os.close(fd)


def table_line(legs: list[str], sectors: int | None = None, *,
               error_threshold: int | None = None, policy: str | None = None,
               strict_writes: bool = False) -> str:
    """The dm table line "0 SECTORS iobridge N DEV... [K OPTS...]"."""
    if not 2 <= len(legs) <= abi.MAX_LEGS:
        raise UsageError(f"an iobridge target needs 2 to {abi.MAX_LEGS} legs, got {len(legs)}")
    if sectors is None:
        sectors = min(device_sectors(d) for d in legs)
    opts: list[str] = []
    if error_threshold is not None:
        opts += ["error_threshold", str(error_threshold)]
    if policy is not None:
        if policy not in POLICIES:
            raise UsageError(f"unknown policy {policy!r}", f"one of {', '.join(POLICIES)}")
        opts += ["policy", policy]
    if strict_writes:
        opts.append("strict_writes")
    parts = ["0", str(sectors), abi.TARGET_TYPE, str(len(legs)), *legs]
    if opts:
        parts += [str(len(opts)), *opts]
    return " ".join(parts)


def create(name: str, legs: list[str], sectors: int | None = None, **opts) -> str:
    """Create target NAME over `legs`; returns /dev/mapper/NAME."""
    _dmsetup("create", name, "--table", table_line(legs, sectors, **opts))
    _dmsetup("mknodes", name, check=False)
    return f"/dev/mapper/{name}"


def create_raw(name: str, table: str) -> subprocess.CompletedProcess:
    """Try to create NAME with an arbitrary table line (no check)."""
    return _dmsetup("create", name, "--table", table, check=False)


def remove(name: str, retries: int = 5) -> None:
    """Remove NAME (retrying while udev still holds it)."""
    args = ["remove", "--retry", name] if retries else ["remove", name]
    _dmsetup(*args)


def exists(name: str) -> bool:
    return Path(f"/dev/mapper/{name}").exists() or \
        _dmsetup("info", name, check=False).returncode == 0


def message(name: str, *words: str, check: bool = True) -> str:
    """Send a target message; returns its output (e.g. of bench_hook)."""
    proc = _dmsetup("message", name, "0", *words, check=check)
    if not check and proc.returncode != 0:
        raise IobridgeError(f"message {' '.join(words)!r} to {name} refused: "
                            f"{proc.stderr.strip()}")
    return proc.stdout.strip()


def parse_status(line: str) -> TargetStatus:
    """Parse one `dmsetup status` line (with or without 'START LEN iobridge')."""
    words = line.split()
    if abi.TARGET_TYPE in words[:3]:
        words = words[words.index(abi.TARGET_TYPE) + 1:]
    try:
        tid, policy, nlegs, health = int(words[0]), words[1], int(words[2]), words[3]
        retries, rfail, wfail, rejected = (int(w) for w in words[4:8])
        legs = []
        rest = words[8:]
        per = 1 + len(LEG_FIELDS)
        for i in range(nlegs):
            chunk = rest[i * per:(i + 1) * per]
            legs.append(LegStatus(chunk[0], health[i], *(int(v) for v in chunk[1:])))
    except (IndexError, ValueError) as err:
        raise IobridgeError(f"cannot parse iobridge status line {line!r}") from err
    return TargetStatus(tid, policy, health, retries, rfail, wfail, rejected, legs)


def status(name: str) -> TargetStatus:
    return parse_status(_dmsetup("status", name).stdout.strip())


def table(name: str) -> str:
    return _dmsetup("table", name).stdout.strip()


def target_id(name: str) -> int:
    """The id the decision table is indexed with."""
    return status(name).target_id
