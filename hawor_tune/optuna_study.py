"""The search recorded as an Optuna study on disk, for ``optuna-dashboard`` and anything else that reads Optuna.

Ray Tune's ``OptunaSearch`` keeps its study in memory and tells it ASHA-stopped trials as complete; this
study is a second, faithful record in a journal file inside the experiment folder (Optuna's
``JournalStorage`` over a ``JournalFileBackend``: a real Optuna storage, no server, safe on a shared
filesystem). :class:`OptunaStudyRecorder`, a Tune callback on the driver like the parquet exporter, writes
every trial with the search's distributions (:func:`hawor_tune.tune_space.optuna_distributions`), one
intermediate value per epoch (single-objective searches: Optuna has none for several objectives), and its
end: COMPLETE with its best value (the ``best/<metric>`` of ``trials.parquet``), PRUNED when ASHA stopped
it (valued at its last epoch, as Optuna values a pruned trial), FAIL when it diverged or failed on its own.
A trial cut off by an interrupted search, or whose environment failed (:mod:`hawor_tune.failures`), stays
RUNNING until ``--resume`` finishes it; a resume first makes the study hold what Ray restored.

:func:`warm_start_trials` reads an earlier search's finished trials back, checked against a new search's space,
for ``run_search.py --warm-start``.

    optuna-dashboard results/<experiment>/optuna_journal.log
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from ray.tune import Callback

from hawor_tune.epoch_metrics import CONSTRAINT_PREFIX, constraint_value
from hawor_tune.errors import HaworTuneError
from hawor_tune.failures import OWN, describe, failed_by, trial_error
from hawor_tune.results import stopped_early
from hawor_tune.tune_space import OPTUNA_DIRECTIONS

log = logging.getLogger(__name__)

STUDY_FILE = "optuna_journal.log"
RAY_TRIAL_ATTR = "ray_trial_id"


def open_storage(path: str | os.PathLike) -> JournalStorage:
    """The Optuna storage of a journal file (made if missing)."""
    return JournalStorage(JournalFileBackend(os.fspath(path)))


def load_study(experiment_dir: str | os.PathLike) -> optuna.Study:
    """An experiment's recorded study (:data:`STUDY_FILE`); its name is the experiment's folder name."""
    path = Path(experiment_dir) / STUDY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no Optuna study recorded in this experiment")
    return optuna.load_study(study_name=Path(experiment_dir).name, storage=open_storage(path))


# Where Optuna keeps a trial's constraint values, one system attribute "constraints:<name>" each (optuna/optuna,
# ``optuna/trial/_trial.py``: ``Trial.set_constraint``; ``optuna/study/_constrained_optimization.py``).
CONSTRAINTS_KEY = "constraints"


class OptunaStudyRecorder(Callback):
    """Tune callback that mirrors the search's trials into an Optuna study on disk (see the module docstring).

    Args:
        experiment_dir: the experiment folder; the study is ``<experiment_dir>/optuna_journal.log``, named
            after the folder.
        objectives: (metric, mode) of every objective, mode ``min`` or ``max``.
        distributions: Optuna distributions of the searched parameters, keyed by dotted path.
        max_epochs: the epochs a trial runs when nobody stops it; a finished trial with fewer was stopped by
            the scheduler (ASHA) and is recorded as pruned.
        constraints: the reported names of the space's constraints (``constraint/<metric>``): their values at
            the trial's best epoch are recorded as ``Trial.set_constraint`` records them (<= 0: met).
    """

    def __init__(self, experiment_dir: str | os.PathLike, *, objectives: Sequence[tuple[str, str]],
                 distributions: Mapping[str, BaseDistribution], max_epochs: int,
                 constraints: Sequence[str] = ()) -> None:
        self.experiment_dir = Path(experiment_dir)
        self.objectives = list(objectives)
        self.constraints = list(constraints)
        self._constraint_values: dict[str, list[float]] = {}  # Ray trial id -> at the first objective's best
        self.distributions = dict(distributions)
        self.max_epochs = max_epochs
        self._study: optuna.Study | None = None
        self._store: JournalStorage | None = None
        self._study_id = -1
        self._ids: dict[str, int] = {}         # Ray trial id -> Optuna storage trial id
        self._epochs: dict[str, int] = {}      # Ray trial id -> last reported epoch
        self._best: dict[str, list[float | None]] = {}
        self._last: dict[str, float] = {}      # last finite value of the first objective
        self._diverged: set[str] = set()
        self._matched = False

    @property
    def path(self) -> Path:
        return self.experiment_dir / STUDY_FILE

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            self.setup()
        assert self._study is not None
        return self._study

    # Tune calls setup() on a fresh and on a restored run: open the study, and on resume find its trials.
    def setup(self, **info: Any) -> None:
        self.experiment_dir.mkdir(parents=True, exist_ok=True)
        self._store = open_storage(self.path)
        self._study = optuna.create_study(
            storage=self._store, study_name=self.experiment_dir.name, load_if_exists=True,
            directions=[OPTUNA_DIRECTIONS[mode] for _, mode in self.objectives])
        self._study_id = self._store.get_study_id_from_name(self.experiment_dir.name)
        with warnings.catch_warnings():  # the dashboard labels the objectives with them
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self._study.set_metric_names([m for m, _ in self.objectives])
        for t in self._study.get_trials(deepcopy=False):
            ray_id = t.user_attrs.get(RAY_TRIAL_ATTR)
            if ray_id is not None:
                self._ids[ray_id] = self._store.get_trial_id_from_study_id_trial_number(self._study_id, t.number)
                self._epochs[ray_id] = t.last_step or 0
                if t.intermediate_values:
                    self._last[ray_id] = t.intermediate_values[t.last_step]
                    finite = [v for v in t.intermediate_values.values() if math.isfinite(v)]
                    self._best[ray_id] = [self._pick(0)(finite) if finite else None]

    def _pick(self, i: int) -> Any:
        return max if self.objectives[i][1] == "max" else min

    def _storage(self) -> JournalStorage:
        # Optuna's storage API (BaseStorage) addresses trials by id; Study's ask/tell has no call that writes
        # a trial with given parameters and then its per-epoch values, which Ray reports from outside.
        if self._store is None:
            self.setup()
        assert self._store is not None
        return self._store

    def _trial_id(self, trial: Any) -> int:
        """The Optuna trial of a Ray trial, made (RUNNING, with its parameters) on first sight."""
        ray_id = trial.trial_id
        if ray_id not in self._ids:
            config = getattr(trial, "config", {}) or {}
            params = {p: config[p] for p in self.distributions if config.get(p) is not None}
            template = optuna.trial.create_trial(
                state=TrialState.RUNNING, params=params,
                distributions={p: self.distributions[p] for p in params},
                user_attrs={RAY_TRIAL_ATTR: ray_id})
            self._ids[ray_id] = self._storage().create_new_trial(self._study_id, template_trial=template)
        return self._ids[ray_id]

    def _finished(self, ray_id: str) -> bool:
        trial_id = self._ids.get(ray_id)
        return trial_id is not None and self._storage().get_trial(trial_id).state.is_finished()

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        # The first step of a restored run sees exactly the trials Ray restored.
        if self._matched:
            return
        self._matched = True
        if self._ids:
            self._match_restored(trials)

    def _match_restored(self, trials: list) -> None:
        """Make the study say what Ray's restored experiment holds, as the parquet exporter does its files.

        Ray restores its last state snapshot, and a driver stopped between two snapshots leaves study trials
        ahead of it: a trial Ray does not hold (started after the snapshot; its searcher proposes another)
        never reports again and goes; a trial Ray holds unfinished runs again from its last checkpoint even
        if the study ended it since (an ASHA stop, its last epoch), so it is RUNNING again, and any trial
        keeps its values up to Ray's last result only. Optuna does not reopen an ended trial, so the journal
        is written anew, to a temporary file renamed over the old one, when anything differs. A trial that
        failed on its own stays FAIL (the resume keeps it failed).
        """
        restored = {t.trial_id: t for t in trials}
        kept, changed = [], False
        for t in self.study.get_trials(deepcopy=True):
            trial = restored.get(t.user_attrs.get(RAY_TRIAL_ATTR))
            if trial is None:
                changed = True
                continue
            last = int((getattr(trial, "last_result", None) or {}).get("training_iteration", 0))
            values = {step: v for step, v in t.intermediate_values.items() if step <= last}
            ended_since = t.state in (TrialState.COMPLETE, TrialState.PRUNED) and trial.status != "TERMINATED"
            if ended_since or (t.state == TrialState.RUNNING and values != t.intermediate_values):
                t = optuna.trial.create_trial(state=TrialState.RUNNING, params=t.params,
                                              distributions=t.distributions, intermediate_values=values,
                                              user_attrs=t.user_attrs)
                changed = True
            kept.append(t)
        if changed:
            self._rewrite(kept)

    def _rewrite(self, trials: list[optuna.trial.FrozenTrial]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        study = optuna.create_study(storage=open_storage(tmp), study_name=self.experiment_dir.name,
                                    directions=[OPTUNA_DIRECTIONS[mode] for _, mode in self.objectives])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([m for m, _ in self.objectives])
        study.add_trials(trials)
        os.replace(tmp, self.path)
        self._ids, self._epochs, self._best, self._last = {}, {}, {}, {}
        self.setup()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._trial_id(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self._finished(trial.trial_id):
            return
        trial_id = self._trial_id(trial)
        ray_id = trial.trial_id
        epoch = int(result.get("training_iteration", result.get("epoch", 0)))
        self._epochs[ray_id] = epoch
        if result.get("diverged"):
            self._diverged.add(ray_id)
            return
        best = self._best.setdefault(ray_id, [None] * len(self.objectives))
        best.extend([None] * (len(self.objectives) - len(best)))
        for i, (metric, _) in enumerate(self.objectives):
            value = result.get(metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                improved = best[i] is None or self._pick(i)(best[i], float(value)) != best[i]
                best[i] = float(value) if best[i] is None else self._pick(i)(best[i], float(value))
                if i == 0 and self.constraints and improved:
                    self._constraint_values[ray_id] = [constraint_value(result.get(c)) for c in self.constraints]
                if i == 0:
                    self._last[ray_id] = float(value)
                    if len(self.objectives) == 1:  # Optuna records no intermediate values for several objectives
                        self._storage().set_trial_intermediate_value(trial_id, epoch, float(value))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        ray_id = trial.trial_id
        if self._finished(ray_id):
            return
        trial_id = self._trial_id(trial)
        best = self._best.get(ray_id, [])
        epoch = self._epochs.get(ray_id, 0)
        if ray_id in self._constraint_values:  # before the state: a finished trial's attributes are final
            for name, value in zip(self.constraints, self._constraint_values[ray_id]):
                self._storage().set_trial_system_attr(trial_id, f"{CONSTRAINTS_KEY}:{name.removeprefix(CONSTRAINT_PREFIX)}",
                                                      value)
        if ray_id in self._diverged:
            self._storage().set_trial_user_attr(trial_id, "diverged", True)
            self._storage().set_trial_state_values(trial_id, TrialState.FAIL)
        elif stopped_early(epoch, self.max_epochs) and len(self.objectives) == 1 and ray_id in self._last:
            self._storage().set_trial_user_attr(trial_id, "stopped_at_epoch", epoch)
            self._storage().set_trial_state_values(trial_id, TrialState.PRUNED, values=[self._last[ray_id]])
        elif len(best) == len(self.objectives) and all(v is not None for v in best):
            self._storage().set_trial_state_values(trial_id, TrialState.COMPLETE, values=list(best))
        else:  # no finite value of some objective: nothing for Optuna to rank
            self._storage().set_trial_state_values(trial_id, TrialState.FAIL)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A trial that failed on its own is FAIL; one whose environment failed stays RUNNING, as an
        interrupted one: ``--resume`` runs it again from its last checkpoint and ends it here."""
        if self._finished(trial.trial_id):
            return
        trial_id = self._trial_id(trial)
        error = trial_error(trial)
        self._storage().set_trial_user_attr(trial_id, "error", describe(error))
        self._storage().set_trial_user_attr(trial_id, "failed_by", failed_by(error))
        if failed_by(error) == OWN:
            self._storage().set_trial_state_values(trial_id, TrialState.FAIL)


