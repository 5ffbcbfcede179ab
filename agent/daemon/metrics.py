"""Prometheus metrics of the running agent: off unless `agent.metrics_listen`
(or `iobridge run --metrics-listen ADDR:PORT`) is set.

One collector reads everything at scrape time, so the tick loop does no
extra work and no figure is counted twice:
- the module's counters per target and leg, as `dmsetup status` shows them
  (reads routed by the table, by the module default; reads, writes, errors,
  bios in flight, health);
- the routing program's counters, summed over CPUs and over every target
  (the program keeps them per CPU, not per target): calls, reads routed by
  the table, left to the default, left to it while the agent was silent
  (heartbeat older than max_silence), probes; and its histogram of the
  table's age at each routing;
- the agent's counters (recomputes, decision changes, reloads, ticks) and
  its recompute-time histogram;
- with prefetch on: the prefetch unit's counters (windows, actions by kind,
  processes gone, errors, restores), its mode and classifier, and the
  page-cache observer's counters per device (reads, hits, insertions,
  readahead pages used and evicted unused, evictions, refaults) as of the
  unit's last closed window (window_s old at most: the unit reads the
  observer's maps once per window, a scrape does not read them again);
- the model in force (path, sha256, threshold) and `iobridge_up`.

Histograms come from the log-linear slots the kernel and the agent keep
(core/histogram.py), folded into power-of-4 buckets from 1.024 us to 68.7 s:
each slot lies inside one bucket, so the bucket counts are exact; the sums
are taken at the slots' midpoints (within 6% of the truth).
"""

from __future__ import annotations

import ipaddress
import logging

import numpy as np

from ..core import histogram
from ..core.errors import IobridgeError
from ..kernel import blockdev
from ..kernel.readahead import PAGE

log = logging.getLogger("iobridge.metrics")

EXAMPLE = "127.0.0.1:9464"
# 2^10 .. 2^36 ns in steps of 4x: upper bounds that slot boundaries fall on.
BUCKET_BOUNDS_NS = tuple(1 << k for k in range(10, 37, 2))


# The target's hedged-read counters (dmsetup status "hedge ..."), per target.
HEDGE_COUNTERS = (
    ("issued", "hedges the target issued (a second read of a read past its deadline)"),
    ("won", "hedged reads the hedge completed"),
    ("lost", "hedged reads the first read completed, the hedge issued"),
    ("refused", "hedges due that the target's budget refused"),
    ("nomem", "hedged reads or hedges given up for lack of bounce memory"),
)


# The prefetch unit's counters (daemon/prefetch.py PrefetchUnit.counters).
PREFETCH_COUNTERS = (
    ("windows", "observer windows the prefetch unit has closed and decided on"),
    ("actions", "prefetch actions applied (none in shadow mode)"),
    ("device_changes", "read_ahead_kb changes of a device"),
    ("file_advice", "posix_fadvise advice given to a process's open file"),
    ("willneed_calls", "WILLNEED calls for predicted extents"),
    ("dropped_pages", "consumed pages of sequential scans dropped behind them (DONTNEED)"),
    ("gone", "actions skipped because the process or its file had gone"),
    ("errors", "prefetch actions or windows that failed"),
    ("restores", "restores of recorded settings (at stop, or at start after a kill)"),
)
# The page-cache observer's counters per device (cachestat_abi.COUNTERS):
# metric name, counter, help.
PAGECACHE_COUNTERS = (
    ("reads", "reads", "pages handed to read calls"),
    ("hits", "hits", "pages handed to read calls that were cached before the call"),
    ("insertions", "insertions", "pages added to the page cache"),
    ("readahead_pages", "ra_pages", "pages added beyond what reads asked for (readahead)"),
    ("readahead_used", "ra_used", "readahead pages used before their eviction"),
    ("readahead_evicted_unused", "ra_unused_removed",
     "readahead pages evicted without having been used (wasted)"),
    ("evicted_used", "removed_used", "pages evicted or dropped after being used"),
    ("evicted_unused", "removed_unused", "pages evicted or dropped without being used"),
    ("refaults", "refaults", "evicted pages read back (workingset refaults)"),
)


