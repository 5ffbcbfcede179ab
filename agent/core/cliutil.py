"""What every command's parser shares, whatever layer registers it.

The CLI (iobridge.cli) sits on top and every layer's module adds its own
subcommands with `register_cli(sub)`, so the pieces they share live here, at
the bottom (core imports nothing outside core):

- `json_parent()`: the one `--json` option, given to every command that
  prints a report with `parents=[cliutil.json_parent()]`;
- `examples(...)`: the EXAMPLES epilog of a command's --help, as bcc's tools
  print theirs (real command lines, a one-line comment each), and the help
  formatter that prints it as written.
"""

from __future__ import annotations

import argparse
import functools

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
