"""Minimal sd_notify(3) client: readiness, status, watchdog and stop/reload
notifications for `Type=notify` units (systemd/iobridge.service).

No dependency on python-systemd: the protocol is one datagram of
newline-separated KEY=VALUE lines sent to the AF_UNIX socket named by
$NOTIFY_SOCKET, and python-systemd is not in the venv.

Outside systemd (NOTIFY_SOCKET unset) every call is a silent no-op. A failure
to send is logged once and never raised: the daemon must keep serving I/O
even if systemd went away or the socket is gone.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


def _socket_address(value: str) -> str | bytes | None:
    """The sendto() address for a $NOTIFY_SOCKET value, None if unusable.

    "@name" is a Linux abstract-namespace socket: its address starts with a
    NUL byte instead of "@". Other values must be absolute paths (systemd
    also knows "vsock:..." addresses, which only make sense in VMs talking to
    their host; they are not supported here).
    """
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """Sends notifications to the service manager named by NOTIFY_SOCKET.

    `environ` defaults to os.environ and is read once, at construction.
    """

    def __init__(self, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        self._env = dict(env)
        raw = env.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(raw) if raw else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False
        if raw and self._address is None:
            log.warning("NOTIFY_SOCKET=%r is not a path or @abstract name; "
                        "systemd notifications disabled", raw)

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that wants notifications."""
        return self._address is not None

    # ------------------------------------------------------------ messages

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) finished; optionally with a status line."""
        return self._send(["READY=1"] + ([_status_line(status)] if status is not None else []))

    def status(self, text: str) -> bool:
        """Free-form one-line status shown by `systemctl status`."""
        return self._send([_status_line(text)])

    def watchdog(self) -> bool:
        """Keep-alive ping; send at least every watchdog_interval_s() / 2."""
        return self._send(["WATCHDOG=1"])

    def stopping(self) -> bool:
        """Shutdown has begun."""
        return self._send(["STOPPING=1"])

    def reloading(self) -> bool:
        """A reload (SIGHUP) has begun; send ready() again when it is done.

        systemd >= 253 (Type=notify-reload) wants MONOTONIC_USEC alongside
        RELOADING=1 to match the message to the reload request; older
        versions ignore the unknown key.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send(["RELOADING=1", f"MONOTONIC_USEC={usec}"])

    def watchdog_interval_s(self) -> float | None:
        """The watchdog timeout systemd enforces on us, in seconds.

        None when not under a watchdog: WATCHDOG_USEC unset, zero or invalid,
        or WATCHDOG_PID set to another process (the variables were inherited
        from a parent that is the real service).
        """
        usec = self._env.get("WATCHDOG_USEC")
        if not usec:
            return None
        pid = self._env.get("WATCHDOG_PID")
        if pid:
            try:
                if int(pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            value = int(usec)
        except ValueError:
            return None
        return value / 1e6 if value > 0 else None

    # ------------------------------------------------------------ transport

    def _send(self, lines: list[str]) -> bool:
        """Send one datagram; True if it was sent, False if disabled or failed."""
        if self._address is None:
            return False
        payload = "\n".join(lines).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX,
                                               socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(payload, self._address)
                return True
            except OSError as err:
                if not self._warned:
                    self._warned = True
                    log.warning("cannot notify systemd via %s: %s (further failures "
                                "are not logged)", self._env.get("NOTIFY_SOCKET"), err)
                return False

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _status_line(text: str) -> str:
    # A newline would end the STATUS= assignment and start a bogus one.
    return "STATUS=" + " ".join(str(text).splitlines())
