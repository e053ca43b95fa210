"""Run or resume a search: claim the experiment's folder, wait for the data, start or join Ray, build the Tuner
(or restore it, choosing which failed trials run again) and turn a full disk into one line."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune import Callback

from hawor_tune.atomic import DiskFullError
from hawor_tune.config import save_config
from hawor_tune.results import TRIALS_FILE, ExperimentRecord, StorageError, check_resumable, check_storage
from hawor_tune.search.export import ParquetExporter
from hawor_tune.search.local_ray import start_ray
from hawor_tune.search.preparation import prepare_data
from hawor_tune.search.resume import resume_plan
from hawor_tune.search.storage_fs import atomic_local_fs
from hawor_tune.search.trainable import train_trial
from hawor_tune.search.tuner import build_searcher, build_tuner, quiet_after_the_end
from hawor_tune.search_space import SearchSpace
from hawor_tune.tune_space import optuna_distributions

log = logging.getLogger(__name__)


@dataclass
class SearchOutcome:
    experiment_dir: Path
    results: Any  # ray.tune.ResultGrid


def build_trainable(space: SearchSpace, keep_failed: dict[str, str] | None = None) -> Any:
    """:func:`train_trial` with the space's resources per trial. The space travels to the workers whole (a
    small pickle): it holds the resolved base config, so a worker on another node needs none of the
    driver's files."""
    resources = {"cpu": space.resources_cpu, "gpu": space.resources_gpu}
    return tune.with_resources(tune.with_parameters(train_trial, space=space, keep_failed=keep_failed or {}),
                               resources)


def _disk_full(error: BaseException) -> OSError | None:
    """The full-disk error (ENOSPC, EDQUOT) behind ``error``, if any, following causes and contexts."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None


def _claim(exp_dir: Path) -> Path:
    """Make the experiment folder of a new search, refusing one that exists: ``mkdir`` is atomic, so of two
    searches started at once under one name exactly one gets it."""
    try:
        exp_dir.mkdir()
    except FileExistsError:
        raise StorageError(f"experiment {exp_dir.name}: {exp_dir} already exists (another search has this name; "
                           f"add --resume to continue it, or choose another name)") from None
    return exp_dir


def _record_callbacks(space: SearchSpace, exp_dir: Path, verbose: int, mlflow_uri: str | None = None) -> list[Callback]:
    """The callbacks besides the parquet exporter: the Optuna study on disk, unless Ray prints the live table,
    and MLflow tracking when asked for."""
    from hawor_tune.console import LiveConsole
    from hawor_tune.optuna_study import OptunaStudyRecorder

    max_epochs = space.base_config.train.epochs
    callbacks: list[Callback] = [OptunaStudyRecorder(exp_dir, objectives=space.objectives, max_epochs=max_epochs,
                                                     distributions=optuna_distributions(space.params),
                                                     constraints=space.constraints)]
    if not verbose:
        callbacks.append(LiveConsole(objectives=space.objectives, max_epochs=max_epochs, param_paths=space.params,
                                     constraints=space.constraints))
    if mlflow_uri:
        from hawor_tune.mlflow_tracking import mlflow_callback
        callbacks.append(mlflow_callback(mlflow_uri, exp_dir.name))
    return callbacks


def _restore(space: SearchSpace, exp_dir: Path) -> tune.Tuner:
    """The interrupted search's Tuner, restored: unfinished trials continue; of the errored ones, those whose
    environment failed run again from their last checkpoint, those that failed on their own stay failed
    (one line each says which). Ray restores every errored trial or none, so the second kind is stopped by
    the trainable itself as it starts (:func:`train_trial`'s ``keep_failed``)."""
    quiet_after_the_end()
    plan = resume_plan(exp_dir)
    for trial in plan:
        print(trial.line(), flush=True)
    keep_failed = {t.trial_id: t.why for t in plan if t.errored and not t.runs_again}
    rerun = any(t.runs_again for t in plan)
    return tune.Tuner.restore(str(exp_dir), trainable=build_trainable(space, keep_failed), resume_errored=rerun,
                              storage_filesystem=atomic_local_fs())


def run_search(space: SearchSpace, *, storage: str | os.PathLike, name: str, resume: bool = False,
               address: str | None = None, dashboard_port: int = 8265, verbose: int = 0,
               mlflow_uri: str | None = None, warm_trials: list | None = None,
               prepared: Future | None = None) -> SearchOutcome:
    """Run (or resume) a search; results land in ``<storage>/<name>``.

    Args:
        space: a validated search space (its file is already checked).
        storage: folder (made absolute) for Ray's storage and the results; on a cluster, a shared one that
            every node mounts at the same path (the trials' checkpoints live there).
        name: experiment name (folder under storage).
        resume: continue ``<storage>/<name>`` with ``Tuner.restore``: finished trials are not run again,
            unfinished ones continue, errored ones run again when their environment failed.
        address: join this Ray cluster instead of starting a local one.
        dashboard_port: port of the embedded dashboard (bound to 127.0.0.1).
        verbose: 0 prints the compact live table (:mod:`hawor_tune.console`); 1 or 2 Ray Tune's own output
            at that verbosity instead (every reported result of every trial).
        mlflow_uri: log every trial to this MLflow tracking URI (:mod:`hawor_tune.mlflow_tracking`).
        warm_trials: an earlier search's finished Optuna trials that seed the sampler
            (:func:`hawor_tune.optuna_study.warm_start_trials`).
        prepared: the data's preparation, already started by
            :func:`hawor_tune.search.prepare_in_background`; None prepares it here.
    """
    storage = check_storage(storage)
    exp_dir = check_resumable(storage, name, label="resume") if resume else _claim(storage / name)
    try:
        if prepared is None:
            prepare_data(space.base_config)
        else:
            prepared.result()
    except BaseException:
        if not resume:
            with contextlib.suppress(OSError):
                exp_dir.rmdir()  # the name is free again; an empty folder only, never a search's files
        raise

    if not ray.is_initialized():
        start_ray(address, dashboard_port)
    exporter = ParquetExporter(exp_dir, metric=space.metric, mode=space.mode,
                               max_epochs=space.base_config.train.epochs, param_paths=list(space.params),
                               objectives=space.objectives if space.is_multi_objective else ())
    if resume:  # the callbacks are the first run's, restored with its Tuner
        tuner = _restore(space, exp_dir)
    else:
        ExperimentRecord.of_search(space, name).save(exp_dir)
        save_config(space.base_config, exp_dir / "base_config.yaml")
        callbacks = [exporter, *_record_callbacks(space, exp_dir, verbose, mlflow_uri)]
        tuner = build_tuner(space, build_trainable(space), storage=storage, name=name, callbacks=callbacks,
                            verbose=verbose, searcher=build_searcher(space, warm_trials))
    try:
        results = tuner.fit()
    except Exception as e:
        full = _disk_full(e)
        if full is None:
            raise
        # Ray wraps a callback's error in a TuneError holding the traceback as text: say the one thing wrong.
        if not isinstance(full, DiskFullError):  # one of Ray's own writes
            full = f"no space left on the disk of {storage} ({full}): free space there, then add --resume"
        raise DiskFullError(f"search {name} stopped: {full}") from None
    if not (exp_dir / TRIALS_FILE).is_file():
        exporter.flush()
    return SearchOutcome(exp_dir, results)
