"""iobridge trace format (Parquet) and converters.

Format, version 1 (TRACE_FORMAT_VERSION). One row per I/O, columns:

  column       type    unit / meaning
  issue_ns     int64   issue time, ns since the start of the trace
  complete_ns  int64   completion time, ns (-1 = unknown)
  latency_ns   int64   complete_ns - issue_ns as measured (-1 = unknown)
  device       string  device the I/O went to ("sda", "259:0", a trace name)
  sector       int64   start, in 512-byte sectors
  bytes        int64   request size in bytes
  op           uint8   0 read, 1 write, 2 flush, 3 discard, 4 other
  qlen         int32   I/Os in flight on `device` when issued (-1 = unknown)
  leg          int16   replica leg index under the iobridge target (-1 = none)

File-level metadata (Parquet key/value): "iobridge.trace_format" = "1" and
"iobridge.meta" = a JSON object (source, importer options, recorder info).
Rows are written in batches (one Parquet row group per batch), ordered by
issue time within a file written by the importers.

Importers: CloudPhysics CSV, ARC .lis(.zst), fio iolog v2/v3.
Exporter: fio iolog v3 (timestamps in microseconds, as fio writes them) or
v2 (no timing).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core import cliutil, resources
from ..core.errors import IobridgeError, UsageError

TRACE_FORMAT_VERSION = 1

# Operation codes are the kernel side's (kmodule/iobridge_abi.h IOBRIDGE_OP_*).
from ..core.abi import OP_DISCARD, OP_FLUSH, OP_NAMES, OP_OTHER, OP_READ, OP_WRITE  # noqa: E402,F401

# (name, numpy dtype) in file order
COLUMNS: tuple[tuple[str, str], ...] = (
    ("issue_ns", "int64"),
    ("complete_ns", "int64"),
    ("latency_ns", "int64"),
    ("device", "str"),
    ("sector", "int64"),
    ("bytes", "int64"),
    ("op", "uint8"),
    ("qlen", "int32"),
    ("leg", "int16"),
)
COLUMN_NAMES = tuple(c for c, _ in COLUMNS)
_DEFAULTS = {"complete_ns": -1, "latency_ns": -1, "qlen": -1, "leg": -1,
             "device": "", "op": OP_READ, "sector": 0}
_REQUIRED = ("issue_ns", "bytes")


def traces_dir() -> Path:
    """Directory of the shared real traces: $IOBRIDGE_TRACES or <repo>/../shared/traces."""
    env = os.environ.get("IOBRIDGE_TRACES")
    if env:
        return Path(env)
    root = resources.checkout_root()
    return (root.parent if root else Path.cwd()) / "shared" / "traces"


def _arrow_schema():
    import pyarrow as pa
    types = {"int64": pa.int64(), "int32": pa.int32(), "int16": pa.int16(),
             "uint8": pa.uint8(), "str": pa.dictionary(pa.int32(), pa.string())}
    return pa.schema([(n, types[t]) for n, t in COLUMNS])


@dataclass
class Trace:
    """A trace in memory: one numpy array per column, same length."""
    cols: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.cols["issue_ns"])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.cols[name]

    def take(self, idx) -> "Trace":
        return Trace({k: v[idx] for k, v in self.cols.items()}, dict(self.meta))

    def sorted(self) -> "Trace":
        order = np.argsort(self.cols["issue_ns"], kind="stable")
        return self.take(order)

    @property
    def has_latency(self) -> bool:
        return bool(len(self)) and bool(np.all(self.cols["latency_ns"] >= 0))


def _normalise_batch(batch) -> dict[str, np.ndarray]:
    """dict of arrays or list of dicts/tuples -> dict of typed numpy arrays."""
    if isinstance(batch, Trace):
        batch = batch.cols
    if isinstance(batch, (list, tuple)):
        if not batch:
            return {n: np.zeros(0, dtype=object if t == "str" else t) for n, t in COLUMNS}
        if isinstance(batch[0], dict):
            keys = set().union(*(r.keys() for r in batch))
            batch = {k: [r.get(k, _DEFAULTS.get(k)) for r in batch] for k in keys}
        else:
            batch = {n: [r[i] for r in batch] for i, n in enumerate(COLUMN_NAMES)}
    unknown = set(batch) - set(COLUMN_NAMES)
    if unknown:
        raise IobridgeError(f"trace batch has unknown columns {sorted(unknown)}",
                            f"allowed: {', '.join(COLUMN_NAMES)}")
    for name in _REQUIRED:
        if name not in batch:
            raise IobridgeError(f"trace batch lacks column {name!r}")
    n = len(batch["issue_ns"])
    out = {}
    for name, dtype in COLUMNS:
        if name in batch:
            v = batch[name]
            arr = np.asarray(v, dtype=object if dtype == "str" else dtype)
            if arr.shape == ():
                arr = np.full(n, arr.item(), dtype=arr.dtype)
        else:
            d = _DEFAULTS[name]
            arr = np.full(n, d, dtype=object if dtype == "str" else dtype)
        if len(arr) != n:
            raise IobridgeError(f"trace batch column {name!r} has {len(arr)} rows, "
                                f"issue_ns has {n}")
        out[name] = arr
    return out


class TraceWriter:
    """Appends row batches to a trace file.

    Each write_batch() becomes a Parquet row group, written through at once,
    so an interrupted recorder keeps every completed batch as long as close()
    runs (use it as a context manager, or call close() in a finally block;
    KeyboardInterrupt and SIGTERM handlers that raise are fine). A process
    killed with SIGKILL leaves the file without its footer.
    """

    def __init__(self, path, metadata: dict | None = None):
        import pyarrow.parquet as pq
        self.path = Path(path)
        self.rows = 0
        meta = {"iobridge.trace_format": str(TRACE_FORMAT_VERSION),
                "iobridge.meta": json.dumps(metadata or {}, sort_keys=True)}
        schema = _arrow_schema().with_metadata(meta)
        try:
            self._w = pq.ParquetWriter(str(self.path), schema, compression="zstd")
        except OSError as e:
            raise IobridgeError(f"cannot write trace {self.path}: {e.strerror or e}") from None

    @classmethod
    def open(cls, path, metadata: dict | None = None) -> "TraceWriter":
        return cls(path, metadata)

    def write_batch(self, batch) -> int:
        """Append rows: dict of column -> array/list, or list of dicts/tuples
        (tuples in COLUMN_NAMES order). Missing optional columns get their
        'unknown' value. Returns the number of rows written."""
        import pyarrow as pa
        cols = _normalise_batch(batch)
        n = len(cols["issue_ns"])
        if n == 0:
            return 0
        arrays = []
        for name, dtype in COLUMNS:
            if dtype == "str":
                arrays.append(pa.array(cols[name].astype(str)).dictionary_encode())
            else:
                arrays.append(pa.array(cols[name]))
        table = pa.Table.from_arrays(arrays, schema=self._w.schema)
        self._w.write_table(table)
        self.rows += n
        return n

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_trace(path, trace: Trace, batch_rows: int = 1 << 20) -> None:
    with TraceWriter(path, trace.meta) as w:
        for i in range(0, max(len(trace), 1), batch_rows):
            w.write_batch({k: v[i:i + batch_rows] for k, v in trace.cols.items()})


def read_trace(path) -> Trace:
    """Read an iobridge trace (Parquet). Errors name the file."""
    import pyarrow.parquet as pq
    path = Path(path)
    if not path.exists():
        raise IobridgeError(f"{path}: no such trace file")
    try:
        pf = pq.ParquetFile(str(path))
    except Exception as e:  # pyarrow raises several types for bad files
        raise IobridgeError(f"{path}: not a readable iobridge trace (Parquet): {e}",
                            "import foreign formats with `iobridge trace import`") from None
    kv = {k.decode(): v.decode() for k, v in (pf.schema_arrow.metadata or {}).items()}
    ver = kv.get("iobridge.trace_format")
    if ver is None:
        raise IobridgeError(f"{path}: Parquet file without iobridge trace metadata")
    if ver != str(TRACE_FORMAT_VERSION):
        raise IobridgeError(f"{path}: trace format version {ver}, this iobridge reads "
                            f"version {TRACE_FORMAT_VERSION}")
    missing = [c for c in COLUMN_NAMES if c not in pf.schema_arrow.names]
    if missing:
        raise IobridgeError(f"{path}: trace lacks columns {missing}")
    table = pf.read(columns=list(COLUMN_NAMES))
    cols = {}
    for name, dtype in COLUMNS:
        col = table.column(name)
        if dtype == "str":
            cols[name] = np.asarray(col.cast("string").to_numpy(zero_copy_only=False), dtype=object)
        else:
            cols[name] = col.to_numpy().astype(dtype, copy=False)
    meta = json.loads(kv.get("iobridge.meta", "{}"))
    return Trace(cols, meta)


# ---------------------------------------------------------------- importers

CP_READ_OPS = {0x08, 0x28, 0x88, 0xA8}
CP_WRITE_OPS = {0x0A, 0x2A, 0x8A, 0xAA}
TIME_UNITS_NS = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}


def import_cloudphysics(path, time_unit: str = "s", spread: bool = True) -> Trace:
    """CloudPhysics CSV as published with libCacheSim: `version,time,op,size,lbn`.

    `time_unit`: unit of the `time` column. The traces README says
    microseconds, but the published file spans 7,200 units with one distinct
    value per unit (113,872 requests over 7.2 ms would be 15.8 M IOPS), which
    fits a 2-hour trace at 1-second resolution; the default is therefore "s".
    `spread`: requests sharing a timestamp are spread evenly over that time
    unit in file order (the arrivals the trace cannot give are assigned,
    explicitly); otherwise they all arrive at the same instant.
    """
    path = Path(path)
    if time_unit not in TIME_UNITS_NS:
        raise UsageError(f"unknown time unit {time_unit!r}", "use s, ms, us or ns")
    unit = TIME_UNITS_NS[time_unit]
    try:
        f = open(path, "r", encoding="ascii", errors="strict")
    except OSError as e:
        raise IobridgeError(f"{path}: {e.strerror}") from None
    times, ops, sizes, lbns = [], [], [], []
    with f:
        header = f.readline().strip()
        if header != "version,time,op,size,lbn":
            raise IobridgeError(f"{path} line 1: expected header 'version,time,op,size,lbn', "
                                f"got {header[:60]!r}")
        lineno = 1
        try:
            for lineno, line in enumerate(f, start=2):
                parts = line.rstrip("\r\n").split(",")
                if len(parts) != 5:
                    raise IobridgeError(
                        f"{path} line {lineno}: expected 5 comma-separated fields "
                        f"(version,time,op,size,lbn), got {len(parts)}: {line.strip()[:60]!r}")
                try:
                    t = int(parts[1]); op = int(parts[2], 16); sz = int(parts[3]); lbn = int(parts[4])
                except ValueError:
                    raise IobridgeError(
                        f"{path} line {lineno}: expected integers time,size,lbn and a hex op, "
                        f"got {line.strip()[:60]!r}") from None
                if sz <= 0 or t < 0 or lbn < 0:
                    raise IobridgeError(f"{path} line {lineno}: expected time >= 0, size > 0, "
                                        f"lbn >= 0, got {line.strip()[:60]!r}")
                times.append(t); ops.append(op); sizes.append(sz); lbns.append(lbn)
        except UnicodeDecodeError:
            raise IobridgeError(f"{path} after line {lineno}: expected ASCII CSV text") from None
    if not times:
        raise IobridgeError(f"{path}: no records after the header")
    t = np.asarray(times, dtype=np.int64)
    if np.any(np.diff(t) < 0):
        bad = int(np.argmax(np.diff(t) < 0)) + 3
        raise IobridgeError(f"{path} line {bad}: time goes backwards (expected non-decreasing)")
    t = t - t[0]
    issue = t * unit
    if spread:
        # position of each record within its group of equal timestamps
        starts = np.r_[0, np.flatnonzero(np.diff(t)) + 1]
        counts = np.diff(np.r_[starts, len(t)])
        pos = np.arange(len(t)) - np.repeat(starts, counts)
        issue = issue + (pos * unit) // np.repeat(counts, counts)
    op_arr = np.asarray(ops)
    op = np.full(len(t), OP_OTHER, dtype=np.uint8)
    op[np.isin(op_arr, list(CP_READ_OPS))] = OP_READ
    op[np.isin(op_arr, list(CP_WRITE_OPS))] = OP_WRITE
    cols = _normalise_batch({"issue_ns": issue, "sector": np.asarray(lbns, dtype=np.int64),
                             "bytes": np.asarray(sizes, dtype=np.int64), "op": op,
                             "device": np.full(len(t), "cloudphysics", dtype=object)})
    return Trace(cols, {"source": str(path.name), "format": "cloudphysics-csv",
                        "time_unit": time_unit, "spread_equal_timestamps": spread})


def _read_text(path: Path) -> str:
    """Whole file as ASCII text, zstd-decompressed if named *.zst."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise IobridgeError(f"{path}: {e.strerror}") from None
    if path.suffix == ".zst":
        import zstandard
        d = zstandard.ZstdDecompressor().decompressobj()
        try:
            data = d.decompress(raw)
        except zstandard.ZstdError as e:
            raise IobridgeError(f"{path}: corrupt zstd data ({e})") from None
        if not d.eof:
            raise IobridgeError(f"{path}: truncated zstd stream: the frame ends early after "
                                f"{len(raw)} compressed bytes ({len(data)} decompressed)",
                                "re-fetch the file")
        raw = data
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise IobridgeError(f"{path} line {line}: expected ASCII text") from None


