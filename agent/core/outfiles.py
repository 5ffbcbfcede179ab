"""Output files: checked before the work, written whole or not at all.

Every command that writes a file the user named goes through here:

- `check_output(out, force, sources)` before any long work: not a
  directory, not the input, not an existing file without --force, in a
  writable directory;
- `atomic_output(path)`: a temporary file beside `path`, synced and
  renamed over it when the block ends, removed on any error, Ctrl-C,
  SIGTERM or SIGHUP, so readers see the old file or the complete new one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from pathlib import Path

from .errors import IobridgeError, UsageError


class _Terminated(KeyboardInterrupt):
    """Raised by the handler of SIGTERM/SIGHUP while an output file is being written."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _termination_raises():
    """While active, SIGTERM and SIGHUP, where they would kill the process
    (default disposition, main thread), raise _Terminated instead, so
    cleanup (`except`/`finally`) runs first; then the default disposition
    comes back and the process dies of the signal as it would have. Ignored
    signals and handlers installed by the caller are left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum, _frame):
        raise _Terminated(signum)

    ours = [sig for sig in (signal.SIGTERM, signal.SIGHUP)
            if signal.getsignal(sig) == signal.SIG_DFL]
    for sig in ours:
        signal.signal(sig, on_signal)
    try:
        yield
    except _Terminated as e:
        for sig in ours:
            signal.signal(sig, signal.SIG_DFL)
        ours = []
        os.kill(os.getpid(), e.signum)     # default disposition: ends the process here
        raise
    finally:
        for sig in ours:
            signal.signal(sig, signal.SIG_DFL)


def check_output(out, force: bool = False, sources=()) -> Path:
    """Refuse an output path before any long work: it must not be a
    directory, one of `sources` (the input), or an existing file without
    `force`; its directory must exist and be writable. Returns the path to
    write (a symlink's target, so the link survives)."""
    if not str(out):
        raise UsageError("the output file name is empty", "give a file name to write")
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"{out} is a directory", "give a file name to write")
    for src in sources:
        try:
            same = os.path.samefile(src, out)
        except OSError:
            same = os.path.realpath(src) == os.path.realpath(out)
        if same:
            raise UsageError(f"{out} is the input file {src}",
                             "write the output to another file")
    if out.exists() or out.is_symlink():
        if not out.is_file():
            raise UsageError(f"{out} exists and is not a regular file",
                             "give a new file name to write")
        if not force:
            raise UsageError(f"{out} exists", "pass --force to overwrite it")
    target = Path(os.path.realpath(out))
    parent = target.parent
    if not parent.is_dir():
        raise UsageError(f"directory {parent} does not exist")
    try:   # a real probe: os.access says yes to root on a read-only file system
        with tempfile.TemporaryFile(dir=str(parent)):
            pass
    except OSError as e:
        raise UsageError(f"cannot create {out}: directory {parent} is not writable "
                         f"({e.strerror or e})") from None
    return target


@contextlib.contextmanager
def atomic_output(path):
    """Yields a temporary path beside `path`; when the block ends normally the
    file is synced and renamed over `path` (os.replace), so readers see the
    old file or the complete new one, never a part. On any exception,
    including KeyboardInterrupt and SIGTERM/SIGHUP, the temporary file is
    removed and `path` is left as it was."""
    path = Path(path)
    target = Path(os.path.realpath(path))
    with _termination_raises():
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=str(target.parent), prefix=f".{target.name}.",
                                       suffix=".tmp")
            try:
                umask = os.umask(0)
                os.umask(umask)
                os.fchmod(fd, 0o666 & ~umask)
            finally:
                os.close(fd)
            yield Path(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException as e:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            if isinstance(e, OSError):
                raise IobridgeError(f"cannot write {path}: {e.strerror or e}") from None
            raise
