"""The BTF reader (agent/core/btf.py) the BPF programs' struct offsets come
from: crafted type sections for the C lookup rules (anonymous members,
typedef chains, arrays, bit fields), one clear error for every kind of bad
data, and the real layout of the kernel this host runs.

The VM test tests/vm/test_kernel_layout.py checks the same offsets against
the compiler's offsetof on the VM's kernels."""

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iobridge.core import btf
from iobridge.core.errors import IobridgeError
from iobridge.kernel import kernel_layout


class Builder:
    """Encodes a BTF blob type by type (ids count from 1)."""

    def __init__(self):
        self.strings = bytearray(b"\0")
        self.types: list[bytes] = []

    def _name(self, name: str) -> int:
        if not name:
            return 0
        at = self.strings.find(b"\0" + name.encode() + b"\0")
        if at >= 0:
            return at + 1
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def _add(self, name: str, kind: int, vlen: int, size_or_type: int, extra: bytes = b"",
             kind_flag: int = 0) -> int:
        info = (kind_flag << 31) | (kind << 24) | vlen
        self.types.append(struct.pack("<III", self._name(name), info, size_or_type) + extra)
        return len(self.types)

    def int_(self, name: str, size: int) -> int:
        return self._add(name, btf.INT, 0, size, struct.pack("<I", size * 8))

    def ptr(self, to: int) -> int:
        return self._add("", btf.PTR, 0, to)

    def typedef(self, name: str, to: int) -> int:
        return self._add(name, btf.TYPEDEF, 0, to)

    def const(self, to: int) -> int:
        return self._add("", btf.CONST, 0, to)

    def array(self, elem: int, n: int, index_type: int) -> int:
        return self._add("", btf.ARRAY, 0, 0, struct.pack("<III", elem, index_type, n))

    def composite(self, name: str, size: int, members, union: bool = False,
                  kind_flag: int = 0) -> int:
        """members: (name, type id, bit offset[, bitfield size])."""
        extra = b""
        for m in members:
            mname, mtype, bits = m[:3]
            off = ((m[3] if len(m) > 3 else 0) << 24 | bits) if kind_flag else bits
            extra += struct.pack("<III", self._name(mname), mtype, off)
        return self._add(name, btf.UNION if union else btf.STRUCT, len(members), size, extra,
                         kind_flag)

    def enum(self, name: str, values) -> int:
        extra = b"".join(struct.pack("<Ii", self._name(n), v) for n, v in values)
        return self._add(name, btf.ENUM, len(values), 4, extra)

    def blob(self) -> bytes:
        types = b"".join(self.types)
        header = btf.HEADER.pack(btf.MAGIC, 1, 0, btf.HEADER.size, 0, len(types),
                                 len(types), len(self.strings))
        return header + types + bytes(self.strings)


def folio_like() -> bytes:
    """struct folio { union { struct { unsigned long flags; struct mapping
    *mapping; pgoff_t index; }; struct page page; }; };  struct bio { int x;
    struct bvec_iter bi_iter; const u8 status; u32 flags:3; }; an array
    member, and an enum."""
    b = Builder()
    u64 = b.int_("unsigned long", 8)
    u32 = b.int_("unsigned int", 4)
    u8 = b.int_("unsigned char", 1)
    mapping = b.composite("address_space", 16, [("host", b.ptr(u64), 0)])
    pgoff = b.typedef("pgoff_t", u64)
    inner = b.composite("", 24, [("flags", u64, 0), ("mapping", b.ptr(mapping), 64),
                                 ("index", pgoff, 128)])
    page = b.composite("page", 64, [("flags", u64, 0)])
    anon = b.composite("", 64, [("", inner, 0), ("page", page, 0)], union=True)
    b.composite("folio", 64, [("", anon, 0)])
    iter_ = b.composite("bvec_iter", 16, [("bi_sector", u64, 0), ("bi_size", u32, 64)])
    b.composite("bio", 40, [("x", u32, 0), ("bi_iter", iter_, 64), ("status", b.const(u8), 192),
                            ("bits", u32, 224, 3)], kind_flag=1)
    b.composite("folio_batch", 128, [("nr", u8, 0), ("folios", b.array(b.ptr(page), 15, u32), 64)])
    b.enum("req_op", [("REQ_OP_READ", 0), ("REQ_OP_WRITE", 1), ("REQ_OP_DISCARD", 3)])
    return b.blob()


def test_members_found_through_anonymous_unions_typedefs_and_dotted_paths():
    t = btf.BTF(folio_like())
    assert t.field("folio", "mapping") == btf.Field(8, 8)
    assert t.field("folio", "index") == btf.Field(16, 8)       # pgoff_t -> unsigned long
    assert t.field("folio", "page") == btf.Field(0, 64)
    assert t.field("address_space", "host") == btf.Field(0, 8)
    assert t.field("bio", "bi_iter.bi_sector") == btf.Field(8, 8)
    assert t.field("bio", "bi_iter.bi_size") == btf.Field(16, 4)
    assert t.field("bio", "status") == btf.Field(24, 1)         # const u8
    assert t.field("folio_batch", "folios") == btf.Field(8, 8, 15)
    assert t.field("folio_batch", "nr") == btf.Field(0, 1)
    assert t.enumerators(["REQ_OP_WRITE", "REQ_OP_DISCARD"]) == {"REQ_OP_WRITE": 1,
                                                                  "REQ_OP_DISCARD": 3}


