"""Constants and layouts shared by the BPF programs, the module and the agent.

The C side of every shared structure lives in one header,
kmodule/iobridge_abi.h; this module mirrors it with ctypes.  The host test
tests/test_abi.py compiles the header and checks every size, offset and
constant below against it, and the agent compares ABI_VERSION with the
header it compiles into BPF programs (kernel/bpf.py) and with the loaded
module (kernel/dmtarget.py) before it uses either.
"""

from __future__ import annotations

import ctypes

# Bump together with IOBRIDGE_ABI_VERSION in kmodule/iobridge_abi.h.
ABI_VERSION = 7

MAX_LEGS = 8
MAX_TARGETS = 64

# The decision table's key, per read and leg (since ABI 3): the read's size
# bucket, the leg's in-flight bucket and the leg's latency bucket.
# Size bucket i holds requests of at most SIZE_BUCKET_MAX_BYTES[i] bytes;
# the last bucket holds everything larger.
SIZE_BUCKET_MAX_BYTES = (4096, 16384, 65536)
NUM_SIZE_BUCKETS = len(SIZE_BUCKET_MAX_BYTES) + 1
# In-flight bucket i starts at INFLIGHT_BUCKET_MIN[i] bios (0, 1, 2-3, 4-7, 8-15, 16+).
INFLIGHT_BUCKET_MIN = (0, 1, 2, 4, 8, 16)
NUM_INFLIGHT_BUCKETS = len(INFLIGHT_BUCKET_MIN)
# Latency buckets: split by each leg's NUM_LAT_BUCKETS - 1 ascending edges,
# which the agent publishes (relative to the leg's baseline).
NUM_LAT_BUCKETS = 8
KEYS_PER_LEG = NUM_SIZE_BUCKETS * NUM_INFLIGHT_BUCKETS * NUM_LAT_BUCKETS
PENALTY_MAX_NS = 0xFFFFFFFF

NO_LEG = -1
DECISION_ENTRIES = MAX_TARGETS * MAX_LEGS

# Names used across the module, the BPF program and the agent.
MODULE_NAME = "dm_iobridge"
TARGET_TYPE = "iobridge"
ROUTE_TRACEPOINT = "iobridge_route"



def size_bucket(nbytes: int) -> int:
    """Size bucket of a request of `nbytes` bytes (same rule as the BPF side)."""
    for i, limit in enumerate(SIZE_BUCKET_MAX_BYTES):
        if nbytes <= limit:
            return i
    return NUM_SIZE_BUCKETS - 1


def inflight_bucket(inflight: int) -> int:
    """In-flight bucket of a leg with `inflight` bios in flight (as the BPF side)."""
    for i in range(NUM_INFLIGHT_BUCKETS - 1, -1, -1):
        if inflight >= INFLIGHT_BUCKET_MIN[i]:
            return i
    return 0


def key_latency(last_lat_ns: int, last_lat_qlen: int) -> int:
    """The latency the key buckets (iobridge_key_latency): the newest
    completion latency over (the bios ahead of it at submission + 1)."""
    return int(last_lat_ns) // (int(last_lat_qlen) + 1)


def use_previous(newest_lat_ns: int, newest_qlen: int, prev_lat_ns: int, prev_qlen: int) -> bool:
    """Which of a leg's two newest reads stands for its recent latency
    (iobridge_use_previous): the previous one when its latency per read is
    lower; the newest while there is no previous (0)."""
    if not prev_lat_ns:
        return False
    return int(prev_lat_ns) * (int(newest_qlen) + 1) < int(newest_lat_ns) * (int(prev_qlen) + 1)


