"""Bad trace input gets one clear error and leaves nothing half-written (issue 14).

(a) A matrix of bad inputs run through `iobridge trace import|export|info`:
    each must exit non-zero with one `iobridge: error:` line naming the file
    (and line/row and field where there is one), no traceback, and nothing
    new or changed in the output directory. Interruptions (SIGTERM, SIGHUP,
    Ctrl-C) while the output is written run in a subprocess.
(b) Property-based tests (hypothesis): valid traces survive
    export_fio_iolog/import_fio_iolog and write_trace/read_trace; values out
    of range are refused, never wrapped.
"""

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iobridge import cli
from iobridge.core import outfiles
from iobridge.core.errors import IobridgeError
from iobridge.offline import trace as T

PROPS = settings(max_examples=30, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow])

CSV_HEAD = "version,time,op,size,lbn\n"
FIO3 = "fio version 3 iolog\n"
FIO2 = "fio version 2 iolog\n"


def zstd_bytes(data: bytes) -> bytes:
    import zstandard
    return zstandard.ZstdCompressor().compress(data)


def parquet_bytes(_meta=None, **over) -> bytes:
    """A 3-row iobridge Parquet trace, columns replaced by `over` (pyarrow arrays),
    the file metadata by `_meta`."""
    n = 3
    cols = {"issue_ns": pa.array([0, 10, 20], pa.int64()),
            "complete_ns": pa.array([-1] * n, pa.int64()),
            "latency_ns": pa.array([-1] * n, pa.int64()),
            "device": pa.array(["sda"] * n).dictionary_encode(),
            "sector": pa.array([0, 8, 16], pa.int64()),
            "bytes": pa.array([4096] * n, pa.int64()),
            "op": pa.array([0] * n, pa.uint8()),
            "qlen": pa.array([-1] * n, pa.int32()),
            "leg": pa.array([-1] * n, pa.int16())}
    cols.update(over)
    table = pa.table(cols).replace_schema_metadata(
        _meta or {b"iobridge.trace_format": b"1", b"iobridge.meta": b"{}"})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


