"""The base of every user-facing fault: a bad config, search space, dataset, file or command-line argument.

The command lines print a :class:`HaworTuneError` as one line and exit with status 2 (:mod:`hawor_tune.cli`);
any other exception is a bug and keeps its traceback. As with Optuna's ``OptunaError``, each concern raises its
own subclass, defined beside the code that raises it (``ConfigError`` in config.py, ``SearchSpaceError`` in
search_space.py, ...); most also derive from ``ValueError``, which callers caught before this base existed.
"""

from __future__ import annotations


class HaworTuneError(Exception):
    """A fault in what the user gave; the message names what is wrong, the value and the fix."""


class MissingFileError(HaworTuneError, FileNotFoundError):
    """A file the user named (a config value, a command-line argument) does not exist."""
