"""Host checks, device resolution and the CLI's error handling (no root, no kernel)."""

import collections
import os
import shlex
import time
from pathlib import Path

import pytest

from iobridge.kernel import blockdev
from iobridge.kernel import system
from iobridge.lab import vm
from iobridge.cli import build_parser, main
from iobridge.core.errors import IobridgeError, UsageError


def test_non_root_gets_one_clear_line(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(IobridgeError, match="needs root") as err:
        system.require_root("observing block I/O")
    assert "sudo" in str(err.value)


def test_old_kernel_is_unsupported(tmp_path):
    with pytest.raises(IobridgeError, match=r"kernel 4\.19\.0-foo is not supported.*5\.8"):
        system.require_bpf_kernel("4.19.0-foo", modules_root=tmp_path)


def test_missing_headers_name_the_package(tmp_path):
    with pytest.raises(IobridgeError, match="install linux-headers-6.1.0-99-amd64"):
        system.require_bpf_kernel("6.1.0-99-amd64", modules_root=tmp_path)
    (tmp_path / "6.1.0-99-amd64" / "build").mkdir(parents=True)
    system.require_bpf_kernel("6.1.0-99-amd64", modules_root=tmp_path)


def test_kdev_encoding_is_the_kernels():
    assert blockdev.kdev(8, 16) == (8 << 20) | 16
    assert blockdev.kdev_split(blockdev.kdev(259, 3)) == (259, 3)


def _fake_sysfs(tmp_path):
    for name, dev in (("sda", "8:0"), ("nullb0", "250:0")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "dev").write_text(dev + "\n")
    return tmp_path


def test_resolve_by_name_and_number(tmp_path):
    sysfs = _fake_sysfs(tmp_path)
    assert blockdev.resolve("nullb0", sysfs) == blockdev.BlockDev("nullb0", 250, 0)
    assert blockdev.resolve("8:0", sysfs).name == "sda"


@pytest.mark.parametrize("spec,message", [
    ("nosuch", "no block device named 'nosuch'"),
    ("9:9", "no block device with number 9:9"),
    ("/dev/does-not-exist", "no such device: /dev/does-not-exist"),
    ("/etc/hostname", "is not a block device"),
    ("", "empty device name"),
])
def test_resolve_rejects_bad_devices(tmp_path, spec, message):
    with pytest.raises(IobridgeError, match=message):
        blockdev.resolve(spec, _fake_sysfs(tmp_path))


def test_missing_vm_kernel_names_the_packages():
    with pytest.raises(IobridgeError) as err:
        vm.find_kernel("6.1.0-999-amd64")
    text = str(err.value)
    assert "linux-image-6.1.0-999-amd64-unsigned" in text
    assert "linux-headers-6.1.0-999-amd64" in text
    assert "make setup" in text


def test_the_pinned_kernels_are_debian_12s_two_lines_6_1_first():
    releases = vm.kernel_releases()
    assert len(releases) == 2, releases
    assert releases[0].startswith("6.1.0-") and releases[0].endswith("-amd64")
    assert releases[1].startswith("6.12.") and releases[1].endswith("+deb12-amd64")
    assert vm.pinned_release() == releases[0]


def test_kernel_releases_skip_comments_and_blank_lines(tmp_path):
    (tmp_path / "kernel-release").write_text("# the VM kernels\n\n6.1.0-56-amd64   # 6.1\n"
                                             "6.12.118+deb12-amd64\n")
    assert vm.kernel_releases(tmp_path) == ["6.1.0-56-amd64", "6.12.118+deb12-amd64"]
    (tmp_path / "kernel-release").write_text("# nothing\n")
    with pytest.raises(IobridgeError, match="names no kernel release"):
        vm.kernel_releases(tmp_path)


def test_observe_arguments_parse_with_documented_defaults():
    args = build_parser().parse_args(["observe", "--dev", "sda", "--dev", "8:16"])
    assert args.dev == ["sda", "8:16"] and args.interval == 1.0 and args.count is None
    assert args.probe == "auto" and not args.json


def test_vm_run_keeps_the_guest_command_verbatim():
    args = build_parser().parse_args(["vm", "run", "--timeout", "30", "--", "ls", "-l", "/"])
    assert args.command == ["--", "ls", "-l", "/"] and args.timeout == 30


# (--interval 0 and --count -1 are usage errors of the parser: test_cli_ranges.py)
@pytest.mark.parametrize("argv,message", [
    (["observe", "--dev", "nosuchdisk"], "no block device named 'nosuchdisk'"),
])
def test_bad_observe_input_is_one_line_and_nonzero(capsys, argv, message):
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("iobridge: error: ")


def test_vm_run_without_a_command_is_a_usage_error(capsys):
    assert main(["vm", "run"]) == 2
    assert "no command given" in capsys.readouterr().err


def test_guest_command_stays_off_the_kernel_command_line(tmp_path):
    # virtme-ng passes --exec on the kernel command line (2048 bytes on x86):
    # however long the command, only a short line to a script goes there.
    long_cmd = ["pytest"] + [f"tests/vm/test_x.py::test_{i:04d}_with_a_long_name" for i in range(300)]
    line = vm._write_guest_script(long_cmd, tmp_path)
    assert len(line) < 200
    script = (tmp_path / "guest-command.sh").read_text()
    assert "tests/vm/test_x.py::test_0299_with_a_long_name" in script
    assert str(vm.GUEST_PRELUDE) in script


def test_a_fallback_kernel_recorded_by_setup_wins_over_the_pin(tmp_path):
    (tmp_path / "kernel-release").write_text("6.1.0-56-amd64\n")
    assert vm.pinned_release(tmp_path) == "6.1.0-56-amd64"
    (tmp_path / "kernel-release.local").write_text("6.1.0-60-amd64\n6.12.120+deb12-amd64\n")
    assert vm.pinned_release(tmp_path) == "6.1.0-60-amd64"
    assert vm.kernel_releases(tmp_path) == ["6.1.0-60-amd64", "6.12.120+deb12-amd64"]


def test_tcg_threading_is_single_for_tests_and_from_6_12_unless_the_environment_says(
        monkeypatch):
    monkeypatch.delenv("IOBRIDGE_VM_TCG_THREADS", raising=False)
    assert vm.tcg_threads("6.1.0-41-amd64") == "multi"
    assert vm.tcg_threads("6.1.0-41-amd64", tests=True) == "single"
    assert vm.tcg_threads("6.12.118+deb12-amd64") == "single"
    assert vm.tcg_threads("6.12.118+deb12-amd64", tests=True) == "single"
    monkeypatch.setenv("IOBRIDGE_VM_TCG_THREADS", "multi")
    assert vm.tcg_threads("6.12.118+deb12-amd64") == "multi"
    assert vm.tcg_threads("6.1.0-41-amd64", tests=True) == "multi"
    monkeypatch.setenv("IOBRIDGE_VM_TCG_THREADS", "single")
    assert vm.tcg_threads("6.1.0-41-amd64") == "single"
    monkeypatch.setenv("IOBRIDGE_VM_TCG_THREADS", "one")
    with pytest.raises(UsageError, match="expected single or multi"):
        vm.tcg_threads("6.1.0-41-amd64")
    monkeypatch.delenv("IOBRIDGE_VM_TCG_THREADS")
    with pytest.raises(UsageError, match="MAJOR.MINOR"):
        vm.tcg_threads("linux")


# Console lines as the 6.1 guest printed them in a CI run that locked up.
SOFT_LOCKUP_LINE = "[  576.400737] watchdog: BUG: soft lockup - CPU#1 stuck for 104s! [python:1135]"
RCU_STALL_LINE = "[  549.740758] \t(detected by 1, t=20512 jiffies, g=154025, q=40 ncpus=2)"


def test_livelock_seconds_reads_the_kernels_lockup_reports():
    assert vm.livelock_seconds(SOFT_LOCKUP_LINE) == 104
    assert vm.livelock_seconds(RCU_STALL_LINE) == pytest.approx(20512 / 250)
    assert vm.livelock_seconds("[  486.721645] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:") is None
    assert vm.livelock_seconds("[   70.262927] hrtimer: interrupt took 101590 ns") is None
    assert vm.livelock_seconds("tests/vm/test_agent.py::test_x PASSED") is None


def _fake_guest(tmp_path, lines: list[str], then_sleep: float) -> list[str]:
    script = tmp_path / "guest.sh"
    body = "".join(f"echo {shlex.quote(line)}\n" for line in lines)
    script.write_text(f"{body}sleep {then_sleep}\n")
    return ["bash", str(script)]


def test_a_guest_reporting_a_long_lockup_is_killed_at_once(tmp_path):
    """The run ends on the kernel's report, not at the time bound."""
    stuck = SOFT_LOCKUP_LINE.replace("104s", f"{vm.LIVELOCK_S + 8}s")
    cmd = _fake_guest(tmp_path, [vm.GUEST_READY_MARK, SOFT_LOCKUP_LINE, stuck], then_sleep=300)
    tail: collections.deque = collections.deque(maxlen=10)
    started = time.monotonic()
    rc, why, _ = vm._boot_once(cmd, dict(os.environ), timeout=60, boot_timeout=30, quiet=True,
                               capture=False, log=None, tail=tail)
    assert why == "livelock"
    assert time.monotonic() - started < 20
    assert any("killed the VM" in line for line in tail)


def test_a_short_stall_does_not_end_the_run(tmp_path):
    cmd = _fake_guest(tmp_path, [vm.GUEST_READY_MARK, SOFT_LOCKUP_LINE, "done"], then_sleep=0)
    rc, why, _ = vm._boot_once(cmd, dict(os.environ), timeout=60, boot_timeout=30, quiet=True,
                               capture=True, log=None, tail=collections.deque(maxlen=10))
    assert (rc, why) == (0, "")


def test_a_guest_silent_past_the_bound_is_killed_and_boot_time_does_not_count(tmp_path):
    script = tmp_path / "guest.sh"
    # 3 s of boot without a line, then the ready mark, then silence.
    script.write_text(f"sleep 3\necho {shlex.quote(vm.GUEST_READY_MARK)}\nsleep 300\n")
    tail: collections.deque = collections.deque(maxlen=10)
    started = time.monotonic()
    rc, why, _ = vm._boot_once(["bash", str(script)], dict(os.environ), timeout=60,
                               boot_timeout=30, quiet=True, capture=False, log=None, tail=tail,
                               silence_s=2)
    assert why == "silent"
    assert 5 <= time.monotonic() - started < 20
    assert any("no line from the guest" in line for line in tail)


def test_the_silence_bound_outlasts_every_vm_tests_own_timeout():
    import re
    marks = [int(m) for f in (Path(__file__).parent / "vm").glob("test_*.py")
             for m in re.findall(r"@pytest\.mark\.timeout\((\d+)\)", f.read_text())]
    assert marks and max(marks + [vm.PER_TEST_TIMEOUT_S]) <= vm.LONGEST_TEST_TIMEOUT_S
    assert vm.TEST_SILENCE_S > vm.LONGEST_TEST_TIMEOUT_S
