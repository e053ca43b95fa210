"""A recorded grid of trials, replayed: a tabular benchmark of search strategies on the service's own export
(used by ``bench_search.py --replay``).

A grid of configurations is trained live once, every trial to the full epoch budget, and its
``epochs.parquet``/``trials.parquet`` are kept. :class:`RecordedGrid` reads them back; :func:`replay_trial` is a
Ray Tune trainable that, instead of training, reports the recorded per-epoch metrics of the recorded
configuration nearest to the one it was given, with the recorded epoch time as its cost. Any searcher and
scheduler then run through Tune as usual, in seconds, as in the tabular benchmarks of the HPO literature
(LCBench: Zimmer et al. 2021, "Auto-PyTorch Tabular"; YAHPO Gym: Pfisterer et al. 2022).

Distances are taken in the unit cube of the space: each searched parameter normalised to [0, 1] (on a log
scale for ``loguniform``, by index for ``choice``), so that every parameter weighs alike.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hawor_tune.results import EPOCHS_FILE, TRIALS_FILE, read_rows
from hawor_tune.search_space import ParamSpec, SearchSpace

EPOCH_TIME = "time/epoch_s"


def normalise(spec: ParamSpec, value: Any) -> float:
    """A parameter value as a coordinate in [0, 1]: log scale for ``loguniform``, the index over the last
    index for ``choice``, linear otherwise.

    Raises:
        ValueError: a ``choice`` value that is not one of the choices.
    """
    if spec.type == "choice":
        values = list(spec.values)
        if value not in values:
            raise ValueError(f"{spec.path}: {value!r} is not one of the choices {values}")
        return values.index(value) / max(1, len(values) - 1)
    if spec.type == "loguniform":
        return (math.log(value) - math.log(spec.low)) / (math.log(spec.high) - math.log(spec.low))
    return (float(value) - spec.low) / (spec.high - spec.low)


def denormalise(spec: ParamSpec, u: float) -> Any:
    """The parameter value at coordinate ``u`` in [0, 1] (the inverse of :func:`normalise`, snapped onto
    the space: the nearest choice, the ``q`` grid of ``quniform``, integers for integer parameters)."""
    u = min(max(float(u), 0.0), 1.0)
    if spec.type == "choice":
        return spec.values[min(len(spec.values) - 1, int(u * len(spec.values)))]
    if spec.type == "loguniform":
        return float(math.exp(math.log(spec.low) + u * (math.log(spec.high) - math.log(spec.low))))
    x = spec.low + u * (spec.high - spec.low)
    if spec.type == "quniform":
        k = round((x - spec.low) / spec.q)
        x = min(spec.high, spec.low + k * spec.q)
        return int(x) if spec.is_integer else round(float(x), 12)
    return int(round(x)) if spec.is_integer else float(x)


def quasi_random_grid(space: SearchSpace, n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` configurations spread over the space: the base config's own point, then a scrambled Sobol
    sequence (``torch.quasirandom.SobolEngine``) mapped through :func:`denormalise`. Repeats are skipped.

    Args:
        space: a checked search space.
        n: configurations wanted (at least 1).
        seed: the Sobol scrambling seed.
    """
    import torch

    paths = list(space.params)
    grid = [space.default_point()]
    engine = torch.quasirandom.SobolEngine(len(paths), scramble=True, seed=seed)
    while len(grid) < n:
        u = engine.draw(1)[0].tolist()
        point = {p: denormalise(space.params[p], x) for p, x in zip(paths, u)}
        if point not in grid:
            grid.append(point)
    return grid[:n]


@dataclass(frozen=True)
class RecordedTrial:
    """One recorded configuration: its parameter values, its unit-cube coordinates and its epochs in order
    (each a dict of the reported metrics, ``time/epoch_s`` among them)."""

    trial_id: str
    params: dict[str, Any]
    coords: tuple[float, ...]
    epochs: tuple[dict[str, Any], ...]


