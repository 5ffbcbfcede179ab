"""A small reader of BPF Type Format (BTF) data: struct member offsets and
enumerator values, the two things the BPF programs need from the running
kernel's layout (agent/kernel/kernel_layout.py reads /sys/kernel/btf/vmlinux
and passes them to the compile). Pure logic: it parses bytes.

Why not the kernel headers: BCC parses whatever a program includes on every
compile, and <linux/blkdev.h> or <linux/pagemap.h> cost 20-35 s of each
compile under emulation (about 5 s without them). BTF describes the same
layout, is always in sync with the running kernel, and is read in well
under a second.

Format: Documentation/bpf/btf.rst (header, type section, string section).
Type ids count from 1 in section order; 0 is void.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import IobridgeError

MAGIC = 0xEB9F
HEADER = struct.Struct("<HBBIIIII")   # magic, version, flags, hdr_len, type off/len, str off/len
TYPE = struct.Struct("<III")          # name_off, info, size or type

# Kinds (BTF_KIND_*) and the bytes that follow each type record.
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
FIXED_EXTRA = {INT: 4, ARRAY: 12, VAR: 4, DECL_TAG: 4}
PER_MEMBER_EXTRA = {STRUCT: 12, UNION: 12, ENUM: 8, FUNC_PROTO: 8, DATASEC: 12, ENUM64: 12}
QUALIFIERS = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)
POINTER_BYTES = 8     # the agent and the kernels it supports are 64-bit
MAX_NESTING = 32      # anonymous members or arrays deeper than this: corrupt data


@dataclass(frozen=True)
class Field:
    """Where a member sits: byte offset from the start of the outer struct,
    bytes of one element, and the element count when the member is an array
    (None otherwise)."""
    offset: int
    size: int
    count: int | None = None


class BTF:
    """Parsed type and string sections; lookups by name."""

    def __init__(self, data: bytes, what: str = "BTF data"):
        self.what = what
        if len(data) < HEADER.size:
            raise IobridgeError(f"{what}: {len(data)} bytes, shorter than a BTF header")
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = \
            HEADER.unpack_from(data)
        if magic != MAGIC:
            raise IobridgeError(f"{what}: not BTF (magic {magic:#06x}, expected {MAGIC:#06x})")
        if version != 1:
            raise IobridgeError(f"{what}: BTF version {version}, this reader knows version 1")
        t0, s0 = hdr_len + type_off, hdr_len + str_off
        if t0 + type_len > len(data) or s0 + str_len > len(data):
            raise IobridgeError(f"{what}: truncated ({len(data)} bytes; its header says the "
                                f"sections end at {max(t0 + type_len, s0 + str_len)})")
        self.data = data
        self.strings = data[s0:s0 + str_len]
        self.starts = [0]            # type id -> offset of its record in data (0: void)
        self.by_name: dict[tuple[int, int], int] = {}   # (kind, name_off) -> first id
        pos, end = t0, t0 + type_len
        unpack = TYPE.unpack_from
        while pos < end:
            if pos + TYPE.size > end:
                raise IobridgeError(f"{what}: type record {len(self.starts)} is truncated")
            name_off, info, _ = unpack(data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            if kind == 0 or kind > ENUM64:
                raise IobridgeError(f"{what}: type {len(self.starts)} has unknown kind {kind}")
            if name_off:
                self.by_name.setdefault((kind, name_off), len(self.starts))
            self.starts.append(pos)
            pos += TYPE.size + FIXED_EXTRA.get(kind, 0) + PER_MEMBER_EXTRA.get(kind, 0) * vlen
        if pos != end:
            raise IobridgeError(f"{what}: the last type record runs past the type section")

    # -- low-level ----------------------------------------------------------
    def name_offset(self, name: str) -> int | None:
        """Offset of `name` in the string section (strings are deduplicated)."""
        needle = b"\0" + name.encode() + b"\0"
        at = self.strings.find(needle)
        return None if at < 0 else at + 1

    def name(self, off: int) -> str:
        end = self.strings.find(b"\0", off)
        return self.strings[off:end if end >= 0 else len(self.strings)].decode(errors="replace")

    def record(self, tid: int) -> tuple[int, int, int, int, int]:
        """(kind, vlen, kind_flag, size_or_type, offset of the trailing data)."""
        if not 0 < tid < len(self.starts):
            raise IobridgeError(f"{self.what}: reference to type {tid}, which does not exist")
        pos = self.starts[tid]
        _name, info, size_or_type = TYPE.unpack_from(self.data, pos)
        return (info >> 24) & 0x1F, info & 0xFFFF, info >> 31, size_or_type, pos + TYPE.size

    def resolve(self, tid: int) -> int:
        """Follow typedefs and qualifiers to the underlying type."""
        for _ in range(64):
            kind, _vlen, _kf, size_or_type, _at = self.record(tid)
            if kind not in QUALIFIERS:
                return tid
            tid = size_or_type
        raise IobridgeError(f"{self.what}: a typedef or qualifier chain does not end")

    def _array(self, at: int) -> tuple[int, int]:
        """(element type id, element count) of the array record whose
        trailing data starts at `at`."""
        elem, _index_type, nelems = struct.unpack_from("<III", self.data, at)
        return elem, nelems

    def size(self, tid: int, depth: int = 0) -> int:
        if depth > MAX_NESTING:
            raise IobridgeError(f"{self.what}: array type {tid} nests without end")
        tid = self.resolve(tid)
        kind, _vlen, _kf, size_or_type, at = self.record(tid)
        if kind == PTR:
            return POINTER_BYTES
        if kind == ARRAY:
            elem, nelems = self._array(at)
            return self.size(elem, depth + 1) * nelems
        if kind in (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT):
            return size_or_type
        raise IobridgeError(f"{self.what}: type {tid} (kind {kind}) has no size")

    def members(self, tid: int):
        """(name, type id, bit offset, bitfield size) of a struct or union."""
        kind, vlen, kind_flag, _size, at = self.record(tid)
        for i in range(vlen):
            name_off, mtype, off = struct.unpack_from("<III", self.data, at + 12 * i)
            bits, bitfield = (off & 0xFFFFFF, off >> 24) if kind_flag else (off, 0)
            yield self.name(name_off) if name_off else "", mtype, bits, bitfield

    # -- lookups ------------------------------------------------------------
    def struct_id(self, name: str) -> int:
        off = self.name_offset(name)
        for kind in (STRUCT, UNION):
            tid = self.by_name.get((kind, off)) if off is not None else None
            if tid is not None:
                return tid
        raise IobridgeError(f"{self.what} has no struct {name}")

    def _find(self, tid: int, member: str, base_bits: int, depth: int = 0):
        """(type id, bit offset, bitfield size) of `member`, looking through
        anonymous struct and union members as C does."""
        if depth > MAX_NESTING:
            raise IobridgeError(f"{self.what}: anonymous members of type {tid} nest without end")
        for name, mtype, bits, bitfield in self.members(tid):
            if name == member:
                return mtype, base_bits + bits, bitfield
            if name:
                continue
            inner = self.resolve(mtype)
            if self.record(inner)[0] in (STRUCT, UNION):
                found = self._find(inner, member, base_bits + bits, depth + 1)
                if found:
                    return found
        return None

    def field(self, struct_name: str, path: str) -> Field:
        """Offset and size of `struct_name`.`path` (path may be dotted:
        "bi_iter.bi_sector")."""
        what = f"{struct_name}.{path}"
        tid, bits = self.struct_id(struct_name), 0
        parts = path.split(".")
        for i, part in enumerate(parts):
            found = self._find(tid, part, bits)
            if found is None:
                raise IobridgeError(f"{self.what}: struct {struct_name} has no member {what}")
            mtype, bits, bitfield = found
            if bitfield or bits % 8:
                raise IobridgeError(f"{self.what}: {what} is a bit field; "
                                    "the BPF programs read whole bytes only")
            if i < len(parts) - 1:
                tid = self.resolve(mtype)
                if self.record(tid)[0] not in (STRUCT, UNION):
                    raise IobridgeError(f"{self.what}: {struct_name}.{'.'.join(parts[:i + 1])} "
                                        "is not a struct")
        rtype = self.resolve(mtype)
        kind, _vlen, _kf, _size, at = self.record(rtype)
        if kind == ARRAY:
            elem, nelems = self._array(at)
            return Field(bits // 8, self.size(elem), nelems)
        return Field(bits // 8, self.size(rtype))

    def enumerators(self, names) -> dict[str, int]:
        """The values of the enumerators `names` (in any enum), one pass."""
        wanted = {off: n for n in names if (off := self.name_offset(n)) is not None}
        found: dict[str, int] = {}
        for tid in range(1, len(self.starts)):
            kind, vlen, kind_flag, _size, at = self.record(tid)
            if kind == ENUM:
                for i in range(vlen):
                    noff, val = struct.unpack_from("<Ii" if kind_flag else "<II",
                                                   self.data, at + 8 * i)
                    if noff in wanted:
                        found[wanted[noff]] = val
            elif kind == ENUM64:
                for i in range(vlen):
                    noff, lo, hi = struct.unpack_from("<III", self.data, at + 12 * i)
                    if noff in wanted:
                        found[wanted[noff]] = lo | hi << 32
        missing = [n for n in names if n not in found]
        if missing:
            raise IobridgeError(f"{self.what} has no enumerator {', '.join(missing)}")
        return found
