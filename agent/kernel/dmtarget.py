"""Helpers for the iobridge device-mapper target: table, status, messages.

Status line of the target (`dmsetup status NAME`, after "START LEN iobridge"):

    <target_id> <incarnation> <policy> <nr_legs> <health> <retries>
    <read_failures> <write_failures> <hook_rejected>
    then per leg: <dev> <reads> <writes> <read_errors> <write_errors>
                  <inflight> <hook_routed> <default_routed>
    then: hedge <hedge_us> <hedge_budget> <issued> <won> <lost> <refused>
                <active> <bounce_pages> <nomem>

A leg's reads count every read sent to it (hedges and retries too);
hook_routed + default_routed are the callers' reads. The hedge fields
(target 1.2, ABI 7): the target's own deadline (0 = the routing program's
only) and budget (percent of reads; since target 1.3 to 4 decimals, "0.15",
whole before), hedges issued, won (the hedge completed
the read), lost (the first read did), refused (no token in the budget),
hedged reads alive and the bounce pages they hold (both 0 when idle), and
nomem: no bounce memory without waiting (a read that went to its leg
unhedged, or a hedge due that was not sent).

health has one character per leg: A healthy, F failed (no reads),
S failed and stale (missed a write; no I/O at all). incarnation names the
device holding target_id (decision entries are valid for it only).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
from pathlib import Path
from typing import NamedTuple

from ..core import abi
from ..core.errors import IobridgeError, UsageError
from . import dmioctl

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


HEDGE_FIELDS = ("hedge_us", "budget_pct", "issued", "won", "lost", "refused", "active",
                "bounce_pages", "nomem")


@dataclasses.dataclass
class HedgeStatus:
    hedge_us: int        # the target's own deadline, 0 = the routing program's only
    budget_pct: float    # extra reads allowed, percent of reads routed
    issued: int
    won: int
    lost: int
    refused: int
    active: int          # hedged reads alive
    bounce_pages: int    # bounce pages they hold
    nomem: int           # hedging given up for lack of bounce memory (read unhedged)


@dataclasses.dataclass
class TargetStatus:
    target_id: int
    incarnation: int     # the device holding target_id (decision entries name it)
    policy: str
    health: str
    retries: int
    read_failures: int
    write_failures: int
    hook_rejected: int
    legs: list[LegStatus]
    hedge: HedgeStatus | None = None     # None: a module without hedged reads


DMSETUP_TIMEOUT_S = 60


def dmsetup(*args: str, check: bool = True,
            timeout_s: float = DMSETUP_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run dmsetup: the one wrapper (a clear error when it is missing, fails
    or hangs; a suspended device can make it wait forever otherwise)."""
    try:
        proc = subprocess.run(["dmsetup", *args], capture_output=True, text=True,
                              timeout=timeout_s)
    except FileNotFoundError as err:
        raise IobridgeError("dmsetup not found", "install the dmsetup package") from err
    except subprocess.TimeoutExpired as err:
        raise IobridgeError(f"dmsetup {' '.join(args)} did not answer within "
                            f"{timeout_s:.0f} s") from err
    if check and proc.returncode != 0:
        raise IobridgeError(f"dmsetup {' '.join(args)} failed: "
                            f"{proc.stderr.strip() or proc.stdout.strip() or f'exit status {proc.returncode}'}")
    return proc


def module_version() -> int | None:
    """The loaded module's layout version, or None if it is not loaded."""
    path = Path(f"/sys/module/{abi.MODULE_NAME}/parameters/abi_version")
    try:
        return int(path.read_text().strip())
    except FileNotFoundError:
        return None


def check_module_version() -> None:
    """Refuse a loaded module whose layout version differs from the agent's."""
    found = module_version()
    if found is None:
        raise IobridgeError(f"kernel module {abi.MODULE_NAME} is not loaded",
                            "build it with 'make -C kmodule RELEASES=$(uname -r)' and insmod "
                            "kmodule/build/$(uname -r)/dm-iobridge.ko")
    if found != abi.ABI_VERSION:
        raise IobridgeError(
            f"ABI mismatch: module {abi.MODULE_NAME} has layout version {found}, "
            f"the agent expects {abi.ABI_VERSION}",
            "load the module built from the same iobridge release as the agent")


def device_sectors(dev: str) -> int:
    """Size of a block device in 512-byte sectors."""
    fd = os.open(dev, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END) // 512
    finally:
        os.close(fd)


# A hedge budget as the target takes and prints it: a percent of reads, 0
# to 100, to at most HEDGE_BUDGET_DECIMALS decimals.
_BUDGET_RE = re.compile(r"\d+(\.\d{1,%d})?" % abi.HEDGE_BUDGET_DECIMALS)