# (id, input file name, its content, command, what the error line must contain)
# command: "import" (-o out/x.parquet), "export" (-o out/x.iolog), "info"
BAD_INPUT = [
    # values past int64 / past what the kernel can address
    ("cp-time-overflow", "cp.csv", CSV_HEAD + "1,0,28,4096,10\n1,9300000000,28,4096,10\n",
     "import", "cp.csv line 3: field 'time' = 9300000000"),
    ("cp-size-2**64", "cp.csv", CSV_HEAD + f"1,0,28,{2**64},10\n",
     "import", "cp.csv line 2: field 'size' = 18446744073709551616 does not fit in 64 bits"),
    ("cp-size-zero", "cp.csv", CSV_HEAD + "1,0,28,0,10\n",
     "import", "cp.csv line 2: field 'bytes' (the file's size) = 0 for a read"),
    ("cp-size-5GiB", "cp.csv", CSV_HEAD + f"1,0,28,{5 << 30},10\n",
     "import", "cp.csv line 2: field 'bytes' (the file's size) = 5368709120 is larger"),
    ("cp-negative-lbn", "cp.csv", CSV_HEAD + "1,0,28,4096,-3\n",
     "import", "cp.csv line 2: field 'lbn' = '-3' is not a non-negative integer"),
    ("cp-lbn-past-2**63", "cp.csv", CSV_HEAD + f"1,0,28,4096,{2**62}\n",
     "import", "cp.csv line 2: field 'sector' (the file's lbn)"),
    ("cp-time-backwards", "cp.csv", CSV_HEAD + "1,5,28,4096,1\n1,4,28,4096,1\n",
     "info", "cp.csv line 3: time goes backwards"),
    ("arc-nblocks-2**55", "x.lis", f"1 1 0 0\n2 {2**55} 0 1\n",
     "import", f"x.lis line 2: field 'nblocks' = {2**55}: times 512 bytes does not fit"),
    ("arc-nblocks-4GiB", "x.lis", "1 1 0 0\n\n2 8388608 0 1\n",
     "import", "x.lis line 3: field 'bytes' (the file's nblocks x 512) = 4294967296"),
    ("arc-start-past-2**63", "x.lis", f"{2**54} 8 0 0\n",
     "import", "x.lis line 1: field 'sector' (the file's start_block)"),
    ("arc-value-2**64", "x.lis", f"1 1 0 {2**64}\n",
     "import", "x.lis line 1: field 'reqno' = 18446744073709551616 does not fit in 64 bits"),
    ("arc-negative", "x.lis", "1 1 0 0\n-2 1 0 1\n",
     "import", "x.lis line 2: expected 4 non-negative integers"),
    ("fio-negative-offset", "j.iolog", FIO3 + "0 /dev/x add\n5 /dev/x read -512 4096\n",
     "import", "j.iolog line 3: field 'offset' = '-512' is not a non-negative integer"),
    ("fio-negative-length", "j.iolog", FIO2 + "/dev/x read 0 -4096\n",
     "import", "j.iolog line 2: field 'length' = '-4096'"),
    ("fio-negative-time", "j.iolog", FIO3 + "-5 /dev/x read 0 4096\n",
     "import", "j.iolog line 2: field 'timestamp' = '-5'"),
    ("fio-zero-length-read", "j.iolog", FIO3 + "5 /dev/x read 0 0\n",
     "import", "j.iolog line 2: field 'bytes' (the file's length) = 0 for a read"),
    ("fio-offset-past-2**63", "j.iolog", FIO3 + f"5 /dev/x read {2**63 - 4096} 8192\n",
     "import", "j.iolog line 2: field 'sector' (the file's offset / 512)"),
    ("fio-offset-2**70", "j.iolog", FIO3 + f"5 /dev/x read {2**70} 4096\n",
     "export", f"j.iolog line 2: field 'offset' = {2**70} does not fit in 64 bits"),
    ("fio-timestamp-ns-overflow", "j.iolog", FIO3 + f"{2**62} /dev/x read 0 4096\n",
     "import", f"j.iolog line 2: field 'timestamp' = {2**62} us is past the int64"),
    ("fio-wait-overflow", "j.iolog", FIO2 + f"/dev/x wait {2**62} 0\n/dev/x read 0 4096\n",
     "import", "j.iolog line 2: the waits so far add up to"),
    ("pq-null-time", "t.parquet", parquet_bytes(issue_ns=pa.array([0, None, 2], pa.int64())),
     "info", "t.parquet row 2: field 'issue_ns' is null"),
    ("pq-negative-size", "t.parquet", parquet_bytes(bytes=pa.array([4096, -1, 1], pa.int64())),
     "info", "t.parquet row 2: field 'bytes' = -1 is negative"),
    ("pq-op-200", "t.parquet", parquet_bytes(op=pa.array([0, 0, 200], pa.uint8())),
     "export", "t.parquet row 3: field 'op' = 200 is not an operation code"),
    ("pq-sector-uint64", "t.parquet", parquet_bytes(sector=pa.array([0, 2**64 - 1, 0],
                                                                     pa.uint64())),
     "export", "t.parquet row 2: field 'sector' = 18446744073709551615 does not fit int64"),
    ("pq-sector-end-past-2**63", "t.parquet", parquet_bytes(sector=pa.array([2**54, 0, 0],
                                                                             pa.int64())),
     "export", "t.parquet row 1: field 'sector' = 18014398509481984 with 4096 bytes ends"),
    ("pq-float-times", "t.parquet", parquet_bytes(issue_ns=pa.array([0.0, float("nan"), 2.0])),
     "info", "t.parquet: column 'issue_ns' has type double, expected int64"),
    ("pq-negative-time", "t.parquet", parquet_bytes(issue_ns=pa.array([5, -10, 20], pa.int64())),
     "info", "t.parquet row 2: field 'issue_ns' = -10 is negative"),
    ("pq-negative-latency", "t.parquet", parquet_bytes(latency_ns=pa.array([-1, -1, -5],
                                                                           pa.int64())),
     "info", "t.parquet row 3: field 'latency_ns' = -5 is negative"),
    ("pq-null-device", "t.parquet", parquet_bytes(device=pa.array(["a", None, "b"])),
     "info", "t.parquet row 2: field 'device' is null"),
    ("pq-not-parquet", "t.parquet", b"PAR1 but not really",
     "export", "t.parquet: not a readable iobridge trace"),
    # text that is not UTF-8
    ("csv-not-utf8", "cp.csv", CSV_HEAD.encode() + b"1,0,28,4096,10\n1,\xff,28,4096,10\n",
     "import", "cp.csv line 3: byte 0xff is not UTF-8 text"),
    ("fio-not-utf8", "j.iolog", FIO3.encode() + b"0 /dev/\xe9 read 0 4096\n",
     "export --format fio", "j.iolog line 2: byte 0xe9 is not UTF-8 text"),
    ("arc-not-utf8", "x.lis", b"1 1 0 0\n2 1 0 1\n\x80\n",
     "import", "x.lis line 3: byte 0x80 is not UTF-8 text"),
    ("arc-fullwidth-digits", "x.lis", "1 1 0 0\n\uff12 1 0 1\n".encode(),
     "import", "x.lis line 2: expected 4 non-negative integers"),
    ("csv-bom-then-garbage", "cp.csv", b"\xef\xbb\xbf" + b"time,op\n1,2\n",
     "import", "cp.csv line 1: expected header"),
    # fields counted per line, not over the file: 3 + 5 fields are not two records
    ("arc-3-then-5-fields", "x.lis", "1 8 0\n0 1 8 0 0\n",
     "info", "x.lis line 1: expected 4 non-negative integers"),
    # bytes after the last zstd frame are an error, not dropped
    ("arc-zst-trailing-garbage", "x.lis.zst", zstd_bytes(b"1 8 0 0\n") + b"garbage",
     "import", "x.lis.zst: bytes after the zstd frame ending at byte"),
    # an iolog offset is in bytes, a trace's in sectors: refused, never rounded
    ("fio-unaligned-offset", "j.iolog", FIO3 + "5 /dev/x read 1000 4096\n",
     "export", "j.iolog line 2: field 'offset' = 1000 is not a multiple of 512"),
    # a file opened and not closed: a truncated log (a cut at a line boundary)
    ("fio-truncated-no-close", "j.iolog", FIO3 + "0 /dev/x add\n0 /dev/x open\n"
     "5 /dev/x read 0 4096\n", "info",
     "j.iolog: ends with /dev/x still open (line 3 opens it, no 'close' follows)"),
    ("pq-meta-nested-too-deeply", "t.parquet", parquet_bytes(
        _meta={b"iobridge.trace_format": b"1", b"iobridge.meta": b"[" * 100000 + b"]" * 100000}),
     "info", "metadata 'iobridge.meta' is not JSON (nested too deeply to parse)"),
]


