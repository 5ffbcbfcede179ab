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


# Pages either side of a window's first and last page that readahead or a
# block's own pages may add (512 KB readahead: 128 pages).
WRAP_TOLERANCE_PAGES = 256


def came_round(w: dict) -> bool:
    """The scan passed an end of the file and came round inside the window:
    neither its first page nor its last lies at an end of its range, as
    they do in a window of one pass either way (extent: lowest, highest and
    last page, relative to the first); or it inserted more pages than its
    range holds, so it passed some twice (a whole pass and more inside one
    window, which puts its ends anywhere: 24,816 insertions over the 96 MB
    file's 24,576 pages, first page at the start, last 239 pages further,
    in one 6.12 run)."""
    lo, hi, last = w["extent"]

    def inside(p):
        return p - lo > WRAP_TOLERANCE_PAGES and hi - p > WRAP_TOLERANCE_PAGES
    return (inside(0) and inside(last)) or w["features"][0] > hi - lo + 1


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
            print(f"{cls} {scope}: (direction, insertions, extent) "
                  f"{[(round(w['direction'], 2), w['features'][0], w['extent']) for w in ws]}")
            # Most windows of a scan move its way over at least half their
            # range. A scan that reached the file's end and started again
            # inside a window does not (a fast machine reads the 96 MB file
            # in under a second at 512 KB); those must be such wraps.
            wrapped = [w for w in ws if came_round(w)]
            plain = [w for w in ws if not came_round(w)]
            its_way = [w for w in plain if sign * w["direction"] >= 0.5]
            assert its_way and len(its_way) >= 0.8 * len(plain), (cls, scope)
            # ...ending behind where it began, or having passed some pages twice
            assert all(sign * w["extent"][2] < 0 or w["features"][0] > w["extent"][1] - w["extent"][0] + 1
                       for w in wrapped), (cls, scope)
    # the readahead feature is the run's setting (sectors / 1024)
    assert all(w["features"][4] == PF.readahead_feature(w["read_ahead_kb"])
               for w in rec.windows)
    # read-only workloads: no window saw writes
    assert not any(w["has_writes"] for w in busy)
    # sequential at 512 KB: most inserted pages were readahead
    seq = [w for w in busy if w["class"] == "sequential" and w["read_ahead_kb"] == 512
           and w["scope"] == "file"]
    assert sum(w["ra_pages"] for w in seq) >= 0.8 * sum(w["insertions"] for w in seq)
