"""Host test: the wheel runs with no checkout.

Builds the wheel, installs it into a fresh venv made with
--system-site-packages outside the checkout (tests/install_helpers.py), and
from a directory outside the checkout runs `iobridge --version` and
`iobridge model check` on the default model inside the installed package.
The BPF sources, the ABI header and the models must be in the package, and
every path iobridge resolves (BPF source, header, default model) must lead
into it, not back to the checkout.
"""

from __future__ import annotations

import time

import pytest

import iobridge
from install_helpers import (CHECKOUT, DATA_FILES, NOT_SHIPPED, build_wheel, install, run,
                             wheel_names, where_is_iobridge)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    t0 = time.monotonic()
    work = tmp_path_factory.mktemp("install")
    wheel = build_wheel(work)
    venv = install(wheel, work / "venv")
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    print(f"wheel built and installed in {time.monotonic() - t0:.1f} s")
    return wheel, venv, elsewhere


def test_the_venv_is_outside_the_checkout(installed):
    _, venv, elsewhere = installed
    for p in (venv.root, elsewhere):
        assert CHECKOUT not in p.resolve().parents


def test_wheel_carries_the_data_files(installed):
    wheel, venv, _ = installed
    names = wheel_names(wheel)
    for rel in DATA_FILES:
        assert f"iobridge/_data/{rel}" in names, rel
        assert (venv.package / "_data" / rel).is_file(), rel
    for rel in NOT_SHIPPED:
        assert f"iobridge/_data/{rel}" not in names, rel
    assert not [n for n in names if n.startswith(("tests/", "agent/", "vm/"))]


def test_iobridge_imports_from_the_venv_not_the_checkout(installed):
    _, venv, elsewhere = installed
    where = where_is_iobridge(venv, elsewhere)
    assert where["package"] == str(venv.package / "__init__.py"), where
    assert where["checkout"] == "None", where
    data = venv.package / "_data"
    assert where["bpf"] == str(data / "bpf" / "observer.bpf.c"), where
    assert where["abi_header"] == str(data / "kmodule" / "iobridge_abi.h"), where
    assert where["default_model"] == str(data / "models" / "admission-default.onnx"), where


def test_version_from_outside_the_checkout(installed):
    _, venv, elsewhere = installed
    proc = run([venv.iobridge, "--version"], cwd=elsewhere, env=venv.env())
    assert proc.stdout.strip() == f"iobridge {iobridge.__version__}"


def test_model_check_on_the_installed_default_model(installed):
    _, venv, elsewhere = installed
    model = venv.package / "_data" / "models" / "admission-default.onnx"
    proc = run([venv.iobridge, "model", "check", model], cwd=elsewhere, env=venv.env())
    assert proc.stdout.startswith(f"{model}: OK"), proc.stdout
