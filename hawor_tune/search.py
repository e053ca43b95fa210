"""The search service: Ray Tune trials of full HaWoR training runs, proposed by Optuna, stopped by ASHA.

:func:`train_trial` is the trainable, a thin adapter over :func:`hawor_tune.train.fit`; :func:`run_search`
prepares the data once, starts or joins Ray, builds the Tuner (or restores it) and returns the results;
:class:`ParquetExporter` keeps the experiment's parquet files (:mod:`hawor_tune.results`) current.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune import Callback

from hawor_tune.atomic import DiskFullError
from hawor_tune.config import ExperimentConfig, save_config
from hawor_tune.results import (
    EPOCHS_FILE,
    TRIALS_FILE,
    ExperimentRecord,
    StorageError,
    check_resumable,
    check_storage,
    read_rows,
    summarize_trials,
    write_parquet_atomic,
)
from hawor_tune.search_space import SearchSpace
from hawor_tune.tune_space import OPTUNA_DIRECTIONS, optuna_distributions, tune_param_space

log = logging.getLogger(__name__)

INTERRUPTED = "INTERRUPTED"
# How long a worker's exit waits for a stopped trial to free its training state (train_trial).
_STOP_GRACE_S = 30.0
_FINAL = ("TERMINATED", "ERROR")


def train_trial(params: dict[str, Any], space: SearchSpace) -> None:
    """Ray Tune function trainable: one full training run of the trial's config (:meth:`SearchSpace.trial_config`).

    Resumes from ``tune.get_checkpoint()`` (a retried or restored trial) and reports every epoch's
    metrics with that epoch's checkpoint. Torch uses as many threads as the trial has CPUs.

    ``fit()`` writes into a temporary folder (in the system's temporary directory), removed when the trial
    ends or ASHA stops it (a worker killed outright leaves it there), not into the trial's folder: Ray
    copies that folder to the storage after every report and never deletes there, so each epoch's
    checkpoint would be stored once more, and left in Ray's session folder under /tmp for good. Tune's own
    copies of the reported checkpoints are the ones kept (``CheckpointConfig(num_to_keep=2)``: the two best
    by the metric, and the newest).

    A trial that Tune stops (ASHA, or its last epoch) leaves ``tune.report`` by ``SystemExit(0)`` in its own
    thread, and Tune does not wait for that thread: the worker may exit at once. Freeing the training's
    tensors while the interpreter shuts down aborted the worker (torch frees a tensor without the GIL; a
    thread that takes the GIL back during finalization is ended by ``pthread_exit``, which unwinds through
    a C++ destructor: SIGABRT, a crash dump of a hundred lines in the search's output, and the temporary
    folder possibly left behind). So the trial lets go of everything before it re-raises the stop, and the
    worker's exit waits for that (``atexit``, at most ``_STOP_GRACE_S``).
    """
    released = threading.Event()
    atexit.register(released.wait, _STOP_GRACE_S)
    stop: SystemExit | None = None
    try:
        try:
            with tempfile.TemporaryDirectory(prefix="hawor-trial-") as run_dir:
                _train_trial(params, space, run_dir)
        except SystemExit as e:
            # A fresh one, with no traceback: leaving this block frees the caught one's, and every tensor
            # of fit()'s frames it holds.
            stop = SystemExit(e.code)
    finally:
        released.set()
        atexit.unregister(released.wait)
    if stop is not None:
        raise stop


def _train_trial(params: dict[str, Any], space: SearchSpace, run_dir: str) -> None:
    from hawor_tune.train import fit

    # Ray logs every reported checkpoint's full path (a line of some 300 characters per trial and epoch) into
    # the search's output, beside fit()'s own epoch line; the paths are in the trial folders.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    ctx = tune.get_context()
    cpus = ctx.get_trial_resources().required_resources.get("CPU", 1) if ctx.get_trial_resources() else 1
    threads = max(1, math.ceil(cpus))
    cfg = space.trial_config(params, {"train.out_dir": run_dir, "train.threads": threads,
                                      "train.keep_checkpoints": 1})
    node_id = ray.get_runtime_context().get_node_id()

    # Each result names its epoch as Ray's training_iteration, which otherwise counts reports: a trial that
    # falls back to an older checkpoint reports some epochs again, and they must replace the first reports.
    def report(record: dict[str, float], checkpoint_dir: str) -> None:
        tune.report({**record, "training_iteration": int(record["epoch"]), "node_id": node_id},
                    checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))

    checkpoint = tune.get_checkpoint()
    # The storage is a local or shared folder (check_storage refuses URIs), so the path is readable here.
    result = fit(cfg, on_epoch=report, resume_from=_resume_point(checkpoint.path if checkpoint else None))
    if result.status == "diverged":
        # An infinite objective tells ASHA and Optuna this configuration is bad; the row is flagged diverged.
        epoch = result.epochs_run + 1
        tune.report({"diverged": True, "epoch": float(epoch), "training_iteration": epoch, "node_id": node_id,
                     **{m: math.inf if mode == "min" else -math.inf for m, mode in space.objectives}})


def _resume_point(newest: str | None) -> str | None:
    """The checkpoint a retried or restored trial continues from: Ray's newest, or, when that one cannot be
    read (a crash or a full disk cut it short), the newest older one of the trial that can; None (the trial
    starts again from epoch 1) when none can. Each fallback is logged."""
    from hawor_tune.checkpoint import CheckpointError, load_checkpoint

    if newest is None:
        return None
    newest_dir = Path(newest)
    # Ray names a trial's checkpoints checkpoint_<6-digit index>: by name is oldest to newest.
    older = sorted((p for p in newest_dir.parent.glob("checkpoint_*") if p.name < newest_dir.name), reverse=True)
    for candidate in [newest_dir, *older]:
        try:
            load_checkpoint(candidate, mmap=True)  # fit() reads it for real
        except CheckpointError as e:
            log.warning("cannot resume from %s: %s", candidate, e)
            continue
        if candidate != newest_dir:
            log.warning("resuming from the older checkpoint %s; its later epochs run again", candidate)
        return str(candidate)
    log.warning("no readable checkpoint in %s: the trial starts again from epoch 1", newest_dir.parent)
    return None


def prepare_data(cfg: ExperimentConfig) -> None:
    """Generate the dataset (if configured), build the frame and flow caches, the hand-pretrained start and the camera's
    flow-head fit once, before trials start (each is cached; a later search re-uses them)."""
    from hawor_tune.data import build_dataset, ensure_dataset
    from hawor_tune.flow_fit import ensure_flow_fit
    from hawor_tune.pretrain import ensure_pretrained

    t0 = time.perf_counter()
    ensure_dataset(cfg)
    for split in ("train", "val"):
        build_dataset(cfg, split)
    log.info("data ready in %.1f s", time.perf_counter() - t0)
    t0 = time.perf_counter()
    ensure_pretrained(cfg)
    ensure_flow_fit(cfg)
    log.info("pretrained start ready in %.1f s", time.perf_counter() - t0)


def _made_before(cfg: ExperimentConfig) -> bool:
    """Whether the one-time preparation of ``cfg``'s data is done: the dataset is there and its pretrained
    start and the camera's flow-head fit are cached. :func:`prepare_data` then only checks them (and builds a
    frame or flow cache that is missing)."""
    from hawor_tune.flow_fit import flow_fit_file
    from hawor_tune.pretrain import makes_own_start, pretrained_file

    if not (Path(cfg.data.root) / "raw_seqs").is_dir():
        return False
    if makes_own_start(cfg) and not pretrained_file(cfg).is_file():
        return False
    return not cfg.data.flow_grid or flow_fit_file(cfg).is_file()


def _yield_cpu() -> None:
    """Lowest CPU priority (nice 19) for the calling thread only: Linux gives each thread its own nice value."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def prepare_in_background(cfg: ExperimentConfig) -> Future:
    """:func:`prepare_data` in threads of their own, so that the local Ray starts meanwhile; the returned
    future re-raises its error.

    Data an earlier search prepared (:func:`_made_before`) is only checked, in a thread at nice 19, so that
    on a small machine Ray's own start-up gets the CPU first (the first trial waits for both). A first
    search's one-time generation and pretraining run in a second thread at the caller's priority (a thread's
    nice value is its own, and a thread cannot raise it again). Both are daemons: Ctrl-C does not wait for
    them; what they make is written atomically and made again by the next search."""
    future: Future = Future()
    made_before: Future = Future()

    def check() -> None:
        _yield_cpu()
        try:
            made = _made_before(cfg)
        except BaseException as e:  # handed to whoever waits on the future
            made_before.set_result(True)  # nothing for the other thread to do
            future.set_exception(e)
            return
        made_before.set_result(made)
        if made:
            _settle(future, cfg)

    def first_time() -> None:
        if not made_before.result():
            _settle(future, cfg)

    threading.Thread(target=check, name="check-data", daemon=True).start()
    threading.Thread(target=first_time, name="prepare-data", daemon=True).start()
    return future


