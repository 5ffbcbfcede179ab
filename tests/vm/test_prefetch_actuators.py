"""The prefetch actuators on the real kernel (kernel/readahead.py driven by
the prefetch unit, daemon/prefetch.py, with the real page-cache observer):
a process holding a file open and reading it sequentially is set to RANDOM
through pidfd_getfd + fadvise, after which the observer sees no readahead
for it; the device's read_ahead_kb is changed and put back on stop, and
after a kill -9 from the record at the next start; a process that exits
mid-decision is not an error; non-root is refused with nothing changed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import make_file

import iobridge
from iobridge.core import cachestat_abi as cabi
from iobridge.daemon import prefetch as P
from iobridge.kernel import cachestat as cs
from iobridge.kernel import readahead as RA
from iobridge.core.prefetch_rules import RuleClassifier

PAGE = 4096
CHUNK = 128 << 10
STEP = 512                 # pages read per phase (2 MiB)
PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(iobridge.__file__)))
ENV = {**os.environ, "PYTHONPATH": PKG_ROOT}

# A reader that holds the file open and reads the next N pages, in 128 KiB
# reads, on each "N" line; it answers "ok".
READER = textwrap.dedent("""
    import os, sys
    fd = os.open(sys.argv[1], os.O_RDONLY)
    print(fd, flush=True)
    for line in sys.stdin:
        left = int(line) * 4096
        while left > 0:
            got = len(os.read(fd, min(left, 128 << 10)))
            if not got:
                break
            left -= got
        print("ok", flush=True)
""")


class Reader:
    def __init__(self, path):
        self.proc = subprocess.Popen([sys.executable, "-c", READER, str(path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.fd = int(self.proc.stdout.readline())
        self.pid = self.proc.pid

    def read(self, pages: int) -> None:
        self.proc.stdin.write(f"{pages}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def observer():
    with cs.CacheObserver() as obs:
        print(f"cachestat compile time in the VM: {obs.compile_seconds:.1f}s; {obs.hooks}")
        yield obs


def delta(obs, key, action) -> dict:
    before = obs.snapshot()[1].get(key, cs.Counters.empty())
    action()
    return obs.snapshot()[1].get(key, cs.Counters.empty()).minus(before).values


def ra_kb(ra) -> int:
    return int(ra.read_text())


def test_random_advice_stops_the_readers_readahead_and_stop_restores(observer, ext4, tmp_path):
    orig = ra_kb(ext4.ra)
    path = ext4.mnt / "scan"
    key = (ext4.dev, make_file(path, 4 * STEP))
    state = tmp_path / "state.json"
    r = Reader(path)
    try:
        before = delta(observer, key, lambda: r.read(STEP))
        print("sequential, as opened:", before)
        assert before["ra_pages"] >= STEP * 0.8 and before["ra_windows"][cabi.RA_ASYNC] >= 1

        unit = P.PrefetchUnit(None, RuleClassifier(), "on", state,
                              force={key: "random", ext4.dev: "sequential"})
        unit.start(observer)
        acts = unit.step()
        print("actions:", [a.line() for a in acts])
        assert {(a.kind, a.key, a.new) for a in acts} >= {("device_ra", ext4.dev, 320),
                                                          ("advise", key, "random")}
        assert ra_kb(ext4.ra) == 320
        rec = json.loads(state.read_text())
        assert rec["devices"] == {"%d:%d" % cs.blockdev.kdev_split(ext4.dev):
                                  {"dev": ext4.dev, "read_ahead_kb": orig}}
        assert rec["files"][f"{r.pid}:{r.fd}"]["advice"] == "random"
        assert unit.counters["file_advice"] == 1 and unit.counters["errors"] == 0

        after = delta(observer, key, lambda: r.read(STEP))
        print("after RANDOM:", after)
        assert after["reads"] == STEP
        assert after["ra_pages"] == 0, "nothing read beyond what the reader asked for"
        assert after["ra_windows"][cabi.RA_ASYNC] == 0

        done = unit.stop()
        assert done == {"devices": 1, "files": 1, "gone": 0, "failed": 0}
        assert ra_kb(ext4.ra) == orig and not state.exists()
        again = delta(observer, key, lambda: r.read(STEP))
        print("after restore:", again)
        assert again["ra_pages"] >= STEP * 0.8, "NORMAL again: readahead is back"
    finally:
        r.close()


def test_random_alone_does_not_stop_a_scan_under_way(observer, ext4):
    """Why RANDOM advice also drops the pages just ahead of the reader: on
    its own, FADV_RANDOM changes only what a miss does; the running scan
    keeps hitting its window's PG_readahead mark and async readahead opens
    the next window (page_cache_async_ra checks only ra_pages)."""
    path = ext4.mnt / "chain"
    key = (ext4.dev, make_file(path, 4 * STEP))
    r = Reader(path)
    try:
        r.read(STEP)
        RA.Actuators().advise(r.pid, r.fd, key, "random", ahead_pages=0)
        alone = delta(observer, key, lambda: r.read(STEP))
        print("RANDOM without dropping ahead:", alone)
        assert alone["ra_windows"][cabi.RA_ASYNC] >= 1 and alone["ra_pages"] >= STEP * 0.5
    finally:
        r.close()


KILLED_AGENT = textwrap.dedent("""
    import sys
    from iobridge.daemon import prefetch as P
    from iobridge.core.prefetch_rules import RuleClassifier
    dev, ino, state = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    # the real actuators; no observer: forced decisions need no window
    unit = P.PrefetchUnit(None, RuleClassifier(), "on", state,
                          force={(dev, ino): "random", dev: "reverse"})
    unit.prepare()
    unit.apply(unit.decider.decide({}, {}, {dev: unit.act.read_ahead_kb(dev)}, unit.force))
    print("applied", unit.counters["errors"], flush=True)
    sys.stdin.read()