def import_arc(path, duration_s: float = 3600.0) -> Trace:
    """ARC trace (`.lis`, optionally `.zst`): `start_block nblocks ignored reqno`.

    Blocks are 512 bytes; all requests are reads. The format has no
    timestamps: arrivals are assigned evenly over `duration_s` seconds
    (the ARC paper's OLTP trace covers one hour).
    """
    path = Path(path)
    if not path.exists():
        raise IobridgeError(f"{path}: no such file")
    text = _read_text(path)
    vals = text.split()
    ok = len(vals) % 4 == 0
    if ok:
        try:
            arr = np.array(vals, dtype=np.int64).reshape(-1, 4)
        except (ValueError, OverflowError):
            ok = False
        ok = ok and bool(np.all(arr >= 0))
    if not ok:
        for lineno, line in enumerate(text.splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 4 or not all(p.isdigit() for p in parts):
                raise IobridgeError(f"{path} line {lineno}: expected 4 non-negative integers "
                                    f"'start_block nblocks ignored reqno', got {line[:60]!r}")
        raise IobridgeError(f"{path}: malformed ARC trace")
    if len(arr) == 0:
        raise IobridgeError(f"{path}: no records")
    n = len(arr)
    if np.any(arr[:, 1] <= 0):
        bad = int(np.argmax(arr[:, 1] <= 0)) + 1
        raise IobridgeError(f"{path} record {bad}: expected nblocks > 0")
    issue = (np.arange(n, dtype=np.float64) * (duration_s * 1e9 / n)).astype(np.int64)
    cols = _normalise_batch({"issue_ns": issue, "sector": arr[:, 0], "bytes": arr[:, 1] * 512,
                             "op": np.zeros(n, np.uint8),
                             "device": np.full(n, path.name.split(".")[0], dtype=object)})
    return Trace(cols, {"source": path.name, "format": "arc-lis",
                        "assigned_arrivals": f"evenly over {duration_s} s"})


FIO_ACTIONS = {"read": OP_READ, "write": OP_WRITE, "trim": OP_DISCARD,
               "sync": OP_FLUSH, "datasync": OP_FLUSH}


def import_fio_iolog(path) -> Trace:
    """fio iolog version 2 or 3 (see fio(1), 'Trace file format').

    v3 timestamps (microseconds since the start) become issue times; v2 has
    no timing: `wait` actions (microseconds) advance the clock, otherwise
    I/Os are 1 us apart. File actions (add/open/close) are skipped; the
    file name becomes the device.
    """
    path = Path(path)
    try:
        f = open(path, "r", encoding="ascii")
    except OSError as e:
        raise IobridgeError(f"{path}: {e.strerror}") from None
    rows = {"issue_ns": [], "device": [], "op": [], "sector": [], "bytes": []}
    with f:
        first = f.readline().strip()
        if first == "fio version 2 iolog":
            ver = 2
        elif first == "fio version 3 iolog":
            ver = 3
        else:
            raise IobridgeError(f"{path} line 1: expected 'fio version 2 iolog' or "
                                f"'fio version 3 iolog', got {first[:60]!r}")
        clock_us = 0
        for lineno, line in enumerate(f, start=2):
            parts = line.split()
            if not parts:
                continue
            try:
                if ver == 3:
                    if len(parts) not in (3, 5):
                        raise ValueError
                    ts = int(parts[0]); parts = parts[1:]
                else:
                    if len(parts) not in (2, 4):
                        raise ValueError
                    ts = None
                if len(parts) == 2:
                    if parts[1] not in ("add", "open", "close"):
                        raise ValueError
                    continue
                fname, act, off, ln = parts[0], parts[1], int(parts[2]), int(parts[3])
            except ValueError:
                form = ("'timestamp filename action [offset length]'" if ver == 3
                        else "'filename action [offset length]'")
                raise IobridgeError(f"{path} line {lineno}: expected {form}, "
                                    f"got {line.strip()[:60]!r}") from None
            if act == "wait" and ver == 2:
                clock_us += off
                continue
            if act not in FIO_ACTIONS:
                raise IobridgeError(f"{path} line {lineno}: unknown action {act!r}, expected "
                                    f"one of {', '.join(FIO_ACTIONS)}")
            if ts is None:
                ts = clock_us
                clock_us += 1
            rows["issue_ns"].append(ts * 1000)
            rows["device"].append(fname)
            rows["op"].append(FIO_ACTIONS[act])
            rows["sector"].append(off // 512)
            rows["bytes"].append(ln)
    if not rows["issue_ns"]:
        raise IobridgeError(f"{path}: no I/O actions in the iolog")
    cols = _normalise_batch(rows)
    return Trace(cols, {"source": path.name, "format": f"fio-iolog-v{ver}"}).sorted()


def export_fio_iolog(trace: Trace, out, filename: str, version: int = 3,
                     reads_only: bool = False) -> int:
    """Write `trace` as a fio iolog for replay against `filename`.

    v3 carries issue times (microseconds since the first I/O). Returns the
    number of I/O lines written.
    """
    if version not in (2, 3):
        raise UsageError(f"fio iolog version {version} not supported", "use 2 or 3")
    if any(c.isspace() for c in filename):
        raise UsageError(f"fio iolog file name {filename!r} contains whitespace")
    t = trace.sorted()
    keep = {OP_READ: "read", OP_WRITE: "write", OP_DISCARD: "trim", OP_FLUSH: "sync"}
    op = t["op"]
    mask = np.isin(op, [OP_READ] if reads_only else list(keep))
    t = t.take(np.flatnonzero(mask))
    ts_us = (t["issue_ns"] - (t["issue_ns"][0] if len(t) else 0)) // 1000
    names = [keep[int(o)] for o in t["op"]]
    off = t["sector"] * 512
    with open(out, "w", encoding="ascii") as f:
        f.write(f"fio version {version} iolog\n")
        pre = "0 " if version == 3 else ""
        f.write(f"{pre}{filename} add\n{pre}{filename} open\n")
        for i in range(len(t)):
            ln = 0 if names[i] == "sync" else int(t["bytes"][i])
            o = 0 if names[i] == "sync" else int(off[i])
            if version == 3:
                f.write(f"{int(ts_us[i])} {filename} {names[i]} {o} {ln}\n")
            else:
                f.write(f"{filename} {names[i]} {o} {ln}\n")
        last = int(ts_us[-1]) if len(t) else 0
        f.write(f"{last} {filename} close\n" if version == 3 else f"{filename} close\n")
    return len(t)


IMPORTERS = {
    "cloudphysics": import_cloudphysics,
    "arc": import_arc,
    "fio": import_fio_iolog,
}


def guess_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".csv"):
        return "cloudphysics"
    if ".lis" in name:
        return "arc"
    if name.endswith(".parquet"):
        return "parquet"
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError as e:
        raise IobridgeError(f"{path}: {e.strerror}") from None
    if head.startswith(b"fio version"):
        return "fio"
    if head.startswith(b"PAR1"):
        return "parquet"
    raise UsageError(f"{path}: cannot tell the trace format from its name or contents",
                     "pass --format cloudphysics|arc|fio")


def load_any(path, fmt: str | None = None, **opts) -> Trace:
    """Read an iobridge Parquet trace or import a foreign one in memory."""
    path = Path(path)
    if not path.exists():
        raise IobridgeError(f"{path}: no such trace file")
    fmt = fmt or guess_format(path)
    if fmt == "parquet":
        return read_trace(path)
    fn = IMPORTERS[fmt]
    kw = {}
    if fmt == "cloudphysics" and "time_unit" in opts and opts["time_unit"]:
        kw["time_unit"] = opts["time_unit"]
    if fmt == "arc" and opts.get("duration_s"):
        kw["duration_s"] = opts["duration_s"]
    return fn(path, **kw)


def describe(trace: Trace) -> dict:
    n = len(trace)
    op = trace["op"]
    dur = (int(trace["issue_ns"].max() - trace["issue_ns"].min()) / 1e9) if n else 0.0
    d = {
        "records": n,
        "duration_s": round(dur, 6),
        "ops": {OP_NAMES[i]: int((op == i).sum()) for i in range(len(OP_NAMES)) if (op == i).any()},
        "devices": sorted(set(trace["device"].tolist())) if n else [],
        "bytes_total": int(trace["bytes"].sum()),
        "has_latency": trace.has_latency,
        "has_qlen": bool(n) and bool(np.all(trace["qlen"] >= 0)),
        "legs": sorted(int(x) for x in np.unique(trace["leg"]) if x >= 0),
        "meta": trace.meta,
    }
    if trace.has_latency:
        lat = trace["latency_ns"] / 1000.0
        d["latency_us"] = {"mean": float(lat.mean()), "p50": float(np.percentile(lat, 50)),
                           "p99": float(np.percentile(lat, 99))}
    return d


# ---------------------------------------------------------------- CLI

def _cmd_import(args) -> int:
    src = Path(args.source)
    fmt = args.format or guess_format(src)
    if fmt == "parquet":
        raise UsageError(f"{src} is already an iobridge trace")
    print(f"importing {src} as {fmt} ...", file=sys.stderr)
    tr = load_any(src, fmt, time_unit=args.time_unit, duration_s=args.duration)
    write_trace(args.out, tr)
    print(f"wrote {len(tr)} records to {args.out}", file=sys.stderr)
    return 0


def _cmd_export(args) -> int:
    tr = load_any(args.source, args.format, time_unit=args.time_unit, duration_s=args.duration)
    n = export_fio_iolog(tr, args.out, args.filename, args.fio_version, args.reads_only)
    print(f"wrote {n} I/Os to {args.out} (fio iolog v{args.fio_version}); replay with: "
          f"fio --name=replay --read_iolog={args.out} --ioengine=libaio --direct=1",
          file=sys.stderr)
    return 0


def _cmd_info(args) -> int:
    tr = load_any(args.source, args.format, time_unit=args.time_unit, duration_s=args.duration)
    d = describe(tr)
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        for k, v in d.items():
            print(f"{k:12s} {v}")
    return 0


def _add_source_opts(p) -> None:
    p.add_argument("--format", choices=["parquet", *IMPORTERS],
                   help="input format (default: guessed from name/contents: *.csv = "
                        "cloudphysics, *.lis[.zst] = arc, 'fio version' header = fio, "
                        "PAR1 = iobridge Parquet)")
    p.add_argument("--time-unit", choices=list(TIME_UNITS_NS), default=None,
                   help="cloudphysics only: unit of the time column (default s; see "
                        "`iobridge trace import --help`)")
    p.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                   help="arc only: spread the untimed requests evenly over this many "
                        "seconds (default 3600, the OLTP trace's hour)")