def _settle(future: Future, cfg: ExperimentConfig) -> None:
    try:
        prepare_data(cfg)
    except BaseException as e:  # handed to whoever waits on the future
        future.set_exception(e)
    else:
        future.set_result(None)


def _searcher(space: SearchSpace, warm_trials: list | None = None, *, first_point_default: bool = True) -> Any:
    # The base config's own point goes first, unless a benchmark compares the samplers alone.
    first_point = [space.default_point()] if first_point_default else None
    if space.search_algorithm == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator
        return BasicVariantGenerator(points_to_evaluate=first_point, random_state=space.search_seed,
                                     max_concurrent=space.max_concurrent)
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    # Seed the sampler itself: OptunaSearch ignores `seed` when a sampler is passed.
    sampler = optuna.samplers.TPESampler(seed=space.search_seed, n_startup_trials=space.tpe_startup_trials)
    # Given its space up front, OptunaSearch ignores TuneConfig's metric/mode, so it gets them here too
    # (both from the one search-space file).
    # With lists of metrics and modes (a multi-objective space) TPE is Optuna's multi-objective TPE.
    metric, mode = (list(space.metrics), list(space.modes)) if space.is_multi_objective else (space.metric, space.mode)
    storage = None
    if warm_trials:  # an earlier search's trials, already in the sampler's study before the first proposal
        storage = optuna.storages.InMemoryStorage()
        optuna.create_study(storage=storage, study_name="warm_start",
                            directions=[OPTUNA_DIRECTIONS[m] for m in space.modes]
                            ).add_trials(warm_trials)
    options = dict(space=optuna_distributions(space.params), metric=metric, mode=mode, points_to_evaluate=first_point,
                   sampler=sampler, storage=storage, study_name="warm_start" if storage else None)
    if space.search_stopped_as == "pruned":
        from hawor_tune.pruning_search import PruningOptunaSearch
        searcher = PruningOptunaSearch(**options, max_epochs=space.max_epochs)
    else:
        searcher = OptunaSearch(**options)
    return ConcurrencyLimiter(searcher, max_concurrent=space.max_concurrent)


