"""pytest plugin used inside the test VM: one JSON line per finished test.

The host reads the lines from $IOBRIDGE_VM_RESULTS (a directory shared with
the guest) and reports each VM test's outcome as its own.
"""

import json
import os
import time

_PATH = os.environ.get("IOBRIDGE_VM_RESULTS")


def _emit(record: dict) -> None:
    if not _PATH:
        return
    with open(_PATH, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def pytest_sessionstart(session):
    _emit({"event": "start", "time": time.time()})


def pytest_runtest_logreport(report):
    # A test's outcome is its call phase, or the first setup/teardown phase
    # that did not pass.
    if report.when == "call" or (report.when in ("setup", "teardown") and not report.passed):
        outcome = report.outcome
        if report.when != "call" and report.failed:
            outcome = "error"
        longrepr = str(report.longrepr) if report.longrepr else ""
        if report.failed and report.capstdout:
            # What a failing test printed (its measured figures) is often
            # what explains the failure; the host shows only this record.
            longrepr += "\n----- captured stdout (last 6000 characters) -----\n"
            longrepr += report.capstdout[-6000:]
        _emit({"nodeid": report.nodeid, "phase": report.when, "outcome": outcome,
               "seconds": round(report.duration, 3), "time": time.time(),
               "longrepr": longrepr})
