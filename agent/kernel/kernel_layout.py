"""The kernel struct fields and constants the BPF programs read, resolved
from the running kernel's BTF (/sys/kernel/btf/vmlinux) into compile flags.

The programs include no kernel headers (bpf/kernel_layout.h says how they
read a field): BCC would parse those headers on every compile, 20-35 s of
each compile under emulation. Each field here becomes
-DIOBRIDGE_OFF_<name>=<byte offset> and -DIOBRIDGE_SIZE_<name>=<bytes of
one element> (plus -DIOBRIDGE_COUNT_<name>=<elements> for an array); each
enumerator -DKERNEL_<name>=<value>. The C side checks at compile time that
the variable it reads into has the field's size, so a layout change is a
compile error naming the field, never a wrong read.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from ..core.btf import BTF
from ..core.errors import IobridgeError

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
BTF_ENV = "IOBRIDGE_VMLINUX_BTF"   # another BTF file (tests)

# name -> (struct, member path); the names are what the C code passes to KREAD.
FIELDS: dict[str, tuple[str, str]] = {
    # block observer (observer.bpf.c)
    "request_q": ("request", "q"),
    "request_data_len": ("request", "__data_len"),
    "request_sector": ("request", "__sector"),
    "request_cmd_flags": ("request", "cmd_flags"),
    "request_bio": ("request", "bio"),
    "request_queue_disk": ("request_queue", "disk"),
    "gendisk_major": ("gendisk", "major"),
    "gendisk_first_minor": ("gendisk", "first_minor"),
    "bio_bdev": ("bio", "bi_bdev"),
    "bio_sector": ("bio", "bi_iter.bi_sector"),
    "bio_size": ("bio", "bi_iter.bi_size"),
    "bio_opf": ("bio", "bi_opf"),
    "bio_status": ("bio", "bi_status"),
    "bio_next": ("bio", "bi_next"),
    "block_device_dev": ("block_device", "bd_dev"),
    # page-cache observer (cachestat.bpf.c)
    "folio_mapping": ("folio", "mapping"),
    "folio_index": ("folio", "index"),
    "address_space_host": ("address_space", "host"),
    "inode_ino": ("inode", "i_ino"),
    "inode_sb": ("inode", "i_sb"),
    "inode_rdev": ("inode", "i_rdev"),
    "super_block_dev": ("super_block", "s_dev"),
    "ractl_mapping": ("readahead_control", "mapping"),
    "ractl_index": ("readahead_control", "_index"),
    "ractl_ra": ("readahead_control", "ra"),
    "ra_state_ra_pages": ("file_ra_state", "ra_pages"),
    "ra_state_start": ("file_ra_state", "start"),
    "ra_state_size": ("file_ra_state", "size"),
    "folio_batch_nr": ("folio_batch", "nr"),
    "folio_batch_folios": ("folio_batch", "folios"),
}

# Enumerators the programs compare against. REQ_OP_MASK is a macro, not in
# BTF: the first request flag bit (__REQ_FAILFAST_DEV) is REQ_OP_BITS.
ENUMERATORS = ("REQ_OP_READ", "REQ_OP_WRITE", "REQ_OP_FLUSH", "REQ_OP_DISCARD",
               "__REQ_FAILFAST_DEV")


def btf_path() -> Path:
    return Path(os.environ.get(BTF_ENV) or VMLINUX_BTF)


def read_btf(path: Path | None = None) -> BTF:
    path = path or btf_path()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IobridgeError(f"{path} does not exist: this kernel has no BTF, which iobridge "
                            "reads kernel struct layouts from",
                            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y, "
                            "as Debian's are") from None
    except OSError as err:
        raise IobridgeError(f"cannot read {path}: {err.strerror}") from err
    return BTF(data, str(path))


@functools.lru_cache(maxsize=4)
def _cflags(path: Path) -> tuple[str, ...]:
    btf = read_btf(path)
    flags = []
    for name, (struct_name, member) in FIELDS.items():
        f = btf.field(struct_name, member)
        flags += [f"-DIOBRIDGE_OFF_{name}={f.offset}", f"-DIOBRIDGE_SIZE_{name}={f.size}"]
        if f.count is not None:
            flags.append(f"-DIOBRIDGE_COUNT_{name}={f.count}")
    for name, value in btf.enumerators(ENUMERATORS).items():
        flags.append(f"-DKERNEL_{name}={value}")
    return tuple(flags)


def cflags(path: Path | None = None) -> tuple[str, ...]:
    """The compile flags for the running kernel (read once per process)."""
    return _cflags(path or btf_path())
