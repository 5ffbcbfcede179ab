import json

import numpy as np
import pytest

from iobridge import cli
from iobridge.core.errors import IobridgeError
from iobridge.offline import trace as T
from offline_helpers import shared_trace


def test_cloudphysics_import_matches_readme():
    tr = T.import_cloudphysics(shared_trace("cloudPhysicsIO.csv"))
    assert len(tr) == 113_872                      # README: 113,872 requests
    assert int((tr["op"] == T.OP_READ).sum()) + int((tr["op"] == T.OP_WRITE).sum()) == 113_872
    assert np.all(np.diff(tr["issue_ns"]) >= 0)
    # 7,200 one-second time units: the trace spans two hours
    assert 7200e9 <= tr["issue_ns"][-1] < 7201e9
    assert tr["bytes"].min() > 0 and not tr.has_latency


def test_arc_oltp_import_matches_readme():
    tr = T.import_arc(shared_trace("OLTP.lis.zst"))
    assert len(tr) == 914_145                      # README: 914,145 requests, reads only
    assert np.all(tr["op"] == T.OP_READ)
    assert tr["issue_ns"][-1] < 3600e9 and np.all(np.diff(tr["issue_ns"]) > 0)
    assert tr["bytes"].min() == 512 and tr["sector"][0] == 1


def test_parquet_round_trip_and_incremental_writer(tmp_path):
    p = tmp_path / "t.parquet"
    with pytest.raises(KeyboardInterrupt):
        with T.TraceWriter.open(p, {"recorder": "test"}) as w:
            w.write_batch({"issue_ns": np.array([10, 20]), "bytes": np.array([4096, 8192]),
                           "latency_ns": np.array([100, 200]), "device": "sda", "leg": 1})
            w.write_batch([{"issue_ns": 30, "bytes": 512, "op": T.OP_WRITE, "qlen": 3}])
            w.write_batch([(40, 140, 100, "sdb", 8, 4096, T.OP_READ, 2, 0)])
            raise KeyboardInterrupt          # a recorder interrupted by Ctrl-C
    tr = T.read_trace(p)
    assert len(tr) == 4
    assert tr["issue_ns"].tolist() == [10, 20, 30, 40]
    assert tr["device"].tolist() == ["sda", "sda", "", "sdb"]
    assert tr["complete_ns"].tolist() == [-1, -1, -1, 140]
    assert tr["leg"].tolist() == [1, 1, -1, 0]
    assert tr["qlen"].tolist() == [-1, -1, 3, 2]
    assert tr.meta == {"recorder": "test"}


def test_writer_rejects_unknown_column(tmp_path):
    with T.TraceWriter(tmp_path / "x.parquet") as w:
        with pytest.raises(IobridgeError, match="unknown columns"):
            w.write_batch({"issue_ns": [1], "bytes": [1], "lba": [3]})


def test_truncated_csv_names_file_and_line(tmp_path):
    p = tmp_path / "cp.csv"
    p.write_text("version,time,op,size,lbn\n1,5,28,4096,10\n1,6,2a,512,11\n1,7,28\n")
    with pytest.raises(IobridgeError, match=r"cp\.csv line 4: expected 5 comma-separated"):
        T.import_cloudphysics(p)
    p.write_text("time,op\n1,2\n")
    with pytest.raises(IobridgeError, match=r"line 1: expected header"):
        T.import_cloudphysics(p)
    p.write_text("version,time,op,size,lbn\n1,5,zz,4096,10\n")
    with pytest.raises(IobridgeError, match=r"line 2: expected integers"):
        T.import_cloudphysics(p)


def test_malformed_arc_names_line(tmp_path):
    p = tmp_path / "x.lis"
    p.write_text("1 1 0 0\n2 1 0\n3 1 0 0\n")
    with pytest.raises(IobridgeError, match=r"x\.lis line 2: expected 4 non-negative integers"):
        T.import_arc(p)


def test_truncated_zst_is_reported(tmp_path):
    data = shared_trace("OLTP.lis.zst").read_bytes()[:5000]
    p = tmp_path / "cut.lis.zst"
    p.write_bytes(data)
    with pytest.raises(IobridgeError, match=r"cut\.lis\.zst: truncated zstd stream"):
        T.import_arc(p)


def test_fio_iolog_export_import_round_trip(tmp_path):
    full = T.import_cloudphysics(shared_trace("cloudPhysicsIO.csv"))
    tr = full.take(np.arange(500))
    for ver in (2, 3):
        out = tmp_path / f"v{ver}.iolog"
        n = T.export_fio_iolog(tr, out, "/dev/nullb0", version=ver)
        assert n == 500
        lines = out.read_text().splitlines()
        assert lines[0] == f"fio version {ver} iolog"
        back = T.import_fio_iolog(out)
        assert len(back) == 500
        assert back["sector"].tolist() == tr["sector"].tolist()
        assert back["bytes"].tolist() == tr["bytes"].tolist()
        assert back["op"].tolist() == tr["op"].tolist()
        if ver == 3:   # microsecond timestamps survive
            assert back["issue_ns"].tolist() == (tr["issue_ns"] // 1000 * 1000).tolist()
    ro = tmp_path / "ro.iolog"
    # the first 500 records are all writes: 250 of them and the first 250 reads
    mixed = full.take(np.r_[np.arange(250), np.flatnonzero(full["op"] == 0)[:250]])
    assert T.export_fio_iolog(mixed, ro, "/dev/x", reads_only=True) == 250
    assert " write " not in ro.read_text() and " read " in ro.read_text()


def test_fio_iolog_errors(tmp_path):
    p = tmp_path / "bad.iolog"
    p.write_text("fio version 3 iolog\n0 /dev/x add\n5 /dev/x read 0\n")
    with pytest.raises(IobridgeError, match=r"bad\.iolog line 3: expected 'timestamp filename"):
        T.import_fio_iolog(p)
    p.write_text("fio version 2 iolog\n/dev/x add\n/dev/x frobnicate 0 4096\n")
    with pytest.raises(IobridgeError, match=r"line 3: unknown action 'frobnicate'"):
        T.import_fio_iolog(p)
    p.write_text("hello\n")
    with pytest.raises(IobridgeError, match=r"line 1: expected 'fio version 2 iolog'"):
        T.import_fio_iolog(p)


def test_read_trace_rejects_non_parquet(tmp_path):
    p = tmp_path / "no.parquet"
    p.write_text("not parquet")
    with pytest.raises(IobridgeError, match=r"no\.parquet: not a readable iobridge trace"):
        T.read_trace(p)


def test_cli_import_info_export(tmp_path, capsys):
    out = tmp_path / "cp.parquet"
    assert cli.main(["trace", "import", str(shared_trace("cloudPhysicsIO.csv")),
                     "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["trace", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["records"] == 113_872 and info["ops"] == {"read": 46_974, "write": 66_898}
    assert cli.main(["trace", "export", str(out), "--out", str(tmp_path / "x.iolog"),
                     "--filename", "/dev/nullb0"]) == 0
    assert cli.main(["trace", "info", str(tmp_path / "missing.csv")]) == 1
    assert "missing.csv: no such trace file" in capsys.readouterr().err