def budget_arg(percent: float | int | str) -> str:
    """A hedge budget (percent of reads) as the target's table line and
    message take it ("5", "0.15"); a UsageError for one it would refuse."""
    scale = 10 ** abi.HEDGE_BUDGET_DECIMALS
    try:
        value = float(percent)
    except (TypeError, ValueError):
        value = math.nan
    millionths = round(value * scale) if math.isfinite(value) else -1
    if not (0 <= millionths <= 100 * scale and abs(millionths - value * scale) < 1e-6 * scale):
        raise UsageError(f"hedge budget {percent!r}: must be a percent of reads from 0 to 100 "
                         f"with at most {abi.HEDGE_BUDGET_DECIMALS} decimals (0 = never hedge)")
    whole, frac = divmod(millionths, scale)
    return f"{whole}.{frac:0{abi.HEDGE_BUDGET_DECIMALS}d}".rstrip("0") if frac else str(whole)


def table_line(legs: list[str], sectors: int | None = None, *,
               error_threshold: int | None = None, policy: str | None = None,
               strict_writes: bool = False, hedge_us: int | None = None,
               hedge_budget: float | int | None = None) -> str:
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
    if hedge_us is not None:
        opts += ["hedge_us", str(hedge_us)]
    if hedge_budget is not None:
        opts += ["hedge_budget", budget_arg(hedge_budget)]
    parts = ["0", str(sectors), abi.TARGET_TYPE, str(len(legs)), *legs]
    if opts:
        parts += [str(len(opts)), *opts]
    return " ".join(parts)


def create(name: str, legs: list[str], sectors: int | None = None, **opts) -> str:
    """Create target NAME over `legs`; returns /dev/mapper/NAME."""
    dmsetup("create", name, "--table", table_line(legs, sectors, **opts))
    dmsetup("mknodes", name, check=False)
    return f"/dev/mapper/{name}"


def create_raw(name: str, table: str) -> subprocess.CompletedProcess:
    """Try to create NAME with an arbitrary table line (no check)."""
    return dmsetup("create", name, "--table", table, check=False)


def remove(name: str) -> None:
    """Remove NAME (dmsetup retries while udev still holds it)."""
    dmsetup("remove", "--retry", name)


def exists(name: str) -> bool:
    return Path(f"/dev/mapper/{name}").exists() or \
        dmsetup("info", name, check=False).returncode == 0


def message(name: str, *words: str, check: bool = True) -> str:
    """Send a target message; returns its output (e.g. of bench_hook)."""
    proc = dmsetup("message", name, "0", *words, check=check)
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
        tid, incarnation, policy = int(words[0]), int(words[1]), words[2]
        nlegs, health = int(words[3]), words[4]
        retries, rfail, wfail, rejected = (int(w) for w in words[5:9])
        legs = []
        rest = words[9:]
        per = 1 + len(LEG_FIELDS)
        for i in range(nlegs):
            chunk = rest[i * per:(i + 1) * per]
            legs.append(LegStatus(chunk[0], health[i], *(int(v) for v in chunk[1:])))
        tail = rest[nlegs * per:]
        hedge = None
        if tail:
            if tail[0] != "hedge" or len(tail) != 1 + len(HEDGE_FIELDS):
                raise ValueError("unexpected fields after the legs")
            if not _BUDGET_RE.fullmatch(tail[2]):
                raise ValueError(f"hedge budget {tail[2]!r}")
            hedge = HedgeStatus(int(tail[1]), float(tail[2]), *(int(v) for v in tail[3:]))
    except (IndexError, ValueError) as err:
        raise IobridgeError(f"cannot parse iobridge status line {line!r}") from err
    return TargetStatus(tid, incarnation, policy, health, retries, rfail, wfail, rejected, legs,
                        hedge)


def iobridge_line(lines: list[dmioctl.TargetLine]) -> dmioctl.TargetLine | None:
    """A device's one iobridge table line, or None (iobridge creates
    single-line devices; anything else is not a target it manages)."""
    return lines[0] if len(lines) == 1 and lines[0].target_type == abi.TARGET_TYPE else None


def _one_line(name: str, lines: list[dmioctl.TargetLine], what: str) -> str:
    line = iobridge_line(lines)
    if line is None:
        found = ", ".join(line.target_type for line in lines) or "no table"
        raise IobridgeError(f"{name} is not an iobridge target ({what}: {found})")
    return f"{line.start} {line.length} {line.target_type} {line.params}"


def status(name: str) -> TargetStatus:
    """The target's status (as `dmsetup status NAME`, by ioctl: no process)."""
    return parse_status(_one_line(name, dmioctl.status(name), "status"))


def table(name: str) -> str:
    """The target's table line (as `dmsetup table NAME`)."""
    return _one_line(name, dmioctl.status(name, table=True), "table")


class TargetRef(NamedTuple):
    """What decision entries are written for: the id that indexes them and
    the incarnation (the device holding that id now) they are valid for."""
    id: int
    incarnation: int


def target_ref(name: str) -> TargetRef:
    """The id and incarnation that NAME's decision entries are written for."""
    st = status(name)
    return TargetRef(st.target_id, st.incarnation)
