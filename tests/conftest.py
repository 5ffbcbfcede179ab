"""Host side of the test suite.

Tests marked `vm` (everything under tests/vm) need a real kernel. On the host
each of them is replaced by a proxy item; the first proxy to run boots the
test VM once, runs all selected VM tests inside it (iobridge.lab.vm.run_tests),
and every proxy then reports its own test's outcome from inside the VM. So a
single `pytest` run shows host and VM tests alike, one line each.
Inside the VM (IOBRIDGE_IN_VM=1) the real tests run instead.
"""

from __future__ import annotations

import os

import pytest

IN_VM = os.environ.get("IOBRIDGE_IN_VM") == "1"


class VmTestFailure(Exception):
    pass


class VmProxyItem(pytest.Item):
    """Stands on the host for one test that runs inside the VM."""

    def runtest(self):
        outcome = _vm_outcomes(self.session).get(self.nodeid)
        if outcome is None:
            suite = self.session.iobridge_vm_suite
            tail = "\n".join(suite.vm.tail[-25:]) if suite.vm else ""
            why = {"boot": "the guest never finished booting",
                   "panic": "the guest kernel panicked while booting",
                   "timeout": "the VM was killed at its time bound"}.get(
                       suite.vm.why, "the VM run ended without reporting it")
            raise VmTestFailure(f"{self.nodeid}: no outcome from the VM ({why}); "
                                f"console log {suite.log_path}; last console lines:\n{tail}")
        if outcome.outcome == "skipped":
            pytest.skip(f"skipped inside the VM: {outcome.longrepr}")
        if outcome.outcome != "passed":
            raise VmTestFailure(f"{outcome.outcome} inside the VM:\n{outcome.longrepr}")

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, VmTestFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"[vm] {self.name}"


def _vm_outcomes(session):
    if not hasattr(session, "iobridge_vm_suite"):
        from iobridge.lab import vm
        from iobridge.core.errors import IobridgeError

        nodeids = [item.nodeid for item in session.items if isinstance(item, VmProxyItem)]
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        capture = session.config.pluginmanager.get_plugin("capturemanager")

        def say(text):   # to the terminal, past pytest's output capture
            if reporter and capture:
                with capture.global_and_fixture_disabled():
                    reporter.write_line(text)

        say(f"\nbooting the test VM for {len(nodeids)} kernel-facing tests "
            "(the guest's console goes to a log file)...")
        try:
            session.iobridge_vm_suite = vm.run_tests(nodeids, quiet=True)
        except IobridgeError as err:
            raise VmTestFailure(f"could not run the VM tests: {err}") from None
        suite = session.iobridge_vm_suite
        first = suite.boot_to_first_test_s
        say(f"VM run finished in {suite.vm.seconds:.1f}s (boot to pytest start {first:.1f}s); "
            f"console log {suite.log_path}" if first is not None else
            f"VM run finished in {suite.vm.seconds:.1f}s without starting pytest; "
            f"console log {suite.log_path}")
    return session.iobridge_vm_suite.outcomes


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    if IN_VM:
        return
    for i, item in enumerate(items):
        if item.get_closest_marker("vm") is not None:
            proxy = VmProxyItem.from_parent(item.parent, name=item.name)
            proxy.add_marker(pytest.mark.vm)
            items[i] = proxy
