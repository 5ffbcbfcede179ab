"""Hedged reads: the kernel's budget on extra reads and the learned deadlines
(pure logic, no I/O). The replay simulator uses both; the dm target
(kmodule/dm-iobridge.c, "Hedged reads" in iobridge_abi.h) enforces the same
budget, and the agent publishes the deadlines.

What the target does (DESIGN.md section 4; README "Hedged reads"): the
decision table holds, per
leg and key, a hedge deadline in whole microseconds (0 = never hedge). A
read still pending on its leg when the deadline of the key it was routed
with has passed gets ONE more read, to the least in-flight other healthy
leg whose recent read took less than the read has waited (none such: no
hedge, no token; the target's own fixed hedge_us hedges to any other leg);
the first completion wins. Writes are never hedged. Extra reads are
bounded by a token bucket in the target (HedgeBudget), whatever the agent
publishes.

The budget, in the kernel's integer arithmetic (no floats in the kernel):
every read routed by the target earns `credit` = fraction x HEDGE_TOKEN
micro-tokens, a hedge costs HEDGE_TOKEN, the bucket holds at most
BUCKET_HEDGES hedges and starts EMPTY. So over any stretch of n reads the
target issues at most fraction x n + BUCKET_HEDGES extra reads, and since
the start at most fraction x reads; a fraction of 0 never hedges. A hedge
due with less than one token in the bucket is refused (counted), and the
read waits for its own leg.

The deadlines (deadlines_us) come from each leg's recent latencies of fast
reads and the model's P(slow) for the key: a read whose leg is in a slow
period takes milliseconds, a fast one follows the leg's fast latency
distribution F (for the key's size bucket: deadlines_us). If a read is slow
with probability p (the key's P(slow)), then once it is still pending at t,
it is slow with probability

    p / (p + (1 - p) (1 - F(t)))      (slow reads outlast t)

and the deadline is the first t where that reaches HEDGE_WORTH: the quantile
of F at level 1 - p (1 - w) / ((1 - p) w) (hedge_level). A key the model
calls safe waits for nearly all fast reads to finish (level at most
MAX_LEVEL); a key it calls likely slow hedges as soon as a fast read would
have finished (level 0: the fastest recent read). Hedging earlier than that
is never useful, later costs tail latency.

The samples are read completions with their sizes (ReadSamples). The
replay takes each leg's newest ones as the agent samples the kernel; the
agent takes them from the observer's per-bio leg events (daemon/agent.py
says why those). Both compute a target's deadlines with target_deadlines.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from itertools import chain

import numpy as np

from . import abi
from .decision import KEY_SIZE_BUCKET, SLOW_READ_REL
from .features import BASELINE_LAT_QUANTILE

# The bucket's fixed-point unit (a budget fraction is kept to 1e-6: a
# per-read credit of 50000 for 5%), its capacity and default fraction are
# the target's (iobridge_abi.h "Hedged reads"). The capacity: a leg that
# goes slow (a GC busy period) holds every read issued to it just before;
# they all need a hedge at once, and 16 covers the deepest queue the VM
# benchmarks drive (QD16, also the top in-flight bucket of the key). More
# would let a long-idle target put a larger burst of duplicates on the other
# legs just when one leg is slow; fewer leaves reads of a stuck queue
# waiting out the busy period (1-80 ms).
HEDGE_TOKEN = abi.HEDGE_TOKEN
DEFAULT_BUDGET = abi.HEDGE_DEFAULT_BUDGET_PCT / 100
BUCKET_HEDGES = abi.HEDGE_BUCKET

# The deadline rule (module doc). HEDGE_WORTH: how likely a pending read must
# be slow before it is worth a duplicate: 0.5, more likely slow than not.
# Tuned on the training halves of cloudPhysicsIO.csv and OLTP.lis.zst
# (replayed with their own time split), 0.1 to 0.95 gave the same replay:
# the device model's fast reads take a fixed time per size, so every level
# of F gives the same deadline; the level matters on devices with jitter.
HEDGE_WORTH = 0.5
# Highest quantile of the fast reads a deadline waits for: a key with
# P(slow) near 0 still hedges a read that outlasts almost every fast read.
MAX_LEVEL = 0.999
# Fast-read samples a deadline needs (fewer: never hedge; the replay's
# policies then use all legs' samples together, replicas being alike).
MIN_SAMPLES = 32
# Recent read completions kept per leg.
SAMPLE_WINDOW = 1024


class HedgeBudget:
    """The target's token bucket on extra reads (module doc)."""

    def __init__(self, fraction: float = DEFAULT_BUDGET, capacity: int = BUCKET_HEDGES):
        if not (isinstance(fraction, (int, float)) and 0.0 <= fraction <= 1.0):
            raise ValueError(f"hedge budget must be a fraction from 0 to 1, got {fraction!r}")
        if not (isinstance(capacity, int) and capacity >= 1):
            raise ValueError(f"hedge bucket capacity must be a whole number >= 1, got {capacity!r}")
        self.fraction = float(fraction)
        self.capacity = capacity
        # floor: the credit never exceeds the fraction (the bound stays exact)
        self.credit = math.floor(self.fraction * HEDGE_TOKEN)
        self.tokens = 0                   # micro-tokens; starts empty
        self.reads = 0
        self.spent = 0                    # hedges allowed
        self.refused = 0                  # hedges refused for want of a token

    def on_read(self) -> None:
        """A read was routed: it earns its credit, up to the capacity."""
        self.reads += 1
        self.tokens = min(self.tokens + self.credit, self.capacity * HEDGE_TOKEN)

    def try_hedge(self) -> bool:
        """A hedge is due: spend one token (True) or refuse it (False)."""
        if self.tokens < HEDGE_TOKEN:
            self.refused += 1
            return False
        self.tokens -= HEDGE_TOKEN
        self.spent += 1
        return True


