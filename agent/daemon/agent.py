"""The admission agent: `iobridge run` and `iobridge status`.

The kernel routes every read by itself (bpf/route_policy.bpf.c): it keys a
decision table on each leg's live state (size bucket of the read, bios in
flight, the newest completion latency) and picks the leg with the lowest
expected completion time. The agent only keeps that table right:

  every tick (config agent.tick_ms, default 250 ms) it beats the heartbeat
  the routing program checks, extends the entries' expiry, and samples the
  newest completions of every leg of every managed target from the
  observer's mmapped leg_features array (kernel/legstate.py) into each
  leg's baseline (core/features.BaselineTracker);

  when a leg's baseline moved by more than BASELINE_MOVE, a target came or
  went, or the model was reloaded (at most every agent.recompute_ms), it
  evaluates the admission model over every key of every leg in ONE batched
  ONNX call (core/decision.TableMaker, the code the replay simulator runs
  too) and publishes the penalties, latency edges and service estimates;

  with hedging on (config admission.hedging, `iobridge run --hedging on`),
  each tick also drains the leg read completions the observer streams
  (_sample_reads says why those) into each leg's hedging.ReadSamples, and
  every table it publishes carries hedge deadlines per leg and key from
  them and the table's P(slow) (hedging.target_deadlines, the code the
  replay's table-hedged policy runs); between model recomputes they are
  refreshed at most once per recompute_ms when new reads came in.

Nothing on the I/O path waits for this loop, and the table stays right
between recomputes because the fast-moving inputs are looked up live in the
kernel. The kernel ignores expired entries, and the whole table when the
heartbeat is older than max_silence_ms, and falls back to the module's
least-in-flight default. If the agent dies, the kernel closes its file
descriptors and the routing program detaches at once; if it stalls, the
table keeps following the legs' live state until it expires.

Targets are discovered by a background thread, so a slow listing never
delays a tick: it lists them (device-mapper ioctls, kernel/dmioctl.py: no
dmsetup process) when a kernel uevent says a dm device came, went or was
resumed with a new table (kernel/uevents.py), and every discover_interval_s
as a safety net. A target that disappears has its entries cleared and its
leg slots freed.

Signals: SIGHUP reloads the config file and the model (a file that fails
validation is refused and the running ones stay in force; an unchanged
model file keeps the checked model), and switches shadow mode on or off
(off -> on detaches the routing program, so the module default decides
every read at once; on -> off attaches it and publishes a fresh table);
SIGTERM and
SIGINT stop cleanly: detach, unpin, leave the targets on the module default.
Under systemd (Type=notify) READY, STATUS, WATCHDOG, RELOADING and STOPPING
are sent through daemon/sdnotify.py.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from ..core import abi, cliutil, clock, decision, histogram
from ..core import features as F
from ..core import hedging as H
from ..core.errors import IobridgeError, UsageError
from ..core.infiles import json_loads, read_input
from ..kernel import blockdev, bpf, dmioctl, dmtarget, system, uevents
from . import config as config_mod

log = logging.getLogger("iobridge.agent")

PHASES = ("sample", "infer", "deadlines", "publish", "tick", "status", "discover")
# The status file: for `iobridge status` and the tests (~20 ms of an
# emulated core per write).
STATUS_INTERVAL_S = 2.0
# `iobridge status` calls a status file stale (the agent is not running) when
# it is older than STALE_INTERVALS status periods (or ticks, when longer)
# plus the heartbeat limit, all as recorded in the file: 12 s at defaults.
STALE_INTERVALS = 5
# `iobridge status` exit codes
STATUS_RUNNING, STATUS_NOT_RUNNING, STATUS_UNREADABLE = 0, 3, 4
# Target listing period where the uevent listener has ended.
FALLBACK_DISCOVER_S = 1.0
# A leg's baseline that moved by more than this (relative, any of latency,
# throughput, slow cost) makes the table be recomputed.
BASELINE_MOVE = decision.BASELINE_MOVE
# With hedging on, the observer's ring buffer of leg bio events is one page:
# about 73 events (48 bytes each plus an 8-byte header). The agent drains it
# once per tick, so the kernel itself bounds what a tick handles; the events
# that find the ring full are counted in the kernel and dropped, which costs
# nothing here. At QD16 the legs complete ~37k bios/s in the VM: a 1 MiB
# ring drained in full would take a Python callback per bio.
HEDGE_RING_PAGES = 1
# The most a tick spends draining it (EventRing.poll's own bound).
READ_DRAIN_S = 0.005


@dataclasses.dataclass(frozen=True)
class Target:
    """One iobridge target as discovered: its id, the incarnation its
    decision entries must name, and its leg devices in order."""
    name: str
    target_id: int
    incarnation: int
    legs: tuple[str, ...]        # "major:minor", leg order
    kdevs: tuple[int, ...]       # kernel dev_t of each leg

    @property
    def ref(self) -> dmtarget.TargetRef:
        return dmtarget.TargetRef(self.target_id, self.incarnation)


def target_of(name: str, lines: list[dmioctl.TargetLine]) -> Target | None:
    """The iobridge target a device's status lines describe, or None (a
    device with several table lines is not something iobridge creates)."""
    line = dmtarget.iobridge_line(lines)
    if line is None:
        return None
    st = dmtarget.parse_status(line.params)
    kdevs = []
    for leg in st.legs:
        major, minor = (int(x) for x in leg.dev.split(":"))
        kdevs.append(blockdev.kdev(major, minor))
    return Target(name, st.target_id, st.incarnation, tuple(leg.dev for leg in st.legs),
                  tuple(kdevs))


def discover(names: tuple[str, ...] = ()) -> list[Target]:
    """The iobridge targets now present (only `names` if given), by
    device-mapper ioctls: a listing costs no process."""
    targets = []
    for name in dmioctl.list_devices():
        if names and name not in names:
            continue
        try:
            lines = dmioctl.status(name)
        except IobridgeError:
            continue          # removed since the listing
        t = target_of(name, lines)
        if t is not None:
            targets.append(t)
    return sorted(targets, key=lambda t: t.target_id)


class PhaseTimes:
    """Per-phase duration histograms (ns, the observer's log-linear slots)."""

    def __init__(self):
        self.hist = {p: np.zeros(abi.LAT_SLOTS, dtype=np.int64) for p in PHASES}

    def add(self, phase: str, ns: int) -> None:
        self.hist[phase][histogram.slot_of(max(ns, 0))] += 1

    def summary(self) -> dict:
        out = {}
        for phase, h in self.hist.items():
            p50, p99 = histogram.percentiles(h, (50, 99))
            out[phase] = {"count": int(h.sum()),
                          "p50_us": None if p50 is None else round(p50 / 1e3, 1),
                          "p99_us": None if p99 is None else round(p99 / 1e3, 1)}
        return out


class Agent:
    """The daemon: start() loads everything, run() ticks until stopped."""

    def __init__(self, cfg: config_mod.Config, notifier=None, overrides: dict | None = None):
        from .sdnotify import Notifier  # noqa: PLC0415
        self.cfg = cfg
        self.overrides = overrides or {}   # command-line values: win at every reload too
        self.notify = notifier or Notifier()
        self.model = None
        self.maker: decision.TableMaker | None = None
        self.observer = None
        self.legmap = None
        self.policy = None
        self.pins = None
        self.metrics = None                  # metrics.MetricsServer while serving
        self.times = PhaseTimes()
        self.counters = {"ticks": 0, "overruns": 0, "recomputes": 0, "decision_changes": 0,
                         "tick_errors": 0, "reloads": 0, "reload_failures": 0,
                         "targets_added": 0, "targets_removed": 0, "seq_retries": 0,
                         "samples": 0, "listings": 0, "listings_by_uevent": 0, "read_samples": 0,
                         "deadline_updates": 0}
        self.started_ns = 0
        self.last_published_ns = 0
        self._targets: list[Target] = []     # replaced whole by the discovery thread
        self._discovery_error: str | None = None
        self._active: list[Target] = []      # what the tick loop is set up for
        self._slots = np.zeros(0, dtype=np.int64)
        self._kdevs: list[int] = []          # leg devices, in row order
        self._rows: list[tuple[Target, slice]] = []
        self._trackers: dict[int, F.BaselineTracker] = {}   # kdev -> its baseline samples
        self._seen = np.zeros(0, dtype=np.int64)            # completions sampled, per row
        self._unfed: dict[int, tuple[list, list]] = {}      # kdev -> samples not yet in its tracker
        self._reads: dict[int, H.ReadSamples] = {}          # kdev -> its read completions
        self._reads_used = -1                # read samples taken when deadlines were last computed
        self._table: decision.KeyedTable | None = None      # the one in force
        self._hedge_basis: list = []         # per row, hedging.DeadlineBasis of its deadlines
        self._view: tuple = (None, [])                      # status's view of it (_table_view)
        self._dirty = True                   # recompute at the next chance
        self._last_build_ns = 0
        self._next_check_ns = 0              # next look at the baselines (_baselines_to_build)
        self._builder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="recompute")
        self._pending: concurrent.futures.Future | None = None   # a recompute under way
        self._reloading: concurrent.futures.Future | None = None  # a reload being checked
        self._status_written = False
        self._stop = threading.Event()
        self._events: uevents.DmEvents | None = None
        self._reload = False
        self._thread: threading.Thread | None = None
        self.prefetch = None                 # daemon/prefetch.PrefetchUnit when serving
        self.cache_observer = None           # its page-cache observer
        self._prefetch_thread: threading.Thread | None = None
        self._prefetch_error: str | None = None   # why prefetch is not running, if asked for
        self.prefetch_classifier = None      # loaded and checked at start (prefetch not off)

    # -- start and stop ---------------------------------------------------
    @staticmethod
    def _load_model(cfg: config_mod.Config):
        from ..core.model import AdmissionModel  # noqa: PLC0415 (onnxruntime import is slow)
        model = AdmissionModel(cfg.model)          # raises ModelCheckError with the reason
        return model, Agent._maker(cfg, model)

    @staticmethod
    def _maker(cfg: config_mod.Config, model) -> decision.TableMaker:
        return decision.TableMaker(model, ttl_ns=cfg.ttl_ns, threshold=cfg.threshold,
                                   probe_after_ns=cfg.probe_after_ns)

    @staticmethod
    def _load_models(cfg: config_mod.Config):
        """At start: the admission model and maker, and the prefetch unit's
        classifier (None with prefetch off), each fully checked."""
        from .prefetch import classifier_for  # noqa: PLC0415
        model, maker = Agent._load_model(cfg)
        classifier = None if cfg.prefetch_mode == "off" else classifier_for(cfg.prefetch_model)
        return model, maker, classifier

    def start(self) -> None:
        from ..kernel.observer import BlockObserver  # noqa: PLC0415
        from ..kernel.pins import Pins  # noqa: PLC0415
        from ..kernel.route_policy import RoutePolicy  # noqa: PLC0415
        cfg = self.cfg
        system.require_root("iobridge run")
        system.require_bpf_kernel()
        bpf.check_header_version()
        dmtarget.check_module_version()      # names the missing module or both versions
        # The uevent listener imports pyroute2 and opens its socket on its
        # own thread meanwhile; a socket refused (a sandbox without
        # AF_NETLINK) stops the start after the first listing, before
        # anything is compiled or attached.
        self._events = uevents.DmEvents()
        self._events.start()
        # The model check (imports, ONNX checker, a bounded test inference in
        # a child process) and the BCC compiles are independent, and each
        # takes long on a slow host: the check runs on a thread while BCC
        # compiles in C without the GIL. Nothing is attached or pinned before
        # both are done, so a bad model still stops the start with nothing
        # left behind (stop() closes what was compiled).
        from ..core.model import check_quickly  # noqa: PLC0415
        check_quickly(cfg.model, expect="admission")
        if cfg.prefetch_mode != "off" and not cfg.prefetch_rules:
            check_quickly(cfg.prefetch_model, expect="prefetch")   # e.g. an admission model
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model-check") as ex:
            checked = ex.submit(self._load_models, cfg)
            try:
                self._targets = discover(cfg.targets)  # first listing in line: errors stop the start
                self._events.wait_open()
                if cfg.metrics_listen:
                    # Before anything is attached: a port in use stops the start clean.
                    from .metrics import MetricsServer  # noqa: PLC0415
                    server = MetricsServer(cfg.metrics_listen)
                    server.start(self)
                    self.metrics = server
                self.notify.status("compiling BPF programs, checking the model")
                hedging = cfg.hedging == "on"
                self.observer = BlockObserver(
                    probe="auto", stream_legs=hedging,
                    **({"ringbuf_pages": HEDGE_RING_PAGES} if hedging else {})).open()
                self.legmap = self.observer.leg_features()
                if checked.done():
                    checked.result()         # a bad model: say so before the next compile
                self.policy = RoutePolicy().load()
            finally:
                model_error = checked.exception()     # waits for the check
            if model_error is not None:
                raise model_error
            self.model, self.maker, self.prefetch_classifier = checked.result()
        log.info("model %s (threshold %.4f, sha256 %s)", cfg.model, self.maker.threshold,
                 self.model.sha256[:12])
        if self.prefetch_classifier is not None:
            c = self.prefetch_classifier
            sha = getattr(c, "sha256", None)
            log.info("prefetch classifier %s%s: %s", c.name,
                     f" (sha256 {sha[:12]})" if sha else "", c.describe())
        self.pins = Pins(cfg.pin_dir)
        self.pins.prepare()
        for name, fd in {**self.policy.map_fds(), **self.legmap.map_fds()}.items():
            self.pins.pin(name, fd)
        self.policy.agent.pid = os.getpid()
        self.policy.heartbeat(clock.now_ns(), 0, cfg.max_silence_ns)
        if not cfg.shadow:
            self.policy.attach()
        if cfg.prefetch_mode != "off":
            self._start_prefetch()
        self.started_ns = clock.now_ns()
        log.info("target discovery: dm uevents, and a full listing every %g s",
                 cfg.discover_interval_s)
        self._thread = threading.Thread(target=self._discovery_loop, name="discovery", daemon=True)
        self._thread.start()
        log.info("agent started: %d target(s), tick %.3g ms, expiry %d ticks, %s",
                 len(self._targets), cfg.tick_ms, cfg.ttl_ticks,
                 "shadow mode (nothing published)" if cfg.shadow else "publishing")

    def _start_prefetch(self) -> None:
        """The prefetch unit (daemon/prefetch.py) with its page-cache observer.
        What a killed agent left is restored first; an observer that cannot
        attach (missing hooks, ...) is said in one line and the agent serves
        admission only."""
        from ..kernel.cachestat import CacheObserver  # noqa: PLC0415
        from .prefetch import PrefetchUnit, classifier_for  # noqa: PLC0415
        cfg = self.cfg
        if self.prefetch_classifier is None:          # start() loads it before attaching
            self.prefetch_classifier = classifier_for(cfg.prefetch_model)
        unit = PrefetchUnit(None, self.prefetch_classifier, cfg.prefetch_mode,
                            cfg.prefetch_state_file, window_s=cfg.prefetch_window_s,
                            device_only=cfg.prefetch_device_only)
        unit.prepare()                        # root, and the restore of a killed agent's record
        self.prefetch = unit                  # from here on, stop() restores
        self.notify.status("compiling the page-cache observer")
        try:
            obs = CacheObserver().open()
        except IobridgeError as err:
            self._prefetch_error = str(err)
            log.warning("prefetch off: the page-cache observer cannot attach (%s); "
                        "serving admission only", err)
            return
        self.cache_observer = obs
        unit.attach(obs)
        self._prefetch_thread = threading.Thread(target=unit.run, args=(self._stop,),
                                                 name="prefetch", daemon=True)
        self._prefetch_thread.start()

    def _stop_prefetch(self) -> None:
        if self._prefetch_thread is not None:
            self._prefetch_thread.join(timeout=30)
            self._prefetch_thread = None
        if self.prefetch is not None:
            self.prefetch.stop()              # restore what it changed, remove its record
        if self.cache_observer is not None:
            self.cache_observer.close()
            self.cache_observer = None

    def stop(self) -> None:
        """Detach, clear what was published, unpin, close. Idempotent."""
        self._stop.set()
        self.notify.stopping()
        self._builder.shutdown(wait=False, cancel_futures=True)
        if self._events is not None:
            self._events.close()       # also wakes the discovery loop
        self._stop_prefetch()
        acquired = any(x is not None for x in (self.policy, self.pins, self.observer))
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        if self.policy is not None:
            self.policy.detach()
            if self.policy.entries is not None:
                for t in self._active:
                    self.policy.clear(t.target_id)
            self.policy.close()
            self.policy = None
        if self.pins is not None:
            self.pins.remove()
            self.pins = None
        if self.observer is not None:
            self.observer.close()
            self.observer = None
        if self._status_written:      # never another agent's
            try:
                Path(self.cfg.status_file).unlink()
            except OSError:
                pass
            self._status_written = False
        if acquired:                  # not for a start refused before it held anything
            log.info("agent stopped: routing left to the module default")

    # -- target discovery (background thread) -------------------------------
    def _discovery_loop(self) -> None:
        events = self._events
        fallback_said = False
        try:
            while not self._stop.is_set():
                if events.listening:
                    if events.wait(self.cfg.discover_interval_s, self._stop):
                        self.counters["listings_by_uevent"] += 1
                else:
                    if not fallback_said:
                        fallback_said = True
                        log.warning("target discovery: the uevent listener ended (%s); "
                                    "listing targets every %g s instead", events.broken,
                                    FALLBACK_DISCOVER_S)
                    if self._stop.wait(min(FALLBACK_DISCOVER_S, self.cfg.discover_interval_s)):
                        break
                if self._stop.is_set():
                    break
                t0 = time.perf_counter_ns()
                self._discover_once()
                self.times.add("discover", time.perf_counter_ns() - t0)
                # dm devices that are not managed targets: their "change" is not news
                events.ignore = uevents.dm_names() - {t.name for t in self._targets}
        finally:
            events.close()

    def _discover_once(self) -> None:
        self.counters["listings"] += 1
        try:
            found = discover(self.cfg.targets)
            if found != self._targets:
                self._targets = found
            if self._discovery_error:
                log.info("target discovery works again")
            self._discovery_error = None
        except IobridgeError as err:
            if str(err) != self._discovery_error:
                log.error("target discovery failed: %s (keeping the last list)", err)
            self._discovery_error = str(err)

    def _apply_targets(self, targets: list[Target]) -> None:
        """Set the tick loop up for a new target list (slots, row ranges)."""
        old = {t.name: t for t in self._active}
        new = {t.name: t for t in targets}
        for name, t in old.items():
            if name not in new or new[name] != t:
                if self.policy is not None and self.policy.entries is not None:
                    self.policy.clear(t.target_id)
                if name not in new:
                    self.counters["targets_removed"] += 1
                    log.warning("target %s (id %d) is gone: its entries are cleared", name, t.target_id)
                else:
                    n = new[name]
                    log.info("target %s changed (id %d incarnation %d -> id %d incarnation %d, "
                             "legs %s): its entries are cleared and its table rebuilt", name,
                             t.target_id, t.incarnation, n.target_id, n.incarnation, " ".join(n.legs))
        for name, t in new.items():
            if name not in old:
                self.counters["targets_added"] += 1
                log.info("managing target %s (id %d, incarnation %d) with legs %s", name,
                         t.target_id, t.incarnation, " ".join(t.legs))
        kdevs = [d for t in targets for d in t.kdevs]
        slot_of = self.legmap.assign(sorted(set(kdevs)))
        self._slots = np.array([slot_of[d] for d in kdevs], dtype=np.int64)
        self._kdevs = kdevs
        # A leg device keeps its baseline while it stays a leg of some target.
        self._trackers = {d: self._trackers.get(d) or F.BaselineTracker() for d in kdevs}
        self._reads = {d: self._reads.get(d) or H.ReadSamples() for d in kdevs}
        self._reads_used = -1
        self._seen = self.legmap.completed(self._slots)
        self._rows, first = [], 0
        for t in targets:
            self._rows.append((t, slice(first, first + len(t.kdevs))))
            first += len(t.kdevs)
        self._active = targets        # the very list object: tick() compares identity
        self._table = None
        self._pending = None          # a recompute for the old legs is dropped
        self._dirty = True
        self._next_check_ns = 0

    # -- one tick -----------------------------------------------------------
    def tick(self) -> None:
        targets = self._targets       # the discovery thread swaps in a new list on change
        if targets is not self._active:
            self._apply_targets(targets)
        now = clock.now_ns()
        if not self._rows:
            self.policy.heartbeat(now)
            return
        t0 = time.perf_counter_ns()
        self._sample()
        if self.cfg.hedging == "on":
            self._sample_reads()
        t1 = time.perf_counter_ns()
        self.times.add("sample", t1 - t0)
        pending = self._pending
        if pending is not None and pending.done():
            # A recompute finished in the background: publish it now.
            self._pending = None
            self._apply(*pending.result(), now)   # an exception counts as a failed tick
        else:
            # Checking the baselines costs quantiles over every leg's samples
            # (milliseconds under emulation): at most once per recompute_ms.
            if pending is None and now >= self._next_check_ns:
                self._next_check_ns = now + self.cfg.recompute_ns
                baselines = self._baselines_to_build()
                if baselines is not None:
                    reads = self._read_copies()
                    # With the model's answers for every leg's grid point kept
                    # and no deadlines to learn, the build is ~100 us of
                    # numpy: done here and published at once (a hand-off to
                    # the builder thread cost 4x its CPU in cold caches,
                    # bench tick). Inference runs off the tick loop (ONNX
                    # Runtime releases the GIL): measured under emulation on
                    # a loaded host it took 0.5-6 s, and the heartbeat must
                    # not wait for it.
                    built = (self._timed_build(self.maker, now, baselines, None, infer=False)
                             if reads is None else None)
                    if built is not None:
                        self._apply(*built, now)
                    else:
                        self._pending = self._builder.submit(self._timed_build, self.maker, now,
                                                             baselines, reads)
                    self._last_build_ns = now
                    self._dirty = False
                    self.counters["recomputes"] += 1
                elif self._deadlines_due():
                    # New reads, same model rows: only the deadlines (the replay's rule)
                    self._pending = self._builder.submit(self._with_deadlines, self._table,
                                                         self._read_copies())
            if self._table is not None and not self.cfg.shadow:
                # The table follows the legs' live state in the kernel: keep it valid.
                for t, rows in self._rows:
                    self.policy.extend(t.target_id, len(t.kdevs), now + self.cfg.ttl_ns)
        self.policy.heartbeat(now)

    def _timed_build(self, maker: decision.TableMaker, now: int, baselines: list,
                     reads: list | None, infer: bool = True):
        """(table, deadline basis per row): the model over every key, and with
        hedging on the deadlines. On the builder thread; on the tick's with
        infer=False, where it is None unless the model's answers were kept."""
        t0 = time.perf_counter_ns()
        table = maker.build(now, baselines, infer=infer)
        if table is None:
            return None
        self.times.add("infer", time.perf_counter_ns() - t0)
        return self._with_deadlines(table, reads)

    def _apply(self, table: decision.KeyedTable, basis: list, now: int) -> None:
        """Put a finished recompute in force: note what changed, publish."""
        t0 = time.perf_counter_ns()
        self._note_changes(self._table, table)
        self._note_deadlines(self._table, table, basis)
        self._table, self._hedge_basis = table, basis
        if not self.cfg.shadow:
            self._publish(table, now)
        self.times.add("publish", time.perf_counter_ns() - t0)

    def _read_copies(self) -> list | None:
        """With hedging on: each target's rows and their read samples, copied
        for the builder thread (the tick goes on adding to them)."""
        if self.cfg.hedging != "on":
            return None
        reads = [self._reads[d] for d in self._kdevs]
        self._reads_used = sum(r.n for r in reads)
        return [(rows, [r.copy() for r in reads[rows]]) for _, rows in self._rows]

    def _deadlines_due(self) -> bool:
        """Hedging on, a table in force, and reads taken since its deadlines."""
        return (self.cfg.hedging == "on" and self._table is not None
                and sum(self._reads[d].n for d in self._kdevs) != self._reads_used)

    def _with_deadlines(self, table: decision.KeyedTable, reads: list | None):
        """(table with hedge_us, hedging.DeadlineBasis per row); hedging off
        (reads None): the table as it is (hedge_us None: zeros published)."""
        if reads is None:
            return table, []
        t0 = time.perf_counter_ns()
        hedge = np.zeros((len(table), abi.KEYS_PER_LEG), dtype=np.uint32)
        basis: list = [None] * len(table)
        for rows, samples in reads:
            hedge[rows], basis[rows] = H.target_deadlines(samples, table.p_slow[rows],
                                                          table.valid[rows])
        self.counters["deadline_updates"] += 1
        self.times.add("deadlines", time.perf_counter_ns() - t0)
        return dataclasses.replace(table, hedge_us=hedge), basis

    def _sample(self) -> None:
        """Feed each leg's new completions into its baseline."""
        completed = self.legmap.completed(self._slots)
        fresh = np.flatnonzero(completed != self._seen)
        if not len(fresh):
            return
        retries = self.legmap.retries
        samples, done = self.legmap.new_samples(self._slots[fresh], self._seen[fresh].tolist())
        self.counters["seq_retries"] += self.legmap.retries - retries
        for row, sample in zip(fresh.tolist(), samples):
            held = self._unfed.setdefault(self._kdevs[row], ([], [], []))
            for h, values in zip(held, sample):
                h.extend(values)
            self.counters["samples"] += len(sample[0])
        self._seen[fresh] = done

    def _sample_reads(self) -> None:
        """Feed the legs' new read completions into their ReadSamples.

        From the observer's leg bio events (stream_legs), not its leg_features
        records: those hold each leg's last 3 completions, reads and writes
        mixed with no operation recorded, and writes (acknowledged from a
        drive's buffer) must not set a read deadline. The events carry the
        operation and latency of every leg bio; the ring's size bounds what
        one tick drains (HEDGE_RING_PAGES), and the filter is one numpy pass
        per tick, the rest plain Python."""
        ev = self.observer.poll_events(timeout_ms=0, max_seconds=READ_DRAIN_S)
        if not len(ev):
            return
        ev = ev[(ev["op"] == abi.OP_READ) & (ev["error"] == 0) & (ev["level"] == abi.EVENT_LEG_BIO)]
        lat_us = ((ev["complete_ns"] - ev["issue_ns"]) / 1e3).tolist()
        for dev, lat, nbytes in zip(ev["dev"].tolist(), lat_us, ev["bytes"].tolist()):
            reads = self._reads.get(dev)
            if reads is not None:
                reads.add(lat, nbytes)
                self.counters["read_samples"] += 1

    def _feed_baselines(self) -> None:
        """Hand the samples taken since the last call to the legs' trackers:
        once per baseline check, not per tick (numpy calls are dear under
        emulation)."""
        unfed, self._unfed = self._unfed, {}
        for kdev, (lat, tput, per_read) in unfed.items():
            if kdev in self._trackers:
                self._trackers[kdev].add(lat, tput, per_read)

    def _baselines(self) -> list:
        """Each leg's baseline as its target's table uses it
        (decision.target_baselines: borrowed when missing, slow cost shared)."""
        own = [decision.LegBaseline.of(self._trackers[d]) for d in self._kdevs]
        out = list(own)
        for _, rows in self._rows:
            out[rows] = decision.target_baselines(own[rows])[0]
        return out

    def _baselines_to_build(self) -> list | None:
        """The baselines to recompute the table from, or None while the one
        in force still fits them (checked at most once per recompute_ms:
        quantiles over every leg's samples cost milliseconds under emulation)."""
        self._feed_baselines()
        if not any(self._trackers[d].ready for d in self._kdevs):
            return None      # nothing to build from yet: the first baseline builds at once
        baselines = self._baselines()
        if self._dirty or self._table is None:
            return baselines
        if any(new is not None and new.moved(old, BASELINE_MOVE)
               for new, old in zip(baselines, self._table.baselines)):
            return baselines
        return None

    def _publish(self, table: decision.KeyedTable, now: int) -> None:
        expires = now + self.cfg.ttl_ns
        for t, rows in self._rows:
            if not table.valid[rows].any():
                continue   # no baseline yet on any leg: the module default decides
            exp = np.where(table.valid[rows], expires, 0)
            self.policy.publish(t.ref, table.penalty_ns[rows], table.lat_edges_ns[rows],
                                table.service_ns[rows], table.probe_after_ns, exp,
                                table.top_lat_ns[rows],
                                hedge_us=None if table.hedge_us is None else table.hedge_us[rows],
                                in_range=True)
        self.policy.heartbeat(now, published_ns=now)
        self.last_published_ns = now

    def _note_changes(self, old: decision.KeyedTable | None, new: decision.KeyedTable) -> None:
        """Count keys whose verdict (P(slow) against the threshold) changed;
        at debug level log each leg's change with the baseline behind it."""
        if old is None or len(old) != len(new):
            return
        th = self.maker.threshold
        changed = old.avoided(th) != new.avoided(th)
        self.counters["decision_changes"] += int(changed.sum())
        if not changed.any() or not log.isEnabledFor(logging.DEBUG):
            return
        for row in np.flatnonzero(changed.any(axis=1)):
            t, rows = self._target_of(row)
            ob, nb = old.baselines[row], new.baselines[row]
            log.debug("%s leg %d: %d key(s) changed verdict (p_slow vs threshold %.3f): "
                      "avoided keys %d -> %d; baseline latency %s -> %.1f us, service per read %s -> "
                      "%.1f us, slow read %s -> %.0f us",
                      t.name, row - rows.start, int(changed[row].sum()), th,
                      int(old.avoided(th)[row].sum()), int(new.avoided(th)[row].sum()),
                      "none" if ob is None else f"{ob.lat_us:.1f}", nb.lat_us if nb else 0.0,
                      "none" if ob is None else f"{ob.service_us:.1f}", nb.service_us if nb else 0.0,
                      "none" if ob is None else f"{ob.slow_lat_us:.0f}", nb.slow_lat_us if nb else 0.0)

    def _target_of(self, row: int) -> tuple[Target, slice]:
        return next((t, r) for t, r in self._rows if r.start <= row < r.stop)

    def _note_deadlines(self, old: decision.KeyedTable | None, new: decision.KeyedTable,
                        basis: list) -> None:
        """At debug level, each leg whose hedge deadlines changed, with why
        they are what they are (as `iobridge status` shows it)."""
        if new.hedge_us is None or not log.isEnabledFor(logging.DEBUG):
            return
        before = old.hedge_us if old is not None and old.hedge_us is not None \
            and len(old) == len(new) else np.zeros_like(new.hedge_us)
        key = abi.key_index(0, 0, 0)
        for row in np.flatnonzero((before != new.hedge_us).any(axis=1)):
            t, rows = self._target_of(row)
            d = new.hedge_us[row]
            log.debug("%s leg %d: hedge deadlines changed on %d key(s): 4k read, idle, fast "
                      "newest read %d -> %d us, all keys %d-%d us (0 = never); %s",
                      t.name, row - rows.start, int((before[row] != d).sum()), int(before[row, key]),
                      int(d[key]), int(d.min()), int(d.max()),
                      hedge_reason(hedge_view(new, basis, row)))

    # -- reload ---------------------------------------------------------------
    def reload(self) -> bool:
        """Re-read the config file and the model; keep both on any error."""
        self.notify.reloading()
        return self._apply_reload(self._builder.submit(self._prepare_reload))

    def _prepare_reload(self):
        """(config, model, maker) of a reload: the model's checks run a test
        inference in a child process (up to model.CHECK_TIMEOUT_S), off the
        tick loop, which goes on beating the heartbeat and the watchdog."""
        cfg = config_mod.load(self.cfg.source) if self.cfg.source else self.cfg
        cfg = cfg.replace(**self.overrides)
        if self._model_unchanged(cfg):
            # The bytes checked at the last load are the bytes in the files:
            # no second check (a child process's test inference, seconds
            # under emulation), and with the maker's settings unchanged its
            # kept answers too (no inference at the next recompute).
            log.info("model %s unchanged (sha256 %s): kept", cfg.model, self.model.sha256[:12])
            maker = self._maker(cfg, self.model)
            old = self.maker
            if (old is not None and old.model is self.model
                    and (old.ttl_ns, old.threshold, old.probe_after_ns)
                    == (maker.ttl_ns, maker.threshold, maker.probe_after_ns)):
                maker = old
            return cfg, self.model, maker
        return (cfg, *self._load_model(cfg))

    def _model_unchanged(self, cfg: config_mod.Config) -> bool:
        """The model in force came from cfg.model, whose file and card hold
        the same bytes and card as when it was checked."""
        from ..core.model import card_path, model_sha256  # noqa: PLC0415
        m = self.model
        if m is None or getattr(m, "path", None) is None or Path(cfg.model) != m.path:
            return False
        try:
            return (model_sha256(m.path.read_bytes()) == m.sha256
                    and json.loads(card_path(m.path).read_text()) == m.card)
        except (OSError, ValueError):
            return False          # the full load says what is wrong

    def _apply_reload(self, prepared: concurrent.futures.Future) -> bool:
        """Put a prepared reload in force (waits for it), or log why not."""
        try:
            cfg, model, maker = prepared.result()
        except IobridgeError as err:
            self.counters["reload_failures"] += 1
            log.error("reload refused, the running config and model stay in force: %s", err)
            self.notify.ready(f"reload refused: {err}")
            return False
        # hedging: the observer streams leg bios only if it was opened to
        fixed = ("pin_dir", "metrics_listen", "hedging", "prefetch_mode",
                 "prefetch_window_s", "prefetch_state_file", "prefetch_model",
                 "prefetch_device_only")
        if any(getattr(cfg, k) != getattr(self.cfg, k) for k in fixed):
            log.warning("pin_dir, metrics_listen, admission.hedging and the prefetch "
                        "keys take effect at restart only (prefetch: mode, window_s, "
                        "state_file, model, device_only)")
            cfg = dataclasses.replace(cfg, **{k: getattr(self.cfg, k) for k in fixed})
        if cfg.shadow != self.cfg.shadow and not self._set_shadow(cfg.shadow):
            cfg = dataclasses.replace(cfg, shadow=self.cfg.shadow)
        if maker is not self.maker:
            self._pending = None      # a recompute with the old maker is dropped
        self.cfg, self.model, self.maker = cfg, model, maker
        self._dirty = True            # the new model (or probing, expiry) fills the table
        self._last_build_ns = self._next_check_ns = 0
        self.policy.heartbeat(clock.now_ns(),
                              max_silence_ns=cfg.max_silence_ns)
        self.counters["reloads"] += 1
        log.info("reloaded: model %s (threshold %.4f), tick %.3g ms",
                 cfg.model, maker.threshold, cfg.tick_ms)
        self.notify.ready("reloaded")
        return True

    def _set_shadow(self, shadow: bool) -> bool:
        """Enter shadow mode (detach the routing program: the module default
        decides every read from the next one on, the agent goes on deciding
        and logging) or leave it (attach; the reload's recompute publishes a
        fresh table, and until then the entries left have expired, so the
        module default decides). False, said, if the program cannot attach."""
        if shadow:
            self.policy.detach()
            log.info("shadow mode: routing program detached, the module default decides "
                     "every read; decisions are still made and logged")
            return True
        try:
            self.policy.attach()
        except IobridgeError as err:
            log.error("shadow mode kept: %s", err)
            return False
        log.info("shadow mode left: routing program attached, publishing")
        return True

    # -- main loop ---------------------------------------------------------------
    def run(self, duration_s: float | None = None) -> None:
        def on_signal(signum, _frame):
            if signum == signal.SIGHUP:
                self._reload = True
            else:
                self._stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_signal)
        watchdog_s = self.notify.watchdog_interval_s()
        next_ping = next_status = 0.0
        deadline = None if duration_s is None else time.monotonic() + duration_s
        self.notify.ready(f"managing {len(self._targets)} target(s)")
        next_tick = time.monotonic_ns()
        while not self._stop.is_set():
            if self._reload and self._reloading is None:
                self._reload = False
                self.notify.reloading()
                self._reloading = self._builder.submit(self._prepare_reload)
            if self._reloading is not None and self._reloading.done():
                prepared, self._reloading = self._reloading, None
                self._apply_reload(prepared)
            t0 = time.perf_counter_ns()
            try:
                self.tick()
            except Exception:   # noqa: BLE001 - one bad tick must not kill the agent
                self.counters["tick_errors"] += 1
                if self.counters["tick_errors"] <= 10 or log.isEnabledFor(logging.DEBUG):
                    log.exception("tick failed; entries expire and the module default applies")
            self.times.add("tick", time.perf_counter_ns() - t0)
            self.counters["ticks"] += 1
            mono = time.monotonic()
            if watchdog_s and mono >= next_ping:
                self.notify.watchdog()
                next_ping = mono + watchdog_s / 2
            if mono >= next_status:
                t0 = time.perf_counter_ns()
                self.write_status()
                self.times.add("status", time.perf_counter_ns() - t0)
                next_status = mono + STATUS_INTERVAL_S
            if deadline is not None and mono >= deadline:
                break
            next_tick += self.cfg.tick_ns
            wait = next_tick - time.monotonic_ns()
            if wait > 0:
                time.sleep(wait / 1e9)
            else:
                self.counters["overruns"] += 1
                if wait < -10 * self.cfg.tick_ns:
                    next_tick = time.monotonic_ns()   # far behind: don't burst to catch up

    # -- status -------------------------------------------------------------------
    def target_statuses(self) -> list[tuple[str, dmtarget.TargetStatus]]:
        """(name, module status) of each target now managed (by ioctl; a
        target removed since the listing is left out). For the metrics."""
        out = []
        for t in self._targets:
            try:
                out.append((t.name, dmtarget.status(t.name)))
            except IobridgeError:
                continue
        return out

    def status(self) -> dict:
        now = clock.now_ns()
        table = self._table
        live = self.legmap.read(self._slots) if self.legmap is not None and len(self._slots) else None
        idle = live.idle_ns(now) if live is not None else None
        view = self._table_view(table)
        targets = []
        for t, rows in self._rows:
            legs = []
            for i, dev in enumerate(t.legs):
                r = rows.start + i
                tracker = self._trackers.get(self._kdevs[r])
                reads = self._reads.get(self._kdevs[r])
                legs.append({
                    "dev": dev, "slot": int(self._slots[r]),
                    "samples": (tracker.n if tracker else 0)
                    + len(self._unfed.get(self._kdevs[r], ((),))[0]),
                    "read_samples": reads.n if reads else 0,
                    **view[r],
                    "live": None if live is None else {
                        "inflight": int(live.inflight[r]),
                        "prev_lat_us": np.round(live.prev_lat_us[r], 1).tolist(),
                        "idle_ms": None if idle[r] is None else round(idle[r] / 1e6, 1)}})
            targets.append({"name": t.name, "target_id": t.target_id,
                            "incarnation": t.incarnation, "legs": legs,
                            "hedging": any(leg["hedge"]["on"] for leg in legs),
                            "target_hedges": _target_hedges(t.name)})
        return {
            "pid": os.getpid(), "pid_create_time": _own_create_time(),
            "abi_version": abi.ABI_VERSION,
            "written_ns": now, "started_ns": self.started_ns,
            "status_interval_s": STATUS_INTERVAL_S,
            "config": str(self.cfg.source) if self.cfg.source else None,
            "shadow": self.cfg.shadow, "tick_ms": self.cfg.tick_ms, "ttl_ticks": self.cfg.ttl_ticks,
            "max_silence_ms": self.cfg.max_silence_ms, "recompute_ms": self.cfg.recompute_ms,
            "probe_after_ms": self.cfg.probe_after_ms, "hedging": self.cfg.hedging,
            "model": {"path": str(self.cfg.model), "sha256": self.model.sha256,
                      "threshold": self.maker.threshold,
                      "created": self.model.card.get("created")},
            "program_attached": bool(self.policy and self.policy.attached),
            "pins": [str(p) for p in (self.pins.created if self.pins else [])],
            "last_published_ns": self.last_published_ns,
            "last_recompute_ns": self._last_build_ns,
            "table_age_ms": (now - self.last_published_ns) / 1e6 if self.last_published_ns else None,
            "targets": targets,
            "discovery_error": self._discovery_error,
            "counters": dict(self.counters),
            "routing": self.policy.stats() if self.policy else None,
            "timing_us": self.times.summary(),
            "prefetch": self._prefetch_status(),
        }

    def _prefetch_status(self) -> dict:
        if self.prefetch is None or self._prefetch_error:
            # the classifier was loaded and checked at start even when the
            # observer then could not attach: say which one would have run
            from .prefetch import classifier_info  # noqa: PLC0415
            c = self.prefetch_classifier
            return {"mode": "off" if self._prefetch_error is None else self.cfg.prefetch_mode,
                    "running": False, "error": self._prefetch_error,
                    "classifier_info": None if c is None else classifier_info(c)}
        return {"running": self._prefetch_thread is not None, **self.prefetch.status()}

    def _table_view(self, table: decision.KeyedTable | None) -> list[dict]:
        """Per row, what status shows of the table in force; kept until the
        table changes (the status file is rewritten every STATUS_INTERVAL_S)."""
        if self._view[0] is table and len(self._view[1]) == len(self._kdevs):
            return self._view[1]
        th = self.maker.threshold if self.maker else 0.0
        avoided = table.avoided(th).sum(axis=1) if table is not None else None
        view = []
        for r in range(len(self._kdevs)):
            base = table.baselines[r] if table is not None and r < len(table) else None
            if base is None:
                view.append({"baseline": None, "lat_edges_us": None, "p_slow_4k": None,
                             "penalty_4k_us": None, "avoided_keys": None, "hedge": {"on": False}})
                continue
            keys = {n: [abi.key_index(0, n, lb) for lb in range(abi.NUM_LAT_BUCKETS)] for n in (0, 1)}
            view.append({
                "baseline": {"lat_us": round(base.lat_us, 1), "tput_mbps": round(base.tput, 3),
                             "slow_lat_us": round(base.slow_lat_us, 1),
                             "service_us": round(base.service_us, 1)},
                "lat_edges_us": np.round(table.lat_edges_ns[r] / 1e3, 1).tolist(),
                # P(slow) and penalty for 4 KiB reads with 0 and 1 bios in
                # flight, per latency bucket: the model's view of this leg
                "p_slow_4k": {f"inflight_{n}": np.round(table.p_slow[r, k].astype(np.float64), 4).tolist()
                              for n, k in keys.items()},
                "penalty_4k_us": {f"inflight_{n}": np.round(table.penalty_ns[r, k] / 1e3, 1).tolist()
                                  for n, k in keys.items()},
                "avoided_keys": int(avoided[r]),
                "hedge": hedge_view(table, self._hedge_basis, r)})
        self._view = (table, view)
        return view

    def write_status(self) -> None:
        path = Path(self.cfg.status_file)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            # compact: json's C encoder (indent= takes the pure-Python one,
            # ~70 ms per write under emulation); `iobridge status` formats it
            tmp.write_text(json.dumps(self.status()))
            os.replace(tmp, path)
            self._status_written = True
        except OSError as err:
            log.warning("cannot write status file %s: %s", path, err.strerror)


