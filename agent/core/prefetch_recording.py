"""Prefetch recordings: the one definition of the file the recorder
(lab/prefetch_record.py, in the VM) writes and `iobridge train --task
prefetch` reads.

A recording is gzip-compressed JSON lines (NAME.jsonl.gz), one object per
line, each with a "type":

- "header" (first line): format FORMAT, version VERSION, the prefetch
  feature schema it was computed with (schema_version, features), the
  recording's id and seed, the workloads ({name: {class, how}}), the
  readahead sweep (KB), the window (s), where it was made (kernel, device,
  memory limit).
- "window": one feature window of one run: workload, class (one of
  PREFETCH_CLASSES), read_ahead_kb (the setting of that run), scope
  ("device" or "file"), features (the schema's vector, in its order),
  direction, has_writes, and figures for the record (insertions, reads,
  extent: the lowest, highest and last page inserted, relative to the
  window's first, which tells a scan that came round the file's end inside
  the window from one that went the other way...).
- "run": one (workload, read_ahead_kb) run of the sweep: its throughput
  (read_mb_s, write_mb_s, seconds).
- "end" (last line): how many windows and runs the file holds, so that a
  truncated file is told from a complete one.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import zlib
from pathlib import Path

from . import prefetch_features as PF
from .errors import IobridgeError

FORMAT = "iobridge-prefetch-recording"
VERSION = 1
SCOPES = ("device", "file")
# Fields a window line must have, and their JSON types.
WINDOW_FIELDS = {"workload": str, "class": str, "read_ahead_kb": (int, float), "scope": str,
                 "features": list, "direction": (int, float), "has_writes": bool}
RUN_FIELDS = {"workload": str, "class": str, "read_ahead_kb": (int, float),
              "read_mb_s": (int, float), "seconds": (int, float)}


def header(recording: str, seed: int, workloads: dict, sweep_kb, window_s: float,
           **where) -> dict:
    return {"type": "header", "format": FORMAT, "version": VERSION,
            "schema_version": PF.SCHEMA_VERSION, "features": list(PF.FEATURE_NAMES),
            "recording": recording, "seed": seed, "workloads": workloads,
            "readahead_kb_sweep": list(sweep_kb), "window_s": window_s, **where}


class Recording:
    """A parsed, checked recording: header, window lines, run lines."""

    def __init__(self, path, header: dict, windows: list[dict], runs: list[dict]):
        self.path = Path(path)
        self.header = header
        self.windows = windows
        self.runs = runs

    @property
    def id(self) -> str:
        return str(self.header["recording"])


def _bad(path, what: str, hint: str | None = None) -> IobridgeError:
    return IobridgeError(f"{path}: {what}", hint or "record it again (see the model card's "
                         "training.regenerate) or leave it out")


def read_recording(path) -> Recording:
    """Read and check one recording; any problem is one IobridgeError
    naming the file and the line."""
    path = Path(path)
    if not path.exists():
        raise IobridgeError(f"{path}: no such recording", "give a .jsonl.gz file written by "
                            "the prefetch recorder (python -m iobridge.lab.prefetch_record)")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        what = ("truncated (the compressed stream ends early)" if isinstance(e, EOFError)
                else f"not a gzip-compressed recording ({e})")
        raise _bad(path, what) from None
    if not lines:
        raise _bad(path, "empty recording")
    objs = []
    for i, line in enumerate(lines, 1):
        try:
            o = json.loads(line)
        except ValueError as e:
            raise _bad(path, f"line {i} is not JSON ({e})") from None
        if not isinstance(o, dict) or not isinstance(o.get("type"), str):
            raise _bad(path, f"line {i} is not a recording line (an object with a 'type')")
        objs.append(o)
    head = objs[0]
    if head.get("type") != "header" or head.get("format") != FORMAT:
        raise _bad(path, f"not a prefetch recording (first line is not a {FORMAT} header)")
    if head.get("version") != VERSION:
        raise _bad(path, f"recording format version {head.get('version')!r}, this iobridge "
                   f"reads version {VERSION}")
    if head.get("schema_version") != PF.SCHEMA_VERSION or \
            head.get("features") != list(PF.FEATURE_NAMES):
        raise _bad(path, f"recorded with prefetch feature schema v{head.get('schema_version')} "
                   f"({head.get('features')}), this iobridge uses v{PF.SCHEMA_VERSION} "
                   f"({list(PF.FEATURE_NAMES)})")
    if "recording" not in head:
        raise _bad(path, "the header lacks the recording's id ('recording')")
    end = objs[-1]
    if end.get("type") != "end":
        raise _bad(path, f"truncated: no end line after line {len(objs)} (the recorder "
                   "stopped before finishing it)")
    windows, runs = [], []
    for i, o in enumerate(objs[1:-1], 2):
        t = o["type"]
        if t == "window":
            _check_fields(path, i, o, WINDOW_FIELDS)
            f = o["features"]
            if len(f) != PF.NUM_FEATURES or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    for v in f):
                raise _bad(path, f"line {i}: 'features' should be {PF.NUM_FEATURES} finite "
                           f"numbers ({', '.join(PF.FEATURE_NAMES)}), found {f!r:.80}")
            if not math.isfinite(o["direction"]) or not -1.0 <= o["direction"] <= 1.0:
                raise _bad(path, f"line {i}: 'direction' {o['direction']!r} is not in [-1, 1]")
            if o["class"] not in PF.PREFETCH_CLASSES:
                raise _bad(path, f"line {i}: unknown class {o['class']!r} (classes: "
                           f"{', '.join(PF.PREFETCH_CLASSES)})")
            if o["scope"] not in SCOPES:
                raise _bad(path, f"line {i}: unknown scope {o['scope']!r}")
            windows.append(o)
        elif t == "run":
            _check_fields(path, i, o, RUN_FIELDS)
            if o["class"] not in PF.PREFETCH_CLASSES:
                raise _bad(path, f"line {i}: unknown class {o['class']!r}")
            runs.append(o)
        elif t in ("header", "end"):
            raise _bad(path, f"line {i}: a second {t} line")
        # other types (notes) are for people, not for training
    if end.get("windows") != len(windows) or end.get("runs") != len(runs):
        raise _bad(path, f"the end line counts {end.get('windows')} windows and "
                   f"{end.get('runs')} runs, the file holds {len(windows)} and {len(runs)}")
    return Recording(path, head, windows, runs)


def _check_fields(path, i: int, o: dict, fields: dict) -> None:
    for k, typ in fields.items():
        v = o.get(k)
        if v is None or isinstance(v, bool) != (typ is bool) or not isinstance(v, typ):
            raise _bad(path, f"line {i}: {o['type']} line lacks field {k!r} or it has the "
                       f"wrong type ({json.dumps(v)[:40]})")
        if isinstance(v, float) and not math.isfinite(v):
            raise _bad(path, f"line {i}: field {k!r} is not finite")


class RecordingWriter:
    """Writes a recording line by line (gzip), with the end line on close.
    Used by the recorder; the file is complete only once close() ran."""

    def __init__(self, path, head: dict):
        self.path = Path(path)
        # written beside it and renamed on close: a reader never sees a part
        self.tmp = self.path.with_name(f".{self.path.name}.part")
        self.f = gzip.open(self.tmp, "wt", encoding="utf-8")
        self.windows = self.runs = 0
        self.write(head)

    def write(self, obj: dict) -> None:
        if obj.get("type") == "window":
            self.windows += 1
        elif obj.get("type") == "run":
            self.runs += 1
        self.f.write(json.dumps(obj, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self.write({"type": "end", "windows": self.windows, "runs": self.runs})
        self.f.close()
        os.replace(self.tmp, self.path)
