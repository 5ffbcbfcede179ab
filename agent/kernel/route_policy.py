"""Read routing through the iobridge module's writable tracepoint.

RoutePolicy compiles bpf/route_policy.bpf.c (through kernel/bpf.py), attaches
it to the module's "iobridge_route" tracepoint as a
BPF_PROG_TYPE_RAW_TRACEPOINT_WRITABLE program, and publishes the
feature-keyed decision table by writing the BPF_F_MMAPABLE array through
mmap (no syscall per entry). Detaching (or closing) restores the module's
default policy. The rule the program applies per read is in
kmodule/iobridge_abi.h and core/decision.py (route()).

    with RoutePolicy() as policy:
        policy.attach()
        target = dmtarget.target_ref("mirror")
        policy.set_leg(target, 0, penalty_ns=0, ttl_s=1.0)
        policy.set_leg(target, 1, penalty_ns=10_000_000, ttl_s=1.0)   # avoid leg 1
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os

import numpy as np

from ..core import abi
from ..core.clock import now_ns
from ..core.errors import IobridgeError
from . import bpf, dmtarget, system

log = logging.getLogger(__name__)

BPF_PROG_TYPE_RAW_TRACEPOINT_WRITABLE = 24  # BCC 0.26 has no constant
PROGRAM = "route_policy"
DECISION_MAP = "iobridge_decisions"
AGENT_MAP = "iobridge_agent"
STATS_MAP = "iobridge_route_stats"
AGE_MAP = "iobridge_decision_age"
ENTRY_FN = "iobridge_route"
DECISION_DTYPE = np.dtype(abi.LegDecisions)
# Default service estimate for entries written by hand (set_leg).
DEFAULT_SERVICE_NS = 100_000


class RoutePolicy:
    """The BPF routing policy: compile, attach, publish decisions, detach."""

    def __init__(self, extra_source: str = "", check_module: bool = True):
        self.extra_source = extra_source
        self.check_module = check_module
        self.bpf = None
        self._tp_fds: dict[str, int] = {}
        self._mm: mmap.mmap | None = None
        self._agent_mm: mmap.mmap | None = None
        self.entries: np.ndarray | None = None     # numpy view of the table
        self.agent: abi.AgentState | None = None   # the heartbeat record

    # -- lifecycle ------------------------------------------------------
    def load(self) -> "RoutePolicy":
        """Check versions, compile the program and map the decision table."""
        if self.bpf is not None:
            return self
        if self.check_module:
            dmtarget.check_module_version()
        self.bpf, _ = bpf.compile_program(PROGRAM, "the BPF routing program",
                                          extra_source=self.extra_source)
        self._map_decisions()
        return self

    def _map_decisions(self) -> None:
        self._mm = map_array(self.bpf[DECISION_MAP.encode()], abi.LegDecisions,
                             abi.DECISION_ENTRIES, "decision table")
        self.entries = np.frombuffer(self._mm, dtype=DECISION_DTYPE, count=abi.DECISION_ENTRIES)
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
        bcc = system.import_bcc()
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
    def _block(self, target: int, legs: int = abi.MAX_LEGS) -> np.ndarray:
        if self.entries is None:
            raise IobridgeError("routing policy is not loaded")
        first = abi.leg_index(target, 0)
        return self.entries[first:first + legs]

    def publish(self, target: dmtarget.TargetRef, penalty_ns: np.ndarray,
                lat_edges_ns: np.ndarray, service_ns: np.ndarray, probe_after_ns: int,
                expires_ns: int, top_lat_ns: np.ndarray | None = None,
                hedge_us: np.ndarray | None = None, in_range: bool = False) -> None:
        """Write one target's table: penalty_ns [legs, KEYS_PER_LEG], lat_edges_ns
        [legs, NUM_LAT_BUCKETS - 1], service_ns [legs], top_lat_ns [legs]
        (None: 0, the top bucket's penalties as they are), hedge_us [legs,
        KEYS_PER_LEG] (None: 0, never hedge), valid for the device of
        target.incarnation only. Values outside a field's range are clipped,
        unless `in_range` says they are all within (a TableMaker's table
        is): written as they are, without six clips' cost.

        Payload first, expiry last; the program may see a mix of the old and
        the new payload for an instant, which changes one read's choice at
        most, never the validity of an entry."""
        RoutePolicy._write(self._block(target.id, penalty_ns.shape[0]), target.incarnation,
                          penalty_ns,
                          lat_edges_ns, service_ns, probe_after_ns, expires_ns,
                          0 if top_lat_ns is None else top_lat_ns,
                          0 if hedge_us is None else hedge_us, clip=not in_range)

    def set_leg(self, target: dmtarget.TargetRef, leg: int, penalty_ns=0, ttl_s: float = 1.0,
                service_ns: int = DEFAULT_SERVICE_NS, lat_edges_ns=None,
                probe_after_ns: int = 0, hedge_us=0) -> None:
        """Write one leg's entry by hand (tests, benchmarks): `penalty_ns` and
        `hedge_us` a number for every key or an array of KEYS_PER_LEG."""
        pen = np.broadcast_to(np.asarray(penalty_ns, dtype=np.int64), (abi.KEYS_PER_LEG,))
        edges = (np.full(abi.NUM_LAT_BUCKETS - 1, 0xFFFFFFFF) if lat_edges_ns is None
                 else np.asarray(lat_edges_ns))
        entry = self._block(target.id)[leg:leg + 1]
        entry["expires_ns"] = 0
        RoutePolicy._write(entry, target.incarnation, pen[None, :], edges[None, :],
                          np.array([service_ns]), probe_after_ns, now_ns() + int(ttl_s * 1e9),
                          hedge_us=np.broadcast_to(np.asarray(hedge_us, dtype=np.int64),
                                                   (abi.KEYS_PER_LEG,))[None, :])

    @staticmethod
    def _write(block, incarnation, penalty_ns, lat_edges_ns, service_ns, probe_after_ns,
               expires_ns, top_lat_ns=0, hedge_us=0, clip: bool = True) -> None:
        def u32(v):
            return np.clip(v, 0, 0xFFFFFFFF) if clip else v
        block["target_incarnation"] = incarnation
        block["penalty_ns"] = u32(penalty_ns)       # abi.PENALTY_MAX_NS: the field's range
        block["hedge_us"] = u32(hedge_us)
        block["top_lat_ns"] = u32(top_lat_ns)
        block["lat_edge_ns"] = u32(lat_edges_ns)
        block["service_ns"] = u32(service_ns)
        block["probe_after_ns"] = probe_after_ns
        block["expires_ns"] = expires_ns   # last: publishes the entry

    def clear(self, target: int | None = None) -> None:
        """Empty every entry (of one target, or all): expiry first."""
        block = self.entries if target is None else self._block(target)
        if block is None:
            raise IobridgeError("routing policy is not loaded")
        block["expires_ns"] = 0
        block[...] = np.zeros(1, dtype=DECISION_DTYPE)

    def extend(self, target: int, legs: int, expires_ns: int) -> None:
        """Keep one target's current entries valid until expires_ns."""
        block = self._block(target, legs)
        live = block["expires_ns"] != 0
        block["expires_ns"][live] = expires_ns

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
        """Program counters summed over CPUs: calls, routed, default, silent, probes."""
        if self.bpf is None:
            return {"calls": 0, "routed": 0, "default": 0, "silent": 0, "probes": 0}
        per_cpu = self.bpf[STATS_MAP.encode()][ctypes.c_int(0)]
        routed, fallback, silent, probes = (sum(int(getattr(v, f)) for v in per_cpu)
                                            for f in ("routed", "fallback", "silent", "probes"))
        return {"calls": routed + fallback, "routed": routed, "default": fallback,
                "silent": silent, "probes": probes}

    def decision_age_hist(self) -> np.ndarray:
        """The table's age at each routing it decided (log-linear ns slots,
        core/histogram.py), summed over CPUs."""
        out = np.zeros(abi.LAT_SLOTS, dtype=np.uint64)
        if self.bpf is None:
            return out
        table = self.bpf[AGE_MAP.encode()]
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
