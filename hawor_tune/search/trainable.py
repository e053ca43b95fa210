"""The Tune trainable: one trial is one full training run (:func:`hawor_tune.train.fit`), resumed from its
checkpoint when Ray retries or restores it."""

from __future__ import annotations

import atexit
import logging
import math
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
from ray import tune

from hawor_tune.failures import TrialFailedBefore
from hawor_tune.search_space import SearchSpace

log = logging.getLogger(__name__)

# How long a worker's exit waits for a stopped trial to free its training state (train_trial).
_STOP_GRACE_S = 30.0


def train_trial(params: dict[str, Any], space: SearchSpace, keep_failed: Mapping[str, str] | None = None) -> None:
    """Ray Tune function trainable: one full training run of the trial's config (:meth:`SearchSpace.trial_config`).

    Resumes from ``tune.get_checkpoint()`` (a retried or restored trial) and reports every epoch's
    metrics with that epoch's checkpoint. Torch uses as many threads as the trial has CPUs.

    ``keep_failed`` names the trials (id -> their error) that failed on their own in an earlier run of a
    resumed search: Ray's restore runs every errored trial again, so these stop at once, still failed.

    ``fit()`` writes into a temporary folder (in the system's temporary directory), removed when the trial
    ends or ASHA stops it (a worker killed outright leaves it there), not into the trial's folder: Ray
    copies that folder to the storage after every report and never deletes there, so each epoch's
    checkpoint would be stored once more, and left in Ray's session folder under /tmp for good. Tune's own
    copies of the reported checkpoints are the ones kept (``CheckpointConfig(num_to_keep=2)``: the two best
    by the metric, and the newest), in the experiment's storage, where a trial moved to another node reads
    them.

    A trial that Tune stops (ASHA, or its last epoch) leaves ``tune.report`` by ``SystemExit(0)`` in its own
    thread, and Tune does not wait for that thread: the worker may exit at once. Freeing the training's
    tensors while the interpreter shuts down aborted the worker (torch frees a tensor without the GIL; a
    thread that takes the GIL back during finalization is ended by ``pthread_exit``, which unwinds through
    a C++ destructor: SIGABRT). So the trial lets go of everything before it re-raises the stop, and the
    worker's exit waits for that (``atexit``, at most ``_STOP_GRACE_S``).
    """
    if keep_failed and (trial_id := tune.get_context().get_trial_id()) in keep_failed:
        raise TrialFailedBefore(f"trial {trial_id} failed on its own in an earlier run of this search "
                                f"({keep_failed[trial_id]}); it is not run again")
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
    from hawor_tune.train import fit, prepare_run

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
    resume_from = resume_point(checkpoint.path if checkpoint else None)
    if resume_from is None:  # the search made the start before its trials (prepare_data): found here
        cfg = prepare_run(cfg)
    result = fit(cfg, on_epoch=report, resume_from=resume_from)
    if result.status == "diverged":
        # An infinite objective tells ASHA and Optuna this configuration is bad; the row is flagged diverged.
        epoch = result.epochs_run + 1
        tune.report({"diverged": True, "epoch": float(epoch), "training_iteration": epoch, "node_id": node_id,
                     **{m: math.inf if mode == "min" else -math.inf for m, mode in space.objectives}})


def resume_point(newest: str | None) -> str | None:
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
