"""Read routing through the iobridge module's writable tracepoint.

RoutePolicy compiles bpf/route_policy.bpf.c with BCC, attaches it to the
module's "iobridge_route" tracepoint as a BPF_PROG_TYPE_RAW_TRACEPOINT_WRITABLE
program, and publishes decisions by writing the BPF_F_MMAPABLE decision
array through mmap (no syscall per entry).  Detaching (or closing) restores
the module's default policy.

    with RoutePolicy() as policy:
        policy.attach()
        policy.set_leg(target_id, leg=1, admit=False, ttl_s=1.0)
        policy.set_leg(target_id, leg=0, admit=True, score=100, ttl_s=1.0)
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import time
from pathlib import Path

import numpy as np

from . import abi
from .errors import IobridgeError

log = logging.getLogger(__name__)

BPF_PROG_TYPE_RAW_TRACEPOINT_WRITABLE = 24  # BCC 0.26 has no constant
POLICY_SOURCE = abi.REPO_ROOT / "bpf" / "route_policy.bpf.c"
DECISION_MAP = "iobridge_decisions"
AGENT_MAP = "iobridge_agent"
STATS_MAP = "iobridge_route_stats"
AGE_MAP = "iobridge_decision_age"
ENTRY_FN = "iobridge_route"
DECISION_DTYPE = np.dtype(abi.Decision)


def now_ns() -> int:
    """The clock the module and the BPF program compare expiries with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def _import_bcc():
    try:
        import bcc  # noqa: PLC0415
    except ImportError as err:
        raise IobridgeError("BCC's Python bindings are not importable",
                            "install python3-bpfcc and use a venv with --system-site-packages") from err
    return bcc


