"""Ray Tune's Optuna searcher, told the truth about early stops: a trial ASHA stopped is PRUNED, not COMPLETE.

Ray's ``OptunaSearch`` reports each epoch's value to its Optuna trial (``Trial.report``) but ends every trial
COMPLETE with its last value, so TPE ranks a trial stopped after one epoch against full-budget trials as if
the two values were alike. :class:`PruningOptunaSearch` ends such a trial PRUNED instead, as Optuna's own
pruners do inside a study: Optuna keeps its per-epoch values and values it at the last one, and TPE ranks
every pruned trial after the complete ones, the deeper-trained first (optuna/optuna,
``optuna/samplers/_tpe/sampler.py``: ``_split_trials``, ``_get_pruned_trial_score``). Chosen in a search-space
file by ``search: {stopped_as: pruned}``. The study on disk (:mod:`hawor_tune.optuna_study`) applies the same
rule (:func:`hawor_tune.results.stopped_early`) to its own record.

A space with constraints (``train.constraints``) also tells Optuna each trial's constraint values
(:class:`ConstrainedOptunaSearch`, through ``Trial.set_constraint``): Optuna's TPE then ranks every trial that
breaks one below every feasible trial when it models the good configurations (optuna/optuna,
``optuna/samplers/_tpe/sampler.py``: ``_split_trials``, ``_get_infeasible_trial_score``).
"""

from __future__ import annotations

import math
from typing import Any

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from hawor_tune.epoch_metrics import CONSTRAINT_PREFIX, constraint_value
from hawor_tune.results import stopped_early


class ConstrainedOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that sets each ending trial's constraint values, from its last result, on its Optuna
    trial (``Trial.set_constraint``, named by metric) before telling Optuna; a missing or non-finite value
    counts as broken (inf).

    Args:
        *args, **kwargs: ``OptunaSearch``'s.
        constraints: the reported names of the constraints (``constraint/<metric>``); () records nothing.
    """

    def __init__(self, *args: Any, constraints: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.constraints = tuple(constraints)

    def record_constraints(self, trial_id: str, result: dict | None) -> None:
        """Set the trial's constraint values on its Optuna trial (before Optuna is told how it ended)."""
        if trial_id not in self._ot_trials or trial_id in self._completed_trials:
            return
        for name in self.constraints:
            self._ot_trials[trial_id].set_constraint(name.removeprefix(CONSTRAINT_PREFIX),
                                                     constraint_value((result or {}).get(name)))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if not error:
            self.record_constraints(trial_id, result)
        super().on_trial_complete(trial_id, result, error)


class PruningOptunaSearch(ConstrainedOptunaSearch):
    """``OptunaSearch`` that tells Optuna PRUNED for a trial that ended before ``max_epochs`` without an error
    and with a finite value; every other ending (full budget, error, diverged, several objectives: Optuna
    has no per-epoch values for those) is Ray's own.

    Args:
        *args, **kwargs: ``OptunaSearch``'s.
        max_epochs: the epochs a trial runs when the scheduler does not stop it (ASHA's ``max_t``).
    """

    def __init__(self, *args: Any, max_epochs: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_epochs = max_epochs

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        result = result or {}
        value = result.get(self.metric) if isinstance(self.metric, str) else None
        epoch = int(result.get("training_iteration", 0))
        if (error or trial_id in self._completed_trials or trial_id not in self._ot_trials
                or not isinstance(value, (int, float)) or not math.isfinite(value)
                or not stopped_early(epoch, self.max_epochs)):
            super().on_trial_complete(trial_id, result, error)
            return
        self.record_constraints(trial_id, result)
        self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
        self._completed_trials.add(trial_id)
