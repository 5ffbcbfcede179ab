"""Host side of the test suite.

Tests marked `vm` (everything under tests/vm) need a real kernel. On the host
each of them is replaced by one proxy item per VM kernel (vm_kernels():
every kernel line in vm/kernel-release, Debian 12's 6.1 and 6.12, by
default; $IOBRIDGE_KERNELS, space- or comma-separated, chooses). The first
VM proxy boots one test VM per kernel, as many at once as vm_parallel()
says, each running all selected VM tests inside (iobridge.lab.vm.run_tests);
every proxy then reports its own test's outcome on its kernel. So a single `pytest` run shows host and VM
tests alike, one line per test and kernel ("test_x[6.12.118+deb12-amd64]").
Inside the VM (IOBRIDGE_IN_VM=1) the real tests run instead.
"""

from __future__ import annotations

import os

import pytest

IN_VM = os.environ.get("IOBRIDGE_IN_VM") == "1"


class VmTestFailure(Exception):
    pass


def vm_kernels() -> list[str]:
    """The kernels the VM tests run on: $IOBRIDGE_KERNELS or $IOBRIDGE_KERNEL
    (releases, space- or comma-separated), else every line in
    vm/kernel-release ("all" says the same). The test suite boots under
    single-threaded TCG (iobridge.lab.vm.tcg_threads() says why)."""
    from iobridge.lab import vm
    chosen = os.environ.get("IOBRIDGE_KERNELS") or os.environ.get("IOBRIDGE_KERNEL") or ""
    if chosen.strip() in ("", "all"):
        return vm.kernel_releases()
    return chosen.replace(",", " ").split()


class VmProxyItem(pytest.Item):
    """Stands on the host for one test that runs inside the VM on one kernel."""

    def __init__(self, *, guest_nodeid: str, kernel: str, **kw):
        super().__init__(**kw)
        self.guest_nodeid = guest_nodeid     # the test's id inside the guest
        self.kernel = kernel

    def runtest(self):
        outcome = _vm_outcomes(self.session, self.kernel).get(self.guest_nodeid)
        if outcome is None:
            suite = self.session.iobridge_vm_suites[self.kernel]
            tail = "\n".join(suite.vm.tail[-25:]) if suite.vm else ""
            why = {"boot": "the guest never finished booting",
                   "panic": "the guest kernel panicked while booting",
                   "timeout": "the VM was killed at its time bound",
                   "livelock": "the guest kernel locked up and the VM was killed",
                   "silent": "the guest fell silent for longer than any test may run "
                             "and the VM was killed"}.get(
                       suite.vm.why, "the VM run ended without reporting it")
            raise VmTestFailure(f"{self.nodeid}: no outcome from the VM on {self.kernel} ({why}); "
                                f"console log {suite.log_path}; last console lines:\n{tail}")
        if outcome.outcome == "skipped":
            pytest.skip(f"skipped inside the VM: {outcome.longrepr}")
        if outcome.outcome != "passed":
            raise VmTestFailure(f"{outcome.outcome} inside the VM on {self.kernel}:\n"
                                f"{outcome.longrepr}")

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, VmTestFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"[vm] {self.name}"


def vm_parallel(kernels: list[str]) -> int:
    """How many kernels' suites boot at once: $IOBRIDGE_VM_PARALLEL, else
    every kernel's when the host has a CPU per VM (each test VM is one
    single-threaded TCG thread), else one at a time. Why: one after the
    other, the suites had come to take 82 of CI's 90 min on a 2-core host,
    and a run past the bound failed; side by side there, 53 min for both."""
    chosen = os.environ.get("IOBRIDGE_VM_PARALLEL", "").strip()
    if chosen:
        if not chosen.isdigit() or int(chosen) < 1:
            raise pytest.UsageError(f"IOBRIDGE_VM_PARALLEL={chosen!r}: expected a whole number >= 1")
        return min(int(chosen), len(kernels))
    return max(1, min(len(kernels), os.cpu_count() or 1))


def _vm_outcomes(session, kernel: str):
    """The outcomes of `kernel`'s suite. The first call boots every kernel's
    suite (vm_parallel() of them at once, in threads that only wait on
    their QEMU) and then waits for this kernel's."""
    suites = session.__dict__.setdefault("iobridge_vm_suites", {})
    if kernel in suites:
        return suites[kernel].outcomes
    from concurrent.futures import ThreadPoolExecutor

    from iobridge.core.errors import IobridgeError
    from iobridge.lab import vm

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    capture = session.config.pluginmanager.get_plugin("capturemanager")

    def say(text):   # to the terminal, past pytest's output capture (main thread only)
        if reporter and capture:
            with capture.global_and_fixture_disabled():
                reporter.write_line(text)

    runs = session.__dict__.setdefault("iobridge_vm_runs", {})
    if not runs:
        kernels = list(dict.fromkeys(item.kernel for item in session.items
                                     if isinstance(item, VmProxyItem)))
        at_once = vm_parallel(kernels)
        pool = ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="vm")
        for k in kernels:
            nodeids = [item.guest_nodeid for item in session.items
                       if isinstance(item, VmProxyItem) and item.kernel == k]
            runs[k] = pool.submit(vm.run_tests, nodeids, quiet=True, kernel=k)
        pool.shutdown(wait=False)
        say(f"\nbooting the test VM on {', '.join(kernels)}, {at_once} at a time, "
            f"for {len(nodeids)} kernel-facing tests each (the guests' consoles go to log "
            "files)...")
    try:
        suites[kernel] = runs[kernel].result()
    except IobridgeError as err:
        raise VmTestFailure(f"could not run the VM tests on {kernel}: {err}") from None
    suite = suites[kernel]
    first = suite.boot_to_first_test_s
    say(f"VM run on {kernel} finished in {suite.vm.seconds:.1f}s (boot to pytest start "
        f"{first:.1f}s); console log {suite.log_path}" if first is not None else
        f"VM run on {kernel} finished in {suite.vm.seconds:.1f}s without starting pytest; "
        f"console log {suite.log_path}")
    return suite.outcomes


def _proxy_name(name: str, kernel: str) -> str:
    """test_x -> test_x[KERNEL]; test_x[param] -> test_x[param-KERNEL]."""
    return f"{name[:-1]}-{kernel}]" if name.endswith("]") else f"{name}[{kernel}]"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    if IN_VM:
        return
    host = [item for item in items if item.get_closest_marker("vm") is None]
    guest = [item for item in items if item.get_closest_marker("vm") is not None]
    if not guest:
        return
    proxies = []
    kernels = vm_kernels()
    vm_parallel(kernels)             # a bad IOBRIDGE_VM_PARALLEL stops the run here
    for kernel in kernels:           # each kernel's tests together: one VM boot each
        for item in guest:
            proxy = VmProxyItem.from_parent(item.parent, name=_proxy_name(item.name, kernel),
                                            guest_nodeid=item.nodeid, kernel=kernel)
            proxy.add_marker(pytest.mark.vm)
            proxies.append(proxy)
    items[:] = host + proxies
