"""The one BPF loader: every iobridge BPF program is compiled here.

It checks what loading needs (root, a kernel with headers, BCC importable),
checks that the ABI header it compiles in is the layout this agent mirrors,
and compiles bpf/<name>.bpf.c with the include path (bpf/ and the folder of
kmodule/iobridge_abi.h) and flags every program shares. Each program has a
Python module of the same name in this package (observer.bpf.c ->
observer.py, route_policy.bpf.c -> route_policy.py), as libbpf-tools pairs
biolatency.bpf.c with biolatency.c.
"""

from __future__ import annotations

import ctypes
import re
import time
from pathlib import Path

import numpy as np

from ..core import abi, resources
from ..core.errors import IobridgeError
from . import kernel_layout, system

# The last two for Debian's 6.12 headers: Debian 12's clang 14 warns about
# their per-CPU __seg_gs address spaces and nocf_check attributes, harmless
# in BPF code; without them every agent start on 6.12 printed 26 warnings.
COMMON_CFLAGS = ("-Wno-unused-function", "-Wno-duplicate-decl-specifier",
                 "-Wno-ignored-attributes")


def source_path(name: str) -> Path:
    """bpf/<name>.bpf.c, from the checkout or the installed package."""
    return resources.data_dir("bpf") / f"{name}.bpf.c"


def abi_header() -> Path:
    return resources.data_dir("kmodule") / "iobridge_abi.h"


def header_version(header: Path | None = None, macro: str = "IOBRIDGE_ABI_VERSION") -> int:
    """The layout version `macro` as written in a header file (the ABI
    header by default; the page-cache observer's has its own)."""
    header = header or abi_header()
    try:
        text = header.read_text()
    except OSError as err:
        raise IobridgeError(f"cannot read the header {header}: {err.strerror}",
                            "reinstall iobridge, or run from a complete checkout") from err
    m = re.search(rf"^#define\s+{macro}\s+(\d+)\s*$", text, re.M)
    if not m:
        raise IobridgeError(f"{header} defines no {macro}")
    return int(m.group(1))


def check_header_version(header: Path | None = None) -> None:
    """Refuse a header whose layout version differs from this agent's."""
    header = header or abi_header()
    found = header_version(header)
    if found != abi.ABI_VERSION:
        raise IobridgeError(
            f"ABI mismatch: header {header} has layout version {found}, "
            f"the agent expects {abi.ABI_VERSION}",
            "use the agent and kmodule/ from the same iobridge release")


def compile_program(name: str, what: str, cflags: tuple[str, ...] = (), extra_source: str = "",
                    kernel_structs: bool = False):
    """Compile bpf/<name>.bpf.c (plus `extra_source`, for tests) with BCC.

    `kernel_structs`: the program reads kernel struct fields through
    bpf/kernel_layout.h, so it gets their offsets from the running kernel's
    BTF (kernel_layout.py). Returns (the BCC BPF object, seconds the compile
    took, the BTF read included). Failures come back as one IobridgeError
    naming `what`."""
    system.require_root(what)
    system.require_bpf_kernel()
    bcc = system.import_bcc()
    check_header_version()
    src = source_path(name)
    try:
        text = src.read_text() + ("\n" + extra_source if extra_source else "")
    except OSError as err:
        raise IobridgeError(f"cannot read BPF program {src}: {err.strerror}") from err
    started = time.monotonic()
    layout = kernel_layout.cflags() if kernel_structs else ()
    flags = [f"-I{abi_header().parent}", f"-I{src.parent}", *COMMON_CFLAGS, *layout, *cflags]
    try:
        prog = bcc.BPF(text=text.encode(), cflags=flags)
    except Exception as err:   # BCC raises bare Exception for compile and load failures
        raise IobridgeError(f"could not load {what} ({src.name}): {err}",
                            "run with -vv and check the kernel log (dmesg)") from err
    return prog, time.monotonic() - started


def percpu_sum(prog, name: str) -> int:
    """Entry 0 of the per-CPU array map `name` of a BCC program, summed over
    the CPUs (the programs' event and drop counters)."""
    return int(sum(prog[name.encode()][ctypes.c_int(0)]))


class EventRing:
    """A BCC ring buffer map drained into a numpy structured array of
    `dtype` (each record one element)."""

    def __init__(self, prog, map_name: str, dtype: np.dtype):
        self.prog = prog
        self.dtype = dtype
        self._chunks: list[bytes] = []
        self._deadline = 0.0
        prog[map_name.encode()].open_ring_buffer(self._on_event)

    def _on_event(self, _ctx, data, size):
        self._chunks.append(ctypes.string_at(data, size))
        # BCC's ring_buffer_poll() may not return under sustained load; a
        # negative return ends the poll (the record is already consumed).
        return -1 if time.monotonic() > self._deadline else 0

    def poll(self, timeout_ms: int, max_seconds: float) -> np.ndarray:
        """The records that arrive within about `max_seconds` (waiting up
        to `timeout_ms` for the first)."""
        self._deadline = time.monotonic() + max_seconds
        self.prog.ring_buffer_poll(timeout_ms)
        chunks, self._chunks = self._chunks, []
        if not chunks:
            return np.zeros(0, dtype=self.dtype)
        return np.frombuffer(b"".join(chunks), dtype=self.dtype)
