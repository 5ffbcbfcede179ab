"""The VM itself: a pinned Debian 12 kernel, and the device fixtures work."""

import os
import platform
from pathlib import Path

from conftest import run, sectors_of

from iobridge.lab.vm import kernel_releases


def test_runs_on_the_debian_12_kernel_the_harness_chose():
    release = platform.release()
    assert release == os.environ["IOBRIDGE_KERNEL"]     # set by vm.run_tests
    assert release in kernel_releases()
    assert release.startswith(("6.1.", "6.12.")), release
    version = Path("/proc/version").read_text()
    assert "Debian" in version, version
    assert Path("/sys/kernel/btf/vmlinux").exists()
    assert Path(f"/lib/modules/{release}/build/Makefile").exists(), "headers for BCC"


def test_nullb_fixture_makes_a_readable_writable_device(make_nullb):
    dev = make_nullb(size_mb=16)
    assert sectors_of(dev) == 16 * 2048
    run("dd if=/dev/urandom of=/tmp/pattern bs=4k count=4 status=none")
    run(f"dd if=/tmp/pattern of={dev} bs=4k oflag=direct status=none")
    back = run(f"dd if={dev} bs=4k count=4 iflag=direct status=none | cmp - /tmp/pattern",
               check=False)
    assert back.returncode == 0, back.stderr


def test_loop_and_dm_delay_fixtures(make_loop, make_dm_delay):
    loop = make_loop(size_mb=8)
    delayed = make_dm_delay(loop, read_ms=20, write_ms=0)
    assert sectors_of(delayed) == 8 * 2048
    table = run(["dmsetup", "table", os.path.basename(delayed)]).stdout
    assert " delay " in table and " 20 " in table


def test_dm_flakey_fails_io_while_down(make_nullb, make_dm_flakey):
    dev = make_nullb(size_mb=8)
    flakey = make_dm_flakey(dev, up_s=0, down_s=60)
    read = run(f"dd if={flakey} of=/dev/null bs=4k count=1 iflag=direct", check=False)
    assert read.returncode != 0, "reads on a down flakey device must fail"


def test_scsi_debug_fixture(make_scsi_debug):
    dev = make_scsi_debug(dev_size_mb=8)
    assert sectors_of(dev) == 8 * 2048
