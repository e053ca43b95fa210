"""The command-line convention shared by run_search.py, run_best.py and ``python -m hawor_tune.train``: a fault
in the user's input (a :class:`~hawor_tune.errors.HaworTuneError`, or a bad flag) prints ONE line on stderr (what
is wrong, the value, what is allowed) and exits with status 2; any other exception is a bug and keeps its
traceback. Also the one argparse type for counts (:func:`positive_int`) and the one way a value is written in a
terminal table (:func:`format_value`)."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any, NoReturn

from hawor_tune.errors import HaworTuneError

EXIT_USAGE = 2


class UsageError(HaworTuneError):
    """A command-line argument is wrong in a way argparse cannot check (a name taken, nothing to resume)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def fail(error: HaworTuneError | str) -> int:
    """Print one error line and return the exit status for bad input.

    Catch only :class:`HaworTuneError` for it (``except HaworTuneError as e: return fail(e)``), so that a bug
    keeps its traceback.
    """
    message = str(error)
    print(f"error: {message.splitlines()[0] if message else type(error).__name__}", file=sys.stderr)
    return EXIT_USAGE


def positive_int(text: str) -> int:
    """argparse ``type=`` for a count that must be at least 1 (``--num-samples``, ``--max-concurrent``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def format_flag(value: bool | None) -> str:
    """A yes/no cell of a terminal table (e.g. whether a trial meets its constraints); None as an empty cell."""
    return "" if value is None else "yes" if value else "no"


def format_value(value: Any) -> str:
    """A value in a terminal table (the live console, the search summary): floats to 4 significant digits,
    ``inf``/``nan`` as such, None as an empty cell, anything else as ``str``."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)
