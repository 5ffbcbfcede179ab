"""The agent's prefetch unit with the learned prefetch model (issue 11), as
a separate `iobridge run --prefetch on` process on the VM kernel: it runs
the shipped model on a buffered sequential read of a file on a loop
device, and puts the device back on SIGTERM; an admission model given as
prefetch model stops the start with nothing attached; a scan whose
prefetched pages are used gets its device's readahead grown, to 1024 KiB
and no further."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import make_file
from test_agent import PIN_DIR, _free_port, _scrape, agents, iobridge, route_programs_attached, route_programs_left  # noqa: F401 (agents: a fixture)

from iobridge.daemon.config import DEFAULT_MODEL, DEFAULT_PREFETCH_MODEL
from iobridge.daemon.prefetch import KEEP_BEHIND_FRONT, MIN_DROP_PAGES

pytestmark = pytest.mark.vm

FILE_PAGES = 4096          # 16 MiB

# Reads the file from the start in 128 KiB reads, again and again, its
# pages dropped before each pass so every pass inserts them anew.
READER = textwrap.dedent("""
    import os, sys, time
    while True:
        fd = os.open(sys.argv[1], os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while os.read(fd, 128 << 10):
            time.sleep(0.01)
        os.close(fd)
""")


def test_an_admission_model_as_prefetch_model_is_refused(iobridge_module):
    attached = route_programs_attached()
    t0 = time.monotonic()
    proc = iobridge("run", "--prefetch", "on", "--prefetch-model", str(DEFAULT_MODEL),
                    "--duration", "5")
    print(f"refused in {time.monotonic() - t0:.1f} s: {proc.stderr.strip()}")
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "model of the wrong kind: an admission model" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert route_programs_left(attached) == [] and not PIN_DIR.exists()


@pytest.mark.timeout(900)   # an agent start: BCC under TCG, slower on a busy host
def test_the_agent_runs_the_learned_model_and_restores_on_stop(iobridge_module, agents, ext4,
                                                               tmp_path):
    orig = ext4.ra.read_text().strip()
    path = ext4.mnt / "scan"
    make_file(path, FILE_PAGES)
    state = tmp_path / "prefetch-state.json"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[prefetch]\nstate_file = "{state}"\n')     # the model: the default
    port = _free_port()
    t0 = time.monotonic()
    agent = agents("--config", str(cfg), "--prefetch", "on", "--metrics-listen", f"127.0.0.1:{port}")
    start_s = time.monotonic() - t0
    reader = subprocess.Popen([sys.executable, "-c", READER, str(path)])
    try:
        t1 = time.monotonic()
        st = agent.wait_status(lambda s: s["prefetch"].get("running")
                               and s["prefetch"]["counters"]["classified"] >= 1, timeout_s=180)
        classified_s = time.monotonic() - t1
        metrics = _scrape(port)
        try:      # what it did, for the record; the model's choice is not under test
            st = agent.wait_status(lambda s: s["prefetch"]["counters"]["actions"] >= 1,
                                   timeout_s=20)
        except Exception as err:      # noqa: BLE001
            print(f"no action within 20 s: {str(err)[:200]}")
        running_kb = ext4.ra.read_text().strip()
        text = iobridge("status", "--status-file", str(agent.status_file))
    finally:
        reader.kill()
        reader.wait()
    pf = st["prefetch"]
    print(f"agent start {start_s:.1f} s; first classified window after {classified_s:.1f} s; "
          f"read_ahead_kb {orig} -> {running_kb} while running")
    print("status:", json.dumps({k: pf[k] for k in ("mode", "classifier_info", "counters",
                                                    "streams_per_class", "changed_devices")}))
    print(text.stdout)
    card = json.loads((DEFAULT_PREFETCH_MODEL.parent / "prefetch-default.card.json").read_text())
    assert pf["mode"] == "on" and pf["running"]
    assert pf["classifier_info"] == {"name": "learned:prefetch-default.onnx",
                                     "path": str(DEFAULT_PREFETCH_MODEL),
                                     "sha256": card["model_sha256"]}
    assert pf["classifier"].startswith(f"ONNX prefetch model {DEFAULT_PREFETCH_MODEL}")
    assert text.returncode == 0, text.stderr
    assert "classifier learned:prefetch-default.onnx: model " in text.stdout
    # Metrics (issue 13): the unit's counters, and the kernel's page-cache
    # counters of the file's device as of the unit's last window: the
    # reader's passes read its pages and, dropped before each, insert them.
    dev = "%d:%d" % (os.major(path.stat().st_dev), os.minor(path.stat().st_dev))
    print("metrics:", {k: v for k, v in metrics.items() if "prefetch" in k or dev in k})
    assert metrics[f'iobridge_prefetch_info{{classifier="learned:prefetch-default.onnx",'
                   f'mode="on",sha256="{card["model_sha256"]}"}}'] == 1
    assert metrics["iobridge_prefetch_windows_total"] >= 1
    for name in ("reads", "insertions"):
        assert metrics[f'iobridge_pagecache_{name}_total{{dev="{dev}"}}'] > 0, name
    assert f"prefetch classifier learned:prefetch-default.onnx (sha256 " \
           f"{card['model_sha256'][:12]})" in agent.log()

    assert agent.stop() == 0, agent.log()[-2000:]
    assert ext4.ra.read_text().strip() == orig, "read_ahead_kb restored on stop"
    assert not state.exists()
    assert not PIN_DIR.exists() and not agent.status_file.exists()


# A slower scan of a larger file for the growth test: 64 KiB reads, 10 ms
# apart (at most 6.4 MB/s), so one pass of 64 MiB spans ten windows or more
# and few windows see the scan come round to the file's start.
SLOW_READER = READER.replace("128 << 10", "64 << 10")
SLOW_FILE_PAGES = 16384    # 64 MiB of the fixture's 96


@pytest.mark.timeout(900)   # an agent start: BCC under TCG, slower on a busy host
def test_a_sequential_scan_whose_readahead_is_used_gets_more_of_it(iobridge_module, agents,
                                                                   ext4, tmp_path):
    """The feedback rule that grows readahead, on the kernel's own counters:
    with the rule classifier (sequential class 320 KiB) a scan whose
    prefetched pages are used takes the device past the class's value (to
    1024 KiB in the window that shows it) and never past 1024; stop puts the
    device back. The same scan, not re-read, is dropped behind between
    windows too: each drop ends KEEP_BEHIND_FRONT readaheads below the front
    the observer's open window showed, and starts where the last ended."""
    orig = ext4.ra.read_text().strip()
    path = ext4.mnt / "scan"
    make_file(path, SLOW_FILE_PAGES)
    state = tmp_path / "prefetch-state.json"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[prefetch]\nmodel = "rules"\nstate_file = "{state}"\n')
    agent = agents("--config", str(cfg), "--prefetch", "on", verbose=2)   # debug: each change
    agent.wait_status(lambda s: s["prefetch"].get("running"), timeout_s=180)
    reader = subprocess.Popen([sys.executable, "-c", SLOW_READER, str(path)])
    seen = []
    try:
        end, capped_at = time.monotonic() + 90, None
        # until 3 windows past the first 1024 (none may go further), or 90 s
        while time.monotonic() < (end if capped_at is None else capped_at + 3):
            kb = int(ext4.ra.read_text())
            if not seen or seen[-1] != kb:
                seen.append(kb)
            if kb >= 1024 and capped_at is None:
                capped_at = time.monotonic()
            time.sleep(0.2)
    finally:
        reader.kill()
        reader.wait()
    st = agent.wait_status(lambda s: "prefetch" in s, timeout_s=30)
    errors = st["prefetch"]["counters"]["errors"]
    changes = [line for line in agent.log().splitlines() if "device_ra" in line]
    grown = [line for line in changes if "readahead grown to 1024 KiB" in line]
    print(f"read_ahead_kb {orig} -> {' -> '.join(map(str, seen))}")
    print("\n".join(changes[:12]))     # every device change, with its reason
    assert 1024 in seen and max(seen) == 1024, seen
    assert grown and "prefetched pages used, none evicted unused" in grown[0], grown
    # every drop, at a window or between windows: (between?, first, pages, front, kept)
    drops = [(m[3] is not None, int(m[1]), int(m[2]), int(m[4]), int(m[5])) for m in
             re.finditer(r"dontneed None -> dontneed pages (\d+)\+(\d+): "
                         r"(drop-behind between windows)?[^\n]*?readahead front at page "
                         r"(\d+), (\d+) pages kept below it", agent.log())]
    print(f"{len(drops)} drops, {sum(d[0] for d in drops)} between windows; "
          f"(between, first, pages, front, kept): {drops[:6]}")
    assert any(d[0] for d in drops), "a scan not re-read is dropped behind between windows"
    for _, first, pages, front, kept in drops:
        assert pages >= MIN_DROP_PAGES and first + pages == front - kept
        assert kept % KEEP_BEHIND_FRONT == 0       # that many of the device's readahead
    for (_, f0, n0, *_), (_, f1, *_) in zip(drops, drops[1:]):
        assert f1 in (f0 + n0, 0), (f0, n0, f1)    # where the last ended, or a new pass
    assert errors == 0
    assert agent.stop() == 0, agent.log()[-2000:]
    assert ext4.ra.read_text().strip() == orig, "read_ahead_kb restored on stop"
    assert not state.exists()
