"""How many kernels' VM suites the host-side pytest boots at once
(tests/conftest.py vm_parallel): pure logic, no VM."""

import pytest
from conftest import vm_parallel

KERNELS = ["6.1.0-56-amd64", "6.12.118+deb12-amd64"]


def test_a_vm_per_host_cpu_by_default_and_never_more_than_the_kernels(monkeypatch):
    monkeypatch.delenv("IOBRIDGE_VM_PARALLEL", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert vm_parallel(KERNELS) == 2
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert vm_parallel(KERNELS) == 1
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert vm_parallel(KERNELS[:1]) == 1


def test_the_environment_chooses_and_bad_values_are_named(monkeypatch):
    monkeypatch.setenv("IOBRIDGE_VM_PARALLEL", "1")
    assert vm_parallel(KERNELS) == 1
    monkeypatch.setenv("IOBRIDGE_VM_PARALLEL", "8")
    assert vm_parallel(KERNELS) == 2
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("IOBRIDGE_VM_PARALLEL", bad)
        with pytest.raises(pytest.UsageError, match="IOBRIDGE_VM_PARALLEL"):
            vm_parallel(KERNELS)