class RoutePolicy:
    """The BPF routing policy: compile, attach, publish decisions, detach."""

    def __init__(self, source: Path = POLICY_SOURCE, extra_source: str = "",
                 check_module: bool = True):
        self.source = Path(source)
        self.extra_source = extra_source
        self.check_module = check_module
        self.bpf = None
        self._tp_fds: dict[str, int] = {}
        self._mm: mmap.mmap | None = None
        self._agent_mm: mmap.mmap | None = None
        self._table = None
        self.entries: np.ndarray | None = None     # numpy view of the table
        self.agent: abi.AgentState | None = None   # the heartbeat record

    # -- lifecycle ------------------------------------------------------
    def load(self) -> "RoutePolicy":
        """Check versions, compile the program and map the decision table."""
        if self.bpf is not None:
            return self
        abi.check_header_version()
        if self.check_module:
            abi.check_module_version()
        bcc = _import_bcc()
        try:
            text = self.source.read_text() + "\n" + self.extra_source
        except OSError as err:
            raise IobridgeError(f"cannot read BPF program {self.source}: {err.strerror}") from err
        try:
            self.bpf = bcc.BPF(text=text.encode(), cflags=[f"-I{abi.KMODULE_DIR}", f"-I{abi.BPF_DIR}",
                                                      "-Wno-unused-function"])
        except Exception as err:  # BCC raises plain Exception on compile errors
            raise IobridgeError(f"BPF routing program failed to compile: {err}") from err
        self._map_decisions()
        return self

    def _map_decisions(self) -> None:
        self._mm = map_array(self.bpf[DECISION_MAP.encode()], abi.Decision,
                             abi.DECISION_ENTRIES, "decision table")
        self._table = (abi.Decision * abi.DECISION_ENTRIES).from_buffer(self._mm)
        # The same memory as numpy columns, for whole-target writes per tick.
        self.entries = np.frombuffer(self._mm, dtype=DECISION_DTYPE,
                                     count=abi.DECISION_ENTRIES)
        self._agent_mm = map_array(self.bpf[AGENT_MAP.encode()], abi.AgentState, 1,
                                   "agent heartbeat")
        self.agent = abi.AgentState.from_buffer(self._agent_mm)

    def attach(self, fn_name: str | bytes = ENTRY_FN) -> None:
        """Attach program `fn_name` to the routing tracepoint."""
        self.load()
        if isinstance(fn_name, bytes):
            fn_name = fn_name.decode()
        if fn_name in self._tp_fds:
            return
        fn = self.bpf.load_func(fn_name.encode(), BPF_PROG_TYPE_RAW_TRACEPOINT_WRITABLE)
        bcc = _import_bcc()
        fd = bcc.libbcc.lib.bpf_attach_raw_tracepoint(fn.fd, abi.ROUTE_TRACEPOINT.encode())
        if fd < 0:
            raise IobridgeError(
                f"cannot attach {fn_name} to tracepoint {abi.ROUTE_TRACEPOINT}: "
                f"{os.strerror(-fd) if fd < -1 else 'refused'}",
                "is the iobridge module loaded?")
        self._tp_fds[fn_name] = fd
        log.info("routing program %s attached", fn_name)

    def detach(self, fn_name: str | bytes | None = None) -> None:
        """Detach one program (or all): the module default applies again."""
        if isinstance(fn_name, bytes):
            fn_name = fn_name.decode()
        names = [fn_name] if fn_name else list(self._tp_fds)
        for name in names:
            fd = self._tp_fds.pop(name, None)
            if fd is not None:
                os.close(fd)
                log.info("routing program %s detached", name)

    @property
    def attached(self) -> bool:
        return bool(self._tp_fds)

    def close(self) -> None:
        """Detach, unmap the table and free the BPF objects."""
        self.detach()
        self._table = None
        self.entries = None
        self.agent = None
        for mm in (self._mm, self._agent_mm):
            if mm is not None:
                mm.close()
        self._mm = self._agent_mm = None
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None

    def __enter__(self) -> "RoutePolicy":
        return self.load()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- decisions ------------------------------------------------------
    def _entries(self):
        if self._table is None:
            raise IobridgeError("routing policy is not loaded")
        return self._table

    def set_decision(self, target: int, leg: int, bucket: int, admit: bool,
                     score: int = 0, expires_ns: int | None = None,
                     ttl_s: float = 1.0) -> None:
        """Write one entry; expiry is absolute (expires_ns) or now + ttl_s."""
        entry = self._entries()[abi.decision_index(target, leg, bucket)]
        if expires_ns is None:
            expires_ns = now_ns() + int(ttl_s * 1e9)
        # Invalidate, write the payload, then publish the expiry last.
        entry.expires_ns = 0
        entry.score = int(score)
        entry.admit = abi.DECISION_ADMIT if admit else abi.DECISION_AVOID
        entry.expires_ns = int(expires_ns)

    def set_leg(self, target: int, leg: int, admit: bool, score: int = 0,
                ttl_s: float = 1.0, buckets=None) -> None:
        """Write the entries of one leg for every (or the given) size bucket."""
        expires = now_ns() + int(ttl_s * 1e9)
        for bucket in (range(abi.NUM_SIZE_BUCKETS) if buckets is None else buckets):
            self.set_decision(target, leg, bucket, admit, score, expires_ns=expires)

    def get_decision(self, target: int, leg: int, bucket: int) -> abi.Decision:
        entry = self._entries()[abi.decision_index(target, leg, bucket)]
        return abi.Decision.from_buffer_copy(entry)

    def clear(self, target: int | None = None) -> None:
        """Empty every entry (of one target, or all)."""
        table = self._entries()
        if target is None:
            ctypes.memset(ctypes.addressof(table), 0, ctypes.sizeof(table))
            return
        first = abi.decision_index(target, 0, 0)
        count = abi.MAX_LEGS * abi.NUM_SIZE_BUCKETS
        ctypes.memset(ctypes.addressof(table[first]), 0, count * ctypes.sizeof(abi.Decision))

    def publish(self, target: int, admit: np.ndarray, score: np.ndarray,
                expires_ns: int) -> None:
        """Write one target's whole table: admit/score [legs, buckets].

        Payload first, expiry last; the program may see a new admit with an
        old score (or the reverse) for an instant, which only changes a
        tie-break, never the validity of an entry."""
        legs = admit.shape[0]
        first = abi.decision_index(target, 0, 0)
        block = self.entries[first:first + legs * abi.NUM_SIZE_BUCKETS]
        block["score"] = score.reshape(-1)
        block["admit"] = admit.reshape(-1)
        block["expires_ns"] = expires_ns

    def extend(self, target: int, legs: int, expires_ns: int) -> None:
        """Keep one target's current entries valid until expires_ns."""
        first = abi.decision_index(target, 0, 0)
        self.entries["expires_ns"][first:first + legs * abi.NUM_SIZE_BUCKETS] = expires_ns

    def heartbeat(self, now: int, published_ns: int | None = None,
                  max_silence_ns: int | None = None) -> None:
        """Tell the program the agent is alive (and when the table was made)."""
        a = self.agent
        if max_silence_ns is not None:
            a.max_silence_ns = max_silence_ns
        if published_ns is not None:
            a.published_ns = published_ns
        a.ticks += 1
        a.heartbeat_ns = now

    def stats(self) -> dict[str, int]:
        """Program counters summed over CPUs: calls, routed, default, silent."""
        if self.bpf is None:
            return {"calls": 0, "routed": 0, "default": 0, "silent": 0}
        per_cpu = self.bpf[STATS_MAP.encode()][ctypes.c_int(0)]
        routed = sum(int(v.routed) for v in per_cpu)
        fallback = sum(int(v.fallback) for v in per_cpu)
        silent = sum(int(v.silent) for v in per_cpu)
        return {"calls": routed + fallback, "routed": routed, "default": fallback,
                "silent": silent}

    def decision_age_hist(self) -> np.ndarray:
        """Histogram (abi.LAT_* slots, ns) of the table's age at each routing it made."""
        table = self.bpf[AGE_MAP.encode()]
        out = np.zeros(abi.LAT_SLOTS, dtype=np.int64)
        for slot in range(abi.LAT_SLOTS):
            out[slot] = sum(int(v) for v in table[ctypes.c_int(slot)])
        return out

    def map_fds(self) -> dict[str, int]:
        """File descriptors of the maps worth pinning (name -> fd)."""
        return {name: self.bpf[name.encode()].map_fd
                for name in (DECISION_MAP, AGENT_MAP, STATS_MAP, AGE_MAP)}


def map_array(table, struct, entries: int, what: str) -> mmap.mmap:
    """mmap a BPF_F_MMAPABLE array of `entries` `struct`s (BCC has no helper)."""
    size = ctypes.sizeof(struct)
    if ctypes.sizeof(table.Leaf) != size:
        raise IobridgeError(
            f"ABI mismatch: the program's {what} entry is {ctypes.sizeof(table.Leaf)} "
            f"bytes, the agent's is {size}")
    length = entries * size  # array values are padded to 8 bytes; ours are multiples of 8
    length = (length + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
    try:
        return mmap.mmap(table.map_fd, length, mmap.MAP_SHARED,
                         mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as err:
        raise IobridgeError(f"cannot mmap the {what}: {err.strerror}",
                            "the map must be created with BPF_F_MMAPABLE") from err
