"""The search's record on disk while it runs: a Tune callback on the driver that keeps ``epochs.parquet`` and
``trials.parquet`` (:mod:`hawor_tune.results`) current."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ray.tune import Callback

from hawor_tune.failures import TrialFailedBefore, describe, failed_by, trial_error
from hawor_tune.results import EPOCHS_FILE, TRIALS_FILE, read_rows, summarize_trials, write_parquet_atomic

log = logging.getLogger(__name__)

INTERRUPTED = "INTERRUPTED"
_FINAL = ("TERMINATED", "ERROR")


class ParquetExporter(Callback):
    """Tune callback on the driver that keeps ``epochs.parquet`` and ``trials.parquet`` in the experiment folder
    current: it rewrites both atomically after every reported epoch and every checkpoint Ray registers, so a
    killed search still leaves everything up to its last finished epoch, and on resume it reloads what the
    files already hold.

    A trial's ``checkpoint`` is the last one Ray registered (the one a retry or a resume continues from); an
    errored trial's ``error`` is its error in one line and ``failed_by`` says whether its environment failed
    or the trial itself (:func:`hawor_tune.failures.failed_by`)."""

    def __init__(self, experiment_dir: str | os.PathLike, *, metric: str, mode: str, max_epochs: int,
                 param_paths: Iterable[str], objectives: Iterable[tuple[str, str]] = ()) -> None:
        self.experiment_dir = str(experiment_dir)
        self.metric, self.mode, self.max_epochs = metric, mode, max_epochs
        self.objectives = list(objectives)
        self.param_paths = list(param_paths)
        self._epochs: dict[tuple[str, int], dict[str, Any]] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._matched = False

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
                    "failed_by": r.get("failed_by"), "params": {p: r.get(f"param/{p}") for p in self.param_paths}}

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

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        # The first step of a run sees exactly the trials Ray restored (the searcher adds new ones after it).
        if not self._matched:
            self._matched = True
            if self._meta or self._epochs:
                self._match_restored(trials)
                self.flush()

    def _match_restored(self, trials: list) -> None:
        """Make the rows reloaded from the files say what Ray's restored experiment holds.

        Ray restores an experiment from its last state snapshot, taken every few seconds. A driver killed
        between two snapshots leaves rows Ray never recorded: a trial started since the last one (Ray
        forgets it and its searcher proposes again) and epochs past a trial's last recorded result (they
        run again from its checkpoint). Both go; each restored trial takes Ray's status (TERMINATED,
        ERROR, or PENDING to run again).
        """
        restored = {t.trial_id: t for t in trials}
        ghosts = sorted(set(self._meta) - set(restored))
        if ghosts:
            log.warning("dropping trials %s from %s: the restored experiment does not have them (they started "
                        "after Ray's last state snapshot before the search stopped)", ghosts, TRIALS_FILE)
        for trial_id in ghosts:
            del self._meta[trial_id]
        for trial_id, epoch in list(self._epochs):
            trial = restored.get(trial_id)
            if trial is None or epoch > int((trial.last_result or {}).get("training_iteration", 0)):
                del self._epochs[(trial_id, epoch)]
        for trial in trials:
            meta = self._trial(trial)
            meta["status"] = trial.status
            if getattr(trial, "checkpoint", None) is not None and getattr(trial.checkpoint, "path", None):
                meta["checkpoint"] = trial.checkpoint.path

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._trial(trial)
        self.flush()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        epoch = int(result.get("training_iteration", result.get("epoch", 0)))
        row = {"trial_id": trial.trial_id, "epoch": epoch,
               "time_total_s": result.get("time_total_s"), "timestamp": result.get("timestamp"),
               "node_id": result.get("node_id"), "pid": result.get("pid"),
               "diverged": bool(result.get("diverged", False))}
        for k, v in result.items():
            if "/" in k or k in ("lr",):
                row[k] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        self._epochs[(trial.trial_id, epoch)] = row
        self._trial(trial)
        self.flush()

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        # Ray calls this as it registers the checkpoint: from now on a retry continues from it.
        self._trial(trial)["checkpoint"] = getattr(checkpoint, "path", str(checkpoint))
        self.flush()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        meta = self._trial(trial, "TERMINATED")
        meta["error"] = meta["failed_by"] = None  # a resumed trial's earlier failure is over
        self.flush()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        meta = self._trial(trial, "ERROR")
        error = trial_error(trial)
        cause = getattr(error, "cause", error)
        if not (isinstance(cause, TrialFailedBefore) and meta.get("failed_by")):  # keep the first run's why
            meta["error"], meta["failed_by"] = describe(error), failed_by(error)
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
                                  max_epochs=self.max_epochs, param_paths=self.param_paths,
                                  objectives=self.objectives)
        write_parquet_atomic(trials, directory / TRIALS_FILE)
