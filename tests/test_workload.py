"""fio's figures as the benches and VM tests read them (lab/workload.py):
the shares of I/Os over each millisecond edge, from a crafted document and
from a real fio run on a file this test creates."""

from __future__ import annotations

import json
import subprocess

import pytest

from iobridge.core.errors import IobridgeError
from iobridge.lab import workload


def _doc(latency_ms: dict, ios: int = 1000) -> str:
    job = {"error": 0, "latency_ms": latency_ms,
           "read": {"total_ios": ios, "iops": 100.0,
                    "clat_ns": {"mean": 1e6, "max": 9e7, "percentile": {"99.000000": 5e7}}}}
    return "fio: a warning before the document\n" + json.dumps({"jobs": [job]})


def test_shares_over_each_edge_count_the_buckets_above_it():
    # 1% of the I/Os took 20-50 ms, 0.5% 50-100 ms, 0.25% 2 s or more
    fig = workload.read_figures(_doc({"2": 90.0, "4": 8.25, "20": 0.0, "50": 1.0, "100": 0.5,
                                      ">=2000": 0.25}))
    over = fig["over_ms"]
    assert set(over) == set(workload.FIO_MS_EDGES)
    assert over["10"] == over["20"] == pytest.approx(0.0175)
    assert over["50"] == pytest.approx(0.0075)
    assert over["100"] == over["2000"] == pytest.approx(0.0025)
    assert over["2"] == pytest.approx(0.1)
    assert fig["p99_us"] == 5e4


def test_no_latency_buckets_reads_as_none_over():
    assert set(workload.read_figures(_doc({}))["over_ms"].values()) == {0.0}


def test_unparsable_output_is_a_clear_error():
    with pytest.raises(IobridgeError, match="cannot parse fio's JSON output"):
        workload.read_figures("fio: no document")


def test_a_real_fio_run_gives_shares_that_fall_with_the_edge(tmp_path):
    """fio is a setup dependency (scripts/setup.sh): no skip without it."""
    f = tmp_path / "data"
    f.write_bytes(b"\0" * (4 << 20))
    out = subprocess.run(["fio", "--name=t", f"--filename={f}", "--rw=randread", "--bs=4k",
                          "--size=4M", "--output-format=json"],
                         capture_output=True, text=True, check=True).stdout
    fig = workload.read_figures(out)
    shares = [fig["over_ms"][e] for e in workload.FIO_MS_EDGES]
    assert fig["ios"] == 1024 and fig["errors"] == 0
    assert all(0.0 <= s <= 1.0 for s in shares)
    assert shares == sorted(shares, reverse=True)
