"""Host test: the wheel runs with no checkout.

Builds the wheel, installs it into a fresh venv made with
--system-site-packages outside the checkout (iobridge.lab.installed), and
from a directory outside the checkout runs `iobridge --version` and
`iobridge model check` on the default model inside the installed package.
The BPF sources, the ABI header and the models must be in the package, and
every path iobridge resolves (BPF source, header, default model) must lead
into it, not back to the checkout.
"""

from __future__ import annotations

import subprocess
import time
import zipfile

import pytest

import iobridge
from iobridge.core import resources
from iobridge.lab import installed as inst

# What the installed package must carry (paths under iobridge/_data/).
DATA_FILES = ("bpf/observer.bpf.c", "bpf/route_policy.bpf.c", "bpf/iobridge_bpf.h",
              "kmodule/iobridge_abi.h",
              "models/admission-default.onnx", "models/admission-default.card.json")
# What it must not: the kernel module's sources and build products.
NOT_SHIPPED = ("kmodule/dm-iobridge.c", "kmodule/dm-iobridge.ko", "kmodule/Makefile",
               "kmodule/Kbuild", "kmodule/iobridge_trace.h")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    t0 = time.monotonic()
    work = tmp_path_factory.mktemp("install")
    wheel = inst.build_wheel(work)
    venv = inst.make_venv(wheel, work / "venv")
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    print(f"wheel built and installed in {time.monotonic() - t0:.1f} s")
    return wheel, venv, elsewhere


def run(cmd, venv, cwd) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=venv.env())
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}: {proc.stdout}{proc.stderr}"
    return proc


def test_the_venv_is_outside_the_checkout(installed):
    _, venv, elsewhere = installed
    checkout = resources.checkout_root()
    assert checkout is not None
    for p in (venv.root, elsewhere):
        assert checkout not in p.resolve().parents


def test_wheel_carries_the_data_files(installed):
    wheel, venv, _ = installed
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    for rel in DATA_FILES:
        assert f"iobridge/_data/{rel}" in names, rel
        assert (venv.package / "_data" / rel).is_file(), rel
    for rel in NOT_SHIPPED:
        assert f"iobridge/_data/{rel}" not in names, rel
    assert not [n for n in names if n.startswith(("tests/", "agent/", "vm/"))]


def test_iobridge_imports_from_the_venv_not_the_checkout(installed):
    _, venv, elsewhere = installed
    where = venv.where(elsewhere)
    assert where["package"] == str(venv.package / "__init__.py"), where
    assert where["checkout"] == "None", where
    data = venv.package / "_data"
    assert where["bpf"] == str(data / "bpf" / "observer.bpf.c"), where
    assert where["abi_header"] == str(data / "kmodule" / "iobridge_abi.h"), where
    assert where["default_model"] == str(data / "models" / "admission-default.onnx"), where


def test_version_from_outside_the_checkout(installed):
    _, venv, elsewhere = installed
    proc = run([venv.iobridge, "--version"], venv, elsewhere)
    assert proc.stdout.strip() == f"iobridge {iobridge.__version__}"


def test_model_check_on_the_installed_default_model(installed):
    _, venv, elsewhere = installed
    model = venv.package / "_data" / "models" / "admission-default.onnx"
    proc = run([venv.iobridge, "model", "check", model], venv, elsewhere)
    assert proc.stdout.startswith(f"{model}: OK"), proc.stdout
