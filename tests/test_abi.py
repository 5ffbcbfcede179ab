"""Host test: iobridge.core.abi mirrors kmodule/iobridge_abi.h exactly.

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

from iobridge.core import abi
from iobridge.core.errors import IobridgeError
from iobridge.kernel import bpf

CC = shutil.which("gcc") or shutil.which("cc")


def _field_names(struct):
    return [name for name, *_ in struct._fields_]


TOP = abi.NUM_LAT_BUCKETS - 1   # the top latency bucket
PENALTY_CASES = (
    (1000, 0, TOP, 10**9),                  # no top latency: as is
    (1000, 6_000_000, TOP - 1, 10**9),      # not the top bucket: as is
    (1000, 6_000_000, TOP, 6_000_000),      # at the top latency: as is
    (1000, 6_000_000, TOP, 20_000_000),     # beyond: in proportion
    (4_000_000_000, 1000, TOP, 1 << 40),    # capped: latency at 2**31, result at the max
    (3, 7, TOP, 1 << 31),
)
def _calls(kind: str, fn: str, cases, suffixes, fmt: str = "%llu",
           cast: str = "(unsigned long long)") -> list[str]:
    """C lines printing `kind <case args joined by _> <fn(case)>` per case
    (suffixes: the C literal suffix of each argument)."""
    out = []
    for case in cases:
        args = "_".join(str(v) for v in case)
        call = ", ".join(f"{v}{s}" for v, s in zip(case, suffixes))
        out.append(f'printf("{kind} {args} {fmt}\\n", {cast}{fn}({call}));')
    return out


# (newest latency, its queue, previous latency, its queue)
USE_PREVIOUS_CASES = ((1000, 0, 0, 0), (50_000_000, 0, 1_100_000, 0), (1_100_000, 0, 50_000_000, 0),
                      (2000, 1, 1000, 0), (2000, 0, 2000, 1), (1000, 0, 1000, 0),
                      ((1 << 48) - 1, 65535, (1 << 48) - 2, 65535))
# (in flight, service, newest latency, key latency, penalty)
LEG_COST_CASES = ((0, 100, 50, 50, 1000), (0, 100, 300, 300, 1000), (15, 100, 4800, 300, 1000),
                  (0, 100, 20_000_000, 2_500_000, 0), (3, 100, 20_000_000, 20_000_000, 0),
                  (0, 0, 0, 0, 0), (2**32 - 1, 2**32 - 1, 1 << 40, 1 << 40, 2**32 - 1))


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
    lines.append('printf("legindex 3 5 %u\\n", iobridge_leg_index(3, 5));')
    for n in (0, 1, 2, 3, 4, 7, 8, 15, 16, 17, 1000):
        lines.append(f'printf("inflight {n} %u\\n", iobridge_inflight_bucket({n}u));')
    lines.append("const __u32 edges[7] = {100, 200, 400, 800, 1600, 3200, 6400};")
    for n in (0, 99, 100, 101, 399, 400, 6399, 6400, 1 << 40):
        lines.append(f'printf("lat {n} %u\\n", iobridge_lat_bucket(edges, {n}ull));')
    # (last latency, in flight)
    lines += _calls("keylat", "iobridge_key_latency",
                    ((0, 0), (999, 0), (1000, 1), (20_000_000, 3), (1 << 40, 15)), ("ull", "u"))
    # (penalty, top_lat, lat bucket, key latency)
    lines += _calls("keypen", "iobridge_key_penalty", PENALTY_CASES, ("u", "u", "u", "ull"))
    # (probe_after, last latency)
    lines += _calls("probewait", "iobridge_probe_wait_ns",
                    ((200_000_000, 0), (200_000_000, 1_000_000), (200_000_000, 20_000_000), (0, 5)),
                    ("ull", "ull"))
    lines += _calls("useprev", "iobridge_use_previous", USE_PREVIOUS_CASES,
                    ("ull", "u", "ull", "u"), fmt="%d", cast="")
    lines += _calls("legcost", "iobridge_leg_cost", LEG_COST_CASES, ("u", "u", "ull", "ull", "ull"))
    lines.append('printf("key 3 5 7 %u\\n", iobridge_key_index(3, 5, 7));')
    lines.append('printf("key 1 2 3 %u\\n", iobridge_key_index(1, 2, 3));')
    lines.append("return 0; }")
    src = tmp / "layout.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp / "layout"
    subprocess.run([CC, "-std=gnu11", "-Wall", "-Werror", f"-I{bpf.abi_header().parent}",
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
    text = bpf.abi_header().read_text()
    declared = set(re.findall(r"^struct\s+(\w+)\s*\{", text, re.M))
    assert declared == set(abi.STRUCTS), "header and agent/abi.py declare different structs"


def test_constants_match_header(c_layout):
    for pyname in abi.CONSTANTS:
        assert c_layout[("const", pyname)] == [getattr(abi, pyname)], pyname


def test_size_buckets_match_header(c_layout):
    for (kind, key), vals in c_layout.items():
        if kind == "bucket":
            assert abi.size_bucket(int(key)) == vals[0], key


def test_key_rules_match_header(c_layout):
    edges = (100, 200, 400, 800, 1600, 3200, 6400)
    for (kind, key), vals in c_layout.items():
        if kind == "inflight":
            assert abi.inflight_bucket(int(key)) == vals[0], key
        if kind == "lat":
            assert abi.lat_bucket(edges, int(key)) == vals[0], key
        if kind == "keylat":
            lat, n = (int(v) for v in key.split("_"))
            assert abi.key_latency(lat, n) == vals[0], key
        if kind == "keypen":
            pen, top, lat_b, lat = (int(v) for v in key.split("_"))
            assert abi.key_penalty(pen, top, lat_b, lat) == vals[0], key
        if kind == "useprev":
            assert int(abi.use_previous(*(int(v) for v in key.split("_")))) == vals[0], key
        if kind == "legcost":
            n, service, newest, lat, pen = (int(v) for v in key.split("_"))
            assert abi.leg_cost(n, service, newest, lat, pen) == vals[0], key
        if kind == "probewait":
            after, lat = (int(v) for v in key.split("_"))
            assert abi.probe_wait_ns(after, lat) == vals[0], key
    assert sum(kind == "keypen" for kind, _ in c_layout) == len(PENALTY_CASES)
    assert sum(kind == "legcost" for kind, _ in c_layout) == len(LEG_COST_CASES)
    assert sum(kind == "useprev" for kind, _ in c_layout) == len(USE_PREVIOUS_CASES)
    # a 50 ms stall after a 1.1 ms read: the 1.1 ms one; the other way round, the newest
    assert c_layout[("useprev", "50000000_0_1100000_0")] == [1]
    assert c_layout[("useprev", "1100000_0_50000000_0")] == [0]
    assert c_layout[("useprev", "1000_0_0_0")] == [0]           # no previous yet
    # Per read: the key latency, at least the service time; no less than the
    # newest latency; the penalty once.
    assert c_layout[("legcost", "0_100_50_50_1000")] == [1100]
    assert c_layout[("legcost", "15_100_4800_300_1000")] == [16 * 300 + 1000]
    assert c_layout[("legcost", "0_100_20000000_2500000_0")] == [20_000_000]
    assert c_layout[("legcost", f"{2**32 - 1}_{2**32 - 1}_{1 << 40}_{1 << 40}_{2**32 - 1}")] == [
        2**32 * (2**32 - 1) + 2**32 - 1]
    assert c_layout[("keypen", f"1000_6000000_{TOP}_20000000")] == [1000 * 20 // 6]
    assert c_layout[("keypen", f"4000000000_1000_{TOP}_{1 << 40}")] == [abi.PENALTY_MAX_NS]
    # "key 3 5 7 N": key "3", values [5, 7, N].
    assert c_layout[("key", "3")] == [5, 7, abi.key_index(3, 5, 7)]
    assert c_layout[("key", "1")] == [2, 3, abi.key_index(1, 2, 3)]
    assert abi.key_index(abi.NUM_SIZE_BUCKETS - 1, abi.NUM_INFLIGHT_BUCKETS - 1,
                         abi.NUM_LAT_BUCKETS - 1) == abi.KEYS_PER_LEG - 1
    assert c_layout[("legindex", "3")] == [5, abi.leg_index(3, 5)]


def test_header_version_check(tmp_path):
    assert bpf.header_version() == abi.ABI_VERSION
    bpf.check_header_version()
    bad = tmp_path / "iobridge_abi.h"
    bad.write_text(bpf.abi_header().read_text().replace(
        f"IOBRIDGE_ABI_VERSION\t\t{abi.ABI_VERSION}", f"IOBRIDGE_ABI_VERSION\t\t{abi.ABI_VERSION + 1}"))
    with pytest.raises(IobridgeError, match=rf"layout version {abi.ABI_VERSION + 1}.*expects {abi.ABI_VERSION}"):
        bpf.check_header_version(bad)


def test_leg_index_bounds():
    assert abi.leg_index(abi.MAX_TARGETS - 1, abi.MAX_LEGS - 1) == abi.DECISION_ENTRIES - 1
    with pytest.raises(ValueError):
        abi.leg_index(abi.MAX_TARGETS, 0)
    with pytest.raises(ValueError):
        abi.leg_index(0, abi.MAX_LEGS)