def _scheduler(space: SearchSpace) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if space.scheduler_type == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", max_t=space.max_epochs,
                         grace_period=space.grace_period, reduction_factor=space.reduction_factor)


def _trainable(space: SearchSpace) -> Any:
    # The space travels to the workers whole (a small pickle): it holds the resolved base config, so a
    # worker on another node needs none of the driver's files.
    resources = {"cpu": space.resources_cpu, "gpu": space.resources_gpu}
    return tune.with_resources(tune.with_parameters(train_trial, space=space), resources)


@dataclass
class SearchOutcome:
    experiment_dir: Path
    results: Any  # ray.tune.ResultGrid


LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """While Ray starts, make loopback this machine's node IP, so every Ray process listens on it alone.

    Ray binds its GCS, raylet (node and object manager), worker, dashboard-agent and runtime-env-agent
    ports to all interfaces unless the node IP is a loopback address, and ``ray.init`` turns an explicit
    ``_node_ip_address="127.0.0.1"`` into the machine's outward IP. Only Ray's single-machine switch
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read once at import into ``ray_constants``) keeps loopback;
    it is set for the start only, in this process and in the environment the Ray processes inherit.
    """
    from ray._private import ray_constants

    env_var = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_flag = os.environ.get(env_var), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[env_var], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(env_var, None)
        else:
            os.environ[env_var] = saved_env