class RecordedGrid:
    """The finished full-budget trials of a recorded search, for :func:`replay_trial`.

    Args:
        experiment_dir: a search's folder holding ``epochs.parquet`` and ``trials.parquet``.
        space: the space the grid was recorded on (its parameters name the ``param/<path>`` columns).
        epochs: the epoch budget; only trials that reported every epoch 1..epochs count.

    Raises:
        ValueError: no trial of the folder ran the whole budget.
    """

    def __init__(self, experiment_dir: str | Path, space: SearchSpace, *, epochs: int) -> None:
        self.params = dict(space.params)
        self.epochs = epochs
        directory = Path(experiment_dir)
        by_trial: dict[str, list[dict[str, Any]]] = {}
        for row in read_rows(directory / EPOCHS_FILE):
            by_trial.setdefault(str(row["trial_id"]), []).append(row)
        trials = []
        for row in read_rows(directory / TRIALS_FILE):
            rows = sorted(by_trial.get(str(row["trial_id"]), []), key=lambda r: int(r["epoch"]))
            if [int(r["epoch"]) for r in rows][:epochs] != list(range(1, epochs + 1)):
                continue
            params = {p: row[f"param/{p}"] for p in self.params}
            trials.append(RecordedTrial(str(row["trial_id"]), params, self._coords(params), tuple(rows[:epochs])))
        if not trials:
            raise ValueError(f"{directory}: no trial ran all {epochs} epochs; record the grid first")
        self.trials = tuple(trials)

    def _coords(self, params: Mapping[str, Any]) -> tuple[float, ...]:
        return tuple(normalise(spec, params[p]) for p, spec in self.params.items())

    def nearest(self, params: Mapping[str, Any]) -> RecordedTrial:
        """The recorded trial nearest to ``params`` (Euclidean in the unit cube; the first recorded on ties)."""
        x = self._coords(params)
        return min(self.trials, key=lambda t: sum((a - b) ** 2 for a, b in zip(x, t.coords)))

    def final_values(self, metric: str) -> list[float]:
        """Every recorded trial's value of ``metric`` at the last epoch of the budget."""
        return [float(t.epochs[-1][metric]) for t in self.trials]


def replay_trial(params: dict[str, Any], grid: RecordedGrid, metrics: Sequence[str]) -> None:
    """Ray Tune function trainable: report, epoch by epoch, the recorded metrics of the configuration in
    ``grid`` nearest to ``params``, each with its recorded epoch time as ``cost_s``; nothing is trained.

    Every result names its epoch as ``training_iteration`` (as :func:`hawor_tune.search.train_trial` does)
    and carries ``replayed_trial``, the recorded trial it stands for.
    """
    from ray import tune

    recorded = grid.nearest(params)
    for epoch, row in enumerate(recorded.epochs, start=1):
        tune.report({**{m: float(row[m]) for m in metrics}, "epoch": float(epoch), "training_iteration": epoch,
                     "cost_s": float(row[EPOCH_TIME]), "replayed_trial": recorded.trial_id})


@dataclass(frozen=True)
class ReplayedEpoch:
    """One reported epoch of a replayed search, in the order the search reported it."""

    trial_id: str
    epoch: int
    value: float
    cost_s: float
    replayed_trial: str


def replay_search(space: SearchSpace, grid: RecordedGrid, *, storage: str | Path, name: str,
                  first_point_default: bool = True) -> list[ReplayedEpoch]:
    """Run one search of ``space`` through Ray Tune over the recorded ``grid``: the Tuner the service builds
    (:func:`hawor_tune.search.build_tuner`: the space's searcher, scheduler, seed and trial count), one trial
    at a time, the trainable :func:`replay_trial`. Ray must be running.

    Args:
        first_point_default: the base config's point is the first trial, as in the service; False leaves
            every trial to the searcher (a comparison of the samplers alone).

    Returns:
        Every reported epoch in report order (one trial at a time, so the order is the search's own).
    """
    from ray import cloudpickle, tune

    from hawor_tune.search import build_searcher, build_tuner

    # This module is not on the workers' path (it lives beside the benchmark): it travels to them by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    space = replace(space, max_concurrent=1)  # the searcher's own limit: Tune's max_concurrent_trials only warns
    epochs: list[ReplayedEpoch] = []

    class _Collect(tune.Callback):
        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            epochs.append(ReplayedEpoch(trial.trial_id, int(result["training_iteration"]), float(result[space.metric]),
                                        float(result["cost_s"]), str(result["replayed_trial"])))

    trainable = tune.with_resources(tune.with_parameters(replay_trial, grid=grid, metrics=list(space.metrics)),
                                    {"cpu": 1, "gpu": 0})
    tuner = build_tuner(space, trainable, storage=Path(storage).resolve(), name=name, callbacks=[_Collect()],
                        searcher=build_searcher(space, first_point_default=first_point_default))
    tuner.fit()
    return epochs


def anytime_curve(epochs: Sequence[ReplayedEpoch], mode: str) -> list[tuple[int, float, float]]:
    """The best value so far after every reported epoch: (cumulative epochs, cumulative cost in s, best)."""
    pick = max if mode == "max" else min
    curve, best, cost = [], None, 0.0
    for i, e in enumerate(epochs, start=1):
        cost += e.cost_s
        best = e.value if best is None else pick(best, e.value)
        curve.append((i, cost, best))
    return curve


def epochs_to_reach(curve: Sequence[tuple[int, float, float]], target: float, mode: str) -> float:
    """The cumulative epochs after which the curve's best is at least as good as ``target``; ``inf`` if never."""
    for n, _, best in curve:
        if (best <= target) if mode == "min" else (best >= target):
            return float(n)
    return math.inf