@pytest.mark.parametrize("lookup, message", [
    (lambda t: t.field("request", "q"), "BTF data has no struct request"),
    (lambda t: t.field("folio", "lru"), "BTF data: struct folio has no member folio.lru"),
    (lambda t: t.field("bio", "bits"), "BTF data: bio.bits is a bit field; "
                                       "the BPF programs read whole bytes only"),
    (lambda t: t.field("bio", "x.y"), "BTF data: bio.x is not a struct"),
    (lambda t: t.enumerators(["REQ_OP_READ", "REQ_OP_FLUSH"]),
     "BTF data has no enumerator REQ_OP_FLUSH"),
])
def test_what_is_missing_is_named(lookup, message):
    with pytest.raises(IobridgeError) as err:
        lookup(btf.BTF(folio_like()))
    assert err.value.message == message


def test_bad_data_is_refused_with_what_is_wrong():
    good = folio_like()
    cases = {
        b"": "BTF data: 0 bytes, shorter than a BTF header",
        b"\x00\x00" + good[2:]: "BTF data: not BTF (magic 0x0000, expected 0xeb9f)",
        good[:2] + b"\x02" + good[3:]: "BTF data: BTF version 2, this reader knows version 1",
        good[:-5]: "BTF data: truncated",
    }
    for data, message in cases.items():
        with pytest.raises(IobridgeError) as err:
            btf.BTF(data)
        assert err.value.message.startswith(message), (message, err.value.message)
    # A type of an unknown kind (31) in an otherwise valid section.
    bad_kind = bytearray(good)
    info_at = btf.HEADER.size + 4
    bad_kind[info_at:info_at + 4] = struct.pack("<I", 31 << 24)
    with pytest.raises(IobridgeError, match="type 1 has unknown kind 31"):
        btf.BTF(bytes(bad_kind))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_truncation_or_corruption_is_an_iobridge_error_or_a_valid_read(data):
    """Whatever the bytes, the reader raises IobridgeError or answers; it never
    crashes with another exception or loops."""
    blob = bytearray(folio_like())
    if data.draw(st.booleans()):
        blob = blob[:data.draw(st.integers(0, len(blob)))]
    for _ in range(data.draw(st.integers(0, 4))):
        if blob:
            at = data.draw(st.integers(0, len(blob) - 1))
            blob[at] = data.draw(st.integers(0, 255))
    try:
        t = btf.BTF(bytes(blob))
        for struct_name, member in [("folio", "mapping"), ("bio", "bi_iter.bi_size"),
                                    ("folio_batch", "folios")]:
            t.field(struct_name, member)
        t.enumerators(["REQ_OP_READ"])
    except IobridgeError:
        pass


def test_a_missing_btf_file_says_what_the_kernel_lacks(tmp_path):
    with pytest.raises(IobridgeError) as err:
        kernel_layout.read_btf(tmp_path / "vmlinux")
    assert err.value.message == (f"{tmp_path / 'vmlinux'} does not exist: this kernel has no BTF, "
                              "which iobridge reads kernel struct layouts from")
    assert "CONFIG_DEBUG_INFO_BTF" in err.value.hint


@pytest.mark.skipif(not kernel_layout.VMLINUX_BTF.exists(), reason="this host has no BTF")
def test_every_field_resolves_on_this_hosts_kernel():
    """The host runs a third kernel (neither of the VM's): every field and
    enumerator the programs read exists there too, at a plausible size."""
    flags = kernel_layout.cflags(kernel_layout.VMLINUX_BTF)
    sizes = {f.split("=")[0][len("-DIOBRIDGE_SIZE_"):]: int(f.split("=")[1])
             for f in flags if f.startswith("-DIOBRIDGE_SIZE_")}
    assert sizes.keys() == kernel_layout.FIELDS.keys()
    for pointer in ("request_q", "request_bio", "bio_bdev", "folio_mapping", "inode_sb",
                    "folio_batch_folios"):
        assert sizes[pointer] == 8, pointer
    assert sizes["bio_sector"] == 8 and sizes["folio_batch_nr"] == 1
    assert any(f.startswith("-DIOBRIDGE_COUNT_folio_batch_folios=") for f in flags)
    assert "-DKERNEL_REQ_OP_READ=0" in flags


def test_a_type_that_contains_itself_is_an_error_not_a_hang():
    b = Builder()
    u32 = b.int_("unsigned int", 4)
    # type 2: an anonymous struct whose only member is itself; type 3 holds it.
    b.composite("", 4, [("", 2, 0)])
    b.composite("loop", 4, [("", 2, 0), ("x", u32, 0)])
    arr = b.array(5, 2, u32)      # type 4 -> element type 5 (itself an array of 4)
    b.array(arr, 2, u32)
    b.composite("arrays", 8, [("a", arr, 0)])
    t = btf.BTF(b.blob())
    with pytest.raises(IobridgeError, match="nest without end"):
        t.field("loop", "x")
    with pytest.raises(IobridgeError, match="nests without end"):
        t.field("arrays", "a")