# In-flight buckets as status names them: 0, 1, 2-3, 4-7, 8-15, 16+
INFLIGHT_LABELS = tuple(
    str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}"
    for lo, hi in zip(abi.INFLIGHT_BUCKET_MIN, abi.INFLIGHT_BUCKET_MIN[1:])) \
    + (f"{abi.INFLIGHT_BUCKET_MIN[-1]}+",)


def _target_hedges(name: str) -> dict | None:
    """The target's own hedge counters (dmsetup status), None when the
    target is gone or its module reports none."""
    try:
        h = dmtarget.status(name).hedge
    except IobridgeError:
        return None
    return None if h is None else dataclasses.asdict(h)


def hedge_view(table: decision.KeyedTable | None, basis: list, row: int) -> dict:
    """A leg's hedge deadlines as status shows them, with why they are what
    they are: the fast reads behind them and their latency fit. "on": the
    leg has a deadline on some key; only "on" (False) where hedging is off
    or the leg has no entry."""
    b = basis[row] if table is not None and table.hedge_us is not None and row < len(basis) \
        else None
    if b is None:
        return {"on": False}
    d = table.hedge_us[row]
    return {"on": bool(d.any()), "fast_samples": b.fast_samples, "pooled": b.pooled,
            "min_samples": H.MIN_SAMPLES,
            "fit": None if b.fit is None else {"a_us": round(b.fit[0], 1),
                                               "b_us_per_kib": round(b.fit[1] * 1024, 4)},
            # per in-flight bucket, per latency bucket, 0 = never
            "deadline_4k_us": {f"inflight_{lo}": [int(d[abi.key_index(0, n, lb)])
                                                  for lb in range(abi.NUM_LAT_BUCKETS)]
                               for n, lo in enumerate(abi.INFLIGHT_BUCKET_MIN)}}


