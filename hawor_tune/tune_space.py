"""A checked search space mapped onto Ray Tune sampling objects and Optuna distributions.

Both keep the file's inclusive bounds, so a random search and an Optuna search sample the same space;
Ray and Optuna are imported inside each function, so that importing this module needs neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hawor_tune.search_space import ParamSpec

# A search-space mode as an Optuna study direction.
OPTUNA_DIRECTIONS = {"min": "minimize", "max": "maximize"}


def tune_param_space(params: Mapping[str, ParamSpec]) -> dict[str, Any]:
    """Ray Tune sampling objects keyed by dotted path (``Tuner``'s ``param_space`` for a random search).

    Args:
        params: a space's parameters (``SearchSpace.params``).
    """
    from ray import tune

    space = {}
    for key, spec in params.items():
        if spec.type == "uniform":
            space[key] = tune.uniform(spec.low, spec.high)
        elif spec.type == "loguniform":
            space[key] = tune.loguniform(spec.low, spec.high)
        elif spec.type == "randint" or (spec.is_integer and spec.q == 1):
            space[key] = tune.randint(spec.low, spec.high + 1)  # Tune's upper bound is exclusive
        elif spec.type == "quniform" and spec.is_integer:
            space[key] = tune.qrandint(spec.low, spec.high, spec.q)  # inclusive for q > 1
        elif spec.type == "quniform":
            space[key] = tune.quniform(spec.low, spec.high, spec.q)
        else:
            space[key] = tune.choice(list(spec.values))
    return space


def optuna_distributions(params: Mapping[str, ParamSpec]) -> dict[str, Any]:
    """Optuna distributions keyed by dotted path (the space ``OptunaSearch`` samples from).

    Args:
        params: a space's parameters (``SearchSpace.params``).
    """
    from optuna import distributions as od

    space = {}
    for key, spec in params.items():
        if spec.type in ("uniform", "loguniform"):
            space[key] = od.FloatDistribution(spec.low, spec.high, log=spec.type == "loguniform")
        elif spec.type == "randint":
            space[key] = od.IntDistribution(spec.low, spec.high)
        elif spec.type == "quniform" and spec.is_integer:
            space[key] = od.IntDistribution(spec.low, spec.high, step=spec.q)
        elif spec.type == "quniform":
            space[key] = od.FloatDistribution(spec.low, spec.high, step=spec.q)
        else:
            space[key] = od.CategoricalDistribution(list(spec.values))
    return space
