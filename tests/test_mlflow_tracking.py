"""MLflow tracking of a search (hawor_tune.mlflow_tracking): the URI --mlflow names, and Ray Tune's MLflow
logger writing trials to a local file store, driven through Tune's callback hooks."""

from __future__ import annotations

import sys

import pytest

from hawor_tune.mlflow_tracking import TrackingError, mlflow_callback, tracking_uri


class _Trial:
    """What Ray's MLflow logger reads of a trial: its name, config and folder."""

    def __init__(self, trial_id: str, tmp_path) -> None:
        self.trial_id, self.config, self.local_path = trial_id, {"optim.lr": 1e-3, "loss.temporal": 0.5}, str(tmp_path)

    def __str__(self) -> str:
        return f"train_trial_{self.trial_id}"


def test_without_mlflow_the_flag_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    with pytest.raises(TrackingError, match=r'--mlflow: MLflow is not installed; install the extra with pip install -e ".\[mlflow\]"'):
        tracking_uri(None, tmp_path)


def test_the_uri_defaults_to_a_file_store_beside_the_experiments(tmp_path):
    pytest.importorskip("mlflow")
    assert tracking_uri(None, tmp_path) == (tmp_path / "mlruns").as_uri()
    assert tracking_uri(str(tmp_path / "elsewhere"), tmp_path) == (tmp_path / "elsewhere").as_uri()
    for uri in ("http://127.0.0.1:5000", "sqlite:///mlflow.db", "file:///x/mlruns"):
        assert tracking_uri(uri, tmp_path) == uri


def test_trials_land_in_a_local_file_store_with_params_and_per_epoch_metrics(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = tracking_uri(None, tmp_path)
    callback = mlflow_callback(uri, "search-1")
    callback.setup()
    a, b = _Trial("a", tmp_path), _Trial("b", tmp_path)
    for trial in (a, b):
        callback.on_trial_start(0, [], trial)
    for epoch, value in ((1, 50.0), (2, 40.0)):
        callback.on_trial_result(0, [], a, {"training_iteration": epoch, "val/mpjpe": value, "node_id": "n"})
    callback.on_trial_complete(0, [], a)
    callback.on_trial_error(0, [], b)

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("search-1")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"train_trial_a", "train_trial_b"}
    run = runs["train_trial_a"]
    assert run.data.params == {"optim.lr": "0.001", "loss.temporal": "0.5"}
    assert run.data.tags["hawor_tune.experiment"] == "search-1"
    history = client.get_metric_history(run.info.run_id, "val/mpjpe")
    assert [(m.step, m.value) for m in history] == [(1, 50.0), (2, 40.0)]
    assert (run.info.status, runs["train_trial_b"].info.status) == ("FINISHED", "FAILED")
    assert (tmp_path / "mlruns").is_dir()


def test_a_retrain_is_one_run_with_its_model_and_report_as_artifacts(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from hawor_tune.mlflow_tracking import log_retrain

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    out = tmp_path / "best"
    (out / "figures").mkdir(parents=True)
    for name in ("model.pt", "config.yaml", "metrics.json", "report.md", "figures/curves.png"):
        (out / name).write_bytes(b"x")
    uri = tracking_uri(None, tmp_path)
    run_id = log_retrain(uri, "search-1", out, params={"optim.lr": 1e-3},
                         metrics={"mpjpe": 41.5, "cam_jerk": float("nan"), "joint_00": 3.0})
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.params == {"optim.lr": "0.001"} and run.info.status == "FINISHED"
    assert run.data.metrics == {"test/mpjpe": 41.5, "test/joint_00": 3.0}  # NaN is not an MLflow metric
    assert {a.path for a in client.list_artifacts(run_id)} == \
        {"model.pt", "config.yaml", "metrics.json", "report.md", "figures"}
