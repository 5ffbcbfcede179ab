"""`iobridge record`: per-I/O records from the kernel observer to a trace file.

The observer's ring buffer is drained a few times a second and each drain is
appended to the trace (agent/trace.py format) as one batch, so Ctrl-C, SIGTERM
or the end of --duration loses nothing that reached user space; records the
kernel could not queue (ring buffer full) are counted and reported.
"""

from __future__ import annotations

import json
import platform
import signal
import sys
import time
from pathlib import Path

import numpy as np

from ..core import abi, cliutil
from ..core.errors import UsageError
from ..kernel import blockdev
from ..kernel.observer import (BlockObserver, DEFAULT_RINGBUF_PAGES, MAX_RINGBUF_PAGES, RINGBUF_PAGES,
                               add_observer_args)

BATCH_SECONDS = 1.0


def events_to_batch(ev: np.ndarray, t0_ns: int, names: dict[int, str]) -> dict:
    """Observer events -> trace columns (times relative to t0_ns)."""
    return {
        "issue_ns": ev["issue_ns"].astype(np.int64) - t0_ns,
        "complete_ns": ev["complete_ns"].astype(np.int64) - t0_ns,
        "latency_ns": (ev["complete_ns"] - ev["issue_ns"]).astype(np.int64),
        "device": np.array([names.get(int(d)) or blockdev.name_of(int(d)) for d in ev["dev"]],
                           dtype=object),
        "sector": ev["sector"].astype(np.int64),
        "bytes": ev["bytes"].astype(np.int64),
        "op": ev["op"].astype(np.uint8),
        "qlen": ev["queue_len"].astype(np.int32),
        "leg": ev["leg"].astype(np.int16),
    }


def _cmd_record(args) -> int:
    from .trace import TraceWriter   # needs pyarrow (extra "train")

    out = Path(args.out)
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists", "pass --force to overwrite it")
    if not out.parent.is_dir():
        raise UsageError(f"directory {out.parent} does not exist")
    devs = [blockdev.resolve(d) for d in args.dev]
    legs = [blockdev.resolve(d) for d in args.leg]
    wanted = {d.kdev for d in devs}
    leg_devs = {d.kdev for d in legs}
    names = {d.kdev: d.name for d in devs + legs}
    # Request level unless only --leg is given; bio level for the --leg devices.
    obs = BlockObserver(probe=args.probe, devs=devs, stream=bool(devs) or not legs,
                        stream_legs=bool(legs), ringbuf_pages=args.ringbuf_pages)

    def select(ev: np.ndarray) -> np.ndarray:
        if not len(ev):
            return ev
        req = ev["level"] == abi.EVENT_REQUEST
        if wanted:
            req &= np.isin(ev["dev"], list(wanted))
        leg = (ev["level"] == abi.EVENT_LEG_BIO) & np.isin(ev["dev"], list(leg_devs))
        return ev[req | leg]

    # Ctrl-C and SIGTERM set a flag instead of raising: an exception raised
    # inside BCC's ring buffer callback would lose the record being handed over.
    stop = []

    def on_stop(*_):
        stop.append(True)

    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGTERM, on_stop)
    # CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns(); taken before the
    # probes attach, so every I/O they stamp has a time >= 0 (traces refuse
    # negative times).
    t0_ns = time.monotonic_ns()
    with obs:
        if legs:
            obs.leg_features().assign(sorted(leg_devs))
        meta = {"source": "iobridge record", "kernel": platform.release(), "probe": obs.probe,
                "devices": [d.name for d in devs] or ([] if legs else "all"),
                "leg_devices_bio_level": [d.name for d in legs], "t0_monotonic_ns": t0_ns,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        writer = TraceWriter(out, meta)
        started = time.monotonic()
        last_report = started
        print(f"iobridge record: attached ({obs.probe} probes), writing {out}; "
              "Ctrl-C to stop", file=sys.stderr, flush=True)
        try:
            while not stop and (args.duration is None
                                or time.monotonic() - started < args.duration):
                ev = select(obs.poll_events(timeout_ms=100, max_seconds=BATCH_SECONDS))
                if len(ev):
                    writer.write_batch(events_to_batch(ev, t0_ns, names))
                now = time.monotonic()
                if now - last_report >= 1.0:
                    last_report = now
                    print(f"\r{now - started:7.1f}s  {writer.rows:10d} I/Os recorded  "
                          f"{obs.dropped_events():8d} dropped in the kernel",
                          end="", file=sys.stderr, flush=True)
        finally:
            # Drain what is already queued, then close the file properly.
            try:
                for _ in range(20):
                    ev = select(obs.poll_events(timeout_ms=0, max_seconds=0.2))
                    if not len(ev):
                        break
                    writer.write_batch(events_to_batch(ev, t0_ns, names))
            finally:
                writer.close()
        dropped = obs.dropped_events()
    summary = {"out": str(out), "ios": writer.rows, "dropped_in_kernel": dropped,
               "seconds": round(time.monotonic() - started, 2), "interrupted": bool(stop)}
    print(file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"recorded {writer.rows} I/Os in {summary['seconds']}s to {out}; "
              f"{dropped} dropped in the kernel (ring buffer full)")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser(
        "record", help="record per-I/O events from the kernel observer to a trace file",
        description="Streams one record per completed I/O (issue and completion time, device, "
        "sector, bytes, operation, queue length at issue, latency) from the BPF observer into "
        "a Parquet trace (see `iobridge trace info`). Stops at --duration, Ctrl-C or SIGTERM "
        "without losing what reached user space; records the kernel could not queue are "
        "counted and reported. Needs root; in the test VM: iobridge vm run -- iobridge record ...",
        parents=[cliutil.json_parent()],
        **cliutil.examples(
            ("iobridge record --out t.parquet", "every device's I/O until Ctrl-C"),
            ("iobridge record --dev nullb0 --duration 30 --out t.parquet", "one device, 30 s"),
            ("iobridge record --leg dm-1 --leg dm-2 --out legs.parquet",
             "two legs' bios, as the agent sees them"),
            ("iobridge record --out t.parquet --ringbuf-pages 4096 --force",
             "a bigger ring buffer; overwrite t.parquet"),
            ("iobridge trace info t.parquet", "then: what was recorded")))
    add_observer_args(p, "record")
    p.add_argument("--leg", action="append", default=[], metavar="DEV",
                   help="record this device's bios (bio level: queue -> completion, also for "
                   "stacked devices such as dm) as the agent's leg feature state sees them; "
                   "repeatable. With only --leg, no request-level records are written")
    p.add_argument("--out", required=True, metavar="FILE", help="trace file to write (.parquet)")
    p.add_argument("--duration", type=cliutil.seconds, default=None, metavar="S",
                   help="stop after S seconds (default: until Ctrl-C)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--ringbuf-pages", type=RINGBUF_PAGES, default=DEFAULT_RINGBUF_PAGES, metavar="N",
                   help=f"ring buffer size in pages, a power of two up to {MAX_RINGBUF_PAGES} (default "
                   f"{DEFAULT_RINGBUF_PAGES}); raise it if records are dropped")
    p.set_defaults(func=_cmd_record)