""")


def test_after_kill_9_the_next_start_restores_from_the_record(observer, ext4, tmp_path):
    orig = ra_kb(ext4.ra)
    path = ext4.mnt / "scan"
    key = (ext4.dev, make_file(path, 4 * STEP))
    state = tmp_path / "state.json"
    r = Reader(path)
    agent = subprocess.Popen([sys.executable, "-c", KILLED_AGENT, str(ext4.dev), str(key[1]),
                              str(state)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=ENV)
    try:
        r.read(STEP)
        assert agent.stdout.readline().split() == ["applied", "0"]
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        assert ra_kb(ext4.ra) == 480 and state.exists()
        killed = delta(observer, key, lambda: r.read(STEP))
        print("RANDOM left by the killed agent:", killed)
        assert killed["ra_pages"] == 0

        unit = P.PrefetchUnit(None, RuleClassifier(), "on", state)
        unit.prepare()                      # what the agent's start does first
        assert ra_kb(ext4.ra) == orig and not state.exists()
        assert unit.counters["restored_devices"] == 1 and unit.counters["restored_files"] == 1
        again = delta(observer, key, lambda: r.read(STEP))
        print("after the restart's restore:", again)
        assert again["ra_pages"] >= STEP * 0.8
    finally:
        if agent.poll() is None:
            agent.kill()
        r.close()


def test_a_process_that_exits_mid_decision_is_not_an_error(observer, ext4, tmp_path, caplog):
    orig = ra_kb(ext4.ra)
    path = ext4.mnt / "gone"
    key = (ext4.dev, make_file(path, STEP))
    r = Reader(path)

    class ExitsAfterTheScan(RA.Actuators):
        def holders(self, keys):
            found = super().holders(keys)
            r.close()                     # the holder exits between scan and fadvise
            return found

    unit = P.PrefetchUnit(None, RuleClassifier(), "on", tmp_path / "state.json",
                          actuators=ExitsAfterTheScan(), force={key: "random"})
    unit.start(observer)
    with caplog.at_level("DEBUG", logger="iobridge.prefetch"):
        acts = unit.step()
    # (other files of the fresh file system may have windows too: on 6.12
    # an inode of ext4's own got one, classified random, held by no process)
    assert [(a.kind, a.new) for a in acts if a.key == key] == [("advise", "random")]
    assert unit.counters["gone"] >= 1 and unit.counters["errors"] == 0
    assert unit.counters["file_advice"] == 0
    assert f"process {r.pid} has exited" in caplog.text
    assert not (tmp_path / "state.json").exists()     # nothing changed, nothing recorded
    assert unit.stop() == {"devices": 0, "files": 0, "gone": 0, "failed": 0}
    assert ra_kb(ext4.ra) == orig


def test_non_root_is_refused_and_nothing_changes(ext4, tmp_path):
    orig = ra_kb(ext4.ra)
    os.chmod(tmp_path, 0o777)
    code = ("from iobridge.daemon import prefetch as P\n"
            "from iobridge.core.prefetch_rules import RuleClassifier\n"
            f"u = P.PrefetchUnit(None, RuleClassifier(), 'on', '{tmp_path}/s.json', "
            f"force={{{ext4.dev}: 'reverse'}})\n"
            "import sys\n"
            "try:\n    u.prepare()\nexcept Exception as e:\n    print(e, file=sys.stderr); sys.exit(1)\n")
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert proc.returncode == 1
    assert proc.stderr.startswith("the prefetch actuators need root"), proc.stderr
    assert ra_kb(ext4.ra) == orig and not (tmp_path / "s.json").exists()


def test_a_read_only_sysfs_attribute_is_named_and_leaves_no_record(ext4, tmp_path):
    """The kernel refusing a sysfs write (a read-only attribute stands in for
    read_ahead_kb: root opens it for writing and kernfs says EACCES)."""
    orig = ra_kb(ext4.ra)

    class ReadOnly(RA.Actuators):
        def ra_path(self, d):
            return ext4.ra.parent / "hw_sector_size"

    with pytest.raises(cs.IobridgeError, match=r"cannot set read_ahead_kb of device \d+:\d+ "
                                                r"\(.*hw_sector_size\): Permission denied"):
        ReadOnly().set_read_ahead_kb(ext4.dev, 64)
    unit = P.PrefetchUnit(None, RuleClassifier(), "on", tmp_path / "state.json",
                          actuators=ReadOnly())
    unit.apply([P.Action("device_ra", ext4.dev, orig, 64, "test")])
    assert unit.counters["errors"] == 1 and not (tmp_path / "state.json").exists()
    assert ra_kb(ext4.ra) == orig