def hedge_level(p_slow, worth: float = HEDGE_WORTH) -> np.ndarray:
    """The quantile level of the fast-read latencies at which a read still
    pending is slow with probability `worth` (module doc), in [0, MAX_LEVEL]."""
    if not 0.0 < worth < 1.0:
        raise ValueError(f"hedge worth must be between 0 and 1, got {worth}")
    p = np.clip(np.asarray(p_slow, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore"):
        odds = np.where(p < 1.0, p / np.maximum(1.0 - p, 1e-300), np.inf)
    return np.clip(1.0 - odds * (1.0 - worth) / worth, 0.0, MAX_LEVEL)


def latency_fit(lat_us: np.ndarray, nbytes: np.ndarray) -> tuple[float, float]:
    """(a, b): a fast read of n bytes takes about a + b x n us (least
    squares, b >= 0; b = 0 when every sample has the same size)."""
    lat = np.asarray(lat_us, dtype=np.float64)
    nb = np.asarray(nbytes, dtype=np.float64)
    b = 0.0
    if len(nb) > 1 and np.ptp(nb) > 0:
        b = max(float(np.polyfit(nb, lat, 1)[0]), 0.0)
    return float(np.mean(lat - b * nb)), b


def bucket_top_bytes(nbytes: np.ndarray) -> np.ndarray:
    """The largest read each size bucket stands for: its upper bound, and
    for the open top bucket the largest read seen in it (else twice the
    last bound, as decision.BUCKET_SIZE_BYTES)."""
    nb = np.asarray(nbytes)
    over = nb[nb > abi.SIZE_BUCKET_MAX_BYTES[-1]]
    top = int(over.max()) if len(over) else 2 * abi.SIZE_BUCKET_MAX_BYTES[-1]
    return np.array([*abi.SIZE_BUCKET_MAX_BYTES, top], dtype=np.float64)


def deadlines_us(lat_us: np.ndarray, nbytes: np.ndarray, p_slow: np.ndarray,
                 worth: float = HEDGE_WORTH, fit: tuple[float, float] | None = None) -> np.ndarray:
    """One leg's hedge deadline per key, whole us (uint32; 0 = never hedge).

    lat_us, nbytes: the leg's recent FAST reads (ReadSamples.fast; with
    fewer than MIN_SAMPLES, never hedge); p_slow: the model's P(slow) per key
    (KEYS_PER_LEG). The fast latency F of a key is predicted for the
    largest read of its size bucket (latency_fit at bucket_top_bytes) plus
    the spread of the samples around the fit, so one deadline serves every
    read of the bucket: a plain quantile per bucket put it below the
    latency of the bucket's rarer large reads (16K reads among 8K ones), and
    every one of them was hedged. The deadline is F's quantile at
    hedge_level(P(slow)), rounded up. `fit`: latency_fit(lat_us, nbytes)
    when the caller has it already."""
    p = np.asarray(p_slow, dtype=np.float64)
    if p.shape != (abi.KEYS_PER_LEG,):
        raise ValueError(f"p_slow: expected {abi.KEYS_PER_LEG} keys, got shape {p.shape}")
    lat = np.asarray(lat_us, dtype=np.float64)
    nb = np.asarray(nbytes, dtype=np.float64)
    if len(lat) < MIN_SAMPLES:
        return np.zeros(abi.KEYS_PER_LEG, dtype=np.uint32)
    a, b = fit if fit is not None else latency_fit(lat, nb)
    spread = np.quantile(lat - (a + b * nb), hedge_level(p, worth))
    q = a + b * bucket_top_bytes(nb)[KEY_SIZE_BUCKET] + spread
    # whole us, at least 1 (0 would mean never); the kernel's field is u32
    return np.clip(np.ceil(q), 1, 0xFFFFFFFF).astype(np.uint32)


@dataclass(frozen=True)
class DeadlineBasis:
    """Why a leg's deadlines are what they are: the fast reads they come
    from (its own, or its target's legs' together) and their latency_fit."""
    fast_samples: int
    pooled: bool
    fit: tuple[float, float] | None     # (a us, b us per byte); None: too few, never hedge


def target_deadlines(samples: list, p_slow: np.ndarray, valid: np.ndarray,
                     worth: float = HEDGE_WORTH) -> tuple[np.ndarray, list]:
    """Deadlines [legs, KEYS_PER_LEG] (uint32, deadlines_us) of one set of
    legs (a target, or the replay's legs) and the DeadlineBasis of each
    (None for a leg without a valid entry). `samples`: a ReadSamples per
    leg. A leg with fewer than MIN_SAMPLES fast reads (one that gets few
    reads) takes every leg's together, as a leg without a baseline borrows
    one (decision.borrow_missing): replicas are alike."""
    fast = [s.fast() for s in samples]
    pooled = tuple(np.concatenate([f[j] for f in fast]) for j in (0, 1))
    pool_fit = None                  # fitted once for every leg that pools
    out = np.zeros((len(samples), abi.KEYS_PER_LEG), dtype=np.uint32)
    basis: list = [None] * len(samples)
    for i in np.flatnonzero(valid):
        pool = len(fast[i][0]) < MIN_SAMPLES
        lat, nb = pooled if pool else fast[i]
        fit = None
        if len(lat) >= MIN_SAMPLES:
            fit = (pool_fit := pool_fit or latency_fit(lat, nb)) if pool else latency_fit(lat, nb)
            out[i] = deadlines_us(lat, nb, p_slow[i], worth, fit)
        basis[i] = DeadlineBasis(len(lat), pool, fit)
    return out, basis


class ReadSamples:
    """A leg's recent read completions (latency us, bytes), and which of
    them count as fast: below SLOW_READ_REL x their baseline (the
    BASELINE_LAT_QUANTILE of the held read latencies), the threshold
    decision.py's slow-read cost uses. Reads only: the leg's baseline mixes
    in writes, which are acknowledged from the drive's buffer."""

    def __init__(self, window: int = SAMPLE_WINDOW):
        self.ring: deque = deque(maxlen=window)
        self.n = 0

    def add(self, lat_us: float, nbytes: int) -> None:
        if lat_us > 0:
            self.ring.append((float(lat_us), int(nbytes)))
            self.n += 1

    def copy(self) -> "ReadSamples":
        """A copy to compute from on another thread while this one fills."""
        new = ReadSamples(self.ring.maxlen)
        new.ring.extend(self.ring)
        new.n = self.n
        return new

    def held(self) -> tuple[np.ndarray, np.ndarray]:
        """(latency us, bytes) of every held read."""
        if not self.ring:
            return np.zeros(0), np.zeros(0)
        # fromiter over the flattened pairs: a third of np.array's time on
        # a list of tuples (the agent computes this every recompute_ms)
        a = np.fromiter(chain.from_iterable(self.ring), np.float64, 2 * len(self.ring))
        return a[0::2], a[1::2]

    def fast(self) -> tuple[np.ndarray, np.ndarray]:
        """(latency us, bytes) of the held fast reads."""
        lat, nb = self.held()
        if len(lat):
            keep = lat < SLOW_READ_REL * np.quantile(lat, BASELINE_LAT_QUANTILE)
            lat, nb = lat[keep], nb[keep]
        return lat, nb