def parse_listen(text: str) -> tuple[str, int]:
    """"ADDR:PORT" (IPv4, "[IPv6]", or localhost) -> (addr, port); a
    ValueError that says what is wrong otherwise."""
    if not isinstance(text, str) or ":" not in text:
        raise ValueError(f"{text!r} is not ADDR:PORT (for example {EXAMPLE})")
    host, _, port_s = text.rpartition(":")
    if host.startswith("["):
        inner = host[1:-1] if host.endswith("]") else ""
        if not _is_ip(inner) or ipaddress.ip_address(inner).version != 6:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address in brackets")
        host = inner
    elif _is_ip(host):
        if ipaddress.ip_address(host).version == 6:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:9464")
    elif host != "localhost":
        raise ValueError(f"{text!r}: {host!r} is not an IP address or localhost "
                         f"(for example {EXAMPLE})")
    if not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return host, int(port_s)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def prometheus_buckets(hist) -> tuple[list[tuple[str, float]], float]:
    """A log-linear slot histogram (ns) as Prometheus buckets in seconds:
    ([(le, cumulative count), ..., ("+Inf", total)], sum in seconds)."""
    counts = np.asarray(hist, dtype=np.float64)
    lows, highs = histogram.SLOT_BOUNDS[:, 0], histogram.SLOT_BOUNDS[:, 1]
    cum = np.cumsum(counts)
    out = []
    for bound in BUCKET_BOUNDS_NS:
        # slots whose values are all below the bound
        n = int(np.searchsorted(highs, bound, side="right"))
        out.append((_le(bound / 1e9), float(cum[n - 1]) if n else 0.0))
    out.append(("+Inf", float(cum[-1]) if len(cum) else 0.0))
    total = float((counts * (lows + highs) / 2).sum()) / 1e9
    return out, total


def _le(seconds: float) -> str:
    return f"{seconds:.9g}"


