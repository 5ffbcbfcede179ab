"""Record the trace the default admission model is trained on (run inside
the test VM by scripts/train-default-model.sh).

Usage: record-training.py OUT.parquet [--seconds S] [--rounds R]
(defaults: 3 rounds of 12 phases of 3 x 4 s; about 15 minutes in the VM
under emulation, a third of it BCC compiling the observer)

Three legs like the demo's (dm-delay over null_blk, slow periods that come
and go, agent/lab/faults.py) but at three device speeds: null_blk
completion times of 50 us, 250 us and 2 ms -- not the 100 us of the demo
and the tests, nor the 1 ms of a test, so the model is evaluated on speeds
it never saw. Slow periods add 1, 6 or 24 ms to a read (dm-delay rounds
up to jiffies: reads took ~8, ~12 and ~29 ms in the VM), so the same added
delay is a small or a large multiple of a leg's own speed; the admission
features (schema v2) and the labels (`iobridge train --lat-threshold-rel`)
are relative to each leg's baseline, and the model learns what "k times
slower than usual" means rather than a latency in microseconds.

fio random reads at queue depths 1, 4, 16 and 32, of 4 KiB only or of mixed
sizes (4 KiB to 128 KiB, one per size bucket of the decision table), by
phase, recorded at bio
level with `iobridge record --leg` on all three legs (what the agent's leg
feature state sees). One phase is one fio run on one leg at one depth,
during which the slow periods' delay takes each of the three values in
turn (fewer fio starts: under emulation each costs seconds); every (leg,
depth) runs once per round, in an order shuffled per round, and the
rounds make the earlier (training) and later (held-back) parts of the
trace both hold every kind of phase. One leg at a time: side by side,
the guest's two CPUs, shared under emulation, made every read take
milliseconds. Period lengths are the demo's (ReplicaSet); the seeds (300
and up) differ from the demo's and the tests' (1, 3, 7, 11), so the model
never trains on the schedule it is evaluated on.

Beside the trace, OUT.phases.json lists every phase (leg, speed, depth,
delays, seed, fio's figures), when each slow period really held and when
the delay changed (CLOCK_MONOTONIC ns: the trace's times plus its meta
t0_monotonic_ns).
"""

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

from iobridge.lab import testbed
from iobridge.lab import workload
from iobridge.lab.experiment import ReplicaSet
from iobridge.lab.faults import SlowPeriods

SPEEDS_US = (50, 250, 2000)     # null_blk completion time per leg
# Added read latency in slow periods. dm-delay counts in jiffies (HZ=250 on
# Debian's kernel: 4 ms), so 1 ms and 4 ms both became one jiffy (reads took
# ~7 ms either way in a first recording); these three stay distinct
# (reads took ~8, ~12 and ~29 ms in the VM, more on a busy host).
SLOW_MS = (1, 6, 24)
# fio queue depths; 32 covers the decision table's top in-flight bucket
# (16 and more): with 16 at most, the queue length at issue passed 15 only
# in the burst after a dm-delay table switch, and models learned "16 or
# more in flight means slow".
DEPTHS = (1, 4, 16, 32)
# fio request sizes: 4 KiB only (as the demo and the tests read), or one per
# size bucket of the table (<=4K, <=16K, <=64K, more), most of them 4 KiB.
# Both kinds of phase are needed: the throughput features are relative to
# the leg's baseline throughput, which large reads set, so 4 KiB reads look
# different under the two mixes.
SIZE_MIXES = {"4k": "4k/100", "mixed": "4k/55:16k/15:64k/15:128k/15"}
SEED0 = 300


def plan(rounds: int, seconds: float) -> list[dict]:
    """Phases of one fio run on one leg at one depth, every (leg, depth)
    once per round, shuffled per round; within a phase the slow delay
    takes each value of SLOW_MS for `seconds`, in a shuffled order."""
    combos = [(leg, qd) for leg in range(len(SPEEDS_US)) for qd in DEPTHS]
    phases = []
    for r in range(rounds):
        rng = random.Random(SEED0 + r)
        order = list(combos)
        rng.shuffle(order)
        for leg, qd in order:
            delays = list(SLOW_MS)
            rng.shuffle(delays)
            mix = ("4k", "mixed")[(leg + DEPTHS.index(qd) + r) % 2]
            phases.append({"round": r, "leg": leg, "device_us": SPEEDS_US[leg],
                           "iodepth": qd, "slow_ms": delays, "seconds_per_delay": seconds,
                           "sizes": mix, "seed": SEED0 + len(phases)})
    return phases


