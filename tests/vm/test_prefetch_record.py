"""The prefetch recorder on the real kernel (agent/lab/prefetch_record.py):
a short sweep (a forward and a backward reader at two read_ahead_kb
settings) writes a recording that `iobridge train --task prefetch` reads,
whose windows come from the page-cache observer and show what the kernel
did: forward windows move forward, backward ones backward, and readahead
at 512 KB makes the sequential reader's windows mostly readahead pages."""

from __future__ import annotations

import pytest

from iobridge.core import prefetch_features as PF
from iobridge.core import prefetch_recording as R
from iobridge.lab import prefetch_record as P


@pytest.fixture
def small_sweep(monkeypatch):
    monkeypatch.setattr(P, "SWEEP_KB", (0, 512))
    monkeypatch.setattr(P, "BLOCK_KB", {"seq": (16,), "rev": (16,)})
    monkeypatch.setattr(P, "RUN_S", 3)
    monkeypatch.setattr(P, "FILE_MB", 96)
    monkeypatch.setattr(P, "MEMORY_MB", 32)


def test_recorder_writes_windows_the_kernel_made(small_sweep, tmp_path):
    assert P.main([str(tmp_path), "--seed", "7"]) == 0
    rec = R.read_recording(tmp_path / "prefetch-seed7.jsonl.gz")
    assert rec.header["kernel"] and rec.header["readahead_kb_sweep"] == [0, 512]
    assert sorted((r["class"], r["read_ahead_kb"]) for r in rec.runs) == [
        ("reverse", 0), ("reverse", 512), ("sequential", 0), ("sequential", 512)]
    assert all(r["read_mb_s"] > 0 for r in rec.runs)
    busy = [w for w in rec.windows if w["features"][0] >= PF.MIN_EVENTS]
    for cls, sign in (("sequential", 1), ("reverse", -1)):
        for scope in R.SCOPES:
            ws = [w for w in busy if w["class"] == cls and w["scope"] == scope]
            assert len(ws) >= 2, (cls, scope)
            # most windows of a scan move its way over at least half their range
            assert sum(sign * w["direction"] >= 0.5 for w in ws) >= 0.8 * len(ws), \
                [(w["direction"], w["features"][0]) for w in ws]
    # the readahead feature is the run's setting (sectors / 1024)
    assert all(w["features"][4] == PF.readahead_feature(w["read_ahead_kb"])
               for w in rec.windows)
    # read-only workloads: no window saw writes
    assert not any(w["has_writes"] for w in busy)
    # sequential at 512 KB: most inserted pages were readahead
    seq = [w for w in busy if w["class"] == "sequential" and w["read_ahead_kb"] == 512
           and w["scope"] == "file"]
    assert sum(w["ra_pages"] for w in seq) >= 0.8 * sum(w["insertions"] for w in seq)
