"""Hyperparameter importance: an in-memory Optuna study rebuilt from the search's trial rows, scored with
PED-ANOVA (pure numpy, deterministic, no scikit-learn needed)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hawor_tune.results import is_finite_number
from hawor_tune.tune_space import OPTUNA_DIRECTIONS

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution

logger = logging.getLogger(__name__)

# PED-ANOVA compares the top trials with all trials; aim for this many top trials (its default top 10% is
# a single trial in a 10-trial search, which makes the ranking depend on one point).
_TOP_TRIALS = 3


# ---- Hyperparameter importance ---------------------------------------------------------------------------

def hyperparameter_importance(trial_rows: Sequence[Mapping[str, Any]], params: Sequence[str], metric: str,
                              mode: str, distributions: Mapping[str, BaseDistribution]) -> dict[str, float]:
    """How much each searched parameter mattered for reaching the best ``best/<metric>`` values.

    The trials go into an in-memory Optuna study (direction from ``mode``) via
    ``optuna.trial.create_trial`` and are scored by ``optuna.importance.get_param_importances`` with
    :class:`optuna.importance.PedAnovaImportanceEvaluator`, whatever is installed. Why PED-ANOVA: it is
    pure numpy (fANOVA and mean-decrease-impurity need scikit-learn, which is not a dependency) and
    deterministic (no random forest, so no seed to set and the same rows always give the same
    numbers); it is also Optuna 5's default. Its top quantile is set so that about three trials count as
    "top" (between 10% and 50% of the trials): the default 10% is one trial in a 10-trial search.

    A value outside its distribution is handled as follows: float noise within 1e-9 of a bound (or of a
    ``step`` grid point) is snapped in; anything else, a missing value, or a choice not among the
    categories drops that trial, with a warning in the log. Parameters that take a single value over the
    usable trials carry no information; they get importance 0.0 and the others share 1.0.

    Args:
        trial_rows: rows of ``trials.parquet`` (``param/<p>``, ``best/<metric>``).
        params: the searched parameters (dotted paths), each a key of ``distributions``.
        metric: the search metric, e.g. ``val/mpjpe``.
        mode: ``'min'`` or ``'max'``.
        distributions: Optuna distribution of each parameter (``tune_space.optuna_distributions``).

    Returns:
        Parameter -> importance (non-negative, summing to 1), most important first.

    Raises:
        ValueError: an unknown mode or parameter, fewer than 2 usable trials, a metric equal in every
            usable trial, or no parameter that varies.
    """
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

    if mode not in ("min", "max"):
        raise ValueError(f"hyperparameter_importance: mode={mode!r}; allowed: 'min', 'max'")
    if not params:
        raise ValueError("hyperparameter_importance: params is empty")
    missing = [p for p in params if p not in distributions]
    if missing:
        raise ValueError(f"hyperparameter_importance: no distribution for {missing}; "
                         f"distributions has {sorted(distributions)}")
    usable: list[tuple[dict[str, Any], float]] = []
    for row in trial_rows:
        value = row.get(f"best/{metric}")
        if not is_finite_number(value):
            continue
        point = {}
        for p in params:
            x, problem = _into_distribution(row.get(f"param/{p}"), distributions[p])
            if problem:
                logger.warning("hyperparameter importance: trial %s left out: %s = %s",
                               row.get("trial_id"), p, problem)
                break
            point[p] = x
        else:
            usable.append((point, float(value)))
    if len(usable) < 2:
        raise ValueError(f"hyperparameter importance needs at least 2 trials with a finite best/{metric} and "
                         f"parameters inside the search space; {len(usable)} of {len(trial_rows)} qualify")
    if len({v for _, v in usable}) == 1:
        raise ValueError(f"hyperparameter importance is undefined: best/{metric} has the same value "
                         f"({usable[0][1]}) in all {len(usable)} usable trials")
    varying = [p for p in params if len({repr(point[p]) for point, _ in usable}) > 1]
    if not varying:
        raise ValueError(f"hyperparameter importance is undefined: every parameter ({', '.join(params)}) "
                         f"has the same value in all {len(usable)} usable trials")

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" line in the report run
    try:
        with warnings.catch_warnings():
            # Experimental-feature and small-sample warnings; the docstring states the caveats.
            warnings.simplefilter("ignore")
            study = optuna.create_study(direction=OPTUNA_DIRECTIONS[mode])
            for point, value in usable:
                study.add_trial(optuna.trial.create_trial(
                    params={p: point[p] for p in varying},
                    distributions={p: distributions[p] for p in varying}, value=value))
            quantile = min(0.5, max(0.1, (_TOP_TRIALS - 0.5) / len(usable)))  # ceil(q * n) = 3 top trials
            evaluator = PedAnovaImportanceEvaluator(target_quantile=quantile)
            scores = get_param_importances(study, evaluator=evaluator, params=varying)
    finally:
        optuna.logging.set_verbosity(verbosity)
    result = {p: float(scores.get(p, 0.0)) for p in params}
    return dict(sorted(result.items(), key=lambda kv: -kv[1]))


def _into_distribution(value: Any, dist: BaseDistribution) -> tuple[Any, str | None]:
    """``value`` as a member of ``dist`` (float noise snapped in), or None and why it is not one."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if value is None:
        return None, "missing"
    if isinstance(dist, CategoricalDistribution):
        for choice in dist.choices:
            if value == choice and isinstance(value, bool) == isinstance(choice, bool):
                return choice, None
        return None, f"{value!r}, not one of {list(dist.choices)}"
    if not isinstance(dist, (FloatDistribution, IntDistribution)):
        raise ValueError(f"hyperparameter_importance: unsupported distribution {dist!r}")
    if not is_finite_number(value):
        return None, f"{value!r}, not a finite number"
    x = float(value)
    tol = 1e-9 * max(1.0, abs(dist.low), abs(dist.high))
    if not dist.low - tol <= x <= dist.high + tol:
        return None, f"{value!r}, outside [{dist.low}, {dist.high}]"
    x = min(max(x, dist.low), dist.high)
    if dist.step is not None:
        k = round((x - dist.low) / dist.step)
        if abs(dist.low + k * dist.step - x) > tol:
            return None, f"{value!r}, not on the grid {dist.low} + k * {dist.step}"
        x = min(dist.low + k * dist.step, dist.high)
    if isinstance(dist, IntDistribution):
        if abs(x - round(x)) > tol:
            return None, f"{value!r}, not an integer"
        return int(round(x)), None
    return x, None


