"""Host tests of the page-cache observer's pure logic: the header/ctypes
mirror (bpf/cachestat.h vs core/cachestat_abi.py), hook resolution, turning
raw map values into the report (KML features through
core/prefetch_features.py), and `iobridge cachestat`'s arguments and errors."""

from __future__ import annotations

import ctypes
import random
import re
import shutil
import subprocess

import pytest

from iobridge import cli
from iobridge.core import cachestat_abi as cabi
from iobridge.core import prefetch_features as PF
from iobridge.core.errors import IobridgeError
from iobridge.kernel import cachestat as cs

CC = shutil.which("gcc") or shutil.which("cc")


# ------------------------------------------------------------ header mirror

@pytest.fixture(scope="module")
def c_layout(tmp_path_factory):
    if CC is None:
        pytest.fail("no C compiler on this host: the layout check cannot run")
    tmp = tmp_path_factory.mktemp("cachestat")
    lines = ["#include <stdio.h>", "#include <stddef.h>", '#include "cachestat.h"',
             "int main(void) {"]
    for cname, st in cabi.STRUCTS.items():
        lines.append(f'printf("size {cname} %zu\\n", sizeof(struct {cname}));')
        lines.append(f'printf("align {cname} %zu\\n", _Alignof(struct {cname}));')
        for name, *_ in st._fields_:
            lines.append(f'printf("offset {cname}.{name} %zu %zu\\n", offsetof(struct {cname}, '
                         f'{name}), sizeof(((struct {cname} *)0)->{name}));')
    for pyname, macro in cabi.CONSTANTS.items():
        lines.append(f'printf("const {pyname} %lld\\n", (long long)({macro}));')
    lines.append("return 0; }")
    src = tmp / "layout.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp / "layout"
    subprocess.run([CC, "-std=gnu11", "-Wall", "-Werror", f"-I{cs.header_path().parent}",
                    str(src), "-o", str(exe)], check=True)
    table = {}
    for line in subprocess.run([str(exe)], check=True, capture_output=True,
                               text=True).stdout.splitlines():
        kind, key, *vals = line.split()
        table[(kind, key)] = [int(v) for v in vals]
    return table


@pytest.mark.parametrize("cname", sorted(cabi.STRUCTS))
def test_struct_layout_matches_header(c_layout, cname):
    st = cabi.STRUCTS[cname]
    assert c_layout[("size", cname)] == [ctypes.sizeof(st)]
    assert c_layout[("align", cname)] == [ctypes.alignment(st)]
    for name, *_ in st._fields_:
        desc = getattr(st, name)
        assert c_layout[("offset", f"{cname}.{name}")] == [desc.offset, desc.size], name


def test_constants_match_header(c_layout):
    for pyname in cabi.CONSTANTS:
        assert c_layout[("const", pyname)] == [getattr(cabi, pyname)], pyname


def test_every_header_struct_is_mirrored_and_counters_are_in_order():
    text = cs.header_path().read_text()
    assert set(re.findall(r"^struct\s+(\w+)\s*\{", text, re.M)) == set(cabi.STRUCTS)
    names = [n for n, *_ in cabi.CacheStats._fields_]
    assert list(cabi.COUNTERS) == names[:len(cabi.COUNTERS)]


def test_header_version_check(tmp_path):
    cs.check_header_version()
    bad = tmp_path / "cachestat.h"
    bad.write_text(cs.header_path().read_text().replace(
        f"IOBRIDGE_CACHESTAT_VERSION\t{cabi.VERSION}", f"IOBRIDGE_CACHESTAT_VERSION\t{cabi.VERSION + 1}"))
    with pytest.raises(IobridgeError, match=rf"cachestat version {cabi.VERSION + 1}, the agent "
                       rf"expects {cabi.VERSION}"):
        cs.check_header_version(bad)


def test_every_kprobe_program_exists_in_the_bpf_source():
    src = (cs.header_path().parent / "cachestat.bpf.c").read_text()
    for entry, ret in cs.KPROBE_PROGRAMS.values():
        for fn in filter(None, (entry, ret)):
            assert re.search(rf"^int {fn}\(struct pt_regs \*ctx\)", src, re.M), fn
    for role in cs.ROLES:
        for how, target in role.choices:
            assert target in (cs.KPROBE_PROGRAMS if how == "kprobe" else cs.TRACEPOINT_FLAGS)


# ------------------------------------------------------------ hooks

