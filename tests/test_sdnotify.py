"""sd_notify client against a real AF_UNIX datagram socket."""

from __future__ import annotations

import logging
import os
import socket
import time

import pytest

from iobridge.daemon.sdnotify import Notifier


@pytest.fixture
def listener(tmp_path):
    """A bound datagram socket standing in for systemd's notify socket."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    yield str(path), sock
    sock.close()


def _recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_messages_arrive_exactly(listener):
    path, sock = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready()
    assert _recv(sock) == "READY=1"
    assert n.ready(status="serving 2 legs")
    assert _recv(sock) == "READY=1\nSTATUS=serving 2 legs"
    assert n.status("model reloaded\nv2")
    assert _recv(sock) == "STATUS=model reloaded v2"     # newline must not start a new key
    assert n.watchdog()
    assert _recv(sock) == "WATCHDOG=1"
    assert n.stopping()
    assert _recv(sock) == "STOPPING=1"
    n.close()


def test_reloading_carries_monotonic_usec(listener):
    path, sock = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = _recv(sock).split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_abstract_namespace_socket():
    name = f"iobridge-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert _recv(sock) == "READY=1"
    finally:
        sock.close()


def test_unset_socket_is_a_silent_noop(caplog):
    n = Notifier({})
    assert not n.enabled
    with caplog.at_level(logging.DEBUG):
        assert n.ready() is False and n.watchdog() is False and n.stopping() is False
    assert caplog.records == []


def test_send_failure_is_logged_once_and_not_raised(tmp_path, caplog):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})   # nobody listens
    assert n.enabled
    with caplog.at_level(logging.WARNING, logger="iobridge.daemon.sdnotify"):
        assert n.watchdog() is False
        assert n.watchdog() is False
        assert n.ready() is False
    assert len(caplog.records) == 1 and "cannot notify systemd" in caplog.text


def test_unsupported_address_disables(caplog):
    with caplog.at_level(logging.WARNING, logger="iobridge.daemon.sdnotify"):
        n = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled and n.ready() is False
    assert "notifications disabled" in caplog.text


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"WATCHDOG_USEC": "10000000"}, 10.0),
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}, 10.0),
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "x"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": "2500"}, 0.0025),
])
def test_watchdog_interval(env, expected):
    assert Notifier(env).watchdog_interval_s() == expected
