"""The struct offsets the BPF programs read from BTF are the compiler's.

The observers include no kernel headers (bpf/kernel_layout.h); this test
compiles, once per kernel, a program that does include them and asserts at
compile time that every field's offsetof and size, and every enumerator,
equal what agent/kernel/kernel_layout.py resolved from the running kernel's
BTF. A mismatch fails the compile and names the field."""

import os
import sys

from conftest import run

from iobridge.kernel import kernel_layout

HEADERS = ("linux/blk-mq.h", "linux/blkdev.h", "linux/pagemap.h", "linux/pagevec.h")


def cross_check_source() -> str:
    btf = kernel_layout.read_btf()
    lines = ["#include <uapi/linux/ptrace.h>", *(f"#include <{h}>" for h in HEADERS)]
    for name, (struct_name, member) in kernel_layout.FIELDS.items():
        lines.append(f"_Static_assert(offsetof(struct {struct_name}, {member}) == "
                     f"IOBRIDGE_OFF_{name}, \"offset of {name}\");")
        # An array field's SIZE is one element's, COUNT the elements.
        elem = f"((struct {struct_name} *)0)->{member}"
        if btf.field(struct_name, member).count is not None:
            lines.append(f"_Static_assert(sizeof({elem}[0]) == IOBRIDGE_SIZE_{name} && "
                         f"sizeof({elem}) == IOBRIDGE_SIZE_{name} * IOBRIDGE_COUNT_{name}, "
                         f"\"size of {name}\");")
        else:
            lines.append(f"_Static_assert(sizeof({elem}) == IOBRIDGE_SIZE_{name}, "
                         f"\"size of {name}\");")
    for name in kernel_layout.ENUMERATORS:
        lines.append(f"_Static_assert({name} == KERNEL_{name}, \"value of {name}\");")
    lines.append("_Static_assert(REQ_OP_MASK == KERNEL_REQ_OP_MASK, \"REQ_OP_MASK\");")
    lines.append("_Static_assert(PAGE_MAPPING_ANON == KERNEL_PAGE_MAPPING_ANON, "
                 "\"PAGE_MAPPING_ANON\");")
    lines.append("BPF_ARRAY(unused, u64, 1);")
    return "\n".join(lines) + "\n"


def test_btf_offsets_equal_the_kernel_headers_offsets():
    import bcc
    from iobridge.kernel.bpf import COMMON_CFLAGS, source_path

    flags = [*kernel_layout.cflags(), f"-I{source_path('observer').parent}",
             "-include", "kernel_layout.h", *COMMON_CFLAGS]
    prog = bcc.BPF(text=cross_check_source().encode(), cflags=flags)
    prog.cleanup()
    assert len(kernel_layout.FIELDS) >= 30


def test_a_kernel_without_btf_is_refused_in_one_line():
    env = dict(os.environ, IOBRIDGE_VMLINUX_BTF="/nonexistent/vmlinux")
    proc = run([sys.executable, "-m", "iobridge.cli", "observe", "--interval", "0.5"],
               check=False, env=env)
    assert proc.returncode != 0
    assert proc.stderr.strip() == (
        "iobridge: error: /nonexistent/vmlinux does not exist: this kernel has no BTF, which "
        "iobridge reads kernel struct layouts from (use a kernel built with "
        "CONFIG_DEBUG_INFO_BTF=y, as Debian's are)"), proc.stderr