ALL_SYMS = {"page_cache_ra_unbounded", "page_cache_ra_order", "page_cache_sync_ra",
            "page_cache_async_ra", "filemap_add_folio", "filemap_get_pages",
            "folio_mark_accessed", "__filemap_remove_folio", "workingset_refault"}
ALL_TPS = {"filemap:mm_filemap_add_to_page_cache", "filemap:mm_filemap_delete_from_page_cache"}


def test_hooks_prefer_tracepoints_and_report_nothing_missing():
    plan, missing = cs.resolve_hooks(ALL_SYMS, ALL_TPS)
    assert plan["insertion"] == ("tracepoint", "filemap:mm_filemap_add_to_page_cache")
    assert plan["removal"] == ("tracepoint", "filemap:mm_filemap_delete_from_page_cache")
    assert plan["readahead"] == ("kprobe", "page_cache_ra_unbounded")
    assert missing == []
    line = cs.hooks_line(plan, missing)
    assert line.startswith("page-cache hooks: readahead=kprobe:page_cache_ra_unbounded, ")
    assert "insertion=tracepoint:filemap:mm_filemap_add_to_page_cache" in line
    assert line.endswith("; missing: none") and "\n" not in line


def test_hooks_fall_back_to_kprobes_without_the_tracepoints():
    plan, missing = cs.resolve_hooks(ALL_SYMS, set())
    assert plan["insertion"] == ("kprobe", "filemap_add_folio")
    assert plan["removal"] == ("kprobe", "__filemap_remove_folio")
    assert missing == []


def test_missing_optional_hooks_are_listed_not_fatal():
    plan, missing = cs.resolve_hooks(ALL_SYMS - {"workingset_refault", "page_cache_ra_order"},
                                     ALL_TPS, hidden={"folio_mark_accessed"})
    assert missing == ["readahead-order", "use", "refault"]
    assert "refault" not in plan and "use" not in plan
    assert cs.hooks_line(plan, missing).endswith("; missing: readahead-order, use, refault")


def test_a_missing_required_hook_is_named():
    with pytest.raises(IobridgeError) as e:
        cs.resolve_hooks(ALL_SYMS - {"page_cache_ra_unbounded"}, ALL_TPS)
    assert str(e.value).startswith("this kernel lacks page-cache hooks the observer needs: "
                                   "readahead (kprobe page_cache_ra_unbounded)")
    with pytest.raises(IobridgeError, match=r"removal \(tracepoint filemap:mm_filemap_delete_"
                       r"from_page_cache or kprobe __filemap_remove_folio\)"):
        cs.resolve_hooks(ALL_SYMS, {"filemap:mm_filemap_add_to_page_cache"},
                         hidden={"__filemap_remove_folio"})


def test_kernel_symbols_reads_exact_text_names(tmp_path):
    f = tmp_path / "kallsyms"
    f.write_text("ffffffff81000000 T page_cache_ra_unbounded\n"
                 "ffffffff81000100 t filemap_get_pages.isra.0\n"
                 "ffffffff81000200 D folio_mark_accessed\n"
                 "ffffffffc0000000 t workingset_refault\t[mod]\n")
    syms = cs.kernel_symbols(f)
    assert {"page_cache_ra_unbounded", "workingset_refault"} <= syms
    assert "filemap_get_pages" not in syms and "folio_mark_accessed" not in syms
    with pytest.raises(IobridgeError, match="cannot read"):
        cs.kernel_symbols(tmp_path / "nope")


# ------------------------------------------------------------ the report

def kernel_window_add(w: cabi.CacheWindow, index: int, epoch: int) -> None:
    """What window_add() in bpf/cachestat.bpf.c does, for building map values."""
    if w.epoch != epoch or w.n == 0:
        ctypes.memset(ctypes.addressof(w), 0, ctypes.sizeof(w))
        w.epoch, w.base, w.n, w.seq_run_max, w.rev_run_max = epoch, index, 1, 1, 1
        return
    d = index - w.base
    delta = d - w.last
    sq = (d * d) & (2**64 - 1)
    w.n += 1
    w.s1 += d
    lo = (w.s2_lo + sq) & (2**64 - 1)
    if lo < sq:
        w.s2_hi += 1
    w.s2_lo = lo
    w.lo, w.hi = min(w.lo, d), max(w.hi, d)
    w.sad += abs(delta)
    if delta > 0:
        w.max_fwd = max(w.max_fwd, delta)
    else:
        w.max_back = max(w.max_back, -delta)
    if delta == 1:
        if w.run > 0:
            w.run += 1
        else:
            w.run, w.seq_runs = 1, w.seq_runs + 1
        w.seq_steps += 1
        w.seq_run_max = max(w.seq_run_max, w.run + 1)
    elif delta == -1:
        if w.run < 0:
            w.run -= 1
        else:
            w.run, w.rev_runs = -1, w.rev_runs + 1
        w.rev_steps += 1
        w.rev_run_max = max(w.rev_run_max, -w.run + 1)
    else:
        w.run = 0
    w.last = d