class AgentCollector:
    """What a scrape of a running agent returns (see the module docstring)."""

    def __init__(self, agent):
        self.agent = agent

    def describe(self):
        return []          # collected at scrape time only: no scrape at registration

    def collect(self):
        from prometheus_client.core import (  # noqa: PLC0415
            CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily)
        a = self.agent
        yield GaugeMetricFamily("iobridge_up", "1 while the agent runs", value=1)
        info = InfoMetricFamily("iobridge_model", "the admission model in force")
        info.add_metric([], {"path": str(a.cfg.model), "sha256": a.model.sha256,
                             "threshold": f"{a.maker.threshold:.6g}"})
        yield info

        legs = [("iobridge_reads_routed_by_table", "hook_routed",
                 "reads the routing program sent to this leg (from the decision table)"),
                ("iobridge_reads_routed_by_default", "default_routed",
                 "reads the module default sent to this leg (no valid table, "
                 "agent silent, or retries)"),
                ("iobridge_leg_reads", "reads", "reads submitted to this leg"),
                ("iobridge_leg_writes", "writes", "writes submitted to this leg"),
                ("iobridge_leg_read_errors", "read_errors", "failed reads on this leg"),
                ("iobridge_leg_write_errors", "write_errors", "failed writes on this leg")]
        fams = {attr: CounterMetricFamily(name, help_, labels=["target", "leg", "dev"])
                for name, attr, help_ in legs}
        inflight = GaugeMetricFamily("iobridge_leg_inflight", "bios in flight on this leg",
                                     labels=["target", "leg", "dev"])
        healthy = GaugeMetricFamily("iobridge_leg_healthy", "1 while the leg serves reads",
                                    labels=["target", "leg", "dev"])
        hedges = {attr: CounterMetricFamily(f"iobridge_hedges_{attr}", help_, labels=["target"])
                  for attr, help_ in HEDGE_COUNTERS}
        for name, st in a.target_statuses():
            for i, leg in enumerate(st.legs):
                lab = [name, str(i), leg.dev]
                for attr, fam in fams.items():
                    fam.add_metric(lab, getattr(leg, attr))
                inflight.add_metric(lab, leg.inflight)
                healthy.add_metric(lab, 1 if leg.healthy else 0)
            if st.hedge is not None:
                for attr, fam in hedges.items():
                    fam.add_metric([name], getattr(st.hedge, attr))
        yield from fams.values()
        yield inflight
        yield healthy
        yield from hedges.values()

        if a.policy is not None:
            s = a.policy.stats()
            for key, help_ in (("calls", "reads the routing program was called for"),
                               ("routed", "reads the routing program routed from the table "
                                          "(probes included)"),
                               ("default", "reads the routing program left to the module default"),
                               ("silent", "reads left to the module default because the agent's "
                                          "heartbeat was older than max_silence"),
                               ("probes", "reads sent to an idle avoided leg as a probe")):
                yield CounterMetricFamily(f"iobridge_route_{key}", help_, value=s[key])
            buckets, total = prometheus_buckets(a.policy.decision_age_hist())
            yield HistogramMetricFamily(
                "iobridge_decision_age_seconds",
                "age of the decision table (since the agent published it) at each routing",
                buckets=buckets, sum_value=total)

        for key, help_ in (("recomputes", "keyed-table recomputes started"),
                           ("decision_changes", "table entries whose decision changed"),
                           ("reloads", "model reloads applied"),
                           ("reload_failures", "model reloads refused"),
                           ("ticks", "agent ticks"),
                           ("overruns", "ticks that started late"),
                           ("tick_errors", "ticks that failed")):
            yield CounterMetricFamily(f"iobridge_agent_{key}", help_, value=a.counters[key])
        buckets, total = prometheus_buckets(a.times.hist["infer"])
        yield HistogramMetricFamily("iobridge_recompute_seconds",
                                    "time to recompute the keyed table (model call included)",
                                    buckets=buckets, sum_value=total)
        if a.prefetch is not None:
            yield from self._prefetch(a.prefetch)

    @staticmethod
    def _prefetch(unit):
        from prometheus_client.core import (  # noqa: PLC0415
            CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily)
        info = InfoMetricFamily("iobridge_prefetch", "the prefetch unit's mode and classifier")
        ci = unit.classifier_info()
        info.add_metric([], {"mode": unit.mode, "classifier": str(ci["name"]),
                             "sha256": str(ci["sha256"] or "")})
        yield info
        for key, help_ in PREFETCH_COUNTERS:
            yield CounterMetricFamily(f"iobridge_prefetch_{key}", help_, value=unit.counters[key])
        fams = [(CounterMetricFamily(f"iobridge_pagecache_{name}",
                                     help_ + " (as of the prefetch unit's last window)",
                                     labels=["dev"]), counter)
                for name, counter, help_ in PAGECACHE_COUNTERS]
        ra_bytes = GaugeMetricFamily("iobridge_pagecache_readahead_bytes",
                                  "readahead of the device's last file with a window, in bytes",
                                  labels=["dev"])
        for dev, c in sorted(unit.device_counters().items()):
            lab = ["%d:%d" % blockdev.kdev_split(dev)]
            for fam, counter in fams:
                fam.add_metric(lab, c.values[counter])
            ra_bytes.add_metric(lab, c.ra_pages_setting * PAGE)
        for fam, _ in fams:
            yield fam
        yield ra_bytes


class MetricsServer:
    """The HTTP endpoint: started before the agent holds anything, so a
    port in use stops the start with nothing attached."""

    def __init__(self, listen: str):
        self.addr, self.port = parse_listen(listen)
        self.listen = listen
        self._server = None
        self._thread = None

    def start(self, agent) -> None:
        from prometheus_client import CollectorRegistry, start_http_server  # noqa: PLC0415
        registry = CollectorRegistry(auto_describe=False)
        registry.register(AgentCollector(agent))
        try:
            self._server, self._thread = start_http_server(self.port, self.addr, registry=registry)
        except OSError as err:
            raise IobridgeError(f"metrics: cannot listen on {self.listen}: "
                                f"{err.strerror or err}",
                                "choose another address or port (agent.metrics_listen, "
                                "--metrics-listen), or stop what holds it") from None
        log.info("metrics: serving Prometheus metrics on http://%s/metrics", self.listen)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
