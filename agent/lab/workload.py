"""fio as the workload generator: run a job, return the figures that matter.

One place for the fio command lines used by the demo, the benchmarks and
the VM tests, and for reading fio's JSON (completion latency percentiles
in microseconds, I/O counts, errors, and the share of I/Os slower than
each of fio's millisecond edges).
"""

from __future__ import annotations

import json
import shutil
import subprocess

from ..core.errors import IobridgeError

PERCENTILES = (50.0, 99.0, 99.9)
# The benches' fio option ranges (--runtime, --depths)
MAX_RUNTIME_S = 3600       # seconds per fio run
MAX_DEPTH = 1024           # fio iodepth
# fio's latency_ms buckets, each named by its upper edge in ms (the last,
# ">=2000", by its lower edge).
FIO_MS_EDGES = ("2", "4", "10", "20", "50", "100", "250", "500", "750", "1000", "2000")


def fio_random_reads(dev: str, iodepth: int = 1, runtime_s: float = 10.0, bs: str = "4k",
                     ioengine: str | None = None, extra: list[str] | None = None) -> dict:
    """Direct random reads on `dev`; returns read figures (latencies in us)."""
    if shutil.which("fio") is None:
        raise IobridgeError("fio not found", "install the fio package")
    engine = ioengine or ("psync" if iodepth == 1 else "libaio")
    cmd = ["fio", "--name=iobridge", f"--filename={dev}", "--rw=randread", f"--bs={bs}",
           "--direct=1", f"--ioengine={engine}", f"--iodepth={iodepth}",
           f"--runtime={runtime_s:g}", "--time_based", "--randrepeat=0", "--norandommap",
           "--percentile_list=" + ":".join(f"{p:g}" for p in PERCENTILES),
           "--output-format=json", *(extra or [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise IobridgeError(f"fio on {dev} failed ({proc.returncode}): "
                            f"{(proc.stderr or proc.stdout).strip()[-400:]}")
    return read_figures(proc.stdout)


def read_figures(fio_json: str) -> dict:
    """Read-side figures of the first job in fio's JSON output."""
    # fio may print warnings before the JSON document.
    start = fio_json.find("{")
    try:
        job = json.loads(fio_json[start:])["jobs"][0]
    except (ValueError, KeyError, IndexError) as err:
        raise IobridgeError(f"cannot parse fio's JSON output: {err}") from err
    rd = job["read"]
    clat = rd["clat_ns"]
    pct = clat.get("percentile", {})

    def p(q: float) -> float | None:
        v = pct.get(f"{q:.6f}")
        return None if v is None else v / 1e3

    return {
        "ios": int(rd["total_ios"]), "iops": float(rd["iops"]),
        "errors": int(job.get("error", 0)),
        "mean_us": clat["mean"] / 1e3, "p50_us": p(50.0), "p99_us": p(99.0),
        "p999_us": p(99.9), "max_us": clat["max"] / 1e3,
        "over_ms": shares_over_ms(job.get("latency_ms", {})),
    }


def shares_over_ms(latency_ms: dict) -> dict[str, float]:
    """{edge: share of I/Os slower than edge ms} for each of fio's edges,
    from its latency_ms buckets (percent of I/Os per bucket). A count, not a
    percentile: n stalls add n/ios to it, where a percentile jumps from one
    cause's value to another's once they pass its rank."""
    pct = [float(latency_ms.get(e, 0.0)) for e in FIO_MS_EDGES] + \
        [float(latency_ms.get(">=2000", 0.0))]
    return {e: round(sum(pct[i + 1:]) / 100.0, 6) for i, e in enumerate(FIO_MS_EDGES)}