def _write(path: Path, content) -> None:
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)


def _snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in d.iterdir()} if d.exists() else {}


def _argv(cmd: str, src: Path, out_dir: Path) -> list[str]:
    verb, *extra = cmd.split()
    if verb == "import":
        return ["trace", "import", str(src), "-o", str(out_dir / "x.parquet"), *extra]
    if verb == "export":
        return ["trace", "export", str(src), "-o", str(out_dir / "x.iolog"),
                "--filename", "/dev/nullb0", *extra]
    return ["trace", "info", str(src), *extra]


def _one_error_line(err: str, expect: str) -> str:
    """stderr holds exactly one 'iobridge: error:' line (besides the
    'importing ...' progress line) containing `expect`, and no traceback."""
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("iobridge: error: ")]
    assert len(errors) == 1, err
    assert all(ln in errors or ln.startswith("importing ") for ln in lines), err
    assert expect in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_clear_error_and_writes_nothing(case, tmp_path, capsys):
    _, name, content, cmd, expect = case
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    src = src_dir / name
    _write(src, content)
    before = _snapshot(src_dir)
    rc = cli.main(_argv(cmd, src, out_dir))
    assert rc != 0
    _one_error_line(capsys.readouterr().err, expect)
    assert list(out_dir.iterdir()) == []          # no output, no temporary file
    assert _snapshot(src_dir) == before


