"""What a search leaves in its experiment folder, and the one code that writes and reads it.

``epochs.parquet`` (a row per trial per epoch) and ``trials.parquet`` (a row per trial): the search's
exporter (:mod:`hawor_tune.search`) refreshes both atomically after every reported epoch;
:func:`summarize_trials` (pure) turns epoch rows into trial rows and :func:`best_trial` picks the best of
them. ``search.json`` is the :class:`ExperimentRecord`: the checked search space and the base file's full
training budget, enough for run_best.py to rebuild any trial's config. :func:`check_storage` and
:func:`check_resumable` check where a search will write before anything starts. Nothing here needs Ray.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from hawor_tune.atomic import atomic_write, atomic_write_text
from hawor_tune.config import load_config
from hawor_tune.epoch_metrics import CONSTRAINT_PREFIX
from hawor_tune.errors import HaworTuneError
from hawor_tune.search_space import SearchSpace

EPOCHS_FILE = "epochs.parquet"
TRIALS_FILE = "trials.parquet"
RECORD_FILE = "search.json"
# 1: an untyped dict without a version key (read no more); 2: ExperimentRecord.
RECORD_VERSION = 2
# What the final retrain takes from the base file itself rather than from the (maybe shortened) trials.
BUDGET_KEYS = ("train.epochs", "train.max_train_batches")
# Columns every epoch row carries besides the reported metrics.
_EPOCH_META = ("trial_id", "epoch", "time_total_s", "timestamp", "node_id", "pid", "diverged")
# Reported values for which "best" has no meaning; only their last value is kept.
_NO_BEST = ("epoch", "lr", "time/epoch_s", "diverged")


class StorageError(HaworTuneError, ValueError):
    """The search's storage cannot hold results: a file, a URI, a folder this user cannot write, or no
    experiment there to resume."""


_STORAGE_ALLOWED = "a local or shared-filesystem folder this user can write (made if missing)"


def check_storage(storage: str | os.PathLike, *, label: str = "storage") -> Path:
    """The storage folder, absolute and made if missing, once a file has been written and removed in it.

    Run it before Ray starts: a place the search cannot write then fails in one line, not mid-experiment.

    Args:
        storage: the folder (``~`` expanded, made absolute).
        label: how the caller names the value in errors, e.g. ``--storage``.

    Raises:
        StorageError: a URI (the results are written with local file operations), an existing file, or a
            folder that cannot be made or written (under ``/proc``, read-only, no permission).
    """
    text = os.fspath(storage)
    if "://" in text:
        raise StorageError(f"{label} {text}: a URI is not supported; give {_STORAGE_ALLOWED}")
    path = Path(text).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise StorageError(f"{label} {text}: {path} is a file; give {_STORAGE_ALLOWED}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as e:
        raise StorageError(f"{label} {text}: cannot write in {path} ({e.strerror or e}); "
                           f"give {_STORAGE_ALLOWED}") from None
    return path


def check_resumable(storage: Path, name: str, *, label: str = "--resume") -> Path:
    """The folder ``storage/name`` of an earlier search to resume, checked without starting Ray.

    Raises:
        StorageError: no such folder, or one that no search wrote (no ``search.json``); the message lists
            the experiments ``storage`` does hold.
    """
    exp_dir = storage / name
    if not (exp_dir / RECORD_FILE).is_file():
        held = sorted(d.name for d in storage.iterdir() if (d / RECORD_FILE).is_file()) if storage.is_dir() else []
        what = "no such folder" if not exp_dir.is_dir() else f"no {RECORD_FILE}: not a search's folder"
        there = f"experiments there: {', '.join(held)}" if held else "no experiments there"
        raise StorageError(f"{label}: nothing to resume at {exp_dir} ({what}); {there}")
    return exp_dir


def write_parquet_atomic(rows: list[dict[str, Any]], path: str | os.PathLike,
                         columns: Iterable[str] | None = None) -> None:
    """Write rows (dicts; missing keys become nulls) to a parquet file atomically (:func:`atomic_write`)."""
    names = list(columns) if columns is not None else _ordered_keys(rows)
    table = pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows],
                                 schema=None) if rows else pa.table({k: pa.array([], pa.null()) for k in names})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_table(path: str | os.PathLike) -> pa.Table:
    """Read a parquet file through one open handle: a path-based read stats the file and opens it again, so
    a concurrent atomic replace (the exporter refreshes the files while a search runs) could tear it.

    On one thread: with pyarrow's thread pool (26.0) the interpreter sometimes aborted at exit after such a
    read ("terminate called without an active exception", status 134), and these files are small.
    """
    with open(path, "rb") as f:
        return pq.read_table(f, use_threads=False)


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a parquet file as dicts (see :func:`read_table`)."""
    return read_table(path).to_pylist()


