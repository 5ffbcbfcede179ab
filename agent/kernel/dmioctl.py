"""Device-mapper control ioctls (linux/dm-ioctl.h, interface version 4) for
the calls made often: listing devices, reading a table or its status, and
swapping a table (load, then resume).

Why not `dmsetup`: under emulation one dmsetup process costs 130-200 ms of
CPU (measured in the test VM); the agent lists its targets on every dm
uevent, the experiments read the target's counters 50 times a second, and
the slow-period harness swaps a table about twice a second. An ioctl costs
microseconds. Rare operations (create, remove, messages) go through dmsetup
(kernel/dmtarget.py), which also handles udev.

Buffer layout: a struct dm_ioctl header, then data at data_start. Every call
needs CAP_SYS_ADMIN; errors raise IobridgeError naming the call and device.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass

from ..core.errors import IobridgeError

CONTROL = "/dev/mapper/control"
VERSION = (4, 0, 0)          # the oldest 4.x: the kernel accepts any 4.y >= it
NAME_LEN, UUID_LEN, TYPE_NAME_LEN = 128, 129, 16

# struct dm_ioctl: version[3], data_size, data_start, target_count,
# open_count, flags, event_nr, padding, dev, name, uuid, data[7] (312 bytes).
HEADER = struct.Struct(f"=3IIIIiIIIQ{NAME_LEN}s{UUID_LEN}s7s")
# struct dm_target_spec: sector_start, length, status, next, target_type.
SPEC = struct.Struct(f"=QQiI{TYPE_NAME_LEN}s")
# struct dm_name_list head: dev, next (then the name, NUL-terminated).
NAME_LIST = struct.Struct("=QI")
assert HEADER.size == 312 and SPEC.size == 40

# Commands (enum in dm-ioctl.h) and flags used here.
LIST_DEVICES, DEV_SUSPEND, TABLE_LOAD, TABLE_STATUS = 2, 6, 9, 12
SKIP_LOCKFS_FLAG = 1 << 10       # resume: do not freeze a filesystem on top
STATUS_TABLE_FLAG = 1 << 4       # TABLE_STATUS: the table lines, not the status
BUFFER_FULL_FLAG = 1 << 8        # out: retry with a larger buffer

INITIAL_BUFFER = 16 << 10
MAX_BUFFER = 16 << 20


@dataclass(frozen=True)
class TargetLine:
    start: int          # sectors
    length: int         # sectors
    target_type: str
    params: str         # status or table parameters, as `dmsetup` prints them


def request(cmd: int) -> int:
    """_IOWR(DM_IOCTL 0xfd, cmd, struct dm_ioctl)."""
    return (3 << 30) | (HEADER.size << 16) | (0xFD << 8) | cmd


def pack(name: str, size: int, *, flags: int = 0, target_count: int = 0,
         payload: bytes = b"") -> bytearray:
    """A request buffer of `size` bytes: header, then `payload` at data_start."""
    raw = name.encode()
    if len(raw) >= NAME_LEN:
        raise IobridgeError(f"device-mapper name too long ({len(raw)} bytes, at most "
                            f"{NAME_LEN - 1}): {name!r}")
    size = max(size, HEADER.size + len(payload))
    buf = bytearray(size)
    HEADER.pack_into(buf, 0, *VERSION, size, HEADER.size, target_count, 0, flags, 0, 0, 0,
                     raw, b"", b"")
    buf[HEADER.size:HEADER.size + len(payload)] = payload
    return buf


def header(buf) -> dict:
    f = HEADER.unpack_from(buf, 0)
    return {"version": f[0:3], "data_size": f[3], "data_start": f[4], "target_count": f[5],
            "open_count": f[6], "flags": f[7], "event_nr": f[8], "dev": f[10]}


def _cstr(buf, offset: int, end: int) -> str:
    nul = bytes(buf[offset:end]).find(b"\0")
    raw = bytes(buf[offset:end if nul < 0 else offset + nul])
    return raw.decode(errors="replace")


def pack_specs(lines: list[TargetLine]) -> bytes:
    """Table lines as TABLE_LOAD takes them: each spec's `next` is the offset
    of the following spec from this one; each spec + params padded to 8."""
    out = bytearray()
    for line in lines:
        params = line.params.encode() + b"\0"
        step = SPEC.size + len(params) + (-(SPEC.size + len(params)) % 8)
        ttype = line.target_type.encode()
        if len(ttype) >= TYPE_NAME_LEN:
            raise IobridgeError(f"target type name too long: {line.target_type!r}")
        out += SPEC.pack(line.start, line.length, 0, step, ttype)
        out += params + bytes(step - SPEC.size - len(params))
    return bytes(out)


def unpack_specs(buf, count: int) -> list[TargetLine]:
    """TABLE_STATUS output: `count` specs from data_start; each spec's `next`
    is the offset of the following spec from the first one."""
    h = header(buf)
    base, end = h["data_start"], min(h["data_size"], len(buf))
    out, offset = [], base
    for _ in range(count):
        if offset + SPEC.size > end:
            raise IobridgeError("device-mapper returned a truncated table")
        start, length, _status, nxt, ttype = SPEC.unpack_from(buf, offset)
        nul = ttype.find(b"\0")
        params_end = base + nxt if nxt else end
        out.append(TargetLine(start, length, (ttype if nul < 0 else ttype[:nul]).decode(),
                              _cstr(buf, offset + SPEC.size, max(params_end, offset + SPEC.size))))
        offset = base + nxt
    return out


def unpack_names(buf) -> list[str]:
    """LIST_DEVICES output: dm_name_list entries chained by `next` (offset
    from this entry; 0 ends); an entry with dev 0 means no devices."""
    h = header(buf)
    offset, end = h["data_start"], min(h["data_size"], len(buf))
    names = []
    while offset + NAME_LIST.size <= end:
        dev, nxt = NAME_LIST.unpack_from(buf, offset)
        if dev == 0:
            break
        names.append(_cstr(buf, offset + NAME_LIST.size, end))
        if not nxt:
            break
        offset += nxt
    return names


def _call(cmd: int, name: str, what: str, *, flags: int = 0, target_count: int = 0,
          payload: bytes = b"") -> bytearray:
    """One ioctl; grows the buffer while the kernel says it was too small."""
    size = INITIAL_BUFFER
    try:
        fd = os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise IobridgeError(f"{CONTROL} is missing: device-mapper is not available",
                            "load it with 'modprobe dm-mod'") from None
    except PermissionError:
        raise IobridgeError(f"{what}: opening {CONTROL} needs root (CAP_SYS_ADMIN)") from None
    try:
        while True:
            buf = pack(name, size, flags=flags, target_count=target_count, payload=payload)
            try:
                fcntl.ioctl(fd, request(cmd), buf, True)
            except OSError as err:
                if err.errno == errno.ENXIO:
                    raise IobridgeError(f"{what}: no device-mapper device {name!r}") from None
                raise IobridgeError(f"{what} failed: {os.strerror(err.errno)}") from None
            if not header(buf)["flags"] & BUFFER_FULL_FLAG:
                return buf
            if size >= MAX_BUFFER:
                raise IobridgeError(f"{what}: the answer exceeds {MAX_BUFFER} bytes")
            size *= 4
    finally:
        os.close(fd)


def list_devices() -> list[str]:
    """The names of every device-mapper device."""
    return unpack_names(_call(LIST_DEVICES, "", "listing device-mapper devices"))


def status(name: str, *, table: bool = False) -> list[TargetLine]:
    """`dmsetup status NAME` (or `dmsetup table NAME` with table=True) as lines."""
    what = f"reading the {'table' if table else 'status'} of {name}"
    buf = _call(TABLE_STATUS, name, what, flags=STATUS_TABLE_FLAG if table else 0)
    return unpack_specs(buf, header(buf)["target_count"])


def load(name: str, lines: list[TargetLine]) -> None:
    """Stage a new table (`dmsetup load`); it takes effect at resume()."""
    _call(TABLE_LOAD, name, f"loading a table into {name}", target_count=len(lines),
          payload=pack_specs(lines))


def resume(name: str, *, skip_lockfs: bool = True) -> None:
    """Swap a staged table in (`dmsetup resume [--nolockfs] --noudevsync`):
    the kernel suspends the device itself first when a table is staged. No
    udev sync: nothing about the device node changes."""
    _call(DEV_SUSPEND, name, f"resuming {name}", flags=SKIP_LOCKFS_FLAG if skip_lockfs else 0)
