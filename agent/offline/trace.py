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

Validation: every importer, every Parquet load and the exporter pass the
columns through validate_columns() (types; times >= 0; sizes up to
MAX_IO_BYTES, > 0 except flushes; sector * 512 + bytes within 2**63 - 1;
known op codes); text importers parse numbers as Python ints and refuse
overflow before anything becomes int64. Errors name the file, the line or
row, and the field. Files written by write_trace() and export_fio_iolog()
appear atomically (atomic_output), whole or not at all.
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
from ..core.infiles import json_loads, read_input
from ..core.outfiles import atomic_output, check_output

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

# ---------------------------------------------------------------- validation
#
# Every trace, whatever it comes from (an importer, a Parquet file, a Trace
# built in memory and exported), passes validate_columns() before use. The
# limits are the kernel's, so a trace that passes can be replayed on a device:

INT64_MAX = (1 << 63) - 1
# Largest request size: the observer's event carries bytes as a u32, and a
# bio's (bi_iter.bi_size) and a request's (__data_len) size are unsigned int.
MAX_IO_BYTES = (1 << 32) - 1
# Last addressable byte: file and device offsets are loff_t (signed 64-bit),
# so sector * 512 + bytes must stay within 2**63 - 1.
MAX_END_BYTE = INT64_MAX
# Operations that may carry no data (a flush; "other" covers e.g. zone ops).
SIZELESS_OPS = (OP_FLUSH, OP_OTHER)
_OP_CODES = ", ".join(f"{i} {n}" for i, n in enumerate(OP_NAMES))


def _row_label(rows, i: int) -> str:
    """Where row i (0-based) is: `rows` maps it to e.g. 'line 17'; default 'row i+1'."""
    if rows is None:
        return f"row {i + 1}"
    if callable(rows):
        return rows(i)
    return f"line {int(rows[i])}"


def _field_label(name: str, names) -> str:
    if names and name in names:
        return f"{name!r} (the file's {names[name]})"
    return repr(name)


def validate_columns(cols: dict, source, rows=None, names: dict | None = None) -> None:
    """Check trace columns against the format and what the kernel can address.

    `source` names the file (or trace) in errors; `rows` says where row i
    came from: a sequence of line numbers, a callable i -> 'line N', or None
    for 'row N' (1-based, as in a Parquet file). `names` maps a column to
    the input's own field name for the messages (e.g. bytes -> 'size').
    Raises IobridgeError naming the source, the row or line and the field:

    - exactly the columns of COLUMNS, equal lengths, their dtypes;
    - issue_ns >= 0; complete_ns, latency_ns: -1 (unknown) or >= 0;
    - bytes in 0..MAX_IO_BYTES, > 0 unless the op is a flush or "other";
    - sector >= 0 and sector * 512 + bytes <= MAX_END_BYTE;
    - op a known code (OP_NAMES); qlen, leg: -1 (unknown) or >= 0;
    - device a string.
    """
    got = set(cols)
    if got != set(COLUMN_NAMES):
        missing, extra = sorted(set(COLUMN_NAMES) - got), sorted(got - set(COLUMN_NAMES))
        raise IobridgeError(f"{source}: trace columns do not match the format"
                            + (f"; missing {missing}" if missing else "")
                            + (f"; unknown {extra}" if extra else ""),
                            f"expected {', '.join(COLUMN_NAMES)}")
    n = len(cols["issue_ns"])
    for name, dtype in COLUMNS:
        arr = cols[name]
        if not isinstance(arr, np.ndarray) or arr.ndim != 1:
            raise IobridgeError(f"{source}: column {name!r} is not a 1-D array")
        if len(arr) != n:
            raise IobridgeError(f"{source}: column {name!r} has {len(arr)} rows, "
                                f"issue_ns has {n}")
        want = np.dtype(object if dtype == "str" else dtype)
        if arr.dtype != want:
            raise IobridgeError(f"{source}: column {name!r} has type {arr.dtype}, "
                                f"expected {'string' if dtype == 'str' else dtype}")
    if n == 0:
        return

    def fail(mask: np.ndarray, name: str, problem) -> None:
        if mask.any():
            i = int(np.argmax(mask))
            value = cols[name][i]
            value = repr(value) if isinstance(value, str) else value
            text = problem(i) if callable(problem) else problem
            raise IobridgeError(f"{source} {_row_label(rows, i)}: field "
                                f"{_field_label(name, names)} = {value} {text}")

    dev = cols["device"]
    fail(np.fromiter((not isinstance(d, str) for d in dev), bool, n), "device",
         "is not a string")
    fail(cols["issue_ns"] < 0, "issue_ns",
         "is negative (issue times are ns since the start of the trace, >= 0)")
    for name in ("complete_ns", "latency_ns", "qlen", "leg"):
        fail(cols[name] < -1, name, "is negative (expected -1 for unknown, or >= 0)")
    op = cols["op"]
    fail(op >= len(OP_NAMES), "op", f"is not an operation code ({_OP_CODES})")
    b = cols["bytes"]
    fail(b < 0, "bytes", "is negative")
    fail(b > MAX_IO_BYTES, "bytes",
         f"is larger than {MAX_IO_BYTES}, the most one kernel request can carry "
         "(its size is an unsigned int)")
    fail((b == 0) & ~np.isin(op, SIZELESS_OPS), "bytes",
         lambda i: f"for a {OP_NAMES[int(op[i])]}: only flush and other may have no data")
    sec = cols["sector"]
    fail(sec < 0, "sector", "is negative")
    # b is within 0..MAX_IO_BYTES here, so the bound cannot overflow
    fail(sec > (MAX_END_BYTE - b) // 512, "sector",
         lambda i: f"with {int(b[i])} bytes ends at byte {int(sec[i]) * 512 + int(b[i])}, "
                   f"past {MAX_END_BYTE} (2**63-1), the last byte offset the kernel "
                   "can address")