class WarmStartError(HaworTuneError, ValueError):
    """``--warm-start``: the earlier experiment has no study, or its search space differs from this one."""


def warm_start_trials(experiment_dir: str | os.PathLike, *, objectives: Sequence[tuple[str, str]],
                      distributions: Mapping[str, BaseDistribution]) -> list[optuna.trial.FrozenTrial]:
    """The finished trials (COMPLETE and PRUNED) of an earlier search's study, to seed a new search's sampler.

    The earlier search must have searched the same parameters with the same distributions for the same
    objectives: TPE models each parameter from the trials' values, which mean nothing under another range.

    Raises:
        WarmStartError: no recorded study there, or a space that differs (the message names the difference).
    """
    where = f"--warm-start {experiment_dir}"
    try:
        study = load_study(experiment_dir)
    except (FileNotFoundError, KeyError) as e:
        raise WarmStartError(f"{where}: {e}; give the folder of an earlier search of this hawor-tune") from None
    directions = [OPTUNA_DIRECTIONS[mode] for _, mode in objectives]
    theirs = [d.name.lower() for d in study.directions]
    names = study.metric_names or ([objectives[0][0]] if len(objectives) == 1 else None)
    if theirs != directions or (names is not None and list(names) != [m for m, _ in objectives]):
        raise WarmStartError(f"{where}: it optimised {names or '?'} ({', '.join(theirs)}), this search "
                             f"{[m for m, _ in objectives]} ({', '.join(directions)}); warm-start from a search of "
                             f"the same objectives")
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    for trial in trials:
        if trial.distributions != dict(distributions):
            theirs_d, ours = trial.distributions, dict(distributions)
            diff = sorted(set(theirs_d) ^ set(ours)) or sorted(k for k in ours if theirs_d[k] != ours[k])
            key = diff[0]
            raise WarmStartError(f"{where}: its space differs at params.{key} (there: {theirs_d.get(key)}, here: "
                                 f"{ours.get(key)}); warm-start from a search over the same parameters and ranges")
    return [optuna.trial.create_trial(state=t.state, values=t.values, params=t.params,
                                      distributions=t.distributions, intermediate_values=t.intermediate_values,
                                      user_attrs={**t.user_attrs, "warm_start_from": str(experiment_dir)})
            for t in trials]
