"""Host test: agent/abi.py mirrors kmodule/iobridge_abi.h exactly.

Compiles a small C program against the header with the host compiler; it
prints every size, offset and constant, and the test compares them with
the ctypes mirror.  Also checks the size bucket rule on both sides.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess

import pytest

from iobridge import abi

CC = shutil.which("gcc") or shutil.which("cc")


def _field_names(struct):
    return [name for name, *_ in struct._fields_]


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory):
    if CC is None:
        pytest.skip("no C compiler on this host")
    tmp = tmp_path_factory.mktemp("abi")
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        '#include "iobridge_abi.h"',
        "int main(void) {",
    ]
    for cname, pystruct in abi.STRUCTS.items():
        lines.append(f'printf("size {cname} %zu\\n", sizeof(struct {cname}));')
        lines.append(f'printf("align {cname} %zu\\n", _Alignof(struct {cname}));')
        for field in _field_names(pystruct):
            lines.append(
                f'printf("offset {cname}.{field} %zu %zu\\n", '
                f"offsetof(struct {cname}, {field}), "
                f"sizeof(((struct {cname} *)0)->{field}));")
    for pyname, macro in abi.CONSTANTS.items():
        lines.append(f'printf("const {pyname} %lld\\n", (long long)({macro}));')
    for n in (0, 1, 4095, 4096, 4097, 16384, 16385, 65536, 65537, 1 << 20):
        lines.append(f'printf("bucket {n} %u\\n", iobridge_size_bucket({n}u));')
    lines.append('printf("index 3 5 2 %u\\n", iobridge_decision_index(3, 5, 2));')
    lines.append("return 0; }")
    src = tmp / "layout.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp / "layout"
    subprocess.run([CC, "-std=gnu11", "-Wall", "-Werror", f"-I{abi.KMODULE_DIR}",
                    str(src), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    table = {}
    for line in out.splitlines():
        kind, key, *vals = line.split()
        table[(kind, key)] = [int(v) for v in vals]
    return table


@pytest.mark.parametrize("cname", sorted(abi.STRUCTS))
def test_struct_layout_matches_header(c_layout, cname):
    pystruct = abi.STRUCTS[cname]
    assert c_layout[("size", cname)] == [ctypes.sizeof(pystruct)]
    assert c_layout[("align", cname)] == [ctypes.alignment(pystruct)]
    for field in _field_names(pystruct):
        desc = getattr(pystruct, field)
        assert c_layout[("offset", f"{cname}.{field}")] == [desc.offset, desc.size], field


def test_every_header_struct_is_mirrored():
    text = abi.ABI_HEADER.read_text()
    declared = set(re.findall(r"^struct\s+(\w+)\s*\{", text, re.M))
    assert declared == set(abi.STRUCTS), "header and agent/abi.py declare different structs"


def test_constants_match_header(c_layout):
    for pyname in abi.CONSTANTS:
        assert c_layout[("const", pyname)] == [getattr(abi, pyname)], pyname


def test_size_buckets_match_header(c_layout):
    for (kind, key), vals in c_layout.items():
        if kind == "bucket":
            assert abi.size_bucket(int(key)) == vals[0], key


def test_decision_index_matches_header(c_layout):
    # The line reads "index 3 5 2 N": key "3", values [5, 2, N].
    assert c_layout[("index", "3")] == [5, 2, abi.decision_index(3, 5, 2)]


def test_header_version_check(tmp_path):
    assert abi.header_version() == abi.ABI_VERSION
    abi.check_header_version()
    bad = tmp_path / "iobridge_abi.h"
    bad.write_text(abi.ABI_HEADER.read_text().replace(
        f"IOBRIDGE_ABI_VERSION\t\t{abi.ABI_VERSION}", f"IOBRIDGE_ABI_VERSION\t\t{abi.ABI_VERSION + 1}"))
    with pytest.raises(abi.IobridgeError, match=rf"layout version {abi.ABI_VERSION + 1}.*expects {abi.ABI_VERSION}"):
        abi.check_header_version(bad)


def test_decision_index_bounds():
    assert abi.decision_index(abi.MAX_TARGETS - 1, abi.MAX_LEGS - 1,
                              abi.NUM_SIZE_BUCKETS - 1) == abi.DECISION_ENTRIES - 1
    with pytest.raises(ValueError):
        abi.decision_index(abi.MAX_TARGETS, 0, 0)
    with pytest.raises(ValueError):
        abi.decision_index(0, abi.MAX_LEGS, 0)