def key_penalty(penalty_ns: int, top_lat_ns: int, lat_b: int, key_lat_ns: int) -> int:
    """The penalty of a key (iobridge_key_penalty): in the open top latency
    bucket, beyond top_lat_ns, in proportion to the key latency (capped at
    2**31 ns; the result at PENALTY_MAX_NS)."""
    if lat_b != NUM_LAT_BUCKETS - 1 or not top_lat_ns or key_lat_ns <= top_lat_ns:
        return int(penalty_ns)
    return min(int(penalty_ns) * min(int(key_lat_ns), 1 << 31) // int(top_lat_ns),
               PENALTY_MAX_NS)


def leg_cost(inflight: int, service_ns: int, last_lat_ns: int, key_lat_ns: int,
             penalty_ns: int) -> int:
    """A leg's expected completion time for one more read (iobridge_leg_cost):
    the larger of (inflight + 1) x its time per read now (the key latency, at
    least service_ns) and its newest latency (each capped at 2**31 ns), plus
    the key's penalty once."""
    per_read = max(min(int(key_lat_ns), 1 << 31), int(service_ns))
    newest = min(int(last_lat_ns), 1 << 31)
    return max((int(inflight) + 1) * per_read, newest) + int(penalty_ns)


PROBE_LAT_MULT = 32

# Hedged reads (iobridge_abi.h "Hedged reads"; core/hedging.py is the
# reference of the target's token bucket).
HEDGE_TOKEN = 1_000_000        # one hedge, in the bucket's micro-tokens
HEDGE_BUCKET = 16              # bucket capacity, in hedges
HEDGE_DEFAULT_BUDGET_PCT = 5   # extra reads, percent of reads routed
HEDGE_BUDGET_DECIMALS = 4      # the budget's decimals (kept in millionths of reads)


def probe_wait_ns(probe_after_ns: int, last_lat_ns: int) -> int:
    """How long an avoided idle leg waits for a probe (iobridge_probe_wait_ns):
    probe_after_ns, and at least PROBE_LAT_MULT x its key latency."""
    return max(int(probe_after_ns), int(last_lat_ns) * PROBE_LAT_MULT)


def lat_bucket(edges_ns, lat_ns: int) -> int:
    """Latency bucket: the number of edges at or below lat_ns (as the BPF side)."""
    return sum(1 for e in edges_ns if lat_ns >= e)


def key_index(size_b: int, inflight_b: int, lat_b: int) -> int:
    """Index into a leg's penalty_ns[] (iobridge_key_index)."""
    return (size_b * NUM_INFLIGHT_BUCKETS + inflight_b) * NUM_LAT_BUCKETS + lat_b


def leg_index(target: int, leg: int) -> int:
    """Index of the decision entry of (target, leg)."""
    if not 0 <= target < MAX_TARGETS:
        raise ValueError(f"target id {target} outside 0..{MAX_TARGETS - 1}")
    if not 0 <= leg < MAX_LEGS:
        raise ValueError(f"leg {leg} outside 0..{MAX_LEGS - 1}")
    return target * MAX_LEGS + leg


class RouteCtx(ctypes.Structure):
    """struct iobridge_route_ctx: the routing hook's context."""

    _fields_ = [
        ("abi_version", ctypes.c_uint32),
        ("target_id", ctypes.c_uint32),
        ("nr_legs", ctypes.c_uint32),
        ("bio_bytes", ctypes.c_uint32),
        ("sector", ctypes.c_uint64),
        ("now_ns", ctypes.c_uint64),
        ("op_flags", ctypes.c_uint32),
        ("chosen_leg", ctypes.c_int32),
        ("inflight", ctypes.c_uint32 * MAX_LEGS),
        ("healthy", ctypes.c_uint8 * MAX_LEGS),
        ("last_lat_ns", ctypes.c_uint64 * MAX_LEGS),
        ("last_complete_ns", ctypes.c_uint64 * MAX_LEGS),
        ("last_lat_qlen", ctypes.c_uint32 * MAX_LEGS),
        ("target_incarnation", ctypes.c_uint32),
        ("hedge_us", ctypes.c_uint32),
    ]


