"""Record the trace the default admission model is trained on (run inside
the test VM by scripts/train-default-model.sh).

One leg like the demo's: dm-delay over null_blk, with slow periods that come
and go (agent/faults.py), and fio random reads at queue depths 1, 4 and 16
with slow periods of 4, 8 and 20 ms, recorded at bio level with
`iobridge record --leg` -- what the agent's leg feature state sees. The
seeds differ from the demo's and the tests', so the model never trains on
the schedule it is evaluated on.
"""

import subprocess
import sys
import time

from iobridge.lab import testbed
from iobridge.lab import workload
from iobridge.lab.experiment import ReplicaSet
from iobridge.lab.faults import SlowPeriods

# (added read latency in slow periods (ms), fio queue depth, seconds, seed);
# three rounds, so that the earlier (training) and later (held-back) parts
# of the trace both hold every kind of phase.
ROUND = [(8, 1, 8), (20, 1, 5), (4, 1, 5), (8, 4, 5), (8, 16, 5)]
PHASES = [(ms, qd, s, 100 + 10 * r + i) for r in range(3) for i, (ms, qd, s) in enumerate(ROUND)]


def main(out: str) -> int:
    nullb = testbed.make_nullb("iobtrain_nb", 512, **ReplicaSet.NULLB)
    slow = SlowPeriods(nullb, "iobtrain_leg", PHASES[0][0],
                       normal_mean_s=ReplicaSet.normal_mean_s, slow_mean_s=ReplicaSet.slow_mean_s)
    rec = None
    try:
        slow.create()
        rec = subprocess.Popen([sys.executable, "-m", "iobridge.cli", "record", "--leg",
                                slow.path, "--out", out, "--force", "--json",
                                "--ringbuf-pages", "2048"],
                               stderr=subprocess.PIPE, text=True)
        line = rec.stderr.readline()
        if "attached" not in line:
            raise SystemExit(f"record did not start: {line}{rec.stderr.read()}")
        for slow_ms, qd, seconds, seed in PHASES:
            print(f"phase: slow periods +{slow_ms} ms, queue depth {qd}, {seconds} s",
                  flush=True)
            slow.slow_ms = slow_ms
            slow.restart(seed)
            r = workload.fio_random_reads(slow.path, qd, seconds)
            slow.stop()
            print(f"  {r['ios']} reads, p50 {r['p50_us']:.0f} us, p99 {r['p99_us']:.0f} us, "
                  f"slow {slow.slow_fraction():.2f} of the time", flush=True)
        time.sleep(1.5)
    finally:
        if rec is not None:
            rec.terminate()
            rec.wait(60)
        slow.remove()
        testbed.remove_nullb("iobtrain_nb")
    return rec.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
