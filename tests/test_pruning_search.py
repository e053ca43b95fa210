"""The pruning searcher: a trial ASHA stopped reaches Optuna as PRUNED with its per-epoch values, where Ray's
OptunaSearch tells it COMPLETE with its last value; every other ending is Ray's."""

from __future__ import annotations

import optuna
import pytest
from conftest import write_space
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from hawor_tune.pruning_search import ConstrainedOptunaSearch, PruningOptunaSearch
from hawor_tune.search_space import load_search_space

SPACE = {"optim.lr": FloatDistribution(1e-4, 1e-2, log=True)}


def _run(searcher, epochs_by_trial: dict[str, list[float]], errored: tuple[str, ...] = (),
         extra: dict[str, dict] | None = None) -> dict[str, object]:
    """Feed the searcher each trial's per-epoch values as Tune does (``extra``: more keys of a trial's last
    result); its study's trials by Ray id."""
    for trial_id, values in epochs_by_trial.items():
        searcher.suggest(trial_id)
        for epoch, value in enumerate(values, start=1):
            searcher.on_trial_result(trial_id, {"val/mpjpe": value, "training_iteration": epoch})
        last = ({"val/mpjpe": values[-1], "training_iteration": len(values), **(extra or {}).get(trial_id, {})}
                if values else None)
        searcher.on_trial_complete(trial_id, None if trial_id in errored else last, error=trial_id in errored)
    study = searcher._ot_study  # Ray's searcher holds its study privately
    return dict(zip(epochs_by_trial, study.get_trials(deepcopy=False)))


def _searcher(cls, **extra):
    return cls(space=SPACE, metric="val/mpjpe", mode="min", sampler=optuna.samplers.RandomSampler(seed=0), **extra)


def test_a_stopped_trial_is_pruned_with_its_epochs_and_a_full_one_complete():
    told = _run(_searcher(PruningOptunaSearch, max_epochs=3),
                {"stopped": [50.0], "full": [48.0, 45.0, 46.0], "errored": [49.0]}, errored=("errored",))
    assert told["stopped"].state == TrialState.PRUNED
    assert told["stopped"].intermediate_values == {1: 50.0} and told["stopped"].value == 50.0
    assert told["full"].state == TrialState.COMPLETE and told["full"].value == 46.0  # Ray's: the last epoch
    assert told["full"].intermediate_values == {1: 48.0, 2: 45.0, 3: 46.0}
    assert told["errored"].state == TrialState.FAIL


def test_rays_searcher_tells_the_same_stopped_trial_complete():
    told = _run(_searcher(OptunaSearch), {"stopped": [50.0], "full": [48.0, 45.0, 46.0]})
    assert told["stopped"].state == TrialState.COMPLETE and told["stopped"].value == 50.0


def test_a_diverged_trial_keeps_rays_ending():
    told = _run(_searcher(PruningOptunaSearch, max_epochs=3), {"diverged": [float("inf")]})
    assert told["diverged"].state == TrialState.COMPLETE and told["diverged"].value == float("inf")


@pytest.mark.parametrize(("snippet", "startup"), [
    ("num_samples: 30", 10),                                  # a third of 30, at most Optuna's default 10
    ("num_samples: 12", 4),                                   # a third of 12
    ("{num_samples: 12, search: {startup_trials: 7}}", 7),    # the file's own
    ("{num_samples: 12, search: {startup_trials: 0}}", 0),
])
def test_tpe_gets_the_spaces_start_up_trials(tmp_path, snippet, startup):
    from hawor_tune.search import build_searcher as build

    space = load_search_space(write_space(tmp_path, snippet))
    assert build(space).searcher._sampler._n_startup_trials == startup


@pytest.mark.parametrize(("stopped_as", "cls"), [("pruned", PruningOptunaSearch), ("complete", ConstrainedOptunaSearch)])
def test_the_space_file_chooses_the_searcher(tmp_path, stopped_as, cls):
    from hawor_tune.search import build_searcher as build

    space = load_search_space(write_space(tmp_path, f"search: {{stopped_as: {stopped_as}}}"))
    searcher = build(space).searcher
    assert type(searcher) is cls
    if cls is PruningOptunaSearch:
        assert searcher.max_epochs == space.max_epochs == 6


@pytest.mark.parametrize("cls", [ConstrainedOptunaSearch, PruningOptunaSearch])
def test_each_trial_tells_optuna_its_constraint_values(cls):
    extra = {"max_epochs": 3} if cls is PruningOptunaSearch else {}
    searcher = _searcher(cls, constraints=("constraint/accel_error", "constraint/jerk"), **extra)
    told = _run(searcher, {"met": [50.0, 45.0, 44.0], "stopped": [60.0], "missing": [55.0, 54.0, 53.0]},
                extra={"met": {"constraint/accel_error": -0.2, "constraint/jerk": -1.0},
                       "stopped": {"constraint/accel_error": 0.5, "constraint/jerk": float("nan")},
                       "missing": {"constraint/accel_error": 0.1}})
    assert told["met"].constraints == {"accel_error": -0.2, "jerk": -1.0}
    assert told["stopped"].constraints == {"accel_error": 0.5, "jerk": float("inf")}  # not finite: broken
    assert told["missing"].constraints == {"accel_error": 0.1, "jerk": float("inf")}


def test_a_constrained_space_gets_constrained_tpe(tmp_path):
    from hawor_tune.search import build_searcher as build

    space = load_search_space(write_space(tmp_path, "overrides: {train.constraints: {accel_error: 1.0}}"))
    assert space.constraints == ("constraint/accel_error",)
    assert build(space).searcher.constraints == ("constraint/accel_error",)
    assert build(load_search_space(write_space(tmp_path))).searcher.constraints == ()


def _late_feasible(constraints: tuple[str, ...]) -> int:
    """Of TPE's proposals 21-40 on x in [0, 1] scored by x (lower is better) with the constraint x >= 0.5, how
    many meet it."""
    searcher = ConstrainedOptunaSearch(space={"x": FloatDistribution(0.0, 1.0)}, metric="val/mpjpe", mode="min",
                                       sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=10),
                                       constraints=constraints)
    xs = []
    for i in range(40):
        x = searcher.suggest(f"t{i}")["x"]
        xs.append(x)
        searcher.on_trial_complete(f"t{i}", {"val/mpjpe": x, "constraint/x": 0.5 - x, "training_iteration": 1})
    return sum(x >= 0.5 for x in xs[20:])


def test_constrained_tpe_samples_where_the_constraint_held():
    """The best scores break the constraint: told the constraints, TPE models the good configurations from the
    feasible trials and proposes mostly feasible points; not told, it chases the infeasible best."""
    constrained, free = _late_feasible(("constraint/x",)), _late_feasible(())
    assert constrained >= 10 and free <= 3, (constrained, free)