def start_ray(address: str | None, dashboard_port: int, num_cpus: int | None = None) -> str | None:
    """Join a cluster (``address``) or start an embedded local Ray that listens on 127.0.0.1 only: GCS,
    raylet, workers, agents and the dashboard (whose token the user pastes, see ``ray get-auth-token``).

    The local Ray runs its workers, so the trials, at the user's own priority (nice 0, as a plain training
    run), not at Ray's default nice 15, where every CPU cycle that the driver, Ray's daemons or anything else
    on the machine wants is taken from the trials first. It starts no idle workers ahead of time (Ray's
    default starts one per CPU when the driver connects): a Tune trial never runs in one, because Tune gives
    its trial actors a runtime environment of their own (an environment variable) and Ray only hands an
    actor an idle worker started with the same one, so they would only take CPU from the start-up. A
    cluster keeps its own settings.

    Returns:
        The dashboard URL, when there is one.
    """
    if ray.is_initialized():
        return None
    if address:
        ctx = ray.init(address=address, logging_level=logging.WARNING)
    else:
        with _loopback_node():
            ctx = ray.init(num_cpus=num_cpus, _node_ip_address=LOOPBACK, include_dashboard=True,
                           dashboard_host=LOOPBACK, dashboard_port=dashboard_port,
                           logging_level=logging.WARNING,
                           _system_config={"worker_niceness": 0, "prestart_worker_first_driver": False})
    url = getattr(ctx, "dashboard_url", None)
    return f"http://{url}" if url and not url.startswith("http") else url


class ParquetExporter(Callback):
    """Tune callback on the driver that keeps ``epochs.parquet`` and ``trials.parquet`` in the experiment folder
    current: it rewrites both atomically after every reported epoch, so a killed search still leaves everything
    up to its last finished epoch, and on resume it reloads what the files already hold."""

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
                                  max_epochs=self.max_epochs, param_paths=self.param_paths,
                                  objectives=self.objectives)
        write_parquet_atomic(trials, directory / TRIALS_FILE)


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
                                                     distributions=optuna_distributions(space.params))]
    if not verbose:
        callbacks.append(LiveConsole(objectives=space.objectives, max_epochs=max_epochs, param_paths=space.params))
    if mlflow_uri:
        from hawor_tune.mlflow_tracking import mlflow_callback
        callbacks.append(mlflow_callback(mlflow_uri, exp_dir.name))
    return callbacks


def run_search(space: SearchSpace, *, storage: str | os.PathLike, name: str, resume: bool = False,
               address: str | None = None, dashboard_port: int = 8265, verbose: int = 0,
               mlflow_uri: str | None = None, warm_trials: list | None = None,
               prepared: Future | None = None) -> SearchOutcome:
    """Run (or resume) a search; results land in ``<storage>/<name>``.

    Args:
        space: a validated search space (its file is already checked).
        storage: folder (made absolute) or URI for Ray's storage; multi-node runs need it shared.
        name: experiment name (folder under storage).
        resume: continue ``<storage>/<name>`` with ``Tuner.restore``; finished trials are not run again.
        address: join this Ray cluster instead of starting a local one.
        dashboard_port: port of the embedded dashboard (bound to 127.0.0.1).
        verbose: 0 prints the compact live table (:mod:`hawor_tune.console`); 1 or 2 Ray Tune's own output
            at that verbosity instead (every reported result of every trial).
        mlflow_uri: log every trial to this MLflow tracking URI (:mod:`hawor_tune.mlflow_tracking`).
        warm_trials: an earlier search's finished Optuna trials that seed the sampler
            (:func:`hawor_tune.optuna_study.warm_start_trials`).
        prepared: the data's preparation, already started by :func:`prepare_in_background`; None prepares
            it here.
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
    trainable = _trainable(space)
    exporter = ParquetExporter(exp_dir, metric=space.metric, mode=space.mode,
                               max_epochs=space.base_config.train.epochs, param_paths=list(space.params),
                               objectives=space.objectives if space.is_multi_objective else ())
    callbacks = [exporter, *_record_callbacks(space, exp_dir, verbose, mlflow_uri)]
    if resume:
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True)
    else:
        ExperimentRecord.of_search(space, name).save(exp_dir)
        save_config(space.base_config, exp_dir / "base_config.yaml")
        tuner = tune.Tuner(
            trainable,
            param_space=tune_param_space(space.params) if space.search_algorithm == "random" else {},
            tune_config=tune.TuneConfig(
                metric=space.metric, mode=space.mode, num_samples=space.num_samples,
                search_alg=_searcher(space, warm_trials), scheduler=_scheduler(space), reuse_actors=True),
            run_config=tune.RunConfig(
                name=name, storage_path=str(storage), verbose=verbose, callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=2),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=space.metric,
                                                        checkpoint_score_order=space.mode)),
        )
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
