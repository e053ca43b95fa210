"""The data a search needs, prepared once before its trials start: the dataset, its prepared shards, the
hand-pretrained start and the camera's flow-head fit (:func:`hawor_tune.train.prepare_run`; each cached, so
every trial's own prepare_run and a later search find them)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

from hawor_tune.config import ExperimentConfig

log = logging.getLogger(__name__)


def prepare_data(cfg: ExperimentConfig) -> None:
    """Generate the dataset (if configured), prepare its shards, the hand-pretrained start, the camera's
    flow-head fit and (for a declared objective) the mean-pose baseline once, before trials start (each is cached;
    a later search re-uses them)."""
    from hawor_tune.data import build_dataset, ensure_dataset
    from hawor_tune.train import prepare_run

    t0 = time.perf_counter()
    ensure_dataset(cfg)
    for split in ("train", "val"):
        build_dataset(cfg, split)
    log.info("data ready in %.1f s", time.perf_counter() - t0)
    t0 = time.perf_counter()
    prepare_run(cfg)
    if cfg.train.objective:  # the baseline's validation figures every trial's objective is divided by
        from hawor_tune.evaluation import cached_baseline

        cached_baseline(cfg, "val")
    log.info("pretrained start ready in %.1f s", time.perf_counter() - t0)


def _made_before(cfg: ExperimentConfig) -> bool:
    """Whether the one-time preparation of ``cfg``'s data is done: the dataset is there and its pretrained
    start and the camera's flow-head fit are cached. :func:`prepare_data` then only checks them (and prepares a
    sequence whose shard is missing)."""
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