def _ordered_keys(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        for k in r:
            seen.setdefault(k, None)
    return list(seen)


def is_finite_number(x: Any) -> bool:
    """Whether ``x`` is a finite real number (Python's or numpy's); booleans, None and strings are not."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def stopped_early(epochs: int, max_epochs: int) -> bool:
    """Whether a trial that finished (not errored, not diverged) after ``epochs`` epochs was stopped by the
    scheduler (ASHA): it ran some epochs, but fewer than ``max_epochs``. The one rule behind the
    ``stopped_early`` column, the study on disk's PRUNED trials and the pruning searcher's."""
    return 0 < epochs < max_epochs


def summarize_trials(epoch_rows: list[Mapping[str, Any]], trial_meta: Mapping[str, Mapping[str, Any]], *,
                     metric: str, mode: str, max_epochs: int, param_paths: Iterable[str],
                     objectives: Sequence[tuple[str, str]] = ()) -> list[dict[str, Any]]:
    """One row per trial from its epoch rows and its metadata.

    Args:
        epoch_rows: rows of ``epochs.parquet`` (``trial_id``, ``epoch`` and the reported metrics).
        trial_meta: per trial id: ``status``, ``params`` (dotted path -> value), ``checkpoint``,
            ``error`` and ``failed_by`` (optional: why an errored trial failed).
        metric, mode: the search objective; its best is the min (``mode='min'``) or max over finite values.
        max_epochs: the epochs a trial runs when nobody stops it; a finished trial with fewer epochs that did
            not diverge was stopped early by the scheduler (ASHA).
        param_paths: the searched parameters; each becomes a ``param/<path>`` column.
        objectives: (metric, mode) of every objective of a multi-objective search (``metric``/``mode`` are
            the first); each objective's best takes its own mode.

    Returns:
        Rows with: trial_id, status, param/<path>..., epochs, stopped_early, stopped_at_epoch, diverged,
        best/<m> and last/<m> for every reported metric m (best = min, or the search's mode for its
        objectives), best_epoch (the first epoch that reached best/<metric>), wall_time_s, checkpoint, error,
        failed_by; ``feasible`` (whether every ``constraint/<m>`` is <= 0 at best_epoch; None without
        constraints); with two or more objectives also ``pareto`` (:func:`pareto_optimal`).
    """
    by_trial: dict[str, list[Mapping[str, Any]]] = {}
    for r in epoch_rows:
        by_trial.setdefault(str(r["trial_id"]), []).append(r)
    pick = max if mode == "max" else min
    picks = {metric: pick, **{m: max if md == "max" else min for m, md in objectives}}
    out = []
    for trial_id in sorted(set(trial_meta) | set(by_trial)):
        meta = trial_meta.get(trial_id, {})
        rows = sorted(by_trial.get(trial_id, []), key=lambda r: r["epoch"])
        row: dict[str, Any] = {"trial_id": trial_id, "status": meta.get("status", "UNKNOWN")}
        for p in param_paths:
            row[f"param/{p}"] = meta.get("params", {}).get(p)
        diverged = any(bool(r.get("diverged")) for r in rows)
        epochs = max((int(r["epoch"]) for r in rows if not r.get("diverged")), default=0)
        finished = row["status"] == "TERMINATED"
        row["epochs"] = epochs
        row["diverged"] = diverged
        row["stopped_early"] = finished and not diverged and stopped_early(epochs, max_epochs)
        row["stopped_at_epoch"] = epochs if row["stopped_early"] else None
        metric_names = [k for k in _ordered_keys(rows) if k not in _EPOCH_META]
        for m in metric_names:
            values = [r.get(m) for r in rows if not r.get("diverged")]
            finite = [v for v in values if is_finite_number(v)]
            row[f"last/{m}"] = values[-1] if values else None
            if m not in _NO_BEST:
                row[f"best/{m}"] = picks.get(m, min)(finite) if finite else None
        scored = [(r[metric], int(r["epoch"])) for r in rows if is_finite_number(r.get(metric)) and not r.get("diverged")]
        if scored:
            best_value = pick(v for v, _ in scored)
            row["best_epoch"] = min(e for v, e in scored if v == best_value)
        else:
            row["best_epoch"] = None
        # Constraints (train.constraints) hold at the epoch the trial is ranked by: all <= 0 there.
        constraints = [m for m in metric_names if m.startswith(CONSTRAINT_PREFIX)]
        at_best = next((r for r in rows if int(r["epoch"]) == row["best_epoch"]), None) if constraints else None
        row["feasible"] = (None if not constraints else at_best is not None
                           and all(is_finite_number(at_best.get(m)) and at_best[m] <= 0 for m in constraints))
        row["wall_time_s"] = max((float(r.get("time_total_s") or 0.0) for r in rows), default=0.0)
        row["checkpoint"] = meta.get("checkpoint")
        row["error"] = meta.get("error")
        row["failed_by"] = meta.get("failed_by")
        out.append(row)
    if len(objectives) > 1:
        for row, optimal in zip(out, pareto_optimal(out, objectives)):
            row["pareto"] = optimal
    return out


def pareto_optimal(rows: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]]) -> list[bool]:
    """Which trials are Pareto-optimal over their ``best/<metric>`` values of every objective.

    A trial counts unless it errored, diverged or lacks a finite best value of some objective (the rule of
    :func:`best_trial`); it is Pareto-optimal when no counting trial is at least as good in every objective
    and better in one. Trials with identical values are all optimal.

    Args:
        rows: trial rows (:func:`summarize_trials`).
        objectives: (metric, mode) pairs, mode ``min`` or ``max``.

    Returns:
        One flag per row, in order.
    """
    def point(r: Mapping[str, Any]) -> tuple[float, ...] | None:
        if r.get("status") == "ERROR" or r.get("diverged"):
            return None
        values = [r.get(f"best/{m}") for m, _ in objectives]
        if not all(is_finite_number(v) for v in values):
            return None
        return tuple(v if md == "min" else -v for v, (_, md) in zip(values, objectives))

    points = [point(r) for r in rows]
    usable = [p for p in points if p is not None]

    def dominated(p: tuple[float, ...]) -> bool:
        return any(all(a <= b for a, b in zip(q, p)) and q != p for q in usable)

    return [p is not None and not dominated(p) for p in points]


def best_trial(rows: Iterable[Mapping[str, Any]], metric: str, mode: str) -> Mapping[str, Any] | None:
    """The search's best trial, by the one rule every report and the final retrain use.

    A trial counts unless it errored (``status`` ERROR), diverged (``diverged``; retraining its configuration
    would likely diverge again) or has no finite ``best/<metric>``. Of those, the best ``best/<metric>`` wins
    (the lowest for ``mode='min'``, the highest for ``'max'``); a tie goes to the trial that reached it in
    fewer epochs (``best_epoch``), then to the smaller ``trial_id``, so the choice never depends on row order.
    Unfinished (interrupted) trials count with the epochs they completed. Where the search has constraints
    (``feasible`` in the rows), a trial that meets them wins over every one that does not; when none does,
    the best of all counts.

    Args:
        rows: trial rows as :func:`summarize_trials` makes them (``trials.parquet``).
        metric: the search metric, e.g. ``val/mpjpe``.
        mode: ``min`` or ``max``.

    Returns:
        The best row, or None when no trial counts.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    sign = 1.0 if mode == "min" else -1.0
    usable = [r for r in rows
              if r.get("status") != "ERROR" and not r.get("diverged") and is_finite_number(r.get(f"best/{metric}"))]

    def rank(r: Mapping[str, Any]) -> tuple[bool, float, float, str]:
        epoch = r.get("best_epoch")
        return (r.get("feasible") is False, sign * r[f"best/{metric}"], epoch if is_finite_number(epoch) else math.inf,
                str(r["trial_id"]))

    return min(usable, key=rank, default=None)


class RecordError(HaworTuneError, ValueError):
    """An experiment's ``search.json`` is missing, malformed or of a version this hawor-tune does not read."""


@dataclass
class ExperimentRecord:
    """What a search writes to ``search.json`` and run_best.py reads back (:meth:`save`, :meth:`load`).

    ``space`` is the checked search space, holding the resolved base config every trial started from, so
    :meth:`SearchSpace.trial_config` rebuilds any trial's config without the original files.
    ``full_budget`` holds the base file's own ``train.epochs`` and ``train.max_train_batches``: a space may
    shorten trials to fit a search budget, but the final retrain trains in full.
    """

    name: str
    space: SearchSpace
    full_budget: dict[str, Any]
    version: int = RECORD_VERSION

    @classmethod
    def of_search(cls, space: SearchSpace, name: str) -> ExperimentRecord:
        """The record of a search named ``name`` over ``space`` (reads the base file for its budget)."""
        full = load_config(space.base)
        return cls(name=name, space=space,
                   full_budget={key: getattr(full.train, key.split(".")[1]) for key in BUDGET_KEYS})

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "name": self.name, "full_budget": self.full_budget,
                           "space": self.space.to_dict()}, indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = RECORD_FILE) -> ExperimentRecord:
        """Read :meth:`to_json` output; ``source`` names the file in errors.

        Raises:
            RecordError: not JSON, not a record, or a version other than :data:`RECORD_VERSION`.
        """
        try:
            data = json.loads(text)
        except ValueError as e:
            raise RecordError(f"{source}: not valid JSON ({e})") from None
        version = data.get("version") if isinstance(data, dict) else None
        if version is None:
            raise RecordError(f"{source}: written by an earlier hawor-tune (no record version); run the search "
                              f"again, or retrain a configuration with run_best.py --config FILE")
        if version != RECORD_VERSION:
            newer = isinstance(version, int) and version > RECORD_VERSION
            fix = "upgrade hawor-tune" if newer else "run the search again"
            raise RecordError(f"{source}: record version {version!r}, this hawor-tune reads {RECORD_VERSION}; {fix}")
        try:
            return cls(name=data["name"], space=SearchSpace.from_dict(data["space"]),
                       full_budget=dict(data["full_budget"]), version=version)
        except (KeyError, TypeError, ValueError) as e:
            raise RecordError(f"{source}: malformed search record ({type(e).__name__}: {e})") from None

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``<directory>/search.json`` atomically."""
        return atomic_write_text(Path(directory) / RECORD_FILE, self.to_json())

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ExperimentRecord:
        """Read ``<directory>/search.json``.

        Raises:
            RecordError: the file is missing or unreadable as a record.
        """
        path = Path(directory) / RECORD_FILE
        if not path.is_file():
            raise RecordError(f"{directory}: not a hawor-tune experiment ({RECORD_FILE} is missing)")
        return cls.from_json(path.read_text(), source=str(path))
