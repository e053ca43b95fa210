"""The command-line convention shared by run_search.py, run_best.py and ``python -m hawor_tune.train``:
bad input prints ONE line (what is wrong, the value, what is allowed) on stderr and exits with status 2."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def fail(message: object) -> int:
    """Print one error line and return the exit status for bad input."""
    print(f"error: {str(message).splitlines()[0] if str(message) else type(message).__name__}", file=sys.stderr)
    return EXIT_USAGE
