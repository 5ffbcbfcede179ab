"""Block observer: loads bpf/observer.bpf.c with BCC, reads its per-device
state, optionally drains its per-I/O event stream, and the `iobridge observe`
command (iostat and biolatency in one).

Probe selection follows bcc's tools: the block tracepoints first (attached
raw, so a completion interrupt never finds the program busy; see
bpf/observer.bpf.c), kprobes on the block layer's request functions when the
tracepoints are missing, and a clear error when neither is usable. The kprobe
fallback can miss a completion that interrupts the issue probe on the same
CPU; the kernel counts such misses in the program's recursion_misses.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np

from ..core import abi, cliutil, histogram
from ..core.errors import IobridgeError, UsageError
from . import blockdev, bpf, legstate, system

PROBES = ("auto", "tracepoint", "kprobe")
TRACEPOINTS = (("block", "block_rq_issue"), ("block", "block_rq_complete"),
               ("block", "block_bio_queue"), ("block", "block_bio_complete"))
KPROBE_FUNCTIONS = (b"blk_mq_start_request", b"blk_update_request")
DEFAULT_RINGBUF_PAGES = 256   # 1 MiB: ~20k events of headroom between polls
MAX_RINGBUF_PAGES = 65536     # 256 MiB of locked kernel memory
RINGBUF_PAGES = cliutil.power_of_two(1, MAX_RINGBUF_PAGES)   # record --ringbuf-pages
MAX_INTERVAL_S = 86400.0      # observe --interval: a day
MAX_COUNT = 1_000_000_000     # observe --count
EVENT_DTYPE = np.dtype(abi.IoEvent)


@dataclass
class DevSnapshot:
    """Cumulative counters of one device at one instant."""

    issued: int
    completed: int
    inflight: int
    errors: int
    ios: np.ndarray        # per operation (abi.OP_*)
    bytes: np.ndarray      # per operation
    lat_sum_ns: int
    hist: np.ndarray       # abi.LAT_SLOTS slots

    @classmethod
    def from_leaf(cls, leaf) -> "DevSnapshot":
        return cls(int(leaf.issued), int(leaf.completed), int(leaf.inflight), int(leaf.errors),
                   np.array(leaf.ios[:], dtype=np.int64), np.array(leaf.bytes[:], dtype=np.int64),
                   int(leaf.lat_sum_ns), np.array(leaf.lat_hist[:], dtype=np.int64))

    @classmethod
    def empty(cls) -> "DevSnapshot":
        z = np.zeros(abi.NUM_OPS, dtype=np.int64)
        return cls(0, 0, 0, 0, z, z.copy(), 0, np.zeros(abi.LAT_SLOTS, dtype=np.int64))

    def minus(self, before: "DevSnapshot") -> "DevSnapshot":
        """Counts accumulated since `before` (in-flight is this instant's)."""
        return DevSnapshot(self.issued - before.issued, self.completed - before.completed,
                           self.inflight, self.errors - before.errors, self.ios - before.ios,
                           self.bytes - before.bytes, self.lat_sum_ns - before.lat_sum_ns,
                           self.hist - before.hist)

    def figures(self, seconds: float | None = None) -> dict:
        """Rates (when `seconds` is given), counts and latency percentiles (us)."""
        p50, p99, p999 = histogram.percentiles(self.hist, (50, 99, 99.9))
        out = {
            "completed": self.completed, "issued": self.issued, "inflight": self.inflight,
            "errors": self.errors,
            **{f"{name}_ios": int(self.ios[i]) for i, name in enumerate(abi.OP_NAMES)},
            "read_bytes": int(self.bytes[abi.OP_READ]), "write_bytes": int(self.bytes[abi.OP_WRITE]),
            "lat_mean_us": (self.lat_sum_ns / self.completed / 1e3) if self.completed else None,
            "lat_p50_us": p50 / 1e3 if p50 is not None else None,
            "lat_p99_us": p99 / 1e3 if p99 is not None else None,
            "lat_p999_us": p999 / 1e3 if p999 is not None else None,
        }
        if seconds:
            out["r_per_s"] = self.ios[abi.OP_READ] / seconds
            out["w_per_s"] = self.ios[abi.OP_WRITE] / seconds
            out["r_mb_per_s"] = self.bytes[abi.OP_READ] / seconds / 1e6
            out["w_mb_per_s"] = self.bytes[abi.OP_WRITE] / seconds / 1e6
        return out


class BlockObserver:
    """The loaded observer program. Use as a context manager; close() detaches.

    `devs`: when exactly one device is given the kernel side counts only it.
    `stream`: also emit one event per completed request into the ring buffer;
    `stream_legs`: one event per completed bio of the leg devices assigned
    through leg_features() (bio level: sees stacked devices such as dm);
    drain it with poll_events().
    """

    def __init__(self, probe: str = "auto", devs: list[blockdev.BlockDev] | None = None,
                 stream: bool = False, ringbuf_pages: int = DEFAULT_RINGBUF_PAGES,
                 stream_legs: bool = False):
        if probe not in PROBES:
            raise UsageError(f"unknown probe set {probe!r}", f"choose one of {', '.join(PROBES)}")
        try:
            RINGBUF_PAGES(str(ringbuf_pages))
        except argparse.ArgumentTypeError as err:
            raise UsageError(f"ring buffer pages {err}") from None
        self.requested_probe = probe
        self.devs = devs or []
        self.stream = stream
        self.stream_legs = stream_legs
        self.ringbuf_pages = ringbuf_pages
        self.bpf = None
        self.probe: str | None = None
        self.compile_seconds: float | None = None
        self._ring: bpf.EventRing | None = None
        self._legs = None

    # -- loading -------------------------------------------------------
    def _choose_probe(self, bpf_cls) -> str:
        def have_tp():
            return all(bpf_cls.tracepoint_exists(c, e) for c, e in TRACEPOINTS)

        def have_kp():   # scans kallsyms: slow, so only when needed
            return all(bpf_cls.get_kprobe_functions(f) for f in KPROBE_FUNCTIONS)

        if self.requested_probe == "tracepoint" and not have_tp():
            raise IobridgeError("the block tracepoints block_rq_issue/block_rq_complete/"
                                "block_bio_queue/block_bio_complete are not available on "
                                "this kernel", "try --probe kprobe")
        if self.requested_probe == "kprobe" and not have_kp():
            raise IobridgeError("cannot kprobe blk_mq_start_request/blk_update_request on "
                                "this kernel", "try --probe tracepoint")
        if self.requested_probe != "auto":
            return self.requested_probe
        if have_tp():
            return "tracepoint"
        if have_kp():
            return "kprobe"
        raise IobridgeError("no usable block-layer probe: neither the block_rq_issue/"
                            "block_rq_complete tracepoints nor kprobes on "
                            "blk_mq_start_request/blk_update_request are available",
                            "this kernel is not supported (needs CONFIG_TRACEPOINTS or "
                            "CONFIG_KPROBES)")

    def open(self) -> "BlockObserver":
        system.require_root("observing block I/O")
        system.require_bpf_kernel()
        self.probe = self._choose_probe(system.import_bcc().BPF)
        cflags = [f"-DIOBRIDGE_RINGBUF_PAGES={self.ringbuf_pages}"]
        if self.probe == "kprobe":
            cflags.append("-DIOBRIDGE_KPROBES")
        self.bpf, self.compile_seconds = bpf.compile_program(
            "observer", f"the block observer ({self.probe} probes)", tuple(cflags),
            kernel_structs=True)
        self._write_config()
        if self.stream or self.stream_legs:
            self._ring = bpf.EventRing(self.bpf, "events", EVENT_DTYPE)
        return self

    def _write_config(self) -> None:
        cfg = abi.ObserverConfig(filter_dev=self.devs[0].kdev if len(self.devs) == 1 else 0,
                                 stream_events=(abi.STREAM_REQUESTS if self.stream else 0)
                                 | (abi.STREAM_LEG_BIOS if self.stream_legs else 0))
        self.bpf[b"config"][ctypes.c_int(0)] = cfg

    def set_devices(self, devs: list[blockdev.BlockDev]) -> None:
        """Observe these devices from now on (all when empty)."""
        self.devs = list(devs)
        self._write_config()

    def close(self) -> None:
        if self._legs is not None:   # unmap before the maps go
            self._legs.close()
            self._legs = None
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()

    # -- state ---------------------------------------------------------
    def snapshot(self) -> dict[int, DevSnapshot]:
        """Cumulative counters per device (kernel dev_t -> snapshot)."""
        wanted = {d.kdev for d in self.devs}
        out = {}
        for key, leaf in self.bpf[b"stats"].items():
            dev = int(key.value)
            if not wanted or dev in wanted:
                out[dev] = DevSnapshot.from_leaf(leaf)
        return out

    def leg_features(self) -> "legstate.LegFeatureMap":
        """The per-leg admission feature state (a legstate.LegFeatureMap,
        created on first use, closed with the observer)."""
        if self.bpf is None:
            raise IobridgeError("the block observer is not loaded", "open() it first")
        if self.probe == "kprobe":
            raise IobridgeError("leg feature state needs the block_bio_queue/"
                                "block_bio_complete tracepoints; the kprobe fallback "
                                "does not keep it", "use --probe tracepoint")
        if self._legs is None:
            self._legs = legstate.LegFeatureMap(self.bpf)
        return self._legs

    def legs_dropped(self) -> int:
        """Leg bios not tracked because the kernel's start table was full."""
        return self._percpu_sum("leg_dropped")

    def legs_walk_overflow(self) -> int:
        """Request completions with more leg bios than the kernel walks."""
        return self._percpu_sum("leg_walk_overflow")

    def _percpu_sum(self, name: str) -> int:
        return bpf.percpu_sum(self.bpf, name)

    def dropped_events(self) -> int:
        """Events the kernel could not put in the ring buffer (it was full)."""
        return self._percpu_sum("dropped")

    def missed_starts(self) -> int:
        """Completions whose issue was not seen (issued before attach)."""
        return self._percpu_sum("missed_starts")

    # -- event stream --------------------------------------------------
    def poll_events(self, timeout_ms: int = 100, max_seconds: float = 0.5) -> np.ndarray:
        """Drain the event stream for at most about `max_seconds`.

        Returns the events as a numpy structured array (fields of
        struct iobridge_io_event).
        """
        if not (self.stream or self.stream_legs):
            raise UsageError("the observer was opened without the event stream")
        return self._ring.poll(timeout_ms, max_seconds)


# --------------------------------------------------------------------- CLI

def _format_row(name: str, f: dict) -> str:
    def us(v):
        return f"{v:9.1f}" if v is not None else f"{'-':>9}"
    return (f"{name:<14} {f['r_per_s']:9.1f} {f['w_per_s']:9.1f} {f['r_mb_per_s']:8.2f} "
            f"{f['w_mb_per_s']:8.2f} {f['inflight']:8d} {us(f['lat_p50_us'])} "
            f"{us(f['lat_p99_us'])}")


HEADER = (f"{'DEVICE':<14} {'r/s':>9} {'w/s':>9} {'rMB/s':>8} {'wMB/s':>8} {'inflight':>8} "
          f"{'p50(us)':>9} {'p99(us)':>9}")


def summary(obs: BlockObserver, start: dict[int, DevSnapshot], end: dict[int, DevSnapshot],
            seconds: float) -> dict:
    devices = {}
    for dev, snap in end.items():
        delta = snap.minus(start.get(dev, DevSnapshot.empty()))
        if delta.completed or delta.issued:
            devices[blockdev.name_of(dev)] = delta.figures(seconds)
    return {"seconds": round(seconds, 3), "probe": obs.probe, "devices": devices,
            "dropped_events": obs.dropped_events(), "missed_starts": obs.missed_starts(),
            "compile_seconds": round(obs.compile_seconds or 0.0, 2)}


def _print_summary(s: dict) -> None:
    print(f"\nsummary over {s['seconds']:.1f}s ({s['probe']} probes):")
    print(f"{'DEVICE':<14} {'reads':>9} {'writes':>9} {'MB':>9} {'errors':>7} {'mean(us)':>9} "
          f"{'p50(us)':>9} {'p99(us)':>9} {'p99.9(us)':>10}")
    for name, f in sorted(s["devices"].items()):
        mb = (f["read_bytes"] + f["write_bytes"]) / 1e6

        def us(v, w=9):
            return f"{v:{w}.1f}" if v is not None else f"{'-':>{w}}"
        print(f"{name:<14} {f['read_ios']:9d} {f['write_ios']:9d} {mb:9.1f} {f['errors']:7d} "
              f"{us(f['lat_mean_us'])} {us(f['lat_p50_us'])} {us(f['lat_p99_us'])} "
              f"{us(f['lat_p999_us'], 10)}")
    if not s["devices"]:
        print("(no I/O completed)")


def _cmd_observe(args) -> int:
    devs = [blockdev.resolve(d) for d in args.dev]
    obs = BlockObserver(probe=args.probe, devs=devs)

    def on_term(*_):
        raise KeyboardInterrupt

    # Also SIGINT: a shell starts background jobs with it ignored.
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGTERM, on_term)
    with obs:
        first = prev = obs.snapshot()
        t_first = t_prev = time.monotonic()
        # Said once counting has begun: all I/O from here on is reported.
        print(f"iobridge observe: attached ({obs.probe} probes, compiled in "
              f"{obs.compile_seconds:.1f}s); Ctrl-C to stop", file=sys.stderr, flush=True)

        def report(now, t_now, last: bool = False) -> None:
            rows = {}
            for dev in set(now) | {d.kdev for d in devs}:
                delta = now.get(dev, DevSnapshot.empty()).minus(prev.get(dev, DevSnapshot.empty()))
                if delta.completed or delta.issued or (devs and not last):
                    rows[blockdev.name_of(dev)] = delta.figures(t_now - t_prev)
            if last and not rows:
                return
            if args.json:
                print(json.dumps({"time": time.time(), "interval_s": round(t_now - t_prev, 3),
                                  "devices": rows}), flush=True)
            else:
                print(time.strftime("%H:%M:%S"), HEADER)
                for name in sorted(rows):
                    print("        ", _format_row(name, rows[name]))
                sys.stdout.flush()

        n = 0
        try:
            while args.count is None or n < args.count:
                time.sleep(args.interval)
                now, t_now = obs.snapshot(), time.monotonic()
                n += 1
                report(now, t_now)
                prev, t_prev = now, t_now
        except KeyboardInterrupt:
            pass
        end, t_end = obs.snapshot(), time.monotonic()
        if args.count is None or n < args.count:
            # Stopped mid-interval: its I/O gets a last, shorter report, so
            # the reports add up to the summary.
            report(end, t_end, last=True)
        s = summary(obs, first, end, t_end - t_first)
    if args.json:
        print(json.dumps({"summary": s}), flush=True)
    else:
        _print_summary(s)
        print(f"events dropped in the kernel: {s['dropped_events']}, completions without a "
              f"seen issue: {s['missed_starts']}")
    return 0