GOOD_CSV = CSV_HEAD + "1,0,28,4096,10\n1,0,2a,512,11\n1,1,28,8192,12\n"


@pytest.mark.parametrize("content, extra, what", [
    (CSV_HEAD + "1,0,12,4096,10\n", [], "no reads, writes, trims or flushes to export "
     "(1 records: {'other': 1})"),
    (CSV_HEAD + "1,0,2a,4096,10\n", ["--reads-only"], "no reads to export"),
])
def test_export_of_nothing_is_refused(content, extra, what, tmp_path, capsys):
    """An iolog without I/O replays nothing, and `trace import` refuses it."""
    src = tmp_path / "cp.csv"
    _write(src, content)
    assert cli.main(_argv("export", src, tmp_path) + extra) == 1
    _one_error_line(capsys.readouterr().err, f"{src}: {what}")
    assert sorted(os.listdir(tmp_path)) == ["cp.csv"]


def test_every_zstd_frame_is_read(tmp_path):
    """Concatenated frames (what `zstd -d` and `cat a.zst b.zst` give) are one trace."""
    src = tmp_path / "x.lis.zst"
    src.write_bytes(zstd_bytes(b"1 8 0 0\n") + zstd_bytes(b"9 8 0 1\n100 16 0 2\n"))
    tr = T.load_any(src)
    assert tr["sector"].tolist() == [1, 9, 100]


