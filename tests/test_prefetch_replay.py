"""Host tests of the prefetch replay: the page-cache simulator
(offline/pagecache.py), the readahead policies (offline/prefetch.py), the
KML feature definitions (core/prefetch_features.py) and
`iobridge replay --task prefetch` (offline/prefetch_replay.py)."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iobridge import cli
from iobridge.core import prefetch_features as PF
from iobridge.core.errors import UsageError
from iobridge.offline import prefetch as PP
from iobridge.offline.pagecache import (MARKER, PREFETCHED, REFERENCED, PageCache,
                                        requests_of, simulate_prefetch)
from iobridge.offline.prefetch_replay import run_prefetch_replay
from iobridge.offline.trace import OP_READ, OP_WRITE, Trace, _normalise_batch, write_trace
from offline_helpers import SHIPPED_MODEL, shared_trace

PROPS = settings(max_examples=60, deadline=None, database=None)


def trace_of(pages, npages=1, ops=None, gap_ns=1000):
    """Requests of `npages` pages starting at each of `pages`, gap_ns apart."""
    n = len(pages)
    return Trace(_normalise_batch({
        "issue_ns": np.arange(n, dtype=np.int64) * gap_ns,
        "sector": np.asarray(pages, dtype=np.int64) * 8,
        "bytes": np.full(n, 4096 * npages), "op": np.zeros(n) if ops is None else ops}),
        {"source": "synthetic"})


def run(pages, policy, cache_pages=1024, **kw):
    tr = pages if isinstance(pages, Trace) else trace_of(pages)
    return simulate_prefetch(requests_of(tr), cache_pages, policy, **kw)


# ------------------------------------------------------------- exact counts

def test_cold_sequential_read_with_fixed_readahead():
    # 103 one-page reads from page 0, 4 pages ahead on each miss: misses at
    # 0, 5, ..., 100; the last window stops at the device's end (page 103)
    c = run(range(103), PP.Fixed(16)).counts
    assert (c.page_requests, c.misses, c.hits) == (103, 21, 82)
    assert (c.prefetched, c.used_prefetched, c.wasted, c.unused_at_end) == (82, 82, 0, 0)
    assert (c.device_read_pages, c.device_read_requests) == (103, 21)


def test_linux_readahead_ramps_up_on_a_sequential_read():
    # read_ahead_kb 128 = 32 pages: a first window of 4 (one page x4), then
    # each marker hit moves it on x2 (x4 below max/16) up to 32: 4, 8, 16,
    # 32, 32, 32 pages; one demand miss in all
    seen = []

    class Spy(PP.LinuxReadahead):
        def _readit(self, ra, index, mx):
            seen.append(super()._readit(ra, index, mx))
            return seen[-1]

    c = run(range(124), Spy()).counts
    assert seen[:6] == [(0, 4, 3), (4, 8, 8), (12, 16, 16), (28, 32, 32), (60, 32, 32),
                        (92, 32, 32)]
    assert (c.misses, c.hits, c.prefetched, c.used_prefetched) == (1, 123, 123, 123)
    assert c.device_read_requests == 6


def test_linux_window_sizes_follow_the_request_size():
    assert [PP.init_ra_size(r, 32) for r in (1, 2, 3, 8, 9, 40)] == [4, 4, 8, 16, 32, 32]
    assert [PP.next_ra_size(s, 32) for s in (1, 2, 4, 16, 17, 32)] == [4, 4, 8, 32, 32, 32]


def test_backward_scan_gets_nothing_from_linux():
    c = run(range(99, -1, -1), PP.LinuxReadahead()).counts
    assert (c.misses, c.hits, c.prefetched) == (100, 0, 0)
    assert c.device_read_requests == 100


def test_random_reads_waste_fixed_readahead():
    # 100 reads 1000 pages apart, 16 pages ahead on each miss (the last one's
    # window is past the device's end): 1584 prefetched, none used; a
    # 256-page cache evicts the first 1428 pages inserted, 84 requests'
    # worth (17 pages each), 84 x 16 of them prefetched
    c = run([1000 * i for i in range(100)], PP.Fixed(64), cache_pages=256).counts
    assert (c.misses, c.hits, c.prefetched, c.used_prefetched) == (100, 0, 1584, 0)
    assert c.evictions == 1428 and c.wasted == 84 * 16
    assert c.unused_at_end == 1584 - 84 * 16
    assert (c.device_read_pages, c.device_read_requests) == (1684, 100)


def test_unused_prefetched_page_evicted_is_wasted():
    pc = PageCache(2)
    pc.insert(1, PREFETCHED, False)
    pc.insert(2, REFERENCED, True)
    pc.insert(3, REFERENCED, True)
    assert 1 not in pc and (pc.c.wasted, pc.c.evictions) == (1, 1)
    pc.insert(4, PREFETCHED, False)
    assert pc.access(4, True) == PREFETCHED and pc.c.used_prefetched == 1
    pc.insert(5, REFERENCED, True)
    pc.insert(6, REFERENCED, True)        # evicts 4: used, so not wasted
    assert 4 not in pc and pc.c.wasted == 1


def test_refault_within_the_shadow_window():
    c = run([0, 1, 2, 0], PP.Policy(), cache_pages=2).counts
    assert (c.misses, c.evictions, c.refaults) == (4, 2, 1)
    # the shadows of the last 2 evictions (one cache's worth) are kept
    c = run([0, 1, 2, 3, 0], PP.Policy(), cache_pages=2).counts
    assert (c.misses, c.evictions, c.refaults) == (5, 3, 1)
    c = run([0, 1, 2, 3, 4, 0], PP.Policy(), cache_pages=2).counts
    assert (c.misses, c.evictions, c.refaults) == (6, 4, 0)


def test_two_lists_keep_a_page_used_twice_through_a_scan():
    # page 0 read twice goes to the active list; a 10-page scan through a
    # 4-page cache passes it by (plain LRU would have evicted it)
    c = run([0, 1, 0] + list(range(100, 110)) + [0], PP.Policy(), cache_pages=4).counts
    assert c.activations == 1 and c.hits == 2 and c.misses == 12


def test_same_page_again_is_one_access():
    # 512-byte reads inside one page: one use, never activated
    tr = Trace(_normalise_batch({"issue_ns": np.arange(8), "sector": np.arange(8),
                                 "bytes": np.full(8, 512)}), {"source": "t"})
    c = run(tr, PP.Policy()).counts
    assert (c.page_requests, c.misses, c.hits, c.activations) == (8, 1, 7, 0)


def test_writes_allocate_or_are_ignored():
    ops = np.array([OP_WRITE, OP_READ])
    tr = trace_of([5, 5], ops=ops)
    c = run(tr, PP.Policy()).counts
    assert (c.write_pages, c.write_allocated, c.hits, c.misses, c.device_read_pages) == \
        (1, 1, 1, 0, 0)
    c = run(tr, PP.Policy(), writes="ignore").counts
    assert (c.write_allocated, c.hits, c.misses) == (0, 0, 1)


def test_marker_on_the_demand_page_triggers_the_next_window():
    # a 32-page request at 0 with a 32-page maximum: the window is the
    # request, all async, so the next one is merged in and capped: (0, 32, 16),
    # the marker on demand page 16, whose read (same request) moves the
    # window on to (32, 32, 32). A later read at page 1000 makes the device
    # long enough; it is a random read (the request only).
    c = run(trace_of([0, 1000], npages=32), PP.LinuxReadahead(), cache_pages=4096).counts
    assert (c.misses, c.hits, c.prefetched) == (64, 0, 32)
    assert c.device_read_requests == 3 and c.unused_at_end == 32


# ------------------------------------------------------------- KML features

def window(indices) -> PF.WindowStats:
    """A window over page-cache insertions at `indices`, in order."""
    w = PF.WindowStats()
    for i in indices:
        w.add(int(i))
    return w


def test_kml_features_on_a_hand_computed_window():
    w = PF.WindowStats()
    for i in (10, 12, 11, 15):
        w.add(i)
    # mean 12, squared deviations 4 0 1 9: M2 14, range 5;
    # |deltas| 2 1 4: 7 over n = 4; 128 KiB = 256 sectors / 1024
    f = w.features(128)
    assert f == pytest.approx((4.0, 14 / 4 / 5, 14 / 3 / 5, 7 / 4, 0.25))
    assert w.direction == 1.0        # (15 - 10) / (15 - 10)
    assert len(f) == PF.NUM_FEATURES == len(PF.FEATURE_NAMES) == 5
    one = PF.WindowStats()
    one.add(7)
    assert one.features(8) == (1.0, 0.0, 0.0, 0.0, 8 * 2 / 1024)
    assert PF.WindowStats().features(0) == (0.0, 0.0, 0.0, 0.0, 0.0)


def test_direction_leaves_out_a_scans_wrap():
    rc = PP.RuleClassifier()
    cls = PF.PREFETCH_CLASSES
    # A looping reader of a 49,152-page file, back at page 0 anywhere in a
    # window of 4,000 insertions: a forward scan (it read as reverse, -0.92).
    for at in (400, 2000, 3600):
        w = window([*range(49152 - at, 49152), *range(0, 4000 - at)])
        assert w.direction == 1.0
        assert cls[rc.classify(w.features(320), False, w.direction)] == "sequential"
    # A backward reader back at the file's end: a backward scan.
    w = window([*range(300, -1, -1), *range(49151, 49000, -1)])
    assert w.direction == -1.0
    assert cls[rc.classify(w.features(320), False, w.direction)] == "reverse"
    # A backward reader whose reads the kernel fills forward in 32-page
    # chunks has no wrap: its many backward jumps stay counted.
    chunked = window([s + k for s in range(10_000, 0, -32) for k in range(32)])
    assert chunked.direction == pytest.approx((chunked.last - chunked.first)
                                              / (chunked.hi - chunked.lo))
    assert chunked.direction < -0.99
    # One step either way, and random windows, are as before.
    assert window([5, 10]).direction == 1.0 and window([10, 5]).direction == -1.0
    rng = np.random.default_rng(3)
    for _ in range(50):
        w = window(rng.integers(0, 10**6, 16))
        assert w.direction == (w.last - w.first) / (w.hi - w.lo)


def test_kml_features_are_exact_on_huge_page_indices():
    w = PF.WindowStats()
    base = 2**50
    for i in (base, base + 2):
        w.add(i)
    assert w.features(0)[1] == pytest.approx(0.5) and w.features(0)[2] == pytest.approx(1.0)


def test_rule_classifier_classes():
    rc = PP.RuleClassifier()

    rng = np.random.default_rng(0)
    rand = window(rng.integers(0, 10**6, 200))
    seq = window(range(1000, 1200))
    rev = window(range(5000, 4800, -1))
    cls = PF.PREFETCH_CLASSES
    assert cls[rc.classify(rand.features(128), False, rand.direction)] == "random"
    assert cls[rc.classify(rand.features(128), True, rand.direction)] == "random+write"
    assert cls[rc.classify(seq.features(128), False, seq.direction)] == "sequential"
    assert cls[rc.classify(rev.features(128), False, rev.direction)] == "reverse"
    assert rc.classify(window(range(5)).features(128), False, 1.0) is None
    # chunks of 16 pages at random places are runs, not random pages
    chunks = window([s + k for s in rng.integers(0, 10**6, 20) for k in range(16)])
    assert cls[rc.classify(chunks.features(128), False, chunks.direction)] in ("sequential",
                                                                              "reverse")
    # a window that went back and forth is not a reverse scan
    assert cls[rc.classify(seq.features(128), False, -0.4)] == "sequential"


def test_kml_sets_the_class_readahead_per_window():
    # 5000 one-page reads forward over 5 s, then backward over 5 s
    fwd = trace_of(range(5000), gap_ns=1_000_000)
    pol = PP.KmlLike(PP.RuleClassifier(), 1_000_000_000)
    r = run(fwd, pol, cache_pages=100_000)
    assert r.policy_stats["windows_by_class"]["sequential"] >= 3
    assert r.policy_stats["final_read_ahead_kb"] == [320]
    back = trace_of(range(100_000, 95_000, -1), gap_ns=1_000_000)
    r = run(back, PP.KmlLike(PP.RuleClassifier(), 1_000_000_000), cache_pages=100_000)
    assert r.policy_stats["final_read_ahead_kb"] == [480]
    assert r.counts.prefetched == 0        # Linux reads nothing ahead backward anyway
    rng = np.random.default_rng(1)
    rnd = trace_of(rng.integers(0, 10**7, 5000), gap_ns=1_000_000)
    r = run(rnd, PP.KmlLike(PP.RuleClassifier(), 1_000_000_000), cache_pages=100_000)
    assert r.policy_stats["final_read_ahead_kb"] == [8]


# ------------------------------------------------------------- properties

@st.composite
def io_traces(draw):
    n = draw(st.integers(1, 60))
    pages = draw(st.lists(st.integers(0, 300), min_size=n, max_size=n))
    sizes = draw(st.lists(st.integers(1, 12), min_size=n, max_size=n))
    ops = draw(st.lists(st.sampled_from([OP_READ, OP_READ, OP_WRITE]), min_size=n,
                        max_size=n))
    dev = draw(st.lists(st.sampled_from(["a", "b"]), min_size=n, max_size=n))
    return Trace(_normalise_batch({
        "issue_ns": np.arange(n, dtype=np.int64) * 300_000_000,
        "sector": np.asarray(pages) * 8 + draw(st.integers(0, 7)),
        "bytes": np.asarray(sizes) * 2048, "op": np.asarray(ops),
        "device": np.asarray(dev, dtype=object)}), {"source": "hypothesis"})


@PROPS
@given(tr=io_traces(), cache=st.integers(1, 64),
       spec=st.sampled_from(["none", "fixed:4", "fixed:64", "linux", "linux:16", "kml"]),
       writes=st.sampled_from(["allocate", "ignore"]))
def test_counts_add_up(tr, cache, spec, writes):
    pol = PP.build_policy(spec, window_s=0.5)
    r = run(tr, pol, cache_pages=cache, writes=writes)
    c = r.counts
    assert all(v >= 0 for v in c.as_dict().values())
    assert c.hits + c.misses == c.page_requests
    assert c.used_prefetched <= c.prefetched
    # every prefetched page is used, evicted unused or still cached unused
    assert c.used_prefetched + c.wasted + c.unused_at_end == c.prefetched
    assert c.device_read_pages == c.misses + c.prefetched
    assert c.device_read_requests <= c.device_read_pages
    assert c.refault_activations <= c.refaults <= c.misses
    if spec == "none":
        assert c.prefetched == 0


def test_pagecache_never_exceeds_its_capacity():
    pc = PageCache(3)
    for k in range(20):
        pc.insert(k, REFERENCED if k % 2 else PREFETCHED, bool(k % 2))
        pc.access(k, True)
        pc.access(k - 1, True)
        assert len(pc) <= 3
    assert not any(fl & MARKER for fl in pc.inactive.values())


# ------------------------------------------------------------- policies and CLI

@pytest.mark.parametrize("spec,msg", [
    ("nope", "unknown prefetch policy 'nope'"),
    ("fixed", "fixed needs a size"),
    ("fixed:abc", "must be a whole number of KiB"),
    ("fixed:0", "0 KiB reads nothing ahead"),
    ("fixed:6", "multiple of 4 KiB"),
    ("fixed:99999999", "multiple of 4 KiB (whole pages) up to"),
    ("kml:8", "takes no size"),
])
def test_bad_policy_specs(spec, msg):
    with pytest.raises(UsageError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        PP.parse_policy(spec)


def test_policy_names():
    assert PP.parse_policy("fixed:256") == ("fixed", 256)
    assert PP.parse_policy("linux") == ("linux", 128)
    assert PP.build_policy("linux:512").name == "linux:512"
    assert PP.build_policy("kml").classifier.name == "kml-rules"


def test_learned_needs_a_prefetch_model(tmp_path):
    from iobridge.core.model import ModelCheckError
    with pytest.raises(ModelCheckError, match="model of the wrong kind: an admission model"):
        PP.load_prefetch_classifier(str(SHIPPED_MODEL))
    # a card saying prefetch over a file that is not a model
    (tmp_path / "p.onnx").write_bytes(b"")
    (tmp_path / "p.card.json").write_text('{"task": "prefetch"}')
    with pytest.raises(ModelCheckError, match="not an ONNX model"):
        PP.load_prefetch_classifier(str(tmp_path / "p.onnx"))
    with pytest.raises(ModelCheckError, match="no such file"):
        PP.build_policy(f"learned:{tmp_path / 'none.onnx'}")
    assert PP.parse_policy("learned") == ("learned", None)
    assert PP.parse_policy("learned:a:b.onnx") == ("learned", "a:b.onnx")


@pytest.fixture
def small_trace(tmp_path):
    src = tmp_path / "seq.parquet"
    write_trace(src, trace_of(list(range(0, 400)) + list(range(2000, 1000, -7))))
    return src


def test_cli_table_json_and_out(small_trace, tmp_path, capsys):
    base = ["replay", "--task", "prefetch", "-q", "--trace", str(small_trace),
            "--cache-mb", "1"]
    assert cli.main(base + ["--policy", "none", "--policy", "fixed:16",
                            "--policy", "linux"]) == 0
    out = capsys.readouterr().out
    assert "hit ratio" in out and "fixed:16" in out and "two-list" in out
    js = tmp_path / "rep.json"
    assert cli.main(base + ["--json", "--out", str(js)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep == json.loads(js.read_text())
    assert list(rep["policies"]) == list(PP.DEFAULT_POLICIES)
    assert rep["cache_pages"] == 256 and rep["task"] == "prefetch"
    for s in rep["policies"].values():
        assert s["hits"] + s["misses"] == s["page_requests"] == 400 + 143
    assert rep["policies"]["kml"]["details"]["classifier"] == "kml-rules"
    # an existing --out needs --force; nothing else is left beside it
    assert cli.main(base + ["--out", str(js)]) == 2
    assert "exists" in capsys.readouterr().err
    assert cli.main(base + ["--out", str(js), "--force", "--policy", "none"]) == 0
    assert list(json.loads(js.read_text())["policies"]) == ["none"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep.json", "seq.parquet"]


@pytest.mark.parametrize("extra,code,msg", [
    (["--policy", "nope"], 2, "unknown prefetch policy 'nope'"),
    (["--policy", "fixed:7"], 2, "multiple of 4 KiB"),
    (["--policy", "learned", "--model", str(SHIPPED_MODEL)], 1, "model of the wrong kind"),
    (["--model", str(SHIPPED_MODEL)], 2, "--model with --task prefetch is the model of policy "
                                         "learned"),
    (["--legs", "3"], 2, "--legs is an option of the admission replay"),
])
def test_cli_errors(small_trace, capsys, extra, code, msg):
    argv = ["replay", "--task", "prefetch", "-q", "--trace", str(small_trace),
            "--cache-mb", "1"] + extra
    assert cli.main(argv) == code
    out, err = capsys.readouterr()
    assert msg in err and out == "" and "Traceback" not in err


@pytest.mark.parametrize("mb", ["0", "-1", "nan", "2000000", "0.001"])
def test_cli_cache_size_out_of_range(small_trace, capsys, mb):
    with pytest.raises(SystemExit) as e:
        cli.main(["replay", "--task", "prefetch", "--trace", str(small_trace), "--cache-mb", mb])
    assert e.value.code == 2
    assert "--cache-mb: must be a number from 0.00390625 to 1048576" in capsys.readouterr().err


def test_cli_task_options_are_refused_across_tasks(small_trace, capsys):
    assert cli.main(["replay", "-q", "--trace", str(small_trace), "--cache-mb", "4"]) == 2
    assert "--cache-mb is an option of --task prefetch" in capsys.readouterr().err
    assert cli.main(["replay", "--task", "prefetch", "-q", "--trace", str(small_trace)]) == 2
    assert "--task prefetch needs --cache-mb" in capsys.readouterr().err


def test_trace_without_reads_is_an_error(tmp_path, capsys):
    src = tmp_path / "w.parquet"
    write_trace(src, trace_of(range(10), ops=np.full(10, OP_WRITE)))
    assert cli.main(["replay", "--task", "prefetch", "-q", "--trace", str(src),
                     "--cache-mb", "1"]) == 1
    assert "the trace has no reads to replay" in capsys.readouterr().err


def test_cloudphysics_linux_beats_no_readahead():
    """The real trace's reads are 64 KiB runs: Linux's readahead turns most
    of them into hits in a cache well below the working set."""
    from iobridge.offline.trace import import_cloudphysics
    tr = import_cloudphysics(shared_trace("cloudPhysicsIO.csv"))
    rep = run_prefetch_replay(tr, 64, ["none", "linux"])
    none, linux = rep["policies"]["none"], rep["policies"]["linux"]
    assert rep["footprint_mb"] > 4 * 64 and not rep["notes"]
    assert none["prefetched_pages"] == 0 and none["accuracy"] is None
    assert linux["hit_ratio"] > none["hit_ratio"] + 0.2
    assert linux["device_read_requests"] < none["device_read_requests"]
    assert math.isclose(linux["wasted_mb"], linux["wasted_pages"] * 4096 / 2**20)


def test_step_over_range_tells_random_reads_from_scans_whatever_the_files_size():
    import random

    r = random.Random(5)
    for pages in (1_536, 6_144, 49_152, 1_000_000):     # 6 MB to 4 GB files
        for n in (16, 1_500):
            assert 0.2 < window(r.randrange(pages) for _ in range(n)).step_over_range < 0.5
        # 8 KiB random reads: two pages a read, half the steps of one page
        assert 0.1 < window(s + k for s in (r.randrange(pages) for _ in range(700))
                            for k in (0, 1)).step_over_range < 0.3
    # scans: forward with a wrap, backward in readahead chunks, backward by 8 KiB reads
    assert window([*range(49_000, 49_152), *range(0, 4_000)]).step_over_range < 0.001
    assert window(s + k for s in range(10_000, 0, -32) for k in range(32)).step_over_range < 0.01
    assert window(s + k for s in range(10_000, 0, -2) for k in (0, 1)).step_over_range < 0.001
    assert window([5]).step_over_range == 0.0 == PF.WindowStats().step_over_range
