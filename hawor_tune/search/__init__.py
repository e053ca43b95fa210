"""The search service: Ray Tune trials of full HaWoR training runs, proposed by Optuna, stopped by ASHA.

One concern per module: :mod:`~hawor_tune.search.service` runs or resumes a search (:func:`run_search`);
:mod:`~hawor_tune.search.tuner` builds its searcher, scheduler and Tuner; :mod:`~hawor_tune.search.trainable`
is the trainable, a thin adapter over :func:`hawor_tune.train.fit`; :mod:`~hawor_tune.search.preparation`
prepares the data once before trials start; :mod:`~hawor_tune.search.local_ray` starts or joins Ray;
:mod:`~hawor_tune.search.export` keeps the experiment's parquet files current;
:mod:`~hawor_tune.search.storage_fs` makes Ray's own writes to the storage atomic; and
:mod:`~hawor_tune.search.resume` says which failed trials a resume runs again.
"""

from hawor_tune.search.export import INTERRUPTED, ParquetExporter
from hawor_tune.search.local_ray import LOOPBACK, start_ray
from hawor_tune.search.preparation import prepare_data, prepare_in_background
from hawor_tune.search.resume import FailedTrial, resume_plan
from hawor_tune.search.service import SearchOutcome, build_trainable, run_search
from hawor_tune.search.trainable import train_trial
from hawor_tune.search.tuner import MAX_FAILURES, build_scheduler, build_searcher, build_tuner

__all__ = ["INTERRUPTED", "LOOPBACK", "MAX_FAILURES", "FailedTrial", "ParquetExporter", "SearchOutcome",
           "build_scheduler", "build_searcher", "build_trainable", "build_tuner", "prepare_data",
           "prepare_in_background", "resume_plan", "run_search", "start_ray", "train_trial"]