def hedge_reason(h: dict) -> str:
    """Why a leg's deadlines are what they are, in words (status, -vv log)."""
    if "fast_samples" not in h:
        return "hedging off"
    src = "its target's legs together: too few of its own" if h["pooled"] else "its own"
    if h["fit"] is None:
        return f"never hedge: {h['fast_samples']} fast reads ({src}), {h['min_samples']} needed"
    f = h["fit"]
    return (f"from {h['fast_samples']} fast reads ({src}): one takes {f['a_us']} us + "
            f"{f['b_us_per_kib']} us per KiB, and a key's deadline is the quantile of their "
            "spread around that at the level its P(slow) sets (hedging.hedge_level)")


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def run_overrides(args) -> dict:
    """The config values `iobridge run`'s options set (absent ones left out),
    model paths made absolute as --model's always were; "rules" kept as is."""
    pmodel = args.prefetch_model
    if pmodel is not None and not config_mod.is_rules(pmodel):
        pmodel = Path(pmodel).resolve()
    overrides = {"model": Path(args.model).resolve() if args.model else None,
                 "tick_ms": args.tick_ms, "shadow": True if args.shadow else None,
                 "status_file": Path(args.status_file) if args.status_file else None,
                 "metrics_listen": args.metrics_listen, "prefetch_mode": args.prefetch,
                 "hedging": args.hedging, "prefetch_model": pmodel}
    return {k: v for k, v in overrides.items() if v is not None}


