"""The one way a search's Ray Tune ``Tuner`` is built: Optuna (or random search) proposes, ASHA (or nobody) stops,
metric and mode come from the search-space file. The service, the replay benchmark and the grid recording
all build theirs here."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from ray import tune
from ray.tune import Callback

from hawor_tune.search.storage_fs import atomic_local_fs
from hawor_tune.search_space import SearchSpace
from hawor_tune.tune_space import OPTUNA_DIRECTIONS, optuna_distributions, tune_param_space

# A trial whose worker or node fails is retried from its last checkpoint this many times.
MAX_FAILURES = 2


class _AfterItsEnd(logging.Filter):
    """Drops Ray's warning for each result of a trial its Optuna searcher has already ended: a trial that
    errored (told FAIL) and that ``--resume`` runs again, because its environment failed. The searcher's
    study keeps it failed; the study on disk (:mod:`hawor_tune.optuna_study`) records how it ended."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Received additional result for trial")


def quiet_after_the_end() -> None:
    """Install :class:`_AfterItsEnd` on Ray's Optuna searcher's logger (once; a restored search's searcher is
    unpickled, not built)."""
    from ray.tune.search.optuna import optuna_search

    if not any(isinstance(f, _AfterItsEnd) for f in optuna_search.logger.filters):
        optuna_search.logger.addFilter(_AfterItsEnd())


def build_searcher(space: SearchSpace, warm_trials: list | None = None, *, first_point_default: bool = True) -> Any:
    """The space's searcher: Ray's random search, or Optuna's TPE (told ASHA's stops as complete, or as
    pruned with ``search: {stopped_as: pruned}``; constrained by ``train.constraints`` where the space has
    them) behind a ``ConcurrencyLimiter`` of ``max_concurrent``.

    Args:
        space: a checked search space.
        warm_trials: an earlier search's finished Optuna trials, in the sampler's study before its first
            proposal (:func:`hawor_tune.optuna_study.warm_start_trials`).
        first_point_default: the base config's own point is the first trial (False: every trial is the
            searcher's, to compare samplers alone).
    """
    first_point = [space.default_point()] if first_point_default else None
    if space.search_algorithm == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator
        return BasicVariantGenerator(points_to_evaluate=first_point, random_state=space.search_seed,
                                     max_concurrent=space.max_concurrent)
    import optuna
    from ray.tune.search import ConcurrencyLimiter

    from hawor_tune.pruning_search import ConstrainedOptunaSearch, PruningOptunaSearch

    quiet_after_the_end()

    # Seed the sampler itself: OptunaSearch ignores `seed` when a sampler is passed.
    # TPE reads the constraints the searcher sets on each trial (constrained TPE when any is set).
    sampler = optuna.samplers.TPESampler(seed=space.search_seed, n_startup_trials=space.tpe_startup_trials)
    # Given its space up front, OptunaSearch ignores TuneConfig's metric/mode, so it gets them here too
    # (both from the one search-space file).
    # With lists of metrics and modes (a multi-objective space) TPE is Optuna's multi-objective TPE.
    metric, mode = (list(space.metrics), list(space.modes)) if space.is_multi_objective else (space.metric, space.mode)
    storage = None
    if warm_trials:
        storage = optuna.storages.InMemoryStorage()
        optuna.create_study(storage=storage, study_name="warm_start",
                            directions=[OPTUNA_DIRECTIONS[m] for m in space.modes]
                            ).add_trials(warm_trials)
    options = dict(space=optuna_distributions(space.params), metric=metric, mode=mode, points_to_evaluate=first_point,
                   sampler=sampler, storage=storage, study_name="warm_start" if storage else None,
                   constraints=space.constraints)
    if space.search_stopped_as == "pruned":
        searcher = PruningOptunaSearch(**options, max_epochs=space.max_epochs)
    else:
        searcher = ConstrainedOptunaSearch(**options)
    return ConcurrencyLimiter(searcher, max_concurrent=space.max_concurrent)


def build_scheduler(space: SearchSpace) -> Any:
    """The space's scheduler: ASHA over epochs (Ray's ``training_iteration``: one report per epoch), or FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if space.scheduler_type == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", max_t=space.max_epochs,
                         grace_period=space.grace_period, reduction_factor=space.reduction_factor)


def build_tuner(space: SearchSpace, trainable: Any, *, storage: str | os.PathLike, name: str,
                callbacks: Sequence[Callback] = (), verbose: int = 0, searcher: Any = None, scheduler: Any = None,
                num_samples: int | None = None) -> tune.Tuner:
    """A new search's Tuner: ``space``'s metric, mode and trial count, its searcher and scheduler (or the
    ones given), ``MAX_FAILURES`` retries of a failed trial from its last checkpoint, and the checkpoints
    kept in the storage (the two best by the metric, and the newest), each file Ray writes there written
    atomically (:mod:`hawor_tune.search.storage_fs`).

    Args:
        space: a checked search space.
        trainable: the wrapped trainable (``tune.with_resources(tune.with_parameters(...))``).
        storage: Ray's storage folder (absolute); on a cluster, one that every node reads.
        name: the experiment's folder under ``storage``.
        callbacks: Tune callbacks on the driver.
        verbose: Ray Tune's own output (0: none).
        searcher, scheduler: replace the space's (:func:`build_searcher`, :func:`build_scheduler`).
        num_samples: trials to run (default: the space's).
    """
    from ray.tune.search.basic_variant import BasicVariantGenerator

    searcher = build_searcher(space) if searcher is None else searcher
    return tune.Tuner(
        trainable,
        # Random search samples Tune's own space; Optuna holds the distributions itself.
        param_space=tune_param_space(space.params) if isinstance(searcher, BasicVariantGenerator) else {},
        tune_config=tune.TuneConfig(
            metric=space.metric, mode=space.mode, num_samples=num_samples or space.num_samples,
            search_alg=searcher, scheduler=build_scheduler(space) if scheduler is None else scheduler,
            reuse_actors=True),
        run_config=tune.RunConfig(
            name=name, storage_path=os.fspath(storage), storage_filesystem=atomic_local_fs(), verbose=verbose,
            callbacks=list(callbacks),
            failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=space.metric,
                                                    checkpoint_score_order=space.mode)),
    )
