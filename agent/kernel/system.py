"""Checks of the host that kernel-facing commands need, each failing with
one line that says what is wrong and what to do."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

from ..core.errors import IobridgeError

# BPF ring buffers (5.8) are the newest kernel feature the observer needs.
MIN_KERNEL = (5, 8)


def kernel_version(release: str | None = None) -> tuple[int, int]:
    release = release or platform.release()
    m = re.match(r"(\d+)\.(\d+)", release)
    if not m:
        raise IobridgeError(f"cannot parse kernel release {release!r}")
    return int(m.group(1)), int(m.group(2))


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise IobridgeError(f"{what} needs root (loading BPF programs takes CAP_BPF and "
                            "CAP_PERFMON, attaching kprobes CAP_SYS_ADMIN)",
                            "run it with sudo, or as the iobridge service")


def require_bpf_kernel(release: str | None = None,
                       modules_root: Path = Path("/lib/modules")) -> None:
    """The running kernel can load our BCC programs: new enough, with headers."""
    release = release or platform.release()
    if kernel_version(release) < MIN_KERNEL:
        raise IobridgeError(
            f"kernel {release} is not supported: iobridge needs Linux "
            f"{MIN_KERNEL[0]}.{MIN_KERNEL[1]} or newer (BPF ring buffers)",
            "boot a newer kernel, or use the test VM: iobridge vm run -- ...")
    if not (modules_root / release / "build").exists():
        raise IobridgeError(
            f"no kernel headers for the running kernel {release} "
            f"({modules_root / release / 'build'} is missing); BCC compiles against them",
            f"install linux-headers-{release}, or use the test VM: iobridge vm run -- ...")


def import_bcc():
    """BCC's Python module, with a clear error when it is not installed."""
    try:
        import bcc  # noqa: PLC0415 (optional system package)
    except ImportError:
        raise IobridgeError("BCC's Python bindings are not importable",
                            "apt install python3-bpfcc, and use a venv made with "
                            "--system-site-packages (make setup does both)") from None
    return bcc