def cmd_run(args) -> int:
    overrides = run_overrides(args)
    cfg = config_mod.load(args.config).replace(**overrides)
    if args.verbose == 0:
        logging.getLogger().setLevel(cfg.log_level.upper())
    agent = Agent(cfg, overrides=overrides)
    try:
        agent.start()
        agent.run(args.duration)
    finally:
        agent.stop()
    c = agent.counters
    print(f"iobridge run: {c['ticks']} ticks, {c['recomputes']} table recomputes, "
          f"{c['decision_changes']} decision changes, {c['overruns']} overruns, "
          f"{c['tick_errors']} tick errors", flush=True)
    return 0


class AgentNotRunning(IobridgeError):
    """No status file: no agent is running (`iobridge status` exit 3)."""

    exit_code = STATUS_NOT_RUNNING


class StatusFileError(IobridgeError):
    """A status file that cannot be read or is not an agent's status
    (`iobridge status` exit 4: the agent's state is unknown)."""

    exit_code = STATUS_UNREADABLE


@functools.cache
def _own_create_time() -> float:
    """This process's start time as psutil (and `iobridge status`) sees it."""
    return psutil.Process().create_time()


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# What `iobridge status` needs in the file to decide liveness: field -> check
STATUS_FIELDS = {
    "pid": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
    "written_ns": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "tick_ms": lambda v: _is_number(v) and v > 0,
    "max_silence_ms": lambda v: _is_number(v) and v >= 0,
}