class LegDecisions(ctypes.Structure):
    """struct iobridge_leg_decisions: one (target, leg) entry of the table."""

    _fields_ = [
        ("expires_ns", ctypes.c_uint64),
        ("probe_after_ns", ctypes.c_uint64),
        ("service_ns", ctypes.c_uint32),
        ("lat_edge_ns", ctypes.c_uint32 * (NUM_LAT_BUCKETS - 1)),
        ("top_lat_ns", ctypes.c_uint32),
        ("target_incarnation", ctypes.c_uint32),
        ("penalty_ns", ctypes.c_uint32 * KEYS_PER_LEG),
        ("hedge_us", ctypes.c_uint32 * KEYS_PER_LEG),
    ]


# (C struct name, ctypes mirror): checked field by field by tests/test_abi.py.
STRUCTS = {
    "iobridge_route_ctx": RouteCtx,
    "iobridge_leg_decisions": LegDecisions,
}

# Python constant -> C macro: checked by tests/test_abi.py.
CONSTANTS = {
    "ABI_VERSION": "IOBRIDGE_ABI_VERSION",
    "MAX_LEGS": "IOBRIDGE_MAX_LEGS",
    "MAX_TARGETS": "IOBRIDGE_MAX_TARGETS",
    "PROBE_LAT_MULT": "IOBRIDGE_PROBE_LAT_MULT",
    "NUM_SIZE_BUCKETS": "IOBRIDGE_NUM_SIZE_BUCKETS",
    "NUM_INFLIGHT_BUCKETS": "IOBRIDGE_NUM_INFLIGHT_BUCKETS",
    "NUM_LAT_BUCKETS": "IOBRIDGE_NUM_LAT_BUCKETS",
    "KEYS_PER_LEG": "IOBRIDGE_KEYS_PER_LEG",
    "PENALTY_MAX_NS": "IOBRIDGE_PENALTY_MAX_NS",
    "NO_LEG": "IOBRIDGE_NO_LEG",
    "DECISION_ENTRIES": "IOBRIDGE_DECISION_ENTRIES",
    "HEDGE_TOKEN": "IOBRIDGE_HEDGE_TOKEN",
    "HEDGE_BUCKET": "IOBRIDGE_HEDGE_BUCKET",
    "HEDGE_DEFAULT_BUDGET_PCT": "IOBRIDGE_HEDGE_DEFAULT_BUDGET_PCT",
    "HEDGE_BUDGET_DECIMALS": "IOBRIDGE_HEDGE_BUDGET_DECIMALS",
}


# ======================================================================
# Observer section (mirrors the "Observer" part of kmodule/iobridge_abi.h)
# ======================================================================

LAT_SUB_BITS = 3
LAT_SLOTS = 320
OP_READ, OP_WRITE, OP_FLUSH, OP_DISCARD, OP_OTHER = 0, 1, 2, 3, 4
NUM_OPS = 5
OP_NAMES = ("read", "write", "flush", "discard", "other")
EVENT_REQUEST, EVENT_LEG_BIO = 0, 1
STREAM_REQUESTS, STREAM_LEG_BIOS = 1, 2


class DevStats(ctypes.Structure):
    """struct iobridge_dev_stats: per-device counters kept by the observer."""

    _fields_ = [
        ("issued", ctypes.c_uint64),
        ("completed", ctypes.c_uint64),
        ("inflight", ctypes.c_int64),
        ("errors", ctypes.c_uint64),
        ("ios", ctypes.c_uint64 * NUM_OPS),
        ("bytes", ctypes.c_uint64 * NUM_OPS),
        ("lat_sum_ns", ctypes.c_uint64),
        ("lat_hist", ctypes.c_uint64 * LAT_SLOTS),
    ]


