"""The `iobridge` command line.

Each concern registers its own subcommands: a module listed in
COMMAND_MODULES provides `register_cli(subparsers)`, which adds its parsers
and sets `func` (called with the parsed args, returns an exit status).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys

from . import __version__
from .core import cliutil
from .core.errors import IobridgeError

COMMAND_MODULES = [
    "iobridge.lab.vm",
    "iobridge.kernel.observer",
    "iobridge.kernel.cachestat",
    "iobridge.offline.record",
    "iobridge.offline.trace",
    "iobridge.offline.train",
    "iobridge.offline.train_prefetch",    # --task prefetch of `iobridge train`
    "iobridge.core.model",
    "iobridge.offline.replay",
    "iobridge.lab.bench",
    "iobridge.daemon.agent",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iobridge",
        description="Learned I/O admission and prefetch policies for stock Linux.",
        **cliutil.examples(
            ("iobridge --version", "the installed release"),
            ("iobridge COMMAND --help", "a command's options and examples"),
            ("iobridge model check models/admission-default.onnx", "validate a model"),
            ("iobridge vm test", "the kernel-facing tests in the test VM"),
            ("sudo iobridge run", "the admission agent, in the foreground"),
            ("iobridge status", "what the running agent is doing")),
    )
    parser.add_argument("--version", action="version", version=f"iobridge {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register_cli(sub)
    return parser


class StdoutError(Exception):
    """Standard output could not be written (a full disk, /dev/full, a closed
    descriptor): raised by _CheckedStdout for the OSError, so that no
    command's `except OSError` takes it for a problem with its own files."""

    def __init__(self, err: OSError):
        super().__init__(err.strerror or str(err))


class _CheckedStdout:
    """sys.stdout while a command runs: a failed write or flush raises
    StdoutError (one error line, exit 1) instead of an OSError traceback; a
    reader gone away stays BrokenPipeError (exit 141, nothing said)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        if self._stream is None:         # started with stdout closed (`>&-`)
            raise StdoutError(OSError(errno.EBADF, "it is closed"))
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise StdoutError(e) from None

    def flush(self):
        if self._stream is None:
            return
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as e:
            raise StdoutError(e) from None

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _silence_stdout(stream) -> None:
    """stdout to /dev/null, so the interpreter's last flush cannot fail again."""
    if stream is not None:
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def main(argv: list[str] | None = None) -> int:
    stdout = sys.stdout
    sys.stdout = _CheckedStdout(stdout)
    try:
        rc = _main(argv)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        # The reader went away (`iobridge trace info | head`): nothing to say.
        # 141 = 128 + SIGPIPE, what a shell reports for a pipe writer killed by it.
        _silence_stdout(stdout)
        return 141
    except StdoutError as e:
        print(f"iobridge: error: cannot write the output to standard output: {e}",
              file=sys.stderr)
        _silence_stdout(stdout)
        return 1
    finally:
        sys.stdout = stdout


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="iobridge: %(levelname)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except IobridgeError as err:
        print(f"iobridge: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