def run_phase(sp: SlowPeriods, ph: dict) -> None:
    """fio on the leg with a fresh slow-period schedule; the delay of the
    slow periods changes every seconds_per_delay (a slow period under way
    keeps its delay until it ends)."""
    delays = ph["slow_ms"]
    step = ph["seconds_per_delay"]
    fig: dict = {}

    def fio():
        try:
            fig.update(workload.fio_random_reads(sp.path, ph["iodepth"], step * len(delays),
                                                 extra=[f"--bssplit={SIZE_MIXES[ph['sizes']]}"]))
        except Exception as err:
            fig["error"] = repr(err)

    sp.slow_ms = delays[0]
    sp.restart(ph["seed"])
    changes = [(time.clock_gettime_ns(time.CLOCK_MONOTONIC), delays[0])]
    try:
        t = threading.Thread(target=fio)
        t.start()
        for ms in delays[1:]:
            t.join(step)
            sp.slow_ms = ms
            changes.append((time.clock_gettime_ns(time.CLOCK_MONOTONIC), ms))
        t.join()
    finally:
        sp.stop()
    if "error" in fig:
        raise SystemExit(f"fio on {sp.path}: {fig['error']}")
    ph.update(fio=fig, delay_changes=changes, slow_fraction=round(sp.slow_fraction(), 3),
              timeline=[(a, b, s) for a, b, s in sp.timeline if s != "normal"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--seconds", type=float, default=4.0,
                    help="fio seconds per slow delay in a phase (default 4)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    out = Path(args.out)
    phases = plan(args.rounds, args.seconds)
    print(f"{len(phases)} phases of {args.seconds * len(SLOW_MS):g} s: legs at {SPEEDS_US} us, "
          f"slow periods +{SLOW_MS} ms, queue depths {DEPTHS}", flush=True)
    nullbs = [f"iobtrain_nb{i}" for i in range(len(SPEEDS_US))]
    legs: list[SlowPeriods] = []
    leg_names: dict[str, str] = {}    # /dev/mapper path -> dm-N, the trace's device name
    tail: list[str] = []
    rec = None
    t_start = time.monotonic()
    try:
        for name, us in zip(nullbs, SPEEDS_US):
            dev = testbed.make_nullb(name, 512, **ReplicaSet(completion_us=us).nullb_params)
            sp = SlowPeriods(dev, name.replace("_nb", "_leg"), SLOW_MS[0],
                             normal_mean_s=ReplicaSet.normal_mean_s,
                             slow_mean_s=ReplicaSet.slow_mean_s)
            sp.create()
            legs.append(sp)
            leg_names[sp.path] = os.path.basename(os.path.realpath(sp.path))
        cmd = [sys.executable, "-m", "iobridge.cli", "record", "--out", str(out), "--force",
               "--json", "--ringbuf-pages", "4096"]
        for sp in legs:
            cmd += ["--leg", sp.path]
        rec = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        line = rec.stderr.readline()
        if "attached" not in line:
            raise SystemExit(f"record did not start: {line}{rec.stderr.read()}")
        print(f"recorder attached after {time.monotonic() - t_start:.0f} s", flush=True)
        # keep draining its progress output, or a full pipe stalls the recorder
        drain = threading.Thread(target=lambda: tail.extend(iter(lambda: rec.stderr.read(4096), "")),
                                 daemon=True)
        drain.start()
        for i, ph in enumerate(phases):
            run_phase(legs[ph["leg"]], ph)
            r = ph["fio"]
            print(f"[{i + 1}/{len(phases)} {time.monotonic() - t_start:5.0f}s] leg "
                  f"{ph['device_us']:4d} us, QD {ph['iodepth']:2d}, slow periods +"
                  f"{'/'.join(map(str, ph['slow_ms']))} ms, {ph['sizes']:5s}: {r['ios']:6d} reads, p50 "
                  f"{r['p50_us']:6.0f} us, p99 {r['p99_us']:6.0f} us, slow "
                  f"{ph['slow_fraction']:.2f} of the time", flush=True)
        time.sleep(1.5)
    finally:
        if rec is not None:
            rec.terminate()
            rec.wait(120)
            time.sleep(0.5)
            last = "".join(tail[-4:]).replace("\r", "\n").strip().splitlines()
            print(f"recorder: {last[-1] if last else ''}", flush=True)
        for sp in legs:
            sp.remove()
        for name in nullbs:
            testbed.remove_nullb(name)
        sidecar = out.with_suffix(".phases.json")
        sidecar.write_text(json.dumps({"speeds_us": SPEEDS_US, "slow_ms": SLOW_MS,
                                       "depths": DEPTHS, "size_mixes": SIZE_MIXES,
                                       "legs": leg_names, "phases": phases},
                                      indent=1) + "\n")
        print(f"{time.monotonic() - t_start:.0f} s in the guest; phases in {sidecar}", flush=True)
    return rec.returncode


if __name__ == "__main__":
    sys.exit(main())
