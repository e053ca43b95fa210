"""The Optuna study a search records on disk (hawor_tune.optuna_study): checked against trials.parquet of a
real search, driven through Tune's callback hooks for the cases a tiny search does not reach, and opened the
way optuna-dashboard opens it."""

from __future__ import annotations

import io
import json
import math
from types import SimpleNamespace

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from hawor_tune.optuna_study import (
    STUDY_FILE,
    OptunaStudyRecorder,
    WarmStartError,
    load_study,
    warm_start_trials,
)
from hawor_tune.results import read_rows


def test_the_study_holds_every_trial_of_trials_parquet(tiny_search):
    trials = {r["trial_id"]: r for r in read_rows(tiny_search / "trials.parquet")}
    epochs = read_rows(tiny_search / "epochs.parquet")
    study = load_study(tiny_search)
    recorded = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    assert set(recorded) == set(trials) and study.direction == optuna.study.StudyDirection.MINIMIZE
    for trial_id, row in trials.items():
        t = recorded[trial_id]
        assert t.params == pytest.approx({p[len("param/"):]: v for p, v in row.items() if p.startswith("param/")})
        assert t.intermediate_values == pytest.approx(
            {r["epoch"]: r["val/mpjpe"] for r in epochs if r["trial_id"] == trial_id})
        if row["stopped_early"]:  # ASHA's stop is Optuna's prune, valued at the last epoch as Optuna does
            assert t.state == TrialState.PRUNED and t.value == pytest.approx(row["last/val/mpjpe"])
        else:
            assert t.state == TrialState.COMPLETE and t.value == pytest.approx(row["best/val/mpjpe"])
    assert {t.state for t in study.trials} == {TrialState.PRUNED, TrialState.COMPLETE}


def _trial(trial_id: str, lr: float, error: BaseException | None = None, folder=None) -> SimpleNamespace:
    """The part of a Ray Tune trial the recorder reads; ``error`` is pickled where Ray leaves a trial's error."""
    trial = SimpleNamespace(trial_id=trial_id, config={"optim.lr": lr}, status="RUNNING", pickled_error_file=None)
    if error is not None:
        from ray import cloudpickle
        from ray.exceptions import RayTaskError

        trial.pickled_error_file = folder / f"{trial_id}.pkl"
        trial.pickled_error_file.write_bytes(cloudpickle.dumps(
            RayTaskError("ImplicitFunc.train", "Traceback ...", error).as_instanceof_cause()))
    return trial


def _recorder(folder, objectives) -> OptunaStudyRecorder:
    recorder = OptunaStudyRecorder(folder, objectives=objectives, max_epochs=3,
                                   distributions={"optim.lr": FloatDistribution(1e-4, 1e-2, log=True)})
    recorder.setup()
    return recorder


def test_diverged_and_errored_trials_fail_and_a_resume_drops_forgotten_ones(tmp_path):
    folder = tmp_path / "exp"
    rec = _recorder(folder, [("val/mpjpe", "min")])
    a, b, c = _trial("a", 1e-3), _trial("b", 5e-3, ValueError("bad value"), tmp_path), _trial("c", 2e-3)
    rec.on_trial_result(0, [], a, {"training_iteration": 1, "val/mpjpe": 50.0})
    rec.on_trial_result(0, [], a, {"training_iteration": 2, "diverged": True, "val/mpjpe": math.inf})
    rec.on_trial_complete(0, [], a)
    rec.on_trial_start(0, [], b)
    rec.on_trial_error(0, [], b)
    rec.on_trial_result(0, [], c, {"training_iteration": 1, "val/mpjpe": 40.0})  # then the driver dies

    again = _recorder(folder, [("val/mpjpe", "min")])  # --resume: Ray restored a and b but not c
    again.on_step_begin(0, [a, b])
    study = load_study(folder)
    states = {t.user_attrs["ray_trial_id"]: t for t in study.trials}
    assert {k: t.state for k, t in states.items()} == {"a": TrialState.FAIL, "b": TrialState.FAIL}
    assert states["a"].user_attrs["diverged"]
    assert states["b"].user_attrs["error"] == "ValueError: bad value" and states["b"].user_attrs["failed_by"] == "trial"


