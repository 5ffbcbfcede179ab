"""Fixtures for the kernel-facing tests that run inside the test VM.

Every test under tests/vm is marked `vm`. On the host those tests are run
through one VM boot by tests/conftest.py; inside the VM (IOBRIDGE_IN_VM=1)
they run here for real, as root, against real block devices that the
factory fixtures below create and tear down per test.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import NamedTuple

import pytest

# What in the guest kernel log fails a test: the kernel reporting a bug.
KERNEL_TROUBLE = re.compile(
    r"WARNING:|BUG:|Oops|general protection fault|kernel BUG|Call Trace|"
    r"UBSAN:|KASAN:|list_add corruption|list_del corruption|soft lockup|hung_task"
)


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.vm)


def run(cmd: list[str] | str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a command, capturing text output; raise with its stderr on failure."""
    shell = isinstance(cmd, str)
    proc = subprocess.run(cmd, shell=shell, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{cmd!r} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def sectors_of(dev: str) -> int:
    return int(run(["blockdev", "--getsz", dev]).stdout)


def wait_for_path(path: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        time.sleep(0.05)


@pytest.fixture(scope="session", autouse=True)
def _inside_vm():
    if os.environ.get("IOBRIDGE_IN_VM") != "1":
        pytest.fail("VM tests must run inside the test VM (iobridge vm test)")
    if os.geteuid() != 0:
        pytest.fail("VM tests run as root inside the VM")


def _dmesg_lines() -> list[str]:
    return run(["dmesg"]).stdout.splitlines()


@pytest.fixture(autouse=True)
def kernel_log_clean(request):
    """Fail the test if the guest kernel reported a bug while it ran."""
    with open("/dev/kmsg", "w") as kmsg:
        kmsg.write(f"iobridge-test: start {request.node.nodeid}\n")
    yield
    lines = _dmesg_lines()
    marker = f"iobridge-test: start {request.node.nodeid}"
    start = max((i for i, line in enumerate(lines) if marker in line), default=0)
    trouble = [line for line in lines[start:] if KERNEL_TROUBLE.search(line)]
    if trouble:
        pytest.fail("kernel log shows trouble during the test:\n" + "\n".join(lines[start:][-60:]))


# ---------------------------------------------------------------- null_blk

_CONFIGFS_NULLB = Path("/sys/kernel/config/nullb")
_nullb_serial = itertools.count()


def _ensure_configfs() -> None:
    if not Path("/sys/kernel/config").is_dir() or not any(Path("/sys/kernel/config").iterdir()):
        run("mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config")
    if not _CONFIGFS_NULLB.is_dir():
        run(["modprobe", "null_blk", "nr_devices=0"])
    wait_for_path(str(_CONFIGFS_NULLB))


@pytest.fixture
def make_nullb():
    """Factory: make_nullb(size_mb=64, **params) -> '/dev/nullb_tN'.

    `params` are null_blk configfs attributes (memory_backed, blocksize,
    completion_nsec, irqmode, submit_queues, hw_queue_depth, ...).
    memory_backed defaults to 1 so data written can be read back.
    """
    created: list[Path] = []

    def factory(size_mb: int = 64, **params) -> str:
        _ensure_configfs()
        # On 6.1 a configfs null_blk disk is named after its directory.
        d = _CONFIGFS_NULLB / f"nullb_t{next(_nullb_serial)}"
        d.mkdir()
        created.append(d)
        attrs = {"size": size_mb, "memory_backed": 1, **params}
        for key, value in attrs.items():
            (d / key).write_text(f"{value}\n")
        (d / "power").write_text("1\n")
        dev = f"/dev/{d.name}"
        wait_for_path(dev)
        return dev

    yield factory
    for d in reversed(created):
        try:
            (d / "power").write_text("0\n")
        finally:
            d.rmdir()


# ---------------------------------------------------------------- loop

@pytest.fixture
def make_loop(tmp_path):
    """Factory: make_loop(size_mb=64) -> '/dev/loopN' backed by a file."""
    devices: list[str] = []

    def factory(size_mb: int = 64) -> str:
        run(["modprobe", "loop"])
        backing = tmp_path / f"loop{len(devices)}.img"
        with open(backing, "wb") as f:
            f.truncate(size_mb << 20)
        dev = run(["losetup", "--find", "--show", str(backing)]).stdout.strip()
        devices.append(dev)
        return dev

    yield factory
    for dev in reversed(devices):
        run(["losetup", "-d", dev], check=False)


class Ext4(NamedTuple):
    mnt: Path       # the mount point
    dev: int        # the kernel dev_t of the file system (cachestat's key)
    ra: Path        # the device's read_ahead_kb file


@pytest.fixture
def ext4(make_loop, tmp_path):
    """A fresh ext4 on a 96 MiB loop device (tmpfs has no readahead), mounted
    noatime: an Ext4. Its read_ahead_kb is put back before the umount,
    whatever a failing test left there."""
    from iobridge.kernel import blockdev
    from iobridge.kernel import readahead

    loop = make_loop(96)
    run(["mkfs.ext4", "-q", "-F", loop])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run(["mount", "-o", "noatime", loop, str(mnt)])
    st = os.stat(mnt)
    dev = blockdev.kdev(os.major(st.st_dev), os.minor(st.st_dev))
    ra = readahead.Actuators().ra_path(dev)
    assert ra is not None, f"no read_ahead_kb for {loop}"
    orig = ra.read_text()
    yield Ext4(mnt, dev, ra)
    ra.write_text(orig)
    run(["umount", str(mnt)])


PAGE = 4096


def make_file(path, pages: int) -> int:
    """A file of `pages` pages of random data, written, synced and dropped from
    the page cache (so the first read inserts every page); its inode number."""
    with open(path, "wb") as f:
        f.write(os.urandom(pages * PAGE))
        f.flush()
        os.fsync(f.fileno())
    drop(path)
    return os.stat(path).st_ino


def drop(path) -> None:
    """Drop a file's pages from the page cache (POSIX_FADV_DONTNEED)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- scsi_debug

@pytest.fixture
def make_scsi_debug():
    """Factory: make_scsi_debug(dev_size_mb=64, **module_params) -> '/dev/sdX'.

    One scsi_debug instance at a time (it is one module); parameters such as
    delay, ndelay, every_nth and opts are module parameters, and the ones that
    are writable at run time live in /sys/bus/pseudo/drivers/scsi_debug/.
    """
    loaded = []

    def factory(dev_size_mb: int = 64, **params) -> str:
        if loaded:
            raise RuntimeError("only one scsi_debug device per test")
        args = [f"dev_size_mb={dev_size_mb}"] + [f"{k}={v}" for k, v in params.items()]
        run(["modprobe", "scsi_debug", *args])
        loaded.append(True)
        deadline = time.monotonic() + 15
        while True:
            found = list(Path("/sys/bus/pseudo/drivers/scsi_debug").glob(
                "adapter*/host*/target*/*/block/*"))
            if found:
                dev = f"/dev/{found[0].name}"
                wait_for_path(dev)
                return dev
            if time.monotonic() > deadline:
                raise TimeoutError("scsi_debug disk did not appear")
            time.sleep(0.1)

    yield factory
    if loaded:
        for _ in range(50):
            if run(["modprobe", "-r", "scsi_debug"], check=False).returncode == 0:
                break
            time.sleep(0.1)


# ---------------------------------------------------------------- device-mapper

@pytest.fixture
def make_dm():
    """Factory: make_dm(table, name=None) -> '/dev/mapper/NAME'; removed after."""
    names: list[str] = []

    def factory(table: str, name: str | None = None) -> str:
        name = name or f"iobt{os.getpid()}_{len(names)}"
        run(["dmsetup", "create", name, "--table", table])
        names.append(name)
        run(["dmsetup", "mknodes", name])
        path = f"/dev/mapper/{name}"
        wait_for_path(path)
        return path

    yield factory
    for name in reversed(names):
        for _ in range(50):
            if run(["dmsetup", "remove", name], check=False).returncode == 0:
                break
            time.sleep(0.1)


@pytest.fixture
def make_dm_delay(make_dm):
    """Factory: make_dm_delay(dev, read_ms, write_ms=None) -> '/dev/mapper/NAME'.

    Reads are delayed by read_ms and writes by write_ms (default: same).
    Reload the table (dmsetup suspend/load/resume) to change the delay.
    """

    def factory(dev: str, read_ms: int, write_ms: int | None = None, name: str | None = None) -> str:
        write_ms = read_ms if write_ms is None else write_ms
        size = sectors_of(dev)
        return make_dm(f"0 {size} delay {dev} 0 {read_ms} {dev} 0 {write_ms}", name)

    return factory


@pytest.fixture
def make_dm_flakey(make_dm):
    """Factory: make_dm_flakey(dev, up_s, down_s, features=()) -> '/dev/mapper/NAME'.

    The device works for up_s seconds, then misbehaves for down_s seconds
    (with no features every I/O fails; see the kernel's dm-flakey docs).
    """

    def factory(dev: str, up_s: int, down_s: int, features: tuple[str, ...] = (),
                name: str | None = None) -> str:
        size = sectors_of(dev)
        table = f"0 {size} flakey {dev} 0 {up_s} {down_s}"
        if features:
            table += f" {len(features)} " + " ".join(features)
        return make_dm(table, name)

    return factory


# ---------------------------------------------------------------- slow periods

@pytest.fixture
def make_slow_periods():
    """Factory: make_slow_periods(dev, slow_ms, normal_mean_s, slow_mean_s, **kw)
    -> iobridge.lab.faults.SlowPeriods, its dm-delay device created (not started).
    Stopped and removed after the test."""
    from iobridge.lab.faults import SlowPeriods

    made: list[SlowPeriods] = []

    def factory(dev: str, slow_ms: int, normal_mean_s: float, slow_mean_s: float,
                name: str | None = None, **kw) -> SlowPeriods:
        name = name or f"iobslow{os.getpid()}_{len(made)}"
        sp = SlowPeriods(dev, name, slow_ms, normal_mean_s, slow_mean_s, **kw)
        made.append(sp)
        sp.create()
        return sp

    yield factory
    for sp in reversed(made):
        sp.remove()


# ---------------------------------------------------------------- the module

def module_loaded() -> bool:
    from iobridge.core import abi
    return Path(f"/sys/module/{abi.MODULE_NAME}").exists()


def insmod() -> None:
    from iobridge.lab import testbed
    testbed.ensure_module()


def rmmod(check: bool = True) -> subprocess.CompletedProcess:
    from iobridge.core import abi
    return run(["rmmod", abi.MODULE_NAME], check=check)


@pytest.fixture(scope="session")
def iobridge_module():
    """Build (if needed) and load the module; unload it at the end."""
    insmod()
    yield
    if module_loaded():
        proc = rmmod(check=False)
        assert proc.returncode == 0, f"rmmod failed at the end: {proc.stderr}"


# ---------------------------------------------------------------- iobridge targets

@pytest.fixture
def make_iobridge(iobridge_module):
    """Factory: make_iobridge(legs, **opts) -> NAME (device /dev/mapper/NAME);
    `opts` as dmtarget.table_line's. Removed after the test."""
    from iobridge.kernel import dmtarget

    names: list[str] = []

    def factory(legs: list[str], **opts) -> str:
        name = f"iob{os.getpid()}_{len(names)}"
        dmtarget.create(name, legs, sectors=min(sectors_of(d) for d in legs), **opts)
        names.append(name)
        wait_for_path(f"/dev/mapper/{name}")
        run(["udevadm", "settle"], check=False)
        return name

    yield factory
    for name in reversed(names):
        if run(["dmsetup", "info", name], check=False).returncode != 0:
            continue
        for _ in range(50):
            if run(["dmsetup", "remove", name], check=False).returncode == 0:
                break
            time.sleep(0.1)


def fio(*args: str, check: bool = True) -> dict:
    # verify_state_save=0: no *-verify.state files left in the working tree
    proc = run(["fio", "--output-format=json", "--verify_state_save=0", *args], check=False)
    out = proc.stdout[proc.stdout.find("{"):]
    result = json.loads(out) if out else {}
    if check:
        assert proc.returncode == 0, f"fio failed ({proc.returncode}): {proc.stderr}\n{proc.stdout[-2000:]}"
    return result


def fio_errors(result: dict) -> int:
    return sum(job.get("error", 0) for job in result.get("jobs", []))


def verify_while_flipping(dev: str, size_mb: int, max_bs: str, flip,
                          min_flips: int = 0, min_bs: str = "4k") -> tuple[dict, dict, int]:
    """Two checksummed fio write passes over `dev`, verifying as they go and
    at the end (4 KiB at queue depth 8, then min_bs..max_bs at 16, over half
    the size), while a thread calls flip(i) for i = 0, 1, ... until both
    end; the second pass is repeated (up to 5 times) until min_flips flips
    were made, however fast the machine; returns (pass 1, the last pass,
    flips made)."""
    stop = threading.Event()
    flips = [0]

    def flipper() -> None:
        while not stop.is_set():
            flip(flips[0])
            flips[0] += 1

    thread = threading.Thread(target=flipper, daemon=True)
    thread.start()
    try:
        r1 = fio("--name=verify", f"--filename={dev}", "--direct=1", "--ioengine=libaio",
                 "--iodepth=8", "--rw=randwrite", "--bs=4k", f"--size={size_mb}M",
                 "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                 "--verify_backlog=256", "--randrepeat=0")
        for _ in range(6):
            r2 = fio("--name=verify2", f"--filename={dev}", "--direct=1", "--ioengine=libaio",
                     "--iodepth=16", "--rw=randwrite", f"--bsrange={min_bs}-{max_bs}",
                     f"--size={size_mb // 2}M", "--verify=crc32c", "--do_verify=1",
                     "--verify_fatal=1", "--randrepeat=0")
            if flips[0] >= min_flips or fio_errors(r2):
                break
    finally:
        stop.set()
        thread.join()
    return r1, r2, flips[0]


def reload(name: str, table: str) -> None:
    run(["dmsetup", "load", name, "--table", table])
    run(["dmsetup", "suspend", "--noudevsync", name])
    run(["dmsetup", "resume", "--noudevsync", name])


def cmp_devices(a: str, b: str, nbytes: int) -> None:
    """The first nbytes of two devices are the same, as the devices hold
    them: their page caches go first (a leg written through the target
    below its own page cache keeps whatever a udev probe cached there)."""
    run(["blockdev", "--flushbufs", a, b])
    proc = run(f"cmp -n {nbytes} {a} {b}", check=False)
    assert proc.returncode == 0, f"{a} and {b} differ: {proc.stdout}{proc.stderr}"