class IoEvent(ctypes.Structure):
    """struct iobridge_io_event: one completed I/O from the ring buffer."""

    _fields_ = [
        ("issue_ns", ctypes.c_uint64),
        ("complete_ns", ctypes.c_uint64),
        ("sector", ctypes.c_uint64),
        ("dev", ctypes.c_uint32),
        ("bytes", ctypes.c_uint32),
        ("queue_len", ctypes.c_uint32),
        ("leg", ctypes.c_int32),
        ("op", ctypes.c_uint8),
        ("error", ctypes.c_uint8),
        ("level", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 5),
    ]


class ObserverConfig(ctypes.Structure):
    """struct iobridge_observer_config: element 0 of the observer's config map."""

    _fields_ = [
        ("filter_dev", ctypes.c_uint32),
        ("stream_events", ctypes.c_uint32),
    ]


STRUCTS.update({
    "iobridge_dev_stats": DevStats,
    "iobridge_io_event": IoEvent,
    "iobridge_observer_config": ObserverConfig,
})
CONSTANTS.update({
    "LAT_SUB_BITS": "IOBRIDGE_LAT_SUB_BITS",
    "LAT_SLOTS": "IOBRIDGE_LAT_SLOTS",
    "OP_READ": "IOBRIDGE_OP_READ",
    "OP_WRITE": "IOBRIDGE_OP_WRITE",
    "OP_FLUSH": "IOBRIDGE_OP_FLUSH",
    "OP_DISCARD": "IOBRIDGE_OP_DISCARD",
    "OP_OTHER": "IOBRIDGE_OP_OTHER",
    "NUM_OPS": "IOBRIDGE_NUM_OPS",
    "EVENT_REQUEST": "IOBRIDGE_EVENT_REQUEST",
    "EVENT_LEG_BIO": "IOBRIDGE_EVENT_LEG_BIO",
    "STREAM_REQUESTS": "IOBRIDGE_STREAM_REQUESTS",
    "STREAM_LEG_BIOS": "IOBRIDGE_STREAM_LEG_BIOS",
})


# ======================================================================
# Leg feature state and agent liveness (since ABI 2)
# ======================================================================

HISTORY = 3
MAX_LEG_SLOTS = MAX_TARGETS * MAX_LEGS


class LegFeatures(ctypes.Structure):
    """struct iobridge_leg_features: one leg device's model inputs."""

    _fields_ = [
        ("seq", ctypes.c_uint32),
        ("dev", ctypes.c_uint32),
        ("inflight", ctypes.c_int64),
        ("issued", ctypes.c_uint64),
        ("completed", ctypes.c_uint64),
        ("contended", ctypes.c_uint64),
        ("last_complete_ns", ctypes.c_uint64),
        ("prev_lat_ns", ctypes.c_uint64 * HISTORY),
        ("prev_bytes", ctypes.c_uint32 * HISTORY),
        ("prev_qlen", ctypes.c_uint32 * HISTORY),
        ("prev_lat_qlen", ctypes.c_uint32 * HISTORY),
        ("pad", ctypes.c_uint32),
    ]


class AgentState(ctypes.Structure):
    """struct iobridge_agent_state: the agent's heartbeat for the routing program."""

    _fields_ = [
        ("heartbeat_ns", ctypes.c_uint64),
        ("published_ns", ctypes.c_uint64),
        ("max_silence_ns", ctypes.c_uint64),
        ("ticks", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class RouteStats(ctypes.Structure):
    """struct iobridge_route_stats: per-CPU routing program counters."""

    _fields_ = [
        ("routed", ctypes.c_uint64),
        ("fallback", ctypes.c_uint64),
        ("silent", ctypes.c_uint64),
        ("probes", ctypes.c_uint64),
    ]


STRUCTS.update({
    "iobridge_leg_features": LegFeatures,
    "iobridge_agent_state": AgentState,
    "iobridge_route_stats": RouteStats,
})
CONSTANTS.update({
    "HISTORY": "IOBRIDGE_HISTORY",
    "MAX_LEG_SLOTS": "IOBRIDGE_MAX_LEG_SLOTS",
})
