"""ctypes mirror of bpf/cachestat.h, the page-cache observer's structures.

tests/test_cachestat_host.py compiles the header with the host compiler and
checks every size, offset and constant below against it; the loader
(kernel/cachestat.py) compares VERSION with the header it compiles in.
"""

from __future__ import annotations

import ctypes

# Bump together with IOBRIDGE_CACHESTAT_VERSION in bpf/cachestat.h.
VERSION = 2

RA_SYNC, RA_ASYNC, RA_FORCED = 0, 1, 2
RA_KINDS = 3
RA_KIND_NAMES = ("sync", "async", "forced")
PAGE_READAHEAD, PAGE_USED = 1, 2
CEV_INSERT, CEV_READ, CEV_REMOVE, CEV_REFAULT, CEV_WINDOW = 0, 1, 2, 3, 4
CEV_NAMES = ("insert", "read", "remove", "refault", "window")
CEV_HIT = 0x80


class CacheWindow(ctypes.Structure):
    """struct iobridge_cache_window: one time window's KML aggregates."""

    _fields_ = [
        ("lock", ctypes.c_uint32),
        ("epoch", ctypes.c_uint32),
        ("base", ctypes.c_uint64),
        ("n", ctypes.c_uint64),
        ("s1", ctypes.c_int64),
        ("s2_lo", ctypes.c_uint64),
        ("s2_hi", ctypes.c_uint64),
        ("lo", ctypes.c_int64),
        ("hi", ctypes.c_int64),
        ("sad", ctypes.c_uint64),
        ("last", ctypes.c_int64),
        ("run", ctypes.c_int64),
        ("seq_steps", ctypes.c_uint64),
        ("rev_steps", ctypes.c_uint64),
        ("seq_runs", ctypes.c_uint64),
        ("rev_runs", ctypes.c_uint64),
        ("seq_run_max", ctypes.c_uint64),
        ("rev_run_max", ctypes.c_uint64),
        ("max_fwd", ctypes.c_uint64),
        ("max_back", ctypes.c_uint64),
        ("contended", ctypes.c_uint64),
    ]


# The cumulative counters of struct iobridge_cache_stats, in order.
COUNTERS = ("insertions", "window_pages", "ra_pages", "ra_windows", "ra_requested", "reads",
            "hits", "marked", "ra_used", "removed_used", "removed_unused", "removed_untracked",
            "ra_unused_removed", "refaults")


class CacheStats(ctypes.Structure):
    """struct iobridge_cache_stats: one device's or file's counters and windows."""

    _fields_ = [
        ("insertions", ctypes.c_uint64),
        ("window_pages", ctypes.c_uint64),
        ("ra_pages", ctypes.c_uint64),
        ("ra_windows", ctypes.c_uint64 * RA_KINDS),
        ("ra_requested", ctypes.c_uint64),
        ("reads", ctypes.c_uint64),
        ("hits", ctypes.c_uint64),
        ("marked", ctypes.c_uint64),
        ("ra_used", ctypes.c_uint64),
        ("removed_used", ctypes.c_uint64),
        ("removed_unused", ctypes.c_uint64),
        ("removed_untracked", ctypes.c_uint64),
        ("ra_unused_removed", ctypes.c_uint64),
        ("refaults", ctypes.c_uint64),
        ("ra_pages_setting", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("win", CacheWindow * 2),
    ]


class CacheFileKey(ctypes.Structure):
    """struct iobridge_cache_file_key."""

    _fields_ = [("dev", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("ino", ctypes.c_uint64)]


class CachePageKey(ctypes.Structure):
    """struct iobridge_cache_page_key."""

    _fields_ = [("dev", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("ino", ctypes.c_uint64),
                ("index", ctypes.c_uint64)]


class CachePage(ctypes.Structure):
    """struct iobridge_cache_page: per-page state from insertion to removal."""

    _fields_ = [("insert_ns", ctypes.c_uint64), ("nr_pages", ctypes.c_uint32),
                ("flags", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3)]


class CacheConfig(ctypes.Structure):
    """struct iobridge_cache_config: element 0 of the config array."""

    _fields_ = [("epoch", ctypes.c_uint32), ("stream", ctypes.c_uint32)]


class CacheEvent(ctypes.Structure):
    """struct iobridge_cache_event: one record of the --events stream."""

    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("ino", ctypes.c_uint64),
        ("index", ctypes.c_uint64),
        ("dev", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("nr_pages", ctypes.c_uint32),
        ("kind", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    ]


STRUCTS = {
    "iobridge_cache_window": CacheWindow,
    "iobridge_cache_stats": CacheStats,
    "iobridge_cache_file_key": CacheFileKey,
    "iobridge_cache_page_key": CachePageKey,
    "iobridge_cache_page": CachePage,
    "iobridge_cache_config": CacheConfig,
    "iobridge_cache_event": CacheEvent,
}

CONSTANTS = {
    "VERSION": "IOBRIDGE_CACHESTAT_VERSION",
    "RA_SYNC": "IOBRIDGE_RA_SYNC",
    "RA_ASYNC": "IOBRIDGE_RA_ASYNC",
    "RA_FORCED": "IOBRIDGE_RA_FORCED",
    "RA_KINDS": "IOBRIDGE_RA_KINDS",
    "PAGE_READAHEAD": "IOBRIDGE_PAGE_READAHEAD",
    "PAGE_USED": "IOBRIDGE_PAGE_USED",
    "CEV_INSERT": "IOBRIDGE_CEV_INSERT",
    "CEV_READ": "IOBRIDGE_CEV_READ",
    "CEV_REMOVE": "IOBRIDGE_CEV_REMOVE",
    "CEV_REFAULT": "IOBRIDGE_CEV_REFAULT",
    "CEV_WINDOW": "IOBRIDGE_CEV_WINDOW",
    "CEV_HIT": "IOBRIDGE_CEV_HIT",
}
