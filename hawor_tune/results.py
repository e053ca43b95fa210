"""Search results as parquet: ``epochs.parquet`` (a row per trial per epoch) and ``trials.parquet`` (a row per trial).

:class:`ParquetExporter` is a Ray Tune callback on the driver that refreshes both files atomically after every
reported epoch, so a killed search still leaves everything up to its last finished epoch; on resume it reloads
what the files already hold. :func:`summarize_trials` (pure) turns epoch rows into trial rows and
:func:`best_trial` picks the best of them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray.tune import Callback

from hawor_tune.atomic import atomic_write

EPOCHS_FILE = "epochs.parquet"
INTERRUPTED = "INTERRUPTED"
_FINAL = ("TERMINATED", "ERROR")
TRIALS_FILE = "trials.parquet"
# Columns every epoch row carries besides the reported metrics.
_EPOCH_META = ("trial_id", "epoch", "time_total_s", "timestamp", "node_id", "diverged")
# Reported values for which "best" has no meaning; only their last value is kept.
_NO_BEST = ("epoch", "lr", "time/epoch_s", "diverged")


def write_parquet_atomic(rows: list[dict[str, Any]], path: str | os.PathLike,
                         columns: Iterable[str] | None = None) -> None:
    """Write rows (dicts; missing keys become nulls) to a parquet file atomically (:func:`atomic_write`)."""
    names = list(columns) if columns is not None else _ordered_keys(rows)
    table = pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows],
                                 schema=None) if rows else pa.table({k: pa.array([], pa.null()) for k in names})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_table(path: str | os.PathLike) -> pa.Table:
    """Read a parquet file through one open handle: a path-based read stats the file and opens it again, so
    a concurrent atomic replace (the exporter refreshes the files while a search runs) could tear it."""
    with open(path, "rb") as f:
        return pq.read_table(f)


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a parquet file as dicts (see :func:`read_table`)."""
    return read_table(path).to_pylist()