def test_a_resume_reopens_a_trial_ray_restores_unfinished_with_its_values_up_to_rays_last_result(tmp_path):
    """The driver died after ASHA stopped trial a at epoch 2 and d reported epoch 2, but Ray's last snapshot
    holds both at epoch 1: both run again from there, so the study holds them RUNNING with epoch 1's value."""
    folder = tmp_path / "exp"
    rec = _recorder(folder, [("val/mpjpe", "min")])
    a, d = _trial("a", 1e-3), _trial("d", 2e-3)
    for trial in (a, d):
        for epoch, value in ((1, 50.0), (2, 45.0)):
            rec.on_trial_result(0, [], trial, {"training_iteration": epoch, "val/mpjpe": value})
    rec.on_trial_complete(0, [], a)
    assert {t.state for t in load_study(folder).trials} == {TrialState.PRUNED, TrialState.RUNNING}

    a.last_result = d.last_result = {"training_iteration": 1}
    again = _recorder(folder, [("val/mpjpe", "min")])
    again.on_step_begin(0, [a, d])
    for trial in (a, d):
        for epoch, value in ((2, 44.0), (3, 43.0)):
            again.on_trial_result(0, [a, d], trial, {"training_iteration": epoch, "val/mpjpe": value})
        again.on_trial_complete(0, [a, d], trial)
    trials = load_study(folder).trials
    assert [(t.user_attrs["ray_trial_id"], t.state, t.value) for t in trials] == [
        ("a", TrialState.COMPLETE, 43.0), ("d", TrialState.COMPLETE, 43.0)]
    assert all(t.intermediate_values == {1: 50.0, 2: 44.0, 3: 43.0} for t in trials)


def test_a_trial_whose_environment_failed_stays_running_until_a_resume_completes_it(tmp_path):
    folder = tmp_path / "exp"
    rec = _recorder(folder, [("val/mpjpe", "min")])
    a = _trial("a", 1e-3, OSError(28, "No space left on device"), tmp_path)
    rec.on_trial_result(0, [], a, {"training_iteration": 1, "val/mpjpe": 50.0})
    rec.on_trial_error(0, [], a)
    (t,) = load_study(folder).trials
    assert t.state == TrialState.RUNNING and t.user_attrs["failed_by"] == "environment"
    assert t.user_attrs["error"] == "OSError: [Errno 28] No space left on device"

    a.last_result = {"training_iteration": 1}
    again = _recorder(folder, [("val/mpjpe", "min")])  # --resume runs it again from its epoch-1 checkpoint
    again.on_step_begin(0, [a])
    for epoch, value in ((2, 45.0), (3, 47.0)):
        again.on_trial_result(0, [a], a, {"training_iteration": epoch, "val/mpjpe": value})
    again.on_trial_complete(0, [a], a)
    (t,) = load_study(folder).trials
    assert t.state == TrialState.COMPLETE and t.value == 45.0 and t.intermediate_values == {1: 50.0, 2: 45.0, 3: 47.0}


def test_a_multi_objective_study_has_both_directions_and_values(tmp_path):
    rec = _recorder(tmp_path / "exp", [("val/mpjpe", "min"), ("val/cam_trans_error", "max")])
    a = _trial("a", 1e-3)
    rec.on_trial_result(0, [], a, {"training_iteration": 1, "val/mpjpe": 50.0, "val/cam_trans_error": 3.0})
    rec.on_trial_result(0, [], a, {"training_iteration": 3, "val/mpjpe": 45.0, "val/cam_trans_error": 2.0})
    rec.on_trial_complete(0, [], a)
    study = load_study(tmp_path / "exp")
    assert study.metric_names == ["val/mpjpe", "val/cam_trans_error"]
    (t,) = study.trials
    assert t.state == TrialState.COMPLETE and t.values == [45.0, 3.0] and t.intermediate_values == {}