def leaf(**counts) -> cabi.CacheStats:
    s = cabi.CacheStats()
    for k, v in counts.items():
        if k == "ra_windows":
            for i, x in enumerate(v):
                s.ra_windows[i] = x
        else:
            setattr(s, k, v)
    return s


@pytest.mark.parametrize("seed", range(5))
def test_features_from_kernel_aggregates_equal_the_replays(seed):
    rng = random.Random(seed)
    base = rng.randrange(0, 1 << 31)
    idx = [base + rng.randrange(-5000, 5000) for _ in range(rng.randrange(1, 400))]
    s = cabi.CacheStats()
    for i in idx:
        kernel_window_add(s.win[1], i, 7)
    ref = PF.WindowStats()
    for i in idx:
        ref.add(i)
    c = cs.Counters.from_leaf(s, epoch=7)
    f = cs.window_features(c.window, 128)
    assert [f[n] for n in PF.FEATURE_NAMES] == pytest.approx(list(ref.features(128)), rel=1e-12)
    assert f["direction"] == pytest.approx(ref.direction)
    # not this epoch's window: no features
    assert cs.Counters.from_leaf(s, epoch=9).window is None
    assert cs.Counters.from_leaf(s, epoch=6).window is None


def test_run_lengths_of_forward_and_backward_scans():
    s = cabi.CacheStats()
    for i in list(range(100, 110)) + [500] + list(range(300, 295, -1)):
        kernel_window_add(s.win[0], i, 2)
    f = cs.window_features(cs.Counters.from_leaf(s, epoch=2).window, 128)
    assert f["seq_run_max"] == 10 and f["rev_run_max"] == 5
    assert f["seq_run_mean"] == 10 and f["rev_run_mean"] == 5
    assert f["events"] == 16


def test_report_row_from_raw_counters():
    before = cs.Counters.from_leaf(leaf(insertions=10, reads=5, hits=5, ra_pages=2, ra_used=1))
    after = cs.Counters.from_leaf(leaf(
        insertions=1034, window_pages=1024, ra_pages=1000, ra_windows=[3, 30, 1], reads=2053,
        hits=1029, ra_used=801, removed_used=700, removed_unused=300, ra_unused_removed=200,
        refaults=7, ra_pages_setting=32))
    d = after.minus(before)
    row = cs.report_row(d, None, after)
    assert row["insertions"] == 1024 and row["reads"] == 2048 and row["hits"] == 1024
    assert row["hit_ratio"] == 0.5 and row["misses"] == 1024
    assert row["ra_windows"] == {"sync": 3, "async": 30, "forced": 1}
    assert row["ra_accuracy"] == 801 / 1000          # since start (total)
    assert row["removed"] == 1000 and row["wasted_kb"] == 800
    assert row["refaults"] == 7
    assert row["readahead_kb"] == 128                  # 32 pages, no device figure
    assert cs.report_row(d, 512.0)["readahead_kb"] == 512.0
    assert row["window"]["events"] == 0 and row["window"]["readahead_over_1024"] == 0.25
    empty = cs.report_row(cs.Counters.empty(), None)
    assert empty["hit_ratio"] is None and empty["ra_accuracy"] is None


def test_interval_report_keeps_active_devices_and_the_top_files():
    dev = (8 << 20) | 1
    prev = ({dev: cs.Counters.from_leaf(leaf(reads=10))},
            {(dev, 11): cs.Counters.from_leaf(leaf(reads=10))})
    now = ({dev: cs.Counters.from_leaf(leaf(reads=110)), (9 << 20): cs.Counters.empty()},
           {(dev, 11): cs.Counters.from_leaf(leaf(reads=15)),
            (dev, 12): cs.Counters.from_leaf(leaf(reads=90, insertions=5)),
            (dev, 13): cs.Counters.from_leaf(leaf(reads=2)),
            (dev, 14): cs.Counters.empty()})
    rep = cs.interval_report(prev, now, top=2, ra_kb_of=lambda d: 128.0)
    assert list(rep["devices"].values())[0]["dev"] == "8:1"
    assert [r["reads"] for r in rep["devices"].values()] == [100]
    assert [f["ino"] for f in rep["files"]] == [12, 11]
    assert rep["files"][0]["file"] == "8:1:12" and rep["files"][0]["insertions"] == 5
    assert cs.interval_report(prev, now, top=0, ra_kb_of=lambda d: None)["files"] == []