def stale_after_s(st: dict) -> float:
    """Age past which a status file is stale, from the settings it records."""
    interval = st.get("status_interval_s")
    if not (_is_number(interval) and interval > 0):
        interval = STATUS_INTERVAL_S      # written by an agent that did not record it
    return STALE_INTERVALS * max(interval, st["tick_ms"] / 1e3) + st["max_silence_ms"] / 1e3


def _not_alive_reason(st: dict, now_ns: int) -> str | None:
    """Why the status file does not describe a running agent (None: it does):
    its pid must exist and be the agent that wrote it (the start time it
    recorded, or else an iobridge command line), and the file must be fresh."""
    pid = st["pid"]
    try:
        proc = psutil.Process(pid)
        created = proc.create_time()
        if proc.status() == psutil.STATUS_ZOMBIE:
            return f"process {pid} has exited"
    except psutil.NoSuchProcess:
        return f"no process {pid}"
    except psutil.Error as err:
        return f"cannot inspect process {pid}: {err}"
    recorded = st.get("pid_create_time")
    if _is_number(recorded):
        if abs(created - recorded) > 0.5:
            return f"process {pid} is not the agent that wrote the file (it started at another time)"
    else:
        try:
            cmdline = proc.cmdline()
        except psutil.Error:
            cmdline = []
        if not any("iobridge" in arg for arg in cmdline):
            return f"process {pid} is not an iobridge agent"
    age_s = (now_ns - st["written_ns"]) / 1e9
    if age_s < 0:
        return "written before this boot"
    limit = stale_after_s(st)
    if age_s > limit:
        return f"not rewritten for {age_s:.0f} s (stale after {limit:g} s)"
    return None