def _to_int_array(name: str, v, dtype: str, where) -> np.ndarray:
    """`v` as a numpy array of integer `dtype`, refusing (never wrapping)
    values outside the dtype's range, non-integral or non-finite floats,
    and anything that is not a number. `where(i)` names row i for errors."""
    info = np.iinfo(dtype)
    a = np.asarray(v)
    if a.dtype.kind == "b":
        return a.astype(dtype)
    if a.dtype.kind == "O":
        vals = []
        for i, x in enumerate(a.ravel()):
            if isinstance(x, (bool, int, np.integer)):
                vals.append(int(x))
            elif isinstance(x, (float, np.floating)):
                vals.append(float(x))
            else:
                raise IobridgeError(f"{where(i)}: field {name!r} = {x!r} is not a number")
        if any(isinstance(x, float) for x in vals):
            a = np.asarray(vals, dtype=np.float64).reshape(a.shape)
        else:
            for i, x in enumerate(vals):
                if not info.min <= x <= info.max:
                    raise IobridgeError(f"{where(i)}: field {name!r} = {x} does not fit "
                                        f"{dtype} ({info.min}..{info.max})")
            return np.asarray(vals, dtype=dtype).reshape(a.shape)
    if a.dtype.kind == "f":
        flat = a.ravel()
        bad = ~np.isfinite(flat) | (flat != np.floor(flat)) \
            | (flat < float(info.min)) | (flat >= float(info.max) + 1.0)
        if bad.any():
            i = int(np.argmax(bad))
            raise IobridgeError(f"{where(i)}: field {name!r} = {float(flat[i])} is not an "
                                f"integer within {dtype} ({info.min}..{info.max})")
        return a.astype(dtype)
    if a.dtype.kind not in "iu":
        raise IobridgeError(f"{where(0)}: field {name!r} has type {a.dtype}, "
                            "expected integers")
    flat = a.ravel()
    if flat.size:
        bad = (flat < info.min) | (flat > info.max)
        if bad.any():
            i = int(np.argmax(bad))
            raise IobridgeError(f"{where(i)}: field {name!r} = {int(flat[i])} does not fit "
                                f"{dtype} ({info.min}..{info.max})")
    return a.astype(dtype)


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


