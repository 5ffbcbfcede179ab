"""The device-mapper ioctl buffers (pure packing; the VM tests compare the
real calls with dmsetup's output)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, strategies as st

from iobridge.core.errors import IobridgeError
from iobridge.kernel import dmioctl as D


def test_request_numbers_match_dm_ioctl_h():
    # _IOWR(0xfd, cmd, struct dm_ioctl) as libdevmapper computes them
    assert D.request(D.LIST_DEVICES) == 0xC138FD02
    assert D.request(D.DEV_SUSPEND) == 0xC138FD06
    assert D.request(D.TABLE_LOAD) == 0xC138FD09
    assert D.request(D.TABLE_STATUS) == 0xC138FD0C


def test_header_carries_version_sizes_and_name():
    buf = D.pack("iob_x", 4096, flags=D.SKIP_LOCKFS_FLAG, target_count=2, payload=b"abc")
    h = D.header(buf)
    assert len(buf) == 4096 and h["version"] == D.VERSION
    assert h["data_size"] == 4096 and h["data_start"] == 312 and h["target_count"] == 2
    assert h["flags"] == D.SKIP_LOCKFS_FLAG
    assert bytes(buf[40 + 8:40 + 8 + 6]) == b"iob_x\0"
    assert bytes(buf[312:315]) == b"abc"


def test_name_too_long_is_refused():
    with pytest.raises(IobridgeError, match="too long"):
        D.pack("x" * 128, 4096)


def _status_answer(lines):
    """A TABLE_STATUS answer as the kernel writes it (retrieve_status):
    `next` counts from the first spec; each string padded to 8."""
    data = bytearray()
    for line in lines:
        spec_at = len(data)
        data += bytes(D.SPEC.size) + line.params.encode() + b"\0"
        data += bytes(-len(data) % 8)
        D.SPEC.pack_into(data, spec_at, line.start, line.length, 0, len(data),
                         line.target_type.encode())
    buf = D.pack("dev", D.HEADER.size + len(data), target_count=len(lines), payload=bytes(data))
    return buf


lines_st = st.lists(st.builds(
    D.TargetLine, st.integers(0, 2**40), st.integers(1, 2**40),
    st.sampled_from(["iobridge", "linear", "delay"]),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=300)), max_size=5)


@given(lines_st)
def test_status_answers_unpack_to_their_lines(lines):
    buf = _status_answer(lines)
    assert D.unpack_specs(buf, len(lines)) == lines


@given(lines_st)
def test_load_payload_chains_specs_from_each_spec(lines):
    data = D.pack_specs(lines)
    offset, seen = 0, []
    for _ in lines:
        start, length, _status, nxt, ttype = D.SPEC.unpack_from(data, offset)
        params = data[offset + D.SPEC.size:offset + nxt].split(b"\0")[0].decode()
        seen.append(D.TargetLine(start, length, ttype.rstrip(b"\0").decode(), params))
        assert nxt % 8 == 0
        offset += nxt
    assert seen == lines and offset == len(data)


def test_a_truncated_status_answer_is_an_error():
    buf = _status_answer([D.TargetLine(0, 8, "linear", "7:0 0")])
    with pytest.raises(IobridgeError, match="truncated"):
        D.unpack_specs(buf, 2)


def test_name_list_follows_next_and_stops_at_an_empty_list():
    data = bytearray()
    for i, name in enumerate(["a", "iob_c", "iob_c_leg1"]):
        at = len(data)
        data += struct.pack("=QI", (253 << 8) | i, 0) + name.encode() + b"\0"
        data += bytes(-len(data) % 8)
        if i < 2:
            struct.pack_into("=QI", data, at, (253 << 8) | i, len(data) - at + 0)
    buf = D.pack("", D.HEADER.size + len(data), payload=bytes(data))
    assert D.unpack_names(buf) == ["a", "iob_c", "iob_c_leg1"]
    empty = D.pack("", 4096, payload=struct.pack("=QI", 0, 0))
    assert D.unpack_names(empty) == []
