"""The search service: Ray Tune trials of full HaWoR training runs, proposed by Optuna, stopped by ASHA.

:func:`train_trial` is the trainable, a thin adapter over :func:`hawor_tune.train.fit`; :func:`run_search`
prepares the data once, starts or joins Ray, builds the Tuner (or restores it) and returns the results.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune

from hawor_tune.config import ExperimentConfig, load_config, save_config
from hawor_tune.results import TRIALS_FILE, ParquetExporter
from hawor_tune.search_space import SearchSpace

log = logging.getLogger(__name__)

SEARCH_FILE = "search.json"  # what run_best.py needs to know about the experiment
BUDGET_KEYS = ("train.epochs", "train.max_train_batches")


def train_trial(params: dict[str, Any], base: dict[str, Any], metric: str = "val/mpjpe") -> None:
    """Ray Tune function trainable: one full training run of ``base`` with the trial's ``params`` applied.

    Resumes from ``tune.get_checkpoint()`` (a retried or restored trial) and reports every epoch's
    metrics with that epoch's checkpoint. Torch uses as many threads as the trial has CPUs.
    """
    from hawor_tune.train import fit

    ctx = tune.get_context()
    cpus = ctx.get_trial_resources().required_resources.get("CPU", 1) if ctx.get_trial_resources() else 1
    threads = max(1, math.ceil(cpus))
    cfg = load_config(base, {**params, "train.out_dir": os.path.join(ctx.get_trial_dir(), "run"),
                             "train.threads": threads, "train.keep_checkpoints": 1})
    node_id = ray.get_runtime_context().get_node_id()

    def report(record: dict[str, float], checkpoint_dir: str) -> None:
        tune.report({**record, "node_id": node_id}, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        result = fit(cfg, on_epoch=report)
    else:
        with checkpoint.as_directory() as resume_dir:
            result = fit(cfg, on_epoch=report, resume_from=resume_dir)
    if result.status == "diverged":
        # An infinite objective tells ASHA and Optuna this configuration is bad; the row is flagged diverged.
        tune.report({"diverged": True, "epoch": float(result.epochs_run + 1), "node_id": node_id,
                     metric: math.inf})


def prepare_data(cfg: ExperimentConfig) -> None:
    """Generate the dataset (if configured), build the frame caches and the hand-pretrained start once,
    before trials start (each is cached; a later search re-uses them)."""
    from hawor_tune.data import build_dataset, ensure_dataset
    from hawor_tune.pretrain import ensure_pretrained

    t0 = time.perf_counter()
    ensure_dataset(cfg)
    for split in ("train", "val"):
        build_dataset(cfg, split)
    log.info("data ready in %.1f s", time.perf_counter() - t0)
    t0 = time.perf_counter()
    ensure_pretrained(cfg)
    log.info("pretrained start ready in %.1f s", time.perf_counter() - t0)


def _searcher(space: SearchSpace) -> Any:
    first_point = [space.default_point()]
    if space.search_algorithm == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator
        return BasicVariantGenerator(points_to_evaluate=first_point, random_state=space.search_seed,
                                     max_concurrent=space.max_concurrent)
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    # Seed the sampler itself: OptunaSearch ignores `seed` when a sampler is passed. Fewer random start-up
    # trials than Optuna's default 10, or TPE would never act in a 10-16 trial search.
    sampler = optuna.samplers.TPESampler(seed=space.search_seed,
                                         n_startup_trials=max(2, min(10, space.num_samples // 3)))
    # Given its space up front, OptunaSearch ignores TuneConfig's metric/mode, so it gets them here too
    # (both from the one search-space file).
    searcher = OptunaSearch(space=space.to_optuna_distributions(), metric=space.metric, mode=space.mode,
                            points_to_evaluate=first_point, sampler=sampler)
    return ConcurrencyLimiter(searcher, max_concurrent=space.max_concurrent)


def _scheduler(space: SearchSpace) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if space.scheduler_type == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", max_t=space.max_epochs,
                         grace_period=space.grace_period, reduction_factor=space.reduction_factor)


def _trainable(space: SearchSpace, base_tree: dict[str, Any]) -> Any:
    resources = {"cpu": space.resources_cpu, "gpu": space.resources_gpu}
    return tune.with_resources(tune.with_parameters(train_trial, base=base_tree, metric=space.metric), resources)


@dataclass
class SearchOutcome:
    experiment_dir: Path
    results: Any  # ray.tune.ResultGrid


def start_ray(address: str | None, dashboard_port: int, num_cpus: int | None = None) -> str | None:
    """Join a cluster (``address``) or start an embedded local Ray with the dashboard on 127.0.0.1.

    Returns:
        The dashboard URL, when there is one.
    """
    if ray.is_initialized():
        return None
    if address:
        ctx = ray.init(address=address, logging_level=logging.WARNING)
    else:
        ctx = ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                       dashboard_port=dashboard_port, logging_level=logging.WARNING)
    url = getattr(ctx, "dashboard_url", None)
    return f"http://{url}" if url and not url.startswith("http") else url


def experiment_record(space: SearchSpace, base_cfg: ExperimentConfig, name: str) -> dict[str, Any]:
    """What ``search.json`` holds: enough for run_best.py to rebuild any trial's config and the space."""
    from optuna.distributions import distribution_to_json

    full = load_config(space.base)
    return {"distributions": {p: distribution_to_json(d) for p, d in space.to_optuna_distributions().items()},
            "name": name, "space": str(space.path), "base_config": base_cfg.to_dict(), "metric": space.metric,
            "mode": space.mode, "params": list(space.params), "max_epochs": space.max_epochs,
            # The training budget of the base config file itself: a space may shorten trials to fit a search
            # budget, but the final retrain uses the full one.
            "full_budget": {k: getattr(full.train, k.split(".")[1]) for k in BUDGET_KEYS},
            "train_epochs": base_cfg.train.epochs, "num_samples": space.num_samples}


