"""The one clock iobridge shares with the kernel.

CLOCK_MONOTONIC is what the kernel's ktime_get_ns() and BPF's
bpf_ktime_get_ns() read: decision expiries, heartbeats, leg completion
times and recorded traces are all compared on it.
"""

import time


def now_ns() -> int:
    """CLOCK_MONOTONIC in nanoseconds (the kernel's ktime_get_ns())."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


# The agent's tick period (agent.tick_ms, `run --tick-ms`), and the tick the
# offline replay simulates (`replay --tick-us`): from 0.1 ms to 1 s.
TICK_MS_MIN, TICK_MS_MAX = 0.1, 1000.0