def read_status(path: Path) -> dict:
    """The agent's status file, checked for liveness: "agent_alive", and
    "stale_reason" when it is not alive.

    Raises AgentNotRunning without a file, StatusFileError for a file that
    cannot be read or is not an agent's status (bad JSON, missing fields)."""
    try:
        text = read_input(path).decode()
    except FileNotFoundError:
        raise AgentNotRunning(f"no agent status at {path}: the agent is not running",
                              "start it with `iobridge run` or `systemctl start iobridge`") from None
    except (OSError, UnicodeDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise StatusFileError(f"cannot read the agent status {path}: {why}") from None
    try:
        st = json_loads(text)
    except ValueError as err:
        raise StatusFileError(f"{path}: not an agent status file: malformed JSON ({err})") from None
    if not isinstance(st, dict):
        raise StatusFileError(f"{path}: not an agent status file: not a JSON object")
    for key, check in STATUS_FIELDS.items():
        if key not in st:
            raise StatusFileError(f"{path}: not an agent status file: no field {key!r}")
        if not check(st[key]):
            raise StatusFileError(f"{path}: not an agent status file: field {key!r} = {st[key]!r}")
    now = clock.now_ns()
    reason = _not_alive_reason(st, now)
    st["agent_alive"] = reason is None
    if reason is not None:
        st["stale_reason"] = reason
    st["status_age_s"] = round((now - st["written_ns"]) / 1e9, 3)
    if _is_number(st.get("last_published_ns")) and st["last_published_ns"]:
        st["table_age_ms"] = round((now - st["last_published_ns"]) / 1e6, 3)
    return st


def _state_line(st: dict) -> str:
    """The report's first line: the pid, running or not (and why), the file's age."""
    state = "running" if st["agent_alive"] else \
        f"NOT RUNNING (stale status: {st.get('stale_reason', 'the agent is gone')})"
    return f"agent pid {st['pid']} {state}, status written {st['status_age_s']} s ago"


def format_status(st: dict) -> str:
    lines = [_state_line(st),
             f"model {st['model']['path']} (threshold {st['model']['threshold']:.4f}, "
             f"sha256 {st['model']['sha256'][:12]})",
             f"mode {'shadow (not publishing)' if st['shadow'] else 'publishing'}, tick {st['tick_ms']} ms, "
             f"expiry {st['ttl_ticks']} ticks, heartbeat limit {st['max_silence_ms']} ms, "
             f"recompute at most every {st.get('recompute_ms')} ms, probe after {st.get('probe_after_ms')} ms, "
             f"hedging {st.get('hedging', 'off')}",
             f"routing program {'attached' if st['program_attached'] else 'not attached'}; "
             f"pins: {', '.join(st['pins']) or 'none'}",
             f"decision table computed {st.get('table_age_ms')} ms ago (it follows each leg's live "
             f"state in the kernel between recomputes)"]
    r = st.get("routing") or {}
    lines.append(f"routing: {r.get('routed', 0)} reads by the table ({r.get('probes', 0)} probes), "
                 f"{r.get('default', 0)} by the module default ({r.get('silent', 0)} while the "
                 f"agent was silent)")
    c = st["counters"]
    lines.append("counters: " + ", ".join(f"{k} {v}" for k, v in c.items()))
    tm = st["timing_us"]
    lines.append("tick timing (us, p50/p99): " + ", ".join(
        f"{p} {tm[p]['p50_us']}/{tm[p]['p99_us']}" for p in PHASES))
    pf = st.get("prefetch")
    if pf and pf.get("mode", "off") != "off":
        ci = pf.get("classifier_info")
        model = None if not ci else (
            f"model {ci['path']} (sha256 {ci['sha256'][:12]})" if ci.get("sha256")
            else "rule-based (prefetch.model = rules)")
        if not pf.get("running"):
            lines.append(f"prefetch {pf['mode']}: not running ({pf.get('error')})")
            if ci:
                lines.append(f"  classifier {ci['name']}: {model}")
        else:
            c = pf["counters"]
            lines.append(f"prefetch {pf['mode']}: {c['windows']} windows, {c['actions']} actions "
                         f"({c['device_changes']} device, {c['file_advice']} file advice, "
                         f"{c['willneed_calls']} willneed calls, {c['dropped_pages']} pages "
                         f"dropped behind), {c['restores']} restores; streams per class: "
                         + ", ".join(f"{k} {v}" for k, v in pf["streams_per_class"].items()))
            if ci:
                lines.append(f"  classifier {ci['name']}: {model}; {c.get('classified', 0)} "
                             "stream windows classified")
    if st.get("discovery_error"):
        lines.append(f"target discovery failing: {st['discovery_error']}")
    if not st["targets"]:
        lines.append("no iobridge targets")
    for t in st["targets"]:
        lines.append(f"target {t['name']} (id {t['target_id']}, incarnation "
                     f"{t.get('incarnation', '?')}), hedging "
                     f"{'on' if t.get('hedging') else 'off'}")
        th = t.get("target_hedges")
        if th:
            lines.append(f"  hedges in the target: {th['issued']} issued, {th['won']} won, "
                         f"{th['lost']} lost, {th['refused']} refused by its budget of "
                         f"{th['budget_pct']:g}% of reads"
                         + (f", {th['nomem']} given up for lack of bounce memory"
                            if th.get("nomem") else "")
                         + (f"; its own deadline {th['hedge_us']} us" if th["hedge_us"] else ""))
        for i, leg in enumerate(t["legs"]):
            b = leg.get("baseline")
            if b is None:
                lines.append(f"  leg {i} {leg['dev']}: no baseline yet ({leg['samples']} samples): "
                             "the module default decides for it")
                continue
            lines.append(f"  leg {i} {leg['dev']}: baseline {b['lat_us']} us, slow read {b['slow_lat_us']} us, "
                         f"{leg['avoided_keys']} of {abi.KEYS_PER_LEG} keys at or above the threshold")
            lines.append(f"    latency bucket edges (us): {leg['lat_edges_us']}")
            for n in (0, 1):
                lines.append(f"    4k reads, {n} in flight: p_slow per latency bucket "
                             f"{leg['p_slow_4k'][f'inflight_{n}']}, penalty us "
                             f"{leg['penalty_4k_us'][f'inflight_{n}']}")
            h = leg.get("hedge") or {"on": False}
            if "fast_samples" in h:
                lines.append(f"    hedging {'on' if h['on'] else 'off'} ({leg.get('read_samples', 0)} "
                             f"read samples): {hedge_reason(h)}")
            if h["on"]:
                for label, d in zip(INFLIGHT_LABELS, h["deadline_4k_us"].values()):
                    lines.append(f"    4k reads, {label} in flight: hedge deadline us per "
                                 f"latency bucket {d}")
    return "\n".join(lines)


def cmd_status(args) -> int:
    """--json prints what the file holds; the text report needs the fields it
    shows: a live agent's file without them is malformed (exit 4), a stale
    one is "not running" (exit 3, its first line) however much is left."""
    st = read_status(args.status_file)
    if args.json:
        text = json.dumps(st, indent=1)
    else:
        try:
            text = format_status(st)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            if st["agent_alive"]:
                raise StatusFileError(f"{args.status_file}: not an agent status file: "
                                      f"missing or malformed field {err}") from None
            text = _state_line(st)
    print(text)
    return STATUS_RUNNING if st["agent_alive"] else STATUS_NOT_RUNNING


def _metrics_listen(text: str) -> str:
    """argparse type of --metrics-listen: a usage error naming the problem."""
    import argparse  # noqa: PLC0415
    from .metrics import parse_listen  # noqa: PLC0415
    try:
        parse_listen(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def register_cli(sub) -> None:
    p = sub.add_parser("run", help="run the admission agent (foreground; systemd Type=notify)",
                       description="Load the observer and routing programs; keep each leg's "
                                   "baseline from the kernel's leg state, evaluate the admission "
                                   "model over the feature-keyed table when a baseline or the model "
                                   "changes, and publish it; the kernel routes every read from it and "
                                   "the legs' live state. SIGHUP reloads config and model; SIGTERM "
                                   "detaches and leaves the targets on the module default.",
                       **cliutil.examples(
                           ("sudo iobridge run", "built-in defaults and the shipped model"),
                           ("sudo iobridge run --config /etc/iobridge/iobridge.toml",
                            "as the systemd unit runs it"),
                           ("sudo iobridge -v run --shadow", "decide and log, publish nothing"),
                           ("sudo iobridge run --model m.onnx --duration 60",
                            "another model, for one minute"),
                           ("sudo iobridge run --hedging on",
                            "also publish learned hedge deadlines per leg and key"),
                           ("sudo iobridge run --prefetch on",
                            "also tune readahead with the shipped prefetch model"),
                           ("sudo iobridge run --prefetch shadow --prefetch-model rules",
                            "the rule-based prefetch classifier, deciding and logging only"),
                           ("sudo iobridge run --metrics-listen 127.0.0.1:9464",
                            "with Prometheus metrics at http://127.0.0.1:9464/metrics"),
                           ("sudo systemctl reload iobridge", "SIGHUP: reload config and model")))
    p.add_argument("--config", type=Path, help="TOML config file (default: built-in defaults; "
                                               "keys in agent/config.py)")
    p.add_argument("--model", help="ONNX admission model (overrides admission.model)")
    p.add_argument("--tick-ms", type=cliutil.float_range(clock.TICK_MS_MIN, clock.TICK_MS_MAX),
                   help="heartbeat and sampling period in ms (overrides agent.tick_ms)")
    p.add_argument("--shadow", action="store_true", help="compute and log decisions, publish nothing")
    p.add_argument("--status-file", help="where to write the status JSON (overrides agent.status_file)")
    p.add_argument("--duration", type=cliutil.seconds, help="stop cleanly after this many seconds")
    p.add_argument("--metrics-listen", metavar="ADDR:PORT", type=_metrics_listen,
                   help="serve Prometheus metrics at http://ADDR:PORT/metrics, e.g. "
                        "127.0.0.1:9464 (overrides agent.metrics_listen; default: off)")
    p.add_argument("--hedging", choices=config_mod.HEDGING_MODES,
                   help="on: publish hedge deadlines per leg and key, learned from each leg's "
                        "recent fast reads and the model's P(slow); the target hedges a read "
                        "past its deadline, within its budget (overrides admission.hedging; "
                        "default off)")
    p.add_argument("--prefetch", choices=config_mod.PREFETCH_MODES,
                   help="the prefetch unit: off, shadow (decide and log at debug level, change "
                        "nothing) or on (set read_ahead_kb and advise open files; restored on "
                        "stop) (overrides prefetch.mode; default off)")
    p.add_argument("--prefetch-model", metavar="PATH|rules",
                   help="the prefetch unit's classifier: an ONNX prefetch model (default: the "
                        "shipped models/prefetch-default.onnx), or 'rules' for the rule-based "
                        "stand-in for KML's MLP (RuleClassifier); checked at start, before "
                        "anything is attached (overrides prefetch.model; used with --prefetch "
                        "shadow or on)")
    p.set_defaults(func=cmd_run)

    s = sub.add_parser("status", help="show the running agent: targets, legs, model, table age, counters",
                       description="Reads the status file the agent rewrites every "
                       f"{STATUS_INTERVAL_S:g} s. The agent is running when the file's pid "
                       "exists and is the agent that wrote it (same process start time) and "
                       f"the file is fresh: at most {STALE_INTERVALS} x max(status period, "
                       "tick) + the heartbeat limit old, from the settings in the file. "
                       f"Exit status: {STATUS_RUNNING} running; {STATUS_NOT_RUNNING} not running "
                       "(no status file, or a stale one: the report says why); "
                       f"{STATUS_UNREADABLE} the status file cannot be read or is not an "
                       "agent's status (malformed JSON, missing fields): state unknown.",
                       parents=[cliutil.json_parent()],
                       **cliutil.examples(
                           ("iobridge status", "targets, legs, model, table age, counters"),
                           ("iobridge status --json", "the same as JSON"),
                           ("iobridge status --status-file /tmp/agent/status.json",
                            "an agent started with --status-file")))
    s.add_argument("--status-file", type=Path, default=config_mod.Config.status_file,
                   help="the agent's status file (default %(default)s)")
    s.set_defaults(func=cmd_status)