@pytest.mark.parametrize("verb", ["import", "export", "info"])
def test_a_trace_input_that_is_not_a_regular_file_is_refused_at_once(verb, tmp_path):
    """A FIFO (even without a telling name, when the format is guessed from the
    contents) is refused, not opened: opening it would block for ever."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    r = subprocess.run([sys.executable, "-m", "iobridge.cli",
                        *_argv(verb, fifo, tmp_path / "out")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == \
        f"iobridge: error: {fifo}: not a regular file (give a trace file)"


def test_file_names_that_are_not_utf8(tmp_path):
    """Names from the command line may hold undecodable bytes: an output file
    with one is written and read back; an iolog --filename, which goes into
    a UTF-8 text file, is a usage error. (A process: its stderr escapes
    what pytest's capture would refuse to print.)"""
    def iobridge(*argv):
        return subprocess.run([sys.executable, "-m", "iobridge.cli", *argv],
                              capture_output=True, text=True, timeout=60)
    src = tmp_path / "cp.csv"
    _write(src, GOOD_CSV)
    out = tmp_path / os.fsdecode(b"\xff.parquet")
    r = iobridge("trace", "import", str(src), "-o", str(out))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert len(T.read_trace(out)) == 3
    r = iobridge("trace", "export", str(out), "-o", str(tmp_path / "x.iolog"),
                 "--filename", os.fsdecode(b"/dev/\xff"))
    assert r.returncode == 2
    _one_error_line(r.stderr, "is not UTF-8 text")
    assert not (tmp_path / "x.iolog").exists()


def _good_inputs(d: Path) -> dict[str, Path]:
    d.mkdir(exist_ok=True)
    files = {"csv": d / "cp.csv", "iolog": d / "j.iolog", "parquet": d / "t.parquet"}
    _write(files["csv"], GOOD_CSV)
    _write(files["iolog"], FIO3 + "0 /dev/x add\n0 /dev/x read 0 4096\n7 /dev/x write 512 512\n")
    _write(files["parquet"], parquet_bytes())
    return files


# (id, command line made from {csv}, {iolog}, {parquet}, {dir}; error text)
BAD_OUTPUT = [
    ("import-to-a-directory", "import {csv} -o {dir}", "is a directory"),
    ("export-to-a-directory", "export {parquet} -o {dir} --filename /dev/x", "is a directory"),
    ("import-into-missing-dir", "import {csv} -o {dir}/no/such/x.parquet",
     "/no/such does not exist"),
    ("export-into-missing-dir", "export {parquet} -o {dir}/no/x.iolog --filename /dev/x",
     "/no does not exist"),
    ("import-over-itself", "import {csv} -o {csv} --force", "is the input file"),
    ("export-over-itself", "export {iolog} -o {iolog} --force --filename /dev/x",
     "is the input file"),
    ("export-over-itself-by-symlink", "export {parquet} -o {dir}/link --force "
     "--filename /dev/x", "is the input file"),
    ("import-over-existing", "import {csv} -o {parquet}",
     "t.parquet exists (pass --force to overwrite it)"),
    ("export-over-existing", "export {parquet} -o {iolog} --filename /dev/x",
     "j.iolog exists (pass --force to overwrite it)"),
    ("export-over-a-fifo", "export {parquet} -o {dir}/fifo --force --filename /dev/x",
     "fifo exists and is not a regular file"),
    ("export-whitespace-filename", "export {parquet} -o {dir}/x.iolog --filename a\tb",
     "contains whitespace"),
]


@pytest.mark.parametrize("case", BAD_OUTPUT, ids=[c[0] for c in BAD_OUTPUT])
def test_bad_output_path_is_refused_before_work(case, tmp_path, capsys):
    _, line, expect = case
    files = _good_inputs(tmp_path)
    (tmp_path / "link").symlink_to(files["parquet"])
    os.mkfifo(tmp_path / "fifo")
    before = {p.name: (p.read_bytes() if p.is_file() else None) for p in tmp_path.iterdir()}
    argv = ["trace"] + [a.format(dir=tmp_path, **files) for a in line.split(" ")]
    assert cli.main(argv) == 2
    _one_error_line(capsys.readouterr().err, expect)
    after = {p.name: (p.read_bytes() if p.is_file() else None) for p in tmp_path.iterdir()}
    assert after == before


def test_unwritable_output_directory(tmp_path, capsys, monkeypatch):
    files = _good_inputs(tmp_path / "in")
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:     # root writes anywhere: make the probe fail as EACCES would
        def denied(*a, **k):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(outfiles, "tempfile", SimpleNamespace(TemporaryFile=denied,
                                                           mkstemp=denied))
    else:
        ro.chmod(0o555)
    try:
        for argv in (["trace", "import", str(files["csv"]), "-o", str(ro / "x.parquet")],
                     ["trace", "export", str(files["parquet"]), "-o", str(ro / "x.iolog"),
                      "--filename", "/dev/x"]):
            assert cli.main(argv) == 2
            _one_error_line(capsys.readouterr().err, "directory " + str(ro) +
                            " is not writable (Permission denied)")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_write_failure_midway_leaves_nothing(tmp_path, capsys, monkeypatch):
    """ENOSPC while writing: one error, the temporary file removed, an
    existing output (overwritten with --force) left as it was."""
    files = _good_inputs(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.iolog").write_text("keep me")

    def no_space(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(T.os, "fsync", no_space)
    assert cli.main(["trace", "export", str(files["parquet"]), "-o", str(out / "x.iolog"),
                     "--force", "--filename", "/dev/x"]) == 1
    _one_error_line(capsys.readouterr().err, "x.iolog: No space left on device")
    assert cli.main(["trace", "import", str(files["csv"]), "-o", str(out / "y.parquet")]) == 1
    _one_error_line(capsys.readouterr().err, "y.parquet: No space left on device")
    assert _snapshot(out) == {"x.iolog": b"keep me"}


def test_bom_input_is_accepted(tmp_path, capsys):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "cp.csv").write_bytes(bom + GOOD_CSV.encode())
    (tmp_path / "j.iolog").write_bytes(bom + (FIO2 + "/dev/x read 0 4096\n").encode())
    (tmp_path / "x.lis").write_bytes(bom + b"1 1 0 0\n")
    for name, n in (("cp.csv", 3), ("j.iolog", 1), ("x.lis", 1)):
        assert cli.main(["trace", "import", str(tmp_path / name),
                         "-o", str(tmp_path / (name + ".parquet"))]) == 0
        assert len(T.read_trace(tmp_path / (name + ".parquet"))) == n


def test_force_overwrites_and_keeps_a_symlink(tmp_path, capsys):
    files = _good_inputs(tmp_path / "in")
    out = tmp_path / "x.iolog"
    out.write_text("old")
    link = tmp_path / "link.iolog"
    link.symlink_to(out)
    assert cli.main(["trace", "export", str(files["parquet"]), "-o", str(link), "--force",
                     "--filename", "/dev/x"]) == 0
    assert link.is_symlink() and out.read_text().startswith("fio version 3 iolog\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "link.iolog", "x.iolog"]


SIGNAL_SCRIPT = """
import os, signal, sys
# As from a terminal: a runner started with nohup or `&` passes SIGHUP or
# SIGINT on ignored, and an ignored signal is left alone (by design).
signal.signal(signal.SIGHUP, signal.SIG_DFL)
signal.signal(signal.SIGINT, signal.default_int_handler)
real = os.fsync
def fsync(fd):            # the output is complete in its temporary file: interrupt now
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    real(fd)
os.fsync = fsync
from iobridge import cli
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("sig,rc", [("SIGTERM", -signal.SIGTERM), ("SIGHUP", -signal.SIGHUP),
                                    ("SIGINT", 130)])
def test_interrupted_write_leaves_nothing_behind(sig, rc, tmp_path):
    files = _good_inputs(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.iolog").write_text("keep me")
    for argv in (["trace", "export", str(files["parquet"]), "-o", str(out / "keep.iolog"),
                  "--force", "--filename", "/dev/x"],
                 ["trace", "import", str(files["csv"]), "-o", str(out / "new.parquet")]):
        proc = subprocess.run([sys.executable, "-c", SIGNAL_SCRIPT, sig, *argv],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == rc, proc.stderr
        assert "Traceback" not in proc.stderr
        assert _snapshot(out) == {"keep.iolog": b"keep me"}


def test_cli_subprocess_prints_no_traceback(tmp_path):
    """The same through `python -m iobridge.cli`, as a user runs it."""
    src = tmp_path / "cp.csv"
    src.write_bytes(b"\xef\xbb\xbf" + (CSV_HEAD + "1,0,28,4096,10\n1,9300000000,28,1,1\n")
                    .encode())
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "iobridge.cli", "trace", "import", str(src),
                           "-o", str(out / "cp.parquet")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    line = _one_error_line(proc.stderr, "cp.csv line 3: field 'time' = 9300000000")
    assert line.endswith("past the int64 nanosecond range "
                         "(9223372036854775807 ns, about 292 years)")
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- properties

OPS_WITH_DATA = [T.OP_READ, T.OP_WRITE, T.OP_DISCARD]


@st.composite
def io_rows(draw, max_rows=25, max_issue=10**15):
    """Valid rows: (issue_ns, op, sector, bytes); flushes carry no data."""
    n = draw(st.integers(1, max_rows))
    rows = []
    for _ in range(n):
        op = draw(st.sampled_from(OPS_WITH_DATA + [T.OP_FLUSH]))
        issue = draw(st.integers(0, max_issue))
        if op == T.OP_FLUSH:
            rows.append((issue, op, 0, 0))
            continue
        size = draw(st.one_of(st.integers(1, 1 << 20), st.integers(1, T.MAX_IO_BYTES)))
        sector = draw(st.one_of(st.integers(0, 1 << 24),
                                st.integers(0, (T.MAX_END_BYTE - size) // 512)))
        rows.append((issue, op, sector, size))
    return rows


def _trace(rows, **extra) -> T.Trace:
    issue, op, sector, size = (list(c) for c in zip(*rows))
    cols = T._normalise_batch({"issue_ns": issue, "op": op, "sector": sector, "bytes": size,
                               "device": "dev", **extra})
    return T.Trace(cols, {"source": "hypothesis"})


@PROPS
@given(rows=io_rows(), version=st.sampled_from([2, 3]))
def test_fio_iolog_round_trip(rows, version):
    tr = _trace(rows)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "t.iolog"
        assert T.export_fio_iolog(tr, out, "/dev/nullb0", version=version) == len(tr)
        back = T.import_fio_iolog(out)
        assert os.listdir(d) == ["t.iolog"]
    want = tr.sorted()
    assert len(back) == len(want)
    for col in ("sector", "bytes", "op"):
        assert back[col].tolist() == want[col].tolist()
    assert set(back["device"]) == {"/dev/nullb0"}
    if version == 3:
        rel_us = (want["issue_ns"] - want["issue_ns"].min()) // 1000
        assert back["issue_ns"].tolist() == (rel_us * 1000).tolist()
    else:
        assert np.all(np.diff(back["issue_ns"]) > 0)


@PROPS
@given(rows=io_rows(max_issue=T.INT64_MAX),
       devices=st.lists(st.text(max_size=12), min_size=1, max_size=3),
       extra=st.data())
def test_parquet_round_trip(rows, devices, extra):
    n = len(rows)
    known = st.integers(-1, T.INT64_MAX)
    cols = {"device": [extra.draw(st.sampled_from(devices)) for _ in range(n)],
            "complete_ns": extra.draw(st.lists(known, min_size=n, max_size=n)),
            "latency_ns": extra.draw(st.lists(known, min_size=n, max_size=n)),
            "qlen": extra.draw(st.lists(st.integers(-1, 2**31 - 1), min_size=n, max_size=n)),
            "leg": extra.draw(st.lists(st.integers(-1, 2**15 - 1), min_size=n, max_size=n))}
    tr = _trace(rows, **cols)
    tr.meta = {"source": "hypothesis", "note": extra.draw(st.text(max_size=20))}
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "t.parquet"
        T.write_trace(p, tr)
        back = T.read_trace(p)
        assert os.listdir(d) == ["t.parquet"]
    assert back.meta == tr.meta
    for name in T.COLUMN_NAMES:
        assert back[name].tolist() == tr[name].tolist(), name
        assert back[name].dtype == tr[name].dtype


# (column, a strategy of values the validation must refuse)
OUT_OF_RANGE = {
    "issue_ns": st.integers(-2**63, -1),
    "complete_ns": st.integers(-2**63, -2),
    "latency_ns": st.integers(-2**63, -2),
    "bytes": st.one_of(st.integers(-2**63, -1), st.integers(T.MAX_IO_BYTES + 1, 2**63 - 1)),
    "sector": st.one_of(st.integers(-2**63, -1),
                        st.integers(T.MAX_END_BYTE // 512 + 1, 2**63 - 1)),   # even a flush
    "op": st.integers(len(T.OP_NAMES), 255),
    "qlen": st.integers(-2**31, -2),
    "leg": st.integers(-2**15, -2),
}


@PROPS
@given(rows=io_rows(max_rows=8), data=st.data())
def test_validation_refuses_each_out_of_range_value(rows, data):
    # Every data row at the largest size, so its sector must leave room for it.
    last_sector = (T.MAX_END_BYTE - T.MAX_IO_BYTES) // 512
    rows = [(t, op, min(sector, last_sector), n) for t, op, sector, n in rows]
    tr = _trace(rows, bytes=[T.MAX_IO_BYTES if op != T.OP_FLUSH else 0
                             for _, op, _, _ in rows])
    name = data.draw(st.sampled_from(sorted(OUT_OF_RANGE)))
    i = data.draw(st.integers(0, len(tr) - 1))
    tr.cols[name][i] = data.draw(OUT_OF_RANGE[name])
    with pytest.raises(IobridgeError, match=rf"^src\.parquet row {i + 1}: field '{name}' = "):
        T.validate_columns(tr.cols, "src.parquet")
    with tempfile.TemporaryDirectory() as d:       # export refuses it too, writes nothing
        with pytest.raises(IobridgeError, match=rf"row {i + 1}: field '{name}'"):
            T.export_fio_iolog(tr, Path(d) / "x.iolog", "/dev/x")
        assert os.listdir(d) == []


@PROPS
@given(values=st.lists(st.one_of(st.integers(-2**70, 2**70),
                                 st.floats(allow_nan=True, allow_infinity=True)),
                       min_size=1, max_size=5),
       dtype=st.sampled_from(["int64", "int32", "int16", "uint8"]))
def test_batch_conversion_never_wraps(values, dtype):
    info = np.iinfo(dtype)
    fits = all(float(v).is_integer() and info.min <= v <= info.max
               if isinstance(v, float) else info.min <= v <= info.max for v in values)
    if fits:
        assert T._to_int_array("f", values, dtype, str).tolist() == [int(v) for v in values]
    else:
        with pytest.raises(IobridgeError, match="field 'f'"):
            T._to_int_array("f", values, dtype, lambda i: f"row {i + 1}")


@PROPS
@given(t=st.integers(0, 2**70), unit=st.sampled_from(sorted(T.TIME_UNITS_NS)))
def test_cloudphysics_times_are_exact_or_refused(t, unit):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "cp.csv"
        p.write_text(CSV_HEAD + "1,0,28,4096,1\n" + f"1,{t},2a,512,2\n")
        try:
            tr = T.import_cloudphysics(p, time_unit=unit, spread=False)
        except IobridgeError as e:
            assert "line 3: field 'time'" in str(e)
            assert t * T.TIME_UNITS_NS[unit] > T.INT64_MAX
        else:
            assert tr["issue_ns"].tolist() == [0, t * T.TIME_UNITS_NS[unit]]


@PROPS
@given(nblocks=st.integers(1, 2**70), start=st.integers(0, 2**64))
def test_arc_sizes_are_exact_or_refused(nblocks, start):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.lis"
        p.write_text(f"0 1 0 0\n{start} {nblocks} 0 1\n")
        try:
            tr = T.import_arc(p)
        except IobridgeError as e:
            assert "x.lis line 2: field" in str(e)
            assert nblocks * 512 > T.MAX_IO_BYTES or start * 512 + nblocks * 512 > T.MAX_END_BYTE
        else:
            assert tr["bytes"].tolist() == [512, nblocks * 512]
            assert tr["sector"].tolist() == [0, start]


@PROPS
@given(offset=st.one_of(st.integers(-2**64, 2**70),
                       st.integers(-2**55, 2**62).map(lambda k: k * 512)),   # sector-aligned
       length=st.integers(-2**40, 2**40), ts=st.integers(-2**70, 2**70))
def test_fio_import_is_exact_or_refused(offset, length, ts):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "j.iolog"
        p.write_text(f"{FIO3}0 /dev/x add\n{ts} /dev/x write {offset} {length}\n")
        try:
            tr = T.import_fio_iolog(p)
        except IobridgeError as e:
            assert "j.iolog line 3: " in str(e)
            assert (min(offset, length, ts) < 0 or length == 0 or length > T.MAX_IO_BYTES
                    or ts * 1000 > T.INT64_MAX or offset % 512
                    or offset + length > T.MAX_END_BYTE)
        else:      # exact: an offset is never rounded to a sector
            assert tr["sector"].tolist() == [offset // 512] and offset % 512 == 0
            assert tr["bytes"].tolist() == [length]
            assert tr["issue_ns"].tolist() == [ts * 1000]


def test_device_names_keep_trailing_nul(tmp_path):
    """Found by test_parquet_round_trip: numpy's fixed-width strings dropped
    a trailing NUL from a device name on the way to Parquet."""
    tr = _trace([(0, T.OP_READ, 0, 512), (1, T.OP_READ, 1, 512)], device=["a\x00", "\x00"])
    T.write_trace(tmp_path / "t.parquet", tr)
    assert T.read_trace(tmp_path / "t.parquet")["device"].tolist() == ["a\x00", "\x00"]
