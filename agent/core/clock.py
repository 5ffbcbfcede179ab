"""The one clock iobridge shares with the kernel.

CLOCK_MONOTONIC is what the kernel's ktime_get_ns() and BPF's
bpf_ktime_get_ns() read: decision expiries, heartbeats, leg completion
times and recorded traces are all compared on it.
"""

import time


def now_ns() -> int:
    """CLOCK_MONOTONIC in nanoseconds (the kernel's ktime_get_ns())."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)