def test_optuna_dashboard_opens_the_study_file(tiny_search):
    dashboard = pytest.importorskip("optuna_dashboard")
    app = dashboard.wsgi(str(tiny_search / STUDY_FILE))  # what `optuna-dashboard <file>` serves

    def get(path: str) -> dict:
        status: list[str] = []
        body = app({"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "wsgi.input": io.BytesIO(),
                    "SERVER_NAME": "localhost", "SERVER_PORT": "8080", "wsgi.url_scheme": "http"},
                   lambda s, headers, exc_info=None: status.append(s))
        assert status == ["200 OK"]
        return json.loads(b"".join(body))

    (summary,) = get("/api/studies")["study_summaries"]
    assert summary["study_name"] == tiny_search.name
    study = get(f"/api/studies/{summary['study_id']}")
    assert study["has_intermediate_values"] and len(study["trials"]) == len(read_rows(tiny_search / "trials.parquet"))


# --- warm start -------------------------------------------------------------------------------------------

def test_a_new_search_is_seeded_with_an_earlier_searchs_trials(tiny_search):
    from hawor_tune.results import ExperimentRecord
    from hawor_tune.search import build_searcher
    from hawor_tune.tune_space import optuna_distributions

    space = ExperimentRecord.load(tiny_search).space
    trials = warm_start_trials(tiny_search, objectives=space.objectives,
                               distributions=optuna_distributions(space.params))
    assert len(trials) == len(read_rows(tiny_search / "trials.parquet"))  # every trial finished there
    searcher = build_searcher(space, trials).searcher
    # Ray's searcher holds its study privately; besides the seeds it holds the base config's point, queued
    seeded = [t for t in searcher._ot_study.trials if t.state.is_finished()]
    assert [t.params for t in seeded] == [t.params for t in trials] and searcher.suggest("new") is not None


@pytest.mark.parametrize("change,fragment", [
    ({"params": {"optim.lr": FloatDistribution(1e-5, 1e-2, log=True)}}, "differs at params.loss.keypoint_2d"),
    ({"objectives": [("val/pa_mpjpe", "min")]}, "warm-start from a search of the same objectives"),
])
def test_a_warm_start_from_another_space_is_one_clear_error(tiny_search, change, fragment):
    from hawor_tune.results import ExperimentRecord
    from hawor_tune.tune_space import optuna_distributions

    space = ExperimentRecord.load(tiny_search).space
    kwargs = {"objectives": space.objectives, "distributions": optuna_distributions(space.params)}
    if "params" in change:
        kwargs["distributions"] = change["params"]
    else:
        kwargs["objectives"] = change["objectives"]
    with pytest.raises(WarmStartError, match=fragment):
        warm_start_trials(tiny_search, **kwargs)
    with pytest.raises(WarmStartError, match="no Optuna study recorded"):
        warm_start_trials(tiny_search.parent, **kwargs)


def test_the_cli_refuses_a_warm_start_without_a_study_in_one_line(tmp_path, capsys):
    from conftest import write_space

    import run_search

    space = write_space(tmp_path)
    code = run_search.main(["--space", str(space), "--storage", str(tmp_path / "r"), "--warm-start", "nowhere",
                            "--dashboard-port", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --warm-start nowhere:")


def test_a_constrained_trial_keeps_its_constraint_values_at_its_best_epoch(tmp_path):
    rec = OptunaStudyRecorder(tmp_path / "exp", objectives=[("val/mpjpe", "min")], max_epochs=3,
                              distributions={"optim.lr": FloatDistribution(1e-4, 1e-2, log=True)},
                              constraints=["constraint/accel_error"])
    rec.setup()
    a = _trial("a", 1e-3)
    for epoch, (value, c) in enumerate([(50.0, 0.3), (40.0, -0.2), (45.0, 0.1)], start=1):
        rec.on_trial_result(0, [], a, {"training_iteration": epoch, "val/mpjpe": value, "constraint/accel_error": c})
    rec.on_trial_complete(0, [], a)
    (t,) = load_study(tmp_path / "exp").trials
    assert t.state == TrialState.COMPLETE and t.value == 40.0
    assert t.constraints == {"accel_error": -0.2}  # where Optuna keeps them
