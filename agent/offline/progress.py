"""Progress of long offline work on stderr: a live percentage on a
terminal, phase lines otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    """Progress on stderr: a live percentage on a terminal, phase lines otherwise."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def phase(self, msg: str) -> None:
        if self.enabled:
            print(f"iobridge: {msg}", file=sys.stderr, flush=True)

    def update(self, label: str, done: int, total: int) -> None:
        if not (self.enabled and self.tty):
            return
        now = time.monotonic()
        if now - self._last > 0.5 or done == total:
            self._last = now
            end = "\n" if done == total else ""
            print(f"\r  {label}: {100 * done // max(total, 1):3d}%", end=end,
                  file=sys.stderr, flush=True)
