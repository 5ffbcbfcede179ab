"""Input files: read whole, or refused with one clear error, never a hang.

Every file the user names as an input that iobridge reads whole (a text
trace, a model and its card, the agent's status file, a config file) goes
through `read_input(path)`: it must be a regular file. A FIFO, a device
such as /dev/zero or a directory is refused at once (opened without
blocking, checked with fstat on the open file, so nothing can be swapped in
between); a missing or unreadable file raises the OSError, for the caller's
message.

`json_loads(text)` is json.loads with a document nested too deeply for the
parser raised as a ValueError, like any other malformed JSON.
"""

from __future__ import annotations

import errno
import json
import os
import stat

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


class NotRegularFile(OSError):
    """An input that is not a regular file: its `strerror` says what it is."""


def read_input(path) -> bytes:
    """The bytes of the regular file `path`. Raises NotRegularFile (an
    OSError, strerror e.g. "not a regular file: a FIFO (named pipe)") for
    anything else, and the OSError of the open or read (FileNotFoundError,
    PermissionError, ...) otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((what for test, what in _KINDS if test(mode)), "not a file")
            raise NotRegularFile(errno.EINVAL, f"not a regular file: {kind}", os.fspath(path))
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as f:
            fd = -1
            return f.read()
    finally:
        if fd >= 0:
            os.close(fd)


def json_loads(text):
    """json.loads; a document nested too deeply is a ValueError like any other
    malformed JSON (json.loads raises RecursionError for it)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply to parse") from None