def test_events_are_decoded():
    ev = (cabi.CacheEvent * 3)()
    ev[0].kind, ev[0].flags, ev[0].dev, ev[0].ino, ev[0].index = cabi.CEV_READ, \
        cabi.PAGE_READAHEAD | cabi.PAGE_USED | cabi.CEV_HIT, (8 << 20) | 2, 12, 5
    ev[1].kind, ev[1].flags, ev[1].nr_pages = cabi.CEV_WINDOW, cabi.RA_ASYNC, 32
    ev[2].kind, ev[2].flags = cabi.CEV_REMOVE, cabi.PAGE_READAHEAD
    arr = __import__("numpy").frombuffer(bytes(ev), dtype=cs.EVENT_DTYPE)
    a, b, c = (cs.format_event(e) for e in arr)
    assert a["event"] == "read" and a["hit"] and a["readahead"] and a["used"]
    assert a["dev"] == "8:2" and a["ino"] == 12 and a["index"] == 5
    assert b["event"] == "window" and b["ra"] == "async" and b["pages"] == 32
    assert c["event"] == "remove" and c["readahead"] and not c["used"] and "hit" not in c


# ------------------------------------------------------------ the command

def parse(argv):
    return cli.build_parser().parse_args(["cachestat", *argv])


def test_arguments():
    a = parse([])
    assert (a.interval, a.count, a.top, a.json, a.events) == (1.0, None, 10, False, False)
    a = parse(["--interval", "0.5", "--count", "4", "--top", "0", "--json", "--events"])
    assert (a.interval, a.count, a.top, a.json, a.events) == (0.5, 4, 0, True, True)


@pytest.mark.parametrize("argv, message", [
    (["--interval", "0"], "argument --interval: must be a number more than 0"),
    (["--interval", "nan"], "argument --interval: must be a number"),
    (["--count", "0"], "argument --count: must be a whole number from 1"),
    (["--top", "-1"], "argument --top: must be a whole number from 0 to 10000"),
    (["--count", "x"], "argument --count: must be a whole number"),
    (["3"], "unrecognized arguments: 3"),
])
def test_bad_arguments_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.main(["cachestat", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_non_root_is_one_line_and_nothing_is_loaded(monkeypatch, capsys):
    monkeypatch.setattr(cs.os, "geteuid", lambda: 1000)
    monkeypatch.setattr("iobridge.kernel.system.os.geteuid", lambda: 1000)
    loaded = []
    monkeypatch.setattr(cs.bpf, "compile_program", lambda *a, **k: loaded.append(a))
    assert cli.main(["cachestat", "--count", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("iobridge: error: observing the page cache needs root")
    assert loaded == []


def test_old_kernel_is_refused_before_loading(monkeypatch, capsys):
    monkeypatch.setattr("iobridge.kernel.system.os.geteuid", lambda: 0)
    monkeypatch.setattr("iobridge.kernel.system.platform.release", lambda: "4.19.0-27-amd64")
    assert cli.main(["cachestat"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "kernel 4.19.0-27-amd64 is not supported" in err


def test_text_report_has_a_row_per_device_and_file(capsys, monkeypatch):
    monkeypatch.setattr(cs, "dev_label", lambda d: "disk%d" % (d & 0xfffff))
    dev = (7 << 20) | 3
    now = ({dev: cs.Counters.from_leaf(leaf(reads=200, hits=150, insertions=50, ra_pages=40,
                                            ra_used=30, ra_windows=[1, 2, 0]))},
           {(dev, 42): cs.Counters.from_leaf(leaf(reads=200, hits=150, insertions=50))})
    rep = cs.interval_report(({}, {}), now, top=5, ra_kb_of=lambda d: 128.0)
    rep.update({"dropped_events": 3})
    cs._print_report(rep)
    out = capsys.readouterr().out.splitlines()
    assert "READS" in out[0] and "HIT%" in out[0] and "REFAULTS" in out[0]
    dev_row = out[1].split()
    assert dev_row[:5] == ["disk3", "200", "75.0", "50", "40"]
    assert dev_row[5] == "3" and dev_row[6] == "75.0"        # windows, accuracy 30/40
    assert out[2].split()[0] == "7:3:42"
    assert "events dropped in the kernel so far: 3" in out[3]
