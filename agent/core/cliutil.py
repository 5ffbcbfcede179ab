"""What every command's parser shares, whatever layer registers it.

The CLI (iobridge.cli) sits on top and every layer's module adds its own
subcommands with `register_cli(sub)`, so the pieces they share live here, at
the bottom (core imports nothing outside core):

- `json_parent()`: the one `--json` option, given to every command that
  prints a report with `parents=[cliutil.json_parent()]`;
- `examples(...)`: the EXAMPLES epilog of a command's --help, as bcc's tools
  print theirs (real command lines, a one-line comment each), and the help
  formatter that prints it as written;
- the numeric option types (`int_range`, `float_range`, `positive_int`,
  `positive_float`, `nonneg_float`, `fraction`, `percentile`, `seed`,
  `seconds`, `power_of_two`): every numeric option takes one as `type=`, so
  every number on the command line has a range, and a value outside it (or
  nan, inf, or not a number) is a usage error naming the option and the
  range (argparse: `usage: ...`, `error: argument --x: ...`, exit 2).

Ranges are inclusive unless said otherwise; floats must be finite.
"""

from __future__ import annotations

import argparse
import functools
import math
from typing import Callable

JSON_HELP = "print the report as JSON instead of text"


@functools.cache
def json_parent() -> argparse.ArgumentParser:
    """The parent parser holding the shared --json option (one instance)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--json", action="store_true", help=JSON_HELP)
    return parent


class _Verbatim(str):
    """Help text printed as written (line breaks and alignment kept)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps descriptions as argparse does; keeps an examples() epilog as written."""

    def _fill_text(self, text, width, indent):
        if isinstance(text, _Verbatim):
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)


def examples(*lines: tuple[str, str]) -> dict:
    """Keyword arguments for add_parser: an EXAMPLES epilog of
    (command line, one-line comment) pairs, and the formatter that keeps it.

    Comments line up to the right of the commands when that fits in 79
    columns; otherwise each comment goes on the line above its command."""
    width = max(len(cmd) for cmd, _ in lines)
    if all(4 + width + 4 + len(what) <= 79 for _, what in lines):
        body = [f"    {cmd:<{width}}  # {what}" for cmd, what in lines]
    else:
        body = [f"    # {what}\n    {cmd}" for cmd, what in lines]
    return {"epilog": _Verbatim("examples:\n" + "\n".join(body)),
            "formatter_class": HelpFormatter}


# ------------------------------------------------------------ numeric options

INT64_MAX = (1 << 63) - 1
# The longest span of seconds the int64 nanosecond clocks (CLOCK_MONOTONIC,
# trace timestamps) can hold.
MAX_SECONDS = INT64_MAX // 10**9


def _num(v: float) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e16:
        return str(int(v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def describe(lo: float | None, hi: float | None, *, lo_open: bool = False,
             hi_open: bool = False, whole: bool = False) -> str:
    """The range in words, e.g. "a number more than 0 and at most 100"."""
    what = "a whole number" if whole else "a number"
    if lo is not None and hi is not None and not lo_open and not hi_open:
        return f"{what} from {_num(lo)} to {_num(hi)}"
    parts = []
    if lo is not None:
        parts.append(f"more than {_num(lo)}" if lo_open else f"at least {_num(lo)}")
    if hi is not None:
        parts.append(f"less than {_num(hi)}" if hi_open else f"at most {_num(hi)}")
    return f"{what} {' and '.join(parts)}" if parts else what


def int_range(lo: int | None, hi: int | None) -> Callable[[str], int]:
    """type= for a whole number in [lo, hi] (None: unbounded on that side)."""
    rng = describe(lo, hi, whole=True)

    def parse(text: str) -> int:
        try:
            v = int(text.strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rng}, got {text!r}") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {rng}, got {text}")
        return v

    parse.__name__ = "whole number"
    parse.range = rng
    return parse


def float_range(lo: float | None, hi: float | None, *, lo_open: bool = False,
                hi_open: bool = False) -> Callable[[str], float]:
    """type= for a finite number in the range (lo/hi excluded when *_open;
    None: unbounded on that side). nan and inf are always refused."""
    rng = describe(lo, hi, lo_open=lo_open, hi_open=hi_open)

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rng}, got {text!r}") from None
        if (not math.isfinite(v)
                or (lo is not None and (v <= lo if lo_open else v < lo))
                or (hi is not None and (v >= hi if hi_open else v > hi))):
            raise argparse.ArgumentTypeError(f"must be {rng}, got {text}")
        return v

    parse.__name__ = "number"
    parse.range = rng
    return parse


def positive_int(hi: int) -> Callable[[str], int]:
    """type= for a whole number from 1 to hi."""
    return int_range(1, hi)


def positive_float(hi: float) -> Callable[[str], float]:
    """type= for a number more than 0 and at most hi."""
    return float_range(0.0, hi, lo_open=True)


def nonneg_float(hi: float) -> Callable[[str], float]:
    """type= for a number from 0 to hi."""
    return float_range(0.0, hi)


# A fraction strictly between 0 and 1 (e.g. a time split: both parts non-empty).
fraction = float_range(0.0, 1.0, lo_open=True, hi_open=True)
# A percentile strictly between 0 and 100: the 0th and 100th are the minimum
# and maximum, not a tail estimate.
percentile = float_range(0.0, 100.0, lo_open=True, hi_open=True)
# A random seed: what numpy's generators take (non-negative), 32 bits.
seed = int_range(0, 2**32 - 1)
# A span of seconds, more than 0, that fits an int64 count of nanoseconds.
seconds = positive_float(float(MAX_SECONDS))


def power_of_two(lo: int, hi: int) -> Callable[[str], int]:
    """type= for a power of two from lo to hi (both powers of two)."""
    rng = f"a power of two from {lo} to {hi}"
    whole = int_range(lo, hi)

    def parse(text: str) -> int:
        try:
            v = whole(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"must be {rng}, got {text!r}") from None
        if v & (v - 1):
            raise argparse.ArgumentTypeError(f"must be {rng}, got {text}")
        return v

    parse.__name__ = "power of two"
    parse.range = rng
    return parse
