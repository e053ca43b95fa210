"""Why a search's trial failed, and so whether running it again can help.

A trial fails because its **environment** did (its worker or node died, or a read or write failed: a full
disk, storage gone) or **on its own** (its configuration, its data or the code: anything else). Running it
again helps only in the first case: ``run_search.py --resume`` continues such a trial from its last
checkpoint and leaves one that failed on its own failed (:mod:`hawor_tune.search.resume`). The parquet
exporter and the Optuna study on disk record the same verdict.
"""

from __future__ import annotations

import os
from typing import Any

from hawor_tune.atomic import DiskFullError
from hawor_tune.errors import HaworTuneError

ENVIRONMENT = "environment"
OWN = "trial"


class TrialFailedBefore(HaworTuneError, RuntimeError):
    """A resumed search's trial that failed on its own in the earlier run, stopped before it runs again."""


def failed_by(error: BaseException | None) -> str:
    """:data:`ENVIRONMENT` or :data:`OWN` for the error a trial failed with (as Ray recorded it).

    Environment: the trial's worker or node was lost (any Ray error but a task's own), a full disk, or an
    ``OSError`` outside this project's own errors (a :class:`~hawor_tune.errors.HaworTuneError` is a fault in
    what the user gave, a missing file they named included). No recorded error counts as environment: a
    trial that fails on its own fails the same way again.
    """
    from ray.exceptions import RayError, RayTaskError

    cause = error.cause if isinstance(error, RayTaskError) else error
    if cause is None or isinstance(cause, DiskFullError):
        return ENVIRONMENT
    if isinstance(cause, HaworTuneError):
        return OWN
    if isinstance(cause, OSError) or (isinstance(cause, RayError) and not isinstance(cause, RayTaskError)):
        return ENVIRONMENT
    return OWN


def describe(error: BaseException | None) -> str:
    """The error in one line: its type and the first line of its message (Ray's wrapper left out)."""
    from ray.exceptions import RayTaskError

    if error is None:
        return "no error recorded"
    cause = error.cause if isinstance(error, RayTaskError) and error.cause is not None else error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def trial_error(trial: Any) -> BaseException | None:
    """The error a Ray Tune trial last failed with, read from the pickle Ray writes beside it on the driver
    (None when there is none, or it cannot be read)."""
    from ray import cloudpickle

    path = getattr(trial, "pickled_error_file", None)
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            return cloudpickle.load(f)
    except Exception:  # an error class this process cannot import: nothing to classify
        return None