def run_search(space: SearchSpace, *, storage: str | os.PathLike, name: str, resume: bool = False,
               address: str | None = None, dashboard_port: int = 8265, verbose: int = 1) -> SearchOutcome:
    """Run (or resume) a search; results land in ``<storage>/<name>``.

    Args:
        space: a validated search space (its file is already checked).
        storage: folder (made absolute) or URI for Ray's storage; multi-node runs need it shared.
        name: experiment name (folder under storage).
        resume: continue ``<storage>/<name>`` with ``Tuner.restore``; finished trials are not run again.
        address: join this Ray cluster instead of starting a local one.
        dashboard_port: port of the embedded dashboard (bound to 127.0.0.1).
    """
    storage = Path(storage).expanduser().resolve()
    exp_dir = storage / name
    base_cfg = space.base_config()
    prepare_data(base_cfg)

    if not ray.is_initialized():
        start_ray(address, dashboard_port)
    trainable = _trainable(space, base_cfg.to_dict())
    exporter = ParquetExporter(exp_dir, metric=space.metric, mode=space.mode, max_epochs=base_cfg.train.epochs,
                               param_paths=list(space.params))
    if resume:
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True)
    else:
        exp_dir.mkdir(parents=True, exist_ok=True)
        (exp_dir / SEARCH_FILE).write_text(json.dumps(experiment_record(space, base_cfg, name), indent=2))
        save_config(base_cfg, exp_dir / "base_config.yaml")
        tuner = tune.Tuner(
            trainable,
            param_space=space.to_tune_param_space() if space.search_algorithm == "random" else {},
            tune_config=tune.TuneConfig(
                metric=space.metric, mode=space.mode, num_samples=space.num_samples,
                search_alg=_searcher(space), scheduler=_scheduler(space),
                max_concurrent_trials=space.max_concurrent, reuse_actors=True),
            run_config=tune.RunConfig(
                name=name, storage_path=str(storage), verbose=verbose, callbacks=[exporter],
                failure_config=tune.FailureConfig(max_failures=2),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=space.metric,
                                                        checkpoint_score_order=space.mode)),
        )
    results = tuner.fit()
    if not (exp_dir / TRIALS_FILE).is_file():
        exporter.flush()
    return SearchOutcome(exp_dir, results)