def register_cli(sub) -> None:
    p = sub.add_parser("trace", help="import, export and inspect I/O traces",
                       description="I/O traces in iobridge's Parquet format (" +
                       ", ".join(COLUMN_NAMES) + "; times in ns).",
                       **cliutil.examples(
                           ("iobridge trace import cloudPhysicsIO.csv -o cp.parquet",
                            "CloudPhysics CSV to Parquet"),
                           ("iobridge trace info cp.parquet", "records, ops, duration, latency"),
                           ("iobridge trace export cp.parquet -o cp.iolog --filename /dev/nullb0 "
                            "--reads-only", "a fio iolog of the reads")))
    tsub = p.add_subparsers(dest="trace_cmd", metavar="SUBCOMMAND")
    tsub.required = True
    pi = tsub.add_parser("import", help="convert CloudPhysics CSV, ARC .lis[.zst] or fio "
                         "iolog to an iobridge Parquet trace",
                         description="Convert a foreign trace to iobridge Parquet. CloudPhysics "
                         "times: the file's README says microseconds but the data fits seconds "
                         "(7,200 distinct values over 2 h); default --time-unit s, requests "
                         "sharing a timestamp are spread evenly across it. ARC traces have no "
                         "times: arrivals are spread evenly over --duration.",
                         **cliutil.examples(
                             ("iobridge trace import cloudPhysicsIO.csv -o cp.parquet",
                              "CloudPhysics CSV (time column in seconds)"),
                             ("iobridge trace import OLTP.lis.zst -o oltp.parquet --duration 600",
                              "ARC trace, arrivals spread over 10 min"),
                             ("iobridge trace import job.iolog -o job.parquet", "fio iolog")))
    pi.add_argument("source", help="input trace file")
    pi.add_argument("--out", "-o", required=True, help="output .parquet file")
    _add_source_opts(pi)
    pi.set_defaults(func=_cmd_import)
    pe = tsub.add_parser("export", help="write a trace as a fio iolog for replay on a device",
                         description="Write a fio iolog (v3 with issue times in us, or v2 "
                         "untimed). WARNING: replaying writes overwrites the target; use "
                         "--reads-only on a device holding data.",
                         **cliutil.examples(
                             ("iobridge trace export cp.parquet -o cp.iolog --filename /dev/nullb0",
                              "timed iolog (v3) for fio"),
                             ("iobridge trace export cp.parquet -o cp.iolog --filename /dev/sdb "
                              "--reads-only", "reads only: safe on a disk with data"),
                             ("fio --name=replay --read_iolog=cp.iolog --ioengine=libaio --direct=1",
                              "then: replay it")))
    pe.add_argument("source", help="trace (.parquet or any importable format)")
    pe.add_argument("--out", "-o", required=True, help="output iolog file")
    pe.add_argument("--filename", required=True,
                    help="file or device fio should replay against, e.g. /dev/nullb0")
    pe.add_argument("--fio-version", type=int, choices=[2, 3], default=3,
                    help="iolog version (default 3: timed; needs fio >= 3.31)")
    pe.add_argument("--reads-only", action="store_true", help="drop writes, trims, flushes")
    _add_source_opts(pe)
    pe.set_defaults(func=_cmd_export)
    pn = tsub.add_parser("info", help="summarise a trace (records, ops, duration, latency)",
                         parents=[cliutil.json_parent()],
                         **cliutil.examples(
                             ("iobridge trace info cp.parquet", "an iobridge trace"),
                             ("iobridge trace info cloudPhysicsIO.csv", "a foreign trace, as read"),
                             ("iobridge trace info t.parquet --json", "as JSON")))
    pn.add_argument("source")
    _add_source_opts(pn)
    pn.set_defaults(func=_cmd_info)
