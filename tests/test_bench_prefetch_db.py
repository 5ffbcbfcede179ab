"""Host tests of `iobridge bench prefetch`'s db workloads (db_bench of
Debian's rocksdb-tools, agent/lab/prefetch_bench.py): their options, the
db_bench command lines, the parser of db_bench's result lines (on output
captured from db_bench 7.8.3), the refusal without db_bench, the copy
readrandomwriterandom writes into, and one short real db_bench run on a
small DB in a temporary folder (what the options are, not what the kernel
does with them). The benchmark itself runs only in the test VM."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from iobridge import cli
from iobridge.core.errors import IobridgeError, UsageError
from iobridge.lab import bench
from iobridge.lab import prefetch_bench as B
from iobridge.lab import prefetch_record as P

from test_bench_prefetch import result

# db_bench 7.8.3's stdout (captured on the host; the header cut short)
HEADER = """\
Initializing RocksDB Options from the specified file
Initializing RocksDB Options from command-line flags
Integrated BlobDB: blob cache disabled
Keys:       16 bytes each (+ 0 bytes user-defined timestamp)
Values:     1000 bytes each (500 bytes after compression)
Entries:    100000
WARNING: Assertions are enabled; benchmarks unnecessarily slow
------------------------------------------------
DB path: [/tmp/dbbx/db]
"""
READRANDOM = HEADER + (
    "readrandom   :       3.399 micros/op 294170 ops/sec 3.002 seconds 882999 operations;  "
    "285.0 MB/s (882999 of 882999 found)\n\n")
RRWR = HEADER + (
    "readrandomwriterandom :      10.088 micros/op 99125 ops/sec 3.006 seconds 297999 "
    "operations; ( reads:268200 writes:29799 total:100000 found:268200)\n\n")
# two passes of readreverse (one db_bench each), as the run's stdout has them
READREVERSE = HEADER + (
    "readreverse  :       1.417 micros/op 705362 ops/sec 0.142 seconds 100000 operations;  "
    "683.4 MB/s\n") + HEADER + (
    "readreverse  :       1.068 micros/op 935760 ops/sec 0.107 seconds 100000 operations;  "
    "906.7 MB/s\n")
FILLSEQ = HEADER + (
    "fillseq      :       2.790 micros/op 357123 ops/sec 0.280 seconds 100000 operations;  "
    "346.0 MB/s\nflush memtable\nwaitforcompaction(/tmp/dbbx/db): started\n"
    "waitforcompaction(/tmp/dbbx/db): finished\n")
# a DB that is not there: no result line; stderr: the version header, then why
NO_DB_OUT = HEADER.split("Keys:")[0]
NO_DB_ERR = ("RocksDB:    version 7.8.3\nDate:       Fri Dec  4 21:35:39 2026\n"
             "open error: IO error: No such file or directory: While opening a file for "
             "sequentially reading: /tmp/dbbx/nonexist/CURRENT: No such file or directory\n")


def parse(*argv):
    return cli.build_parser().parse_args(["bench", "prefetch", *argv])


@pytest.fixture
def no_db_bench(monkeypatch):
    monkeypatch.setattr(B.shutil, "which", lambda name: None)


# ------------------------------------------------------------ workloads and options

def test_db_workloads_are_named_and_asked_for_not_default():
    assert B.DB_WORKLOADS == ("db-readseq", "db-readreverse", "db-readrandom",
                              "db-readrandomwriterandom")
    assert {B.WORKLOADS[w]["db"] for w in B.DB_WORKLOADS} == {
        "readseq", "readreverse", "readrandom", "readrandomwriterandom"}
    assert not set(B.DB_WORKLOADS) & set(B.DEFAULT_WORKLOADS)
    assert [B.unit(w) for w in B.DB_WORKLOADS] == ["MB/s", "MB/s", "MB/s", "ops/s"]
    args = parse("--workloads", "db-readreverse", "rev", "db-readrandomwriterandom")
    assert args.workloads == ["db-readreverse", "rev", "db-readrandomwriterandom"]
    with pytest.raises(SystemExit):
        parse("--workloads", "db-readseq", "db-readseq")


def test_db_readreverse_is_held_to_the_reverse_goal():
    by = {fig: wls for fig, wls, *_ in B.GOALS}
    assert "db-readreverse" in by["d_over_a"] and "rev" in by["d_over_a"]
    assert set(B.DB_WORKLOADS) <= set(by["d_over_b"])


def test_the_db_is_twice_memory_max():
    measured = 103_256_405 / 2**20       # what db_bench 7.8.3 wrote for these settings
    assert measured <= B.DB_DISK_MB and 1.9 <= measured / P.MEMORY_MB <= 2.2
    assert B.DB_KEYS * (B.DB_KEY_BYTES + B.DB_VALUE_BYTES) / 2**20 == pytest.approx(96.9, abs=0.1)


# ------------------------------------------------------------ command lines

def flags(argv) -> dict:
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))


def test_build_command_line():
    argv = B.db_build_argv(Path("/mnt/t/rocksdb"), 11)
    assert argv[0] == "db_bench"
    assert flags(argv) == {
        "benchmarks": "fillseq,flush,waitforcompaction", "db": "/mnt/t/rocksdb", "num": "100000",
        "key_size": "16", "value_size": "1000", "compression_type": "none",
        "write_buffer_size": "4194304", "threads": "1", "seed": "11", "use_existing_db": "0",
        "disable_wal": "1", "target_file_size_base": "4194304"}


COMMON = {"db": "/mnt/t/rocksdb", "num": "100000", "key_size": "16", "value_size": "1000",
          "compression_type": "none", "write_buffer_size": "4194304", "threads": "1",
          "seed": "11", "use_existing_db": "1", "advise_random_on_open": "false",
          "mmap_read": "0", "use_direct_reads": "0", "cache_size": "8388608",
          "disable_auto_compactions": "1"}


@pytest.mark.parametrize("bench_, extra", [
    ("readrandom", {"readonly": "1", "duration": "8"}),
    ("readrandomwriterandom", {"duration": "8"}),       # it writes: no --readonly
])
def test_timed_run_command_lines(bench_, extra):
    argv = B.db_run_argv(bench_, Path("/mnt/t/rocksdb"), 7.5, 11)   # whole seconds, rounded up
    assert argv[0] == "db_bench"
    assert flags(argv) == {"benchmarks": bench_, **COMMON, **extra}


@pytest.mark.parametrize("bench_", ["readseq", "readreverse"])
def test_pass_run_command_lines_repeat_until_the_time_is_up(bench_):
    argv = B.db_run_argv(bench_, Path("/mnt/t/rocksdb"), 8.0, 11)
    assert argv[:5] == ["bash", "-c", B.DB_PASS_LOOP, "db-passes", "8000000"]
    assert argv[5] == "db_bench"
    # db_bench ignores --duration for these: not given
    assert flags(argv[6:]) == {"benchmarks": bench_, **COMMON, "readonly": "1"}


def test_seed_zero_is_not_db_benchs_clock_seed():
    assert flags(B.db_run_argv("readrandom", Path("/d"), 8, 0))["seed"] == str(2**32)
    assert flags(B.db_build_argv(Path("/d"), 0))["seed"] == str(2**32)


def test_pass_loop_repeats_whole_passes_and_passes_a_failure_on(tmp_path):
    # the loop itself, with a stand-in command: runs at least once, then
    # until the time is up; a failing pass ends it with its exit status
    log = tmp_path / "passes"
    ok = subprocess.run(["bash", "-c", B.DB_PASS_LOOP, "db-passes", "300000", "sh", "-c",
                         f"echo pass >> {log}; sleep 0.1"])
    assert ok.returncode == 0 and 3 <= len(log.read_text().split()) <= 5
    once = subprocess.run(["bash", "-c", B.DB_PASS_LOOP, "db-passes", "0", "sh", "-c",
                           f"echo pass >> {log}"])
    assert once.returncode == 0 and len(log.read_text().split()) <= 6
    bad = subprocess.run(["bash", "-c", B.DB_PASS_LOOP, "db-passes", "5000000", "sh", "-c",
                          "exit 3"])
    assert bad.returncode == 3


# ------------------------------------------------------------ the parser

def test_parse_readrandom():
    assert B.parse_db_bench("readrandom", READRANDOM) == {
        "ops": 882999, "seconds": 3.002, "passes": 1, "ops_s": round(882999 / 3.002, 1),
        "mb_s": 285.0, "found": 882999}


def test_parse_readrandomwriterandom_has_no_mb_s():
    r = B.parse_db_bench("readrandomwriterandom", RRWR)
    assert r["mb_s"] is None and r["ops_s"] == round(297999 / 3.006, 1)
    assert r["found"] == 268200 and r["ops"] == 297999
    # readrandom's pattern does not take readrandomwriterandom's line
    with pytest.raises(IobridgeError):
        B.parse_db_bench("readrandom", RRWR)


def test_parse_passes_add_up():
    r = B.parse_db_bench("readreverse", READREVERSE)
    assert r["passes"] == 2 and r["ops"] == 200000 and r["seconds"] == pytest.approx(0.249)
    assert r["mb_s"] == pytest.approx((683.4 * 0.142 + 906.7 * 0.107) / 0.249, abs=1e-3)
    assert r["ops_s"] == pytest.approx(200000 / 0.249, abs=0.1) and r["found"] is None
    assert B.parse_db_bench("fillseq", FILLSEQ)["ops"] == 100000


def test_parse_without_a_result_line_says_why():
    progress = "... finished 100 ops" + " " * 30 + "\r"
    with pytest.raises(IobridgeError) as e:
        B.parse_db_bench("readrandom", NO_DB_OUT, progress * 40 + NO_DB_ERR)
    msg = str(e.value)
    assert msg.startswith("db_bench readrandom: no result line in its output; stderr: ")
    assert msg.endswith("/tmp/dbbx/nonexist/CURRENT: No such file or directory")
    assert "finished" not in msg and "\n" not in msg
    with pytest.raises(IobridgeError, match=r"stderr: \(empty\)$"):
        B.parse_db_bench("readseq", "")


# ------------------------------------------------------------ without db_bench

def test_asked_for_without_db_bench_is_one_clear_line(no_db_bench, monkeypatch, capsys):
    with pytest.raises(UsageError) as e:
        B.host_check(parse("--workloads", "rev", "db-readseq"))
    assert str(e.value) == ("db-readseq needs db_bench, which is not installed "
                            "(apt-get install rocksdb-tools, or make setup)")
    with pytest.raises(UsageError, match="^db-readseq, db-readrandom need db_bench"):
        B.check_workloads(["db-readseq", "seq", "db-readrandom"])
    # through the CLI: refused on the host, before any VM
    from iobridge.lab import vm

    def no_vm(*a, **kw):
        raise AssertionError("a VM was asked for")
    monkeypatch.setattr(vm, "run", no_vm)
    assert cli.main(["bench", "prefetch", "--workloads", "db-readrandomwriterandom"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("iobridge: error: db-readrandomwriterandom needs db_bench, which is not "
                   "installed (apt-get install rocksdb-tools, or make setup)")


def test_default_set_without_db_bench_says_so(no_db_bench):
    B.host_check(parse())                          # nothing asked for: no error
    assert B.check_workloads(B.DEFAULT_WORKLOADS) == [B.DB_MISSING]
    assert "apt-get install rocksdb-tools" in B.DB_MISSING


def test_with_db_bench_nothing_is_left_uncovered(monkeypatch):
    monkeypatch.setattr(B.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert B.check_workloads(B.DB_WORKLOADS) == []
    assert B.check_workloads(B.DEFAULT_WORKLOADS) == []
    res = result()
    res["not_covered"] = []
    B.summarize(res)
    assert "not covered" not in B.render(res)


# ------------------------------------------------------------ the writable copy

def make_db(d: Path) -> None:
    d.mkdir()
    for name, data in (("000008.sst", b"s" * 4096), ("CURRENT", b"MANIFEST-000005\n"),
                       ("MANIFEST-000005", b"m" * 100), ("LOCK", b"")):
        (d / name).write_bytes(data)


def test_restore_gives_a_fresh_copy_each_time(tmp_path):
    pristine, work = tmp_path / "rocksdb", tmp_path / "rocksdb-rw"
    make_db(pristine)
    listing = B.db_listing(pristine)
    assert listing["000008.sst"][0] == 4096
    B.restore_db(pristine, work, listing)
    assert B.db_listing(work) == listing           # same names, sizes and times
    ino = (work / "000008.sst").stat().st_ino
    assert ino != (pristine / "000008.sst").stat().st_ino
    # what a readrandomwriterandom run leaves: a WAL, an L0 file, a new MANIFEST
    (work / "000031.log").write_bytes(b"w" * 10)
    (work / "000032.sst").write_bytes(b"n" * 10)
    (work / "CURRENT").write_bytes(b"MANIFEST-000024\n")
    B.restore_db(pristine, work, listing)
    assert B.db_listing(work) == listing
    assert (work / "CURRENT").read_bytes() == b"MANIFEST-000005\n"


def test_restore_refuses_a_pristine_db_that_changed(tmp_path):
    pristine, work = tmp_path / "rocksdb", tmp_path / "rocksdb-rw"
    make_db(pristine)
    listing = B.db_listing(pristine)
    (pristine / "OPTIONS-000026").write_text("x")
    with pytest.raises(IobridgeError, match=r"changed since its build \(OPTIONS-000026\): "
                                            r"a read-only run wrote to it"):
        B.restore_db(pristine, work, listing)
    assert not work.exists()


# ------------------------------------------------------------ results in ops/s

def test_ratios_and_rendering_in_each_workloads_unit():
    res = result(workloads=("rev", "db-readreverse", "db-readrandomwriterandom"))
    for p in ("a", "c", "d"):
        r = res["runs"]["db-readrandomwriterandom"][p]
        r["ops_s"], r["mb_s"] = r["mb_s"] * 100, None
    for kb, r in res["runs"]["db-readrandomwriterandom"]["sweep"].items():
        if r is not res["runs"]["db-readrandomwriterandom"]["a"]:
            r["ops_s"], r["mb_s"] = r["mb_s"] * 100, None
    res["setup"]["db"] = {"keys": 100000, "key_bytes": 16, "value_bytes": 1000,
                          "size_mb": 98.5, "sst_files": 25}
    B.summarize(res)
    rw = res["ratios"]["db-readrandomwriterandom"]
    assert res["best_static"]["db-readrandomwriterandom"] == 512
    assert rw["d_over_a"] == pytest.approx(18 / 12) and rw["d_over_b"] == pytest.approx(18 / 14)
    by = {(g["figure"], g["workload"]): g for g in res["goals"]}
    assert by[("d_over_a", "db-readreverse")]["value"] == pytest.approx(16 / 11)
    assert by[("d_over_a", "db-readreverse")]["met"] is True
    text = B.render(res)
    assert "RocksDB of 98 MB (100000 keys of 16 + 1000 B, 25 SST files)" in text
    rwr = text.split("\ndb-readrandomwriterandom: ")[1].split("\n\n")[0]
    assert re.search(r"policy +RA KiB +ops/s +hit%", rwr)
    assert re.search(r"\(a\) kernel default +128 +1200\.0 ", rwr)
    assert "sweep ops/s: 0: 500.0  32: 900.0  128: 1200.0  512: 1400.0" in rwr
    assert "d/a 1.50" in rwr
    rev = text.split("\ndb-readreverse: ")[1].split("\n\n")[0]
    assert re.search(r"policy +RA KiB +MB/s +hit%", rev)
    # the goals' column as wide as the longest workload's name
    assert "  d_over_a         db-readreverse              1.45  [goal >= 1.3: met]" in text
    assert "  d_over_b         db-readrandomwriterandom    1.29  [goal >= 0.95: met]" in text


def test_the_bench_checks_on_the_host():
    assert bench.BENCHES["prefetch"]["host_check"] is not None


# ------------------------------------------------------------ the real db_bench

def test_real_db_bench_takes_every_option_and_prints_what_the_parser_reads(tmp_path, monkeypatch):
    """rocksdb-tools is a setup dependency (scripts/setup.sh): no skip
    without it. A small DB (2000 keys), then the runs' own command lines."""
    known = set(re.findall(r"^\s+-(\w+) \(", subprocess.run(
        ["db_bench", "--help"], capture_output=True, text=True).stdout, re.M))
    db = tmp_path / "rocksdb"
    used = B.db_build_argv(db, 11) + [a for w in B.DB_WORKLOADS
                                      for a in B.db_run_argv(B.WORKLOADS[w]["db"], db, 2, 11)]
    names = {a[2:].split("=")[0] for a in used if a.startswith("--")}
    assert names <= known, names - known

    monkeypatch.setattr(B, "DB_KEYS", 2000)
    # waitforcompaction sleeps seconds: a 2000-key DB has nothing to wait for
    build = [a.replace(",waitforcompaction", "") for a in B.db_build_argv(db, 11)]
    p = subprocess.run(build, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-300:]
    assert B.parse_db_bench("fillseq", p.stdout)["ops"] == 2000
    listing = B.db_listing(db)
    for bench_ in ("readreverse", "readrandom"):       # 0.2 s of passes; --duration=1
        p = subprocess.run(B.db_run_argv(bench_, db, 0.2, 11), capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-300:]
        r = B.parse_db_bench(bench_, p.stdout, p.stderr)
        assert r["ops"] >= 2000 and r["mb_s"] > 0
        if bench_ == "readrandom":
            assert r["found"] == r["ops"]
    assert B.db_listing(db) == listing              # --readonly=1: nothing written
    rw = tmp_path / "rocksdb-rw"
    B.restore_db(db, rw, listing)
    p = subprocess.run(B.db_run_argv("readrandomwriterandom", rw, 1, 11), capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr[-300:]
    r = B.parse_db_bench("readrandomwriterandom", p.stdout, p.stderr)
    assert r["mb_s"] is None and r["ops_s"] > 0
    assert B.db_listing(rw) != listing and B.db_listing(db) == listing