def _ordered_keys(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        for k in r:
            seen.setdefault(k, None)
    return list(seen)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def summarize_trials(epoch_rows: list[Mapping[str, Any]], trial_meta: Mapping[str, Mapping[str, Any]], *,
                     metric: str, mode: str, max_epochs: int, param_paths: Iterable[str]) -> list[dict[str, Any]]:
    """One row per trial from its epoch rows and its metadata.

    Args:
        epoch_rows: rows of ``epochs.parquet`` (``trial_id``, ``epoch`` and the reported metrics).
        trial_meta: per trial id: ``status``, ``params`` (dotted path -> value), ``checkpoint``,
            ``error`` (optional).
        metric, mode: the search objective; its best is the min (``mode='min'``) or max over finite values.
        max_epochs: the epochs a trial runs when nobody stops it; a finished trial with fewer epochs that did
            not diverge was stopped early by the scheduler (ASHA).
        param_paths: the searched parameters; each becomes a ``param/<path>`` column.

    Returns:
        Rows with: trial_id, status, param/<path>..., epochs, stopped_early, stopped_at_epoch, diverged,
        best/<m> and last/<m> for every reported metric m (best = min, or the search's mode for its metric),
        best_epoch (the first epoch that reached best/<metric>), wall_time_s, checkpoint.
    """
    by_trial: dict[str, list[Mapping[str, Any]]] = {}
    for r in epoch_rows:
        by_trial.setdefault(str(r["trial_id"]), []).append(r)
    pick = max if mode == "max" else min
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
        row["stopped_early"] = finished and not diverged and 0 < epochs < max_epochs
        row["stopped_at_epoch"] = epochs if row["stopped_early"] else None
        metric_names = [k for k in _ordered_keys(rows) if k not in _EPOCH_META]
        for m in metric_names:
            values = [r.get(m) for r in rows if not r.get("diverged")]
            finite = [v for v in values if _finite(v)]
            row[f"last/{m}"] = values[-1] if values else None
            if m not in _NO_BEST:
                row[f"best/{m}"] = (pick if m == metric else min)(finite) if finite else None
        scored = [(r[metric], int(r["epoch"])) for r in rows if _finite(r.get(metric)) and not r.get("diverged")]
        if scored:
            best_value = pick(v for v, _ in scored)
            row["best_epoch"] = min(e for v, e in scored if v == best_value)
        else:
            row["best_epoch"] = None
        row["wall_time_s"] = max((float(r.get("time_total_s") or 0.0) for r in rows), default=0.0)
        row["checkpoint"] = meta.get("checkpoint")
        row["error"] = meta.get("error")
        out.append(row)
    return out


def best_trial(rows: Iterable[Mapping[str, Any]], metric: str, mode: str) -> Mapping[str, Any] | None:
    """The search's best trial, by the one rule every report and the final retrain use.

    A trial counts unless it errored (``status`` ERROR), diverged (``diverged``; retraining its configuration
    would likely diverge again) or has no finite ``best/<metric>``. Of those, the best ``best/<metric>`` wins
    (the lowest for ``mode='min'``, the highest for ``'max'``); a tie goes to the trial that reached it in
    fewer epochs (``best_epoch``), then to the smaller ``trial_id``, so the choice never depends on row order.
    Unfinished (interrupted) trials count with the epochs they completed.

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
              if r.get("status") != "ERROR" and not r.get("diverged") and _finite(r.get(f"best/{metric}"))]

    def rank(r: Mapping[str, Any]) -> tuple[float, float, str]:
        epoch = r.get("best_epoch")
        return sign * r[f"best/{metric}"], epoch if _finite(epoch) else math.inf, str(r["trial_id"])

    return min(usable, key=rank, default=None)


class ParquetExporter(Callback):
    """Tune callback that keeps ``epochs.parquet`` and ``trials.parquet`` in the experiment folder current."""

    def __init__(self, experiment_dir: str | os.PathLike, *, metric: str, mode: str, max_epochs: int,
                 param_paths: Iterable[str]) -> None:
        self.experiment_dir = str(experiment_dir)
        self.metric, self.mode, self.max_epochs = metric, mode, max_epochs
        self.param_paths = list(param_paths)
        self._epochs: dict[tuple[str, int], dict[str, Any]] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    # Tune calls setup() on a fresh and on a restored run: reload what an earlier run wrote.
    def setup(self, **info: Any) -> None:
        epochs_path = Path(self.experiment_dir) / EPOCHS_FILE
        trials_path = Path(self.experiment_dir) / TRIALS_FILE
        if epochs_path.is_file():
            for r in read_rows(epochs_path):
                self._epochs[(str(r["trial_id"]), int(r["epoch"]))] = r
        if trials_path.is_file():
            for r in read_rows(trials_path):
                self._meta[str(r["trial_id"])] = {
                    "status": r.get("status"), "checkpoint": r.get("checkpoint"), "error": r.get("error"),
                    "params": {p: r.get(f"param/{p}") for p in self.param_paths}}

    def _trial(self, trial: Any, status: str | None = None) -> dict[str, Any]:
        """The trial's metadata, refreshed. Only on_trial_complete/on_trial_error decide that a trial ended:
        Ray also marks trials TERMINATED when it stops them because the search was interrupted, and those
        are resumed later, so its status is not copied then."""
        meta = self._meta.setdefault(trial.trial_id, {})
        if status is not None:
            meta["status"] = status
        elif meta.get("status") not in _FINAL and trial.status not in _FINAL:
            meta["status"] = trial.status
        meta["params"] = {p: trial.config.get(p) for p in self.param_paths}
        return meta

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._trial(trial)
        self.flush()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        epoch = int(result.get("training_iteration", result.get("epoch", 0)))
        row = {"trial_id": trial.trial_id, "epoch": epoch,
               "time_total_s": result.get("time_total_s"), "timestamp": result.get("timestamp"),
               "node_id": result.get("node_id"), "diverged": bool(result.get("diverged", False))}
        for k, v in result.items():
            if "/" in k or k in ("lr",):
                row[k] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        self._epochs[(trial.trial_id, epoch)] = row
        self._trial(trial)
        self.flush()

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        self._trial(trial)["checkpoint"] = getattr(checkpoint, "path", str(checkpoint))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._trial(trial, "TERMINATED")
        self.flush()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._trial(trial, "ERROR")["error"] = str(getattr(trial, "error_file", "") or "")
        self.flush()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for t in trials:
            meta = self._trial(t)
            if meta.get("status") not in _FINAL:
                meta["status"] = INTERRUPTED  # stopped with the search; --resume continues it
            if getattr(t, "checkpoint", None) is not None and getattr(t.checkpoint, "path", None):
                meta["checkpoint"] = t.checkpoint.path
        self.flush()

    def flush(self) -> None:
        """Rewrite both parquet files (atomically) from the rows held."""
        directory = Path(self.experiment_dir)
        directory.mkdir(parents=True, exist_ok=True)
        epochs = [self._epochs[k] for k in sorted(self._epochs)]
        write_parquet_atomic(epochs, directory / EPOCHS_FILE)
        trials = summarize_trials(epochs, self._meta, metric=self.metric, mode=self.mode,
                                  max_epochs=self.max_epochs, param_paths=self.param_paths)
        write_parquet_atomic(trials, directory / TRIALS_FILE)