def _normalise_batch(batch, source: str = "trace batch") -> dict[str, np.ndarray]:
    """dict of arrays or list of dicts/tuples -> dict of typed numpy arrays.

    Values are converted without wrapping: a number outside its column's
    type (or a non-integral or non-finite float) is an IobridgeError naming
    the row and the field. Ranges are checked by validate_columns()."""
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
        raise IobridgeError(f"{source} has unknown columns {sorted(unknown)}",
                            f"allowed: {', '.join(COLUMN_NAMES)}")
    for name in _REQUIRED:
        if name not in batch:
            raise IobridgeError(f"{source} lacks column {name!r}")
    n = len(batch["issue_ns"])

    def where(i: int) -> str:
        return f"{source} row {i + 1}"

    out = {}
    for name, dtype in COLUMNS:
        if name in batch:
            v = batch[name]
            if dtype == "str":
                arr = np.asarray(v, dtype=object)
            else:
                arr = _to_int_array(name, v, dtype, where)
            if arr.shape == ():
                arr = np.full(n, arr.item(), dtype=arr.dtype)
        else:
            d = _DEFAULTS[name]
            arr = np.full(n, d, dtype=object if dtype == "str" else dtype)
        if arr.ndim != 1 or len(arr) != n:
            raise IobridgeError(f"{source} column {name!r} has {len(arr)} rows, "
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
        # opened by Python, not by path: pyarrow takes paths as UTF-8 text, and a
        # file name need not be (os.fsdecode keeps undecodable bytes as surrogates)
        try:
            self._f = open(self.path, "wb")
        except OSError as e:
            raise IobridgeError(f"cannot write trace {self.path}: {e.strerror or e}") from None
        self._w = pq.ParquetWriter(self._f, schema, compression="zstd")

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
                # not astype(str): numpy's fixed-width strings drop trailing NULs
                arrays.append(pa.array([x if isinstance(x, str) else str(x)
                                        for x in cols[name]], pa.string()).dictionary_encode())
            else:
                arrays.append(pa.array(cols[name]))
        table = pa.Table.from_arrays(arrays, schema=self._w.schema)
        self._w.write_table(table)
        self.rows += n
        return n

    def close(self) -> None:
        if self._w is not None:
            try:
                self._w.close()
            finally:
                self._w = None
                self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------- output files

def write_trace(path, trace: Trace, batch_rows: int = 1 << 20) -> None:
    """Write `trace` to `path` (Parquet), validated, atomically."""
    validate_columns(trace.cols, trace.meta.get("source", "trace"))
    with atomic_output(path) as tmp:
        with TraceWriter(tmp, trace.meta) as w:
            for i in range(0, max(len(trace), 1), batch_rows):
                w.write_batch({k: v[i:i + batch_rows] for k, v in trace.cols.items()})


def _arrow_column(path: Path, name: str, dtype: str, col) -> np.ndarray:
    """A Parquet column as the format's numpy dtype: nulls, a wrong type
    or a value outside the dtype are errors naming the file, row and field."""
    import pyarrow as pa
    import pyarrow.compute as pc
    t = col.type
    if col.null_count:
        first = int(np.argmax(np.asarray(pc.is_null(col).to_numpy(zero_copy_only=False))))
        raise IobridgeError(f"{path} row {first + 1}: field {name!r} is null "
                            f"({col.null_count} nulls in the column)",
                            "every field of every row needs a value")
    if dtype == "str":
        if pa.types.is_dictionary(t):
            t = t.value_type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise IobridgeError(f"{path}: column {name!r} has type {col.type}, expected string")
        return np.asarray(col.cast(pa.string()).to_numpy(zero_copy_only=False), dtype=object)
    if not pa.types.is_integer(t):
        raise IobridgeError(f"{path}: column {name!r} has type {t}, expected {dtype}")
    return _to_int_array(name, col.to_numpy(), dtype, lambda i: f"{path} row {i + 1}")


def read_trace(path) -> Trace:
    """Read an iobridge trace (Parquet), validated (validate_columns).
    Errors name the file, and the row and field when a value is wrong."""
    path = Path(path)
    if not path.exists():
        raise IobridgeError(f"{path}: no such trace file")
    try:   # opened by Python: pyarrow takes paths as UTF-8 text, a file name need not be
        f = open(path, "rb")
    except OSError as e:
        raise IobridgeError(f"{path}: {e.strerror or e}") from None
    with f:
        meta, table = _read_parquet(path, f)
    cols = {name: _arrow_column(path, name, dtype, table.column(name))
            for name, dtype in COLUMNS}
    validate_columns(cols, path)
    return Trace(cols, meta)


def _read_parquet(path: Path, f):
    """(meta, table) of the open iobridge Parquet file f, its metadata checked."""
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(f)
    except Exception as e:  # pyarrow raises several types for bad files
        raise IobridgeError(f"{path}: not a readable iobridge trace (Parquet): {e}",
                            "import foreign formats with `iobridge trace import`") from None
    try:
        kv = {k.decode(): v.decode() for k, v in (pf.schema_arrow.metadata or {}).items()}
    except UnicodeDecodeError:
        raise IobridgeError(f"{path}: Parquet metadata is not UTF-8 text") from None
    ver = kv.get("iobridge.trace_format")
    if ver is None:
        raise IobridgeError(f"{path}: Parquet file without iobridge trace metadata")
    if ver != str(TRACE_FORMAT_VERSION):
        raise IobridgeError(f"{path}: trace format version {ver}, this iobridge reads "
                            f"version {TRACE_FORMAT_VERSION}")
    missing = [c for c in COLUMN_NAMES if c not in pf.schema_arrow.names]
    if missing:
        raise IobridgeError(f"{path}: trace lacks columns {missing}")
    try:
        meta = json_loads(kv.get("iobridge.meta", "{}"))
    except ValueError as e:
        raise IobridgeError(f"{path}: metadata 'iobridge.meta' is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise IobridgeError(f"{path}: metadata 'iobridge.meta' is not a JSON object")
    try:
        table = pf.read(columns=list(COLUMN_NAMES))
    except Exception as e:  # corrupt pages, truncated row groups
        raise IobridgeError(f"{path}: cannot read the trace's rows: {e}") from None
    return meta, table


# ---------------------------------------------------------------- importers

CP_READ_OPS = {0x08, 0x28, 0x88, 0xA8}
CP_WRITE_OPS = {0x0A, 0x2A, 0x8A, 0xAA}
TIME_UNITS_NS = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}


def _decode(raw: bytes, path: Path) -> str:
    """Bytes of a text trace -> str: UTF-8, a leading BOM accepted (utf-8-sig);
    undecodable bytes are an error naming the file and line."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise IobridgeError(f"{path} line {line}: byte 0x{raw[e.start]:02x} is not UTF-8 text",
                            "is this the right file and --format?") from None


def _read_text(path: Path) -> str:
    """Whole file as text (UTF-8, BOM accepted), zstd-decompressed if named *.zst."""
    try:
        raw = read_input(path)
    except OSError as e:
        raise IobridgeError(f"{path}: {e.strerror or e}") from None
    if path.suffix == ".zst":
        raw = _unzstd(raw, path)
    return _decode(raw, path)


def _unzstd(raw: bytes, path: Path) -> bytes:
    """Every zstd frame of `raw`, decompressed and joined (as `zstd -d` does);
    a truncated frame or bytes after the last one that are not a frame are
    errors, never dropped."""
    import zstandard
    out, pos = [], 0
    while True:
        d = zstandard.ZstdDecompressor().decompressobj()
        try:
            out.append(d.decompress(raw[pos:]))
        except zstandard.ZstdError as e:
            what = "corrupt zstd data" if pos == 0 else \
                f"bytes after the zstd frame ending at byte {pos} are not zstd data"
            raise IobridgeError(f"{path}: {what} ({e})") from None
        if not d.eof:
            raise IobridgeError(f"{path}: truncated zstd stream: the frame ends early after "
                                f"{len(raw)} compressed bytes ({sum(map(len, out))} "
                                "decompressed)", "re-fetch the file")
        pos = len(raw) - len(d.unused_data)
        if not d.unused_data:
            return b"".join(out)


def _uint(s: str, where: str, field: str) -> int:
    """A non-negative decimal integer field (ASCII digits only), as a Python
    int checked to fit int64 BEFORE any conversion to numpy."""
    if not (s.isascii() and s.isdigit()):
        raise IobridgeError(f"{where}: field {field!r} = {s[:40]!r} is not a "
                            "non-negative integer")
    digits = s.lstrip("0")
    if len(digits) > 19 or int(digits or "0") > INT64_MAX:
        raise IobridgeError(f"{where}: field {field!r} = {s[:40]} does not fit in 64 bits "
                            f"(at most {INT64_MAX})")
    return int(s)


def _check_ns(value: int, where: str, what: str) -> int:
    """A time in ns computed from the file (Python int) must fit int64."""
    if value > INT64_MAX:
        raise IobridgeError(f"{where}: {what} is past the int64 nanosecond range "
                            f"({INT64_MAX} ns, about 292 years)")
    return value


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
    lines = _read_text(path).splitlines()
    header = lines[0].strip() if lines else ""
    if header != "version,time,op,size,lbn":
        raise IobridgeError(f"{path} line 1: expected header 'version,time,op,size,lbn', "
                            f"got {header[:60]!r}")
    times, ops, sizes, lbns, linenos = [], [], [], [], []
    t0 = prev = None
    for lineno, line in enumerate(lines[1:], start=2):
        where = f"{path} line {lineno}"
        parts = line.split(",")
        if len(parts) != 5:
            raise IobridgeError(
                f"{where}: expected 5 comma-separated fields "
                f"(version,time,op,size,lbn), got {len(parts)}: {line.strip()[:60]!r}")
        op_s = parts[2].strip()
        if not (op_s and op_s.isascii() and all(c in "0123456789abcdefABCDEF" for c in op_s)):
            raise IobridgeError(f"{where}: expected integers time,size,lbn and a hex op, "
                                f"got {line.strip()[:60]!r}")
        t = _uint(parts[1].strip(), where, "time")
        sz = _uint(parts[3].strip(), where, "size")
        lbn = _uint(parts[4].strip(), where, "lbn")
        if prev is not None and t < prev:
            raise IobridgeError(f"{where}: time goes backwards (expected non-decreasing)")
        if t0 is None:
            t0 = t
        prev = t
        # the last instant a request of this time unit can be given (spread)
        _check_ns((t - t0 + 1) * unit - 1 if spread else (t - t0) * unit, where,
                  f"field 'time' = {t}: {t - t0} {time_unit} after the first record")
        times.append(t - t0); ops.append(int(op_s, 16)); sizes.append(sz); lbns.append(lbn)
        linenos.append(lineno)
    if not times:
        raise IobridgeError(f"{path}: no records after the header")
    t = np.asarray(times, dtype=np.int64)
    issue = t * unit      # fits: checked above with Python ints
    if spread:
        # position of each record within its group of equal timestamps
        starts = np.r_[0, np.flatnonzero(np.diff(t)) + 1]
        counts = np.diff(np.r_[starts, len(t)])
        pos = np.arange(len(t)) - np.repeat(starts, counts)
        issue = issue + (pos * unit) // np.repeat(counts, counts)
    op_arr = np.asarray(ops, dtype=object)
    op = np.full(len(t), OP_OTHER, dtype=np.uint8)
    op[np.isin(op_arr, list(CP_READ_OPS))] = OP_READ
    op[np.isin(op_arr, list(CP_WRITE_OPS))] = OP_WRITE
    cols = _normalise_batch({"issue_ns": issue, "sector": np.asarray(lbns, dtype=np.int64),
                             "bytes": np.asarray(sizes, dtype=np.int64), "op": op,
                             "device": np.full(len(t), "cloudphysics", dtype=object)},
                            str(path))
    validate_columns(cols, path, rows=linenos,
                     names={"issue_ns": "time", "sector": "lbn", "bytes": "size"})
    return Trace(cols, {"source": str(path.name), "format": "cloudphysics-csv",
                        "time_unit": time_unit, "spread_equal_timestamps": spread})


def _arc_check_lines(path: Path, text: str) -> None:
    """Slow path of import_arc: find the line that is wrong and say why."""
    fields = ("start_block", "nblocks", "ignored", "reqno")
    for lineno, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 4 or not all(p.isascii() and p.isdigit() for p in parts):
            raise IobridgeError(f"{path} line {lineno}: expected 4 non-negative integers "
                                f"'start_block nblocks ignored reqno', got {line[:60]!r}")
        for p, name in zip(parts, fields):
            _uint(p, f"{path} line {lineno}", name)


def _arc_line_numbers(text: str) -> list[int]:
    """Line number of each record (non-blank line) of an ARC trace."""
    return [i for i, line in enumerate(text.splitlines(), start=1) if line.strip()]


def import_arc(path, duration_s: float = 3600.0) -> Trace:
    """ARC trace (`.lis`, optionally `.zst`): `start_block nblocks ignored reqno`.

    Blocks are 512 bytes; all requests are reads. The format has no
    timestamps: arrivals are assigned evenly over `duration_s` seconds
    (the ARC paper's OLTP trace covers one hour).
    """
    path = Path(path)
    if not (np.isfinite(duration_s) and 0 < duration_s and duration_s * 1e9 < 2.0 ** 63):
        raise UsageError(f"--duration must be a positive number of seconds below "
                         f"{INT64_MAX // 10**9}, got {duration_s}")
    if not path.exists():
        raise IobridgeError(f"{path}: no such file")
    text = _read_text(path)
    vals = text.split()
    arr = None
    # numpy's string -> int conversion takes '+5', '1_0' and non-ASCII digits:
    # such text goes to the slow path, which accepts ASCII digits only
    # (and fields are counted per line: a 3- and a 5-field line make 8 fields too)
    if len(vals) % 4 == 0 and text.isascii() and "_" not in text and "+" not in text \
            and "-" not in text and all(len(ln.split()) in (0, 4) for ln in text.splitlines()):
        try:
            arr = np.array(vals, dtype=np.int64).reshape(-1, 4)
        except (ValueError, OverflowError):
            arr = None
    if arr is None:
        _arc_check_lines(path, text)
        raise IobridgeError(f"{path}: malformed ARC trace")
    if len(arr) == 0:
        raise IobridgeError(f"{path}: no records")
    n = len(arr)
    lines = None

    def where(i: int) -> str:
        nonlocal lines
        lines = lines or _arc_line_numbers(text)
        return f"line {lines[i]}"

    big = arr[:, 1] > INT64_MAX // 512
    if big.any():
        i = int(np.argmax(big))
        raise IobridgeError(f"{path} {where(i)}: field 'nblocks' = {int(arr[i, 1])}: "
                            f"times 512 bytes does not fit in 64 bits")
    issue = (np.arange(n, dtype=np.float64) * (duration_s * 1e9 / n)).astype(np.int64)
    cols = _normalise_batch({"issue_ns": issue, "sector": arr[:, 0], "bytes": arr[:, 1] * 512,
                             "op": np.zeros(n, np.uint8),
                             "device": np.full(n, path.name.split(".")[0], dtype=object)},
                            str(path))
    validate_columns(cols, path, rows=where,
                     names={"sector": "start_block", "bytes": "nblocks x 512"})
    return Trace(cols, {"source": path.name, "format": "arc-lis",
                        "assigned_arrivals": f"evenly over {duration_s} s"})


FIO_ACTIONS = {"read": OP_READ, "write": OP_WRITE, "trim": OP_DISCARD,
               "sync": OP_FLUSH, "datasync": OP_FLUSH}


def import_fio_iolog(path) -> Trace:
    """fio iolog version 2 or 3 (see fio(1), 'Trace file format').

    v3 timestamps (microseconds since the start) become issue times; v2 has
    no timing: `wait` actions (microseconds) advance the clock, otherwise
    I/Os are 1 us apart. File actions (add/open/close) are skipped; the
    file name becomes the device. Offsets are stored in 512-byte sectors
    (an offset that is not a multiple of 512 is refused, never rounded); a
    file opened and never closed means a truncated log and is refused.
    """
    path = Path(path)
    lines = _read_text(path).splitlines()
    first = lines[0].strip() if lines else ""
    if first == "fio version 2 iolog":
        ver = 2
    elif first == "fio version 3 iolog":
        ver = 3
    else:
        raise IobridgeError(f"{path} line 1: expected 'fio version 2 iolog' or "
                            f"'fio version 3 iolog', got {first[:60]!r}")
    rows = {"issue_ns": [], "device": [], "op": [], "sector": [], "bytes": []}
    linenos = []
    clock_us = 0
    still_open: dict[str, int] = {}    # file name -> line of its 'open' without a 'close'
    form = ("'timestamp filename action [offset length]'" if ver == 3
            else "'filename action [offset length]'")
    for lineno, line in enumerate(lines[1:], start=2):
        where = f"{path} line {lineno}"
        parts = line.split()
        if not parts:
            continue
        ts = None
        if ver == 3:
            ok = len(parts) in (3, 5)
            if ok:
                ts = _uint(parts[0], where, "timestamp")
                parts = parts[1:]
        else:
            ok = len(parts) in (2, 4)
        if ok and len(parts) == 2:
            if parts[1] in ("add", "open", "close"):
                if parts[1] == "open":
                    still_open[parts[0]] = lineno
                elif parts[1] == "close":
                    still_open.pop(parts[0], None)
                continue
            ok = False
        if not ok:
            raise IobridgeError(f"{where}: expected {form}, got {line.strip()[:60]!r}")
        fname, act = parts[0], parts[1]
        if act == "wait" and ver == 2:
            clock_us += _uint(parts[2], where, "offset (wait time, us)")
            _check_ns(clock_us * 1000, where, f"the waits so far add up to {clock_us} us, which")
            continue
        if act not in FIO_ACTIONS:
            raise IobridgeError(f"{where}: unknown action {act!r}, expected "
                                f"one of {', '.join(FIO_ACTIONS)}")
        off = _uint(parts[2], where, "offset")
        ln = _uint(parts[3], where, "length")
        if off % 512:
            raise IobridgeError(f"{where}: field 'offset' = {off} is not a multiple of 512",
                                "iobridge traces address 512-byte sectors")
        if ts is None:
            ts = clock_us
            clock_us += 1
        rows["issue_ns"].append(_check_ns(ts * 1000, where, f"field 'timestamp' = {ts} us"
                                          if ver == 3 else f"the issue time {ts} us"))
        rows["device"].append(fname)
        rows["op"].append(FIO_ACTIONS[act])
        rows["sector"].append(off // 512)
        rows["bytes"].append(ln)
        linenos.append(lineno)
    if not rows["issue_ns"]:
        raise IobridgeError(f"{path}: no I/O actions in the iolog")
    if still_open:
        fname, lineno = next(iter(still_open.items()))
        raise IobridgeError(f"{path}: ends with {fname} still open (line {lineno} opens it, "
                            "no 'close' follows): is the file truncated?",
                            "an iolog closes every file it opens")
    cols = _normalise_batch(rows, str(path))
    validate_columns(cols, path, rows=linenos,
                     names={"issue_ns": "timestamp x 1000", "sector": "offset / 512",
                            "bytes": "length"})
    return Trace(cols, {"source": path.name, "format": f"fio-iolog-v{ver}"}).sorted()


def _check_fio_filename(filename: str) -> None:
    if not filename or any(c.isspace() for c in filename):
        raise UsageError(f"fio iolog file name {filename!r} is empty or contains whitespace")
    try:
        filename.encode("utf-8")
    except UnicodeEncodeError:     # undecodable bytes from the command line
        raise UsageError(f"fio iolog file name {filename!r} is not UTF-8 text",
                         "the iolog is a UTF-8 text file") from None


def export_fio_iolog(trace: Trace, out, filename: str, version: int = 3,
                     reads_only: bool = False, source=None) -> int:
    """Write `trace` as a fio iolog for replay against `filename`.

    v3 carries issue times (microseconds since the first I/O). The trace is
    validated first (validate_columns: every offset and size one a device
    can take); `source` names it in errors (default: its meta's source).
    A trace with nothing to export (no I/O fio replays, or no reads with
    `reads_only`) is refused. The file is written atomically (atomic_output).
    Returns the number of I/O lines written.
    """
    if version not in (2, 3):
        raise UsageError(f"fio iolog version {version} not supported", "use 2 or 3")
    _check_fio_filename(filename)
    source = source or trace.meta.get("source", "trace")
    validate_columns(trace.cols, source)
    t = trace.sorted()
    keep = {OP_READ: "read", OP_WRITE: "write", OP_DISCARD: "trim", OP_FLUSH: "sync"}
    op = t["op"]
    mask = np.isin(op, [OP_READ] if reads_only else list(keep))
    t = t.take(np.flatnonzero(mask))
    if not len(t):      # an iolog without I/O replays nothing (and import refuses it)
        what = "reads" if reads_only else "reads, writes, trims or flushes"
        raise IobridgeError(f"{source}: no {what} to export "
                            f"({len(trace)} records: {describe(trace)['ops']})")
    ts_us = (t["issue_ns"] - (t["issue_ns"][0] if len(t) else 0)) // 1000
    names = [keep[int(o)] for o in t["op"]]
    off = t["sector"] * 512      # validated: sector * 512 + bytes <= MAX_END_BYTE
    with atomic_output(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
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
        with open(_check_source(path), "rb") as f:      # a regular file: open cannot block
            head = f.read(32)
    except OSError as e:
        raise IobridgeError(f"{path}: {e.strerror or e}") from None
    if head.startswith(b"\xef\xbb\xbf"):      # a UTF-8 byte order mark
        head = head[3:]
    if head.startswith(b"fio version"):
        return "fio"
    if head.startswith(b"PAR1"):
        return "parquet"
    raise UsageError(f"{path}: cannot tell the trace format from its name or contents",
                     "pass --format cloudphysics|arc|fio")


def _check_source(path) -> Path:
    """A trace input must exist and be a regular file: opening a FIFO blocks,
    and /dev/zero never ends."""
    path = Path(path)
    if not path.exists():
        raise IobridgeError(f"{path}: no such trace file")
    if not path.is_file():
        raise IobridgeError(f"{path}: not a regular file", "give a trace file")
    return path


def load_any(path, fmt: str | None = None, **opts) -> Trace:
    """Read an iobridge Parquet trace or import a foreign one in memory."""
    path = _check_source(path)
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
    src = _check_source(args.source)
    out = check_output(args.out, args.force, [src])     # before the long work
    fmt = args.format or guess_format(src)
    if fmt == "parquet":
        raise UsageError(f"{src} is already an iobridge trace")
    print(f"importing {src} as {fmt} ...", file=sys.stderr)
    tr = load_any(src, fmt, time_unit=args.time_unit, duration_s=args.duration)
    check_output(args.out, args.force, [src])            # again: nothing appeared meanwhile
    write_trace(out, tr)
    print(f"wrote {len(tr)} records to {args.out}", file=sys.stderr)
    return 0


def _cmd_export(args) -> int:
    src = _check_source(args.source)
    out = check_output(args.out, args.force, [src])     # before the long work
    _check_fio_filename(args.filename)
    tr = load_any(src, args.format, time_unit=args.time_unit, duration_s=args.duration)
    check_output(args.out, args.force, [src])            # again: nothing appeared meanwhile
    n = export_fio_iolog(tr, out, args.filename, args.fio_version, args.reads_only,
                         source=src)
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
    p.add_argument("--duration", type=cliutil.seconds, default=None, metavar="SECONDS",
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
                         "times: arrivals are spread evenly over --duration. Every record is "
                         "validated (sizes, offsets, times a device can take; errors name the "
                         "line and field); the output is written atomically and an existing "
                         "file only with --force.",
                         **cliutil.examples(
                             ("iobridge trace import cloudPhysicsIO.csv -o cp.parquet",
                              "CloudPhysics CSV (time column in seconds)"),
                             ("iobridge trace import OLTP.lis.zst -o oltp.parquet --duration 600",
                              "ARC trace, arrivals spread over 10 min"),
                             ("iobridge trace import job.iolog -o job.parquet", "fio iolog")))
    pi.add_argument("source", help="input trace file")
    pi.add_argument("--out", "-o", required=True, help="output .parquet file")
    pi.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    _add_source_opts(pi)
    pi.set_defaults(func=_cmd_import)
    pe = tsub.add_parser("export", help="write a trace as a fio iolog for replay on a device",
                         description="Write a fio iolog (v3 with issue times in us, or v2 "
                         "untimed). WARNING: replaying writes overwrites the target; use "
                         "--reads-only on a device holding data. The trace is validated first "
                         "(every offset and size one a device can take); the output is written "
                         "atomically and an existing file only with --force.",
                         **cliutil.examples(
                             ("iobridge trace export cp.parquet -o cp.iolog --filename /dev/nullb0",
                              "timed iolog (v3) for fio"),
                             ("iobridge trace export cp.parquet -o cp.iolog --filename /dev/sdb "
                              "--reads-only", "reads only: safe on a disk with data"),
                             ("fio --name=replay --read_iolog=cp.iolog --ioengine=libaio --direct=1",
                              "then: replay it")))
    pe.add_argument("source", help="trace (.parquet or any importable format)")
    pe.add_argument("--out", "-o", required=True, help="output iolog file")
    pe.add_argument("--force", action="store_true", help="overwrite --out if it exists")
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
