"""User-facing errors: bad input gets one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import difflib
import math
import os
import sys
import warnings
from collections.abc import Callable


class UserError(Exception):
    """A mistake in what the user asked for or gave us (paths, options, files).

    The message is one line that says what is wrong and, where possible, what to do.
    Command-line entry points print it as ``error: <message>`` and exit with status 2.
    """


class DataError(UserError):
    """A dataset that is missing, empty, or unreadable."""


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a command-line ``main``; turn a ``UserError`` into one line on stderr and exit status 2.

    While it runs, minidit's warnings (e.g. an unreadable image skipped) are one line each too."""
    saved = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None) -> str:
        if not category.__module__.startswith("minidit"):  # other packages' warnings: the usual format
            return saved(message, category, filename, lineno, line)
        from tqdm import tqdm  # ours: `warning: <message>`, written around a running progress bar

        tqdm.write(f"warning: {' '.join(str(message).split())}", file=sys.stderr)
        return ""

    warnings.formatwarning = one_line  # (formatting only: code that records warnings still gets them)
    try:
        return int(main(argv) or 0)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `python -m minidit.train --help | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141  # as a shell reports a process ended by SIGPIPE
    finally:
        warnings.formatwarning = saved


def guidance_scale(text: str) -> float:
    """An ``argparse`` type: a classifier-free guidance scale, a finite number >= 0 (1: no guidance)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (1: no guidance), got {text}")
    return value


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def closest(word: str, options) -> str | None:
    """The option most like ``word`` (for "did you mean" hints), or None when none is close."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return close[0] if close else None


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are one ``UserError`` line (exit status 2 through ``run_cli``), with a
    "did you mean" for a misspelled option (sub-commands' options included)."""

    def error(self, message: str):
        raise UserError(f"{message} (see `{self.prog} --help`)")

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            word = unknown[0].split("=")[0]
            if not word.startswith("-"):
                self.error(f"unexpected argument {word!r}")
            guess = closest(word, _option_strings(self))
            self.error(f"unknown option {word}" + (f" (did you mean {guess}?)" if guess else ""))
        return parsed


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    names = []
    for action in parser._actions:
        names += action.option_strings
        for sub in (action.choices or {}).values() if isinstance(action, argparse._SubParsersAction) else ():
            names += _option_strings(sub)
    return names