def add_observer_args(p, verb: str) -> None:
    """The options every command that loads the observer shares."""
    p.add_argument("--dev", action="append", default=[], metavar="DEV",
                   help=f"{verb} only this device (name, /dev path or MAJ:MIN); repeatable; "
                   "default all devices with I/O")
    p.add_argument("--probe", choices=PROBES, default="auto",
                   help="probe set: raw block tracepoints, kprobes, or auto (tracepoints "
                   "if present)")


def register_cli(sub) -> None:
    p = sub.add_parser(
        "observe", help="live per-device block I/O figures from the BPF observer",
        description="Attaches the block observer (BPF, block-layer tracepoints or kprobes) and "
        "prints, every interval, per device: reads and writes per second, MB/s, requests in "
        "flight, and p50/p99 latency from issue to completion in microseconds; on exit "
        "(Ctrl-C, SIGTERM or --count) a summary since start; with --json one JSON object "
        "per report, then one with the summary. Needs root and the running "
        "kernel's headers; inside the test VM: iobridge vm run -- iobridge observe ...",
        parents=[cliutil.json_parent()],
        **cliutil.examples(
            ("iobridge observe", "every device with I/O, each second, until Ctrl-C"),
            ("iobridge observe --dev nullb0 --interval 5", "one device, every 5 seconds"),
            ("iobridge observe --count 10 --json", "10 reports as JSON lines, then the summary"),
            ("iobridge observe --probe kprobe", "kprobes instead of the block tracepoints"),
            ("iobridge vm run -- iobridge observe --count 5", "in the test VM")))
    add_observer_args(p, "observe")
    p.add_argument("--interval", type=cliutil.positive_float(MAX_INTERVAL_S), default=1.0, metavar="S",
                   help="seconds between reports (default 1)")
    p.add_argument("--count", type=cliutil.positive_int(MAX_COUNT), default=None, metavar="N",
                   help="stop after N reports (default: until Ctrl-C)")
    p.set_defaults(func=_cmd_observe)
