"""Optional MLflow tracking of a search (``run_search.py --mlflow [URI]``), through Ray Tune's own
``MLflowLoggerCallback`` (``ray.air.integrations.mlflow``): one MLflow run per trial, named after the trial, with
its searched parameters and every reported metric at every epoch, in an MLflow experiment named after the search.

MLflow is an optional extra (``pip install -e ".[mlflow]"``): nothing else imports this module. Without a URI the
runs go to a local file store, ``<storage>/mlruns``, beside the experiments. MLflow 3 keeps that backend in
maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE=true``, which is set for this process when a
``file:`` store is chosen; a database (``sqlite:///...``, needs the full ``mlflow`` package) or a tracking server
(``http://host:5000``) is taken as given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hawor_tune.errors import HaworTuneError

MLRUNS_DIR = "mlruns"
_ALLOW_FILE_STORE = "MLFLOW_ALLOW_FILE_STORE"


class TrackingError(HaworTuneError, ValueError):
    """``--mlflow`` cannot work: MLflow is not installed."""


def tracking_uri(value: str | None, storage: str | os.PathLike) -> str:
    """The MLflow tracking URI that ``--mlflow``'s value names.

    Args:
        value: None or empty (the local file store ``<storage>/mlruns``), a folder (a file store there,
            made absolute), or a URI with a scheme (``file:``, ``sqlite:``, ``http(s):``, ``databricks``), kept.
        storage: the search's storage folder.

    Raises:
        TrackingError: MLflow is not installed.
    """
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise TrackingError('--mlflow: MLflow is not installed; install the extra with pip install -e ".[mlflow]" '
                            '(or pip install mlflow), or leave out --mlflow') from None
    if not value:
        return (Path(storage).expanduser().resolve() / MLRUNS_DIR).as_uri()
    if "://" in value or value.startswith(("file:", "databricks")):
        return value
    return Path(value).expanduser().resolve().as_uri()


def mlflow_callback(uri: str, experiment_name: str) -> Any:
    """Ray Tune's MLflow logger for one search: its runs go to ``uri`` under the MLflow experiment
    ``experiment_name`` (made if missing, reused otherwise), each tagged with the search's name."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    if uri.startswith("file:"):
        os.environ.setdefault(_ALLOW_FILE_STORE, "true")
    return MLflowLoggerCallback(tracking_uri=uri, experiment_name=experiment_name,
                                tags={"hawor_tune.experiment": experiment_name})


def log_retrain(uri: str, experiment_name: str, out_dir: str | os.PathLike, *, params: dict[str, Any],
                metrics: dict[str, Any], run_name: str = "best") -> str:
    """Log a final retrain (``run_best.py --mlflow``) as one MLflow run: the chosen parameters, the test
    metrics (finite numbers only) and the output folder's model, config, metrics and report as artifacts.

    Returns:
        The MLflow run id.
    """
    import math

    import mlflow

    if uri.startswith("file:"):
        os.environ.setdefault(_ALLOW_FILE_STORE, "true")
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(experiment_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name)
    run = client.create_run(experiment_id, run_name=run_name, tags={"hawor_tune.experiment": experiment_name})
    run_id = run.info.run_id
    for key, value in params.items():
        client.log_param(run_id, key, value)
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            client.log_metric(run_id, f"test/{key}", float(value))
    out = Path(out_dir)
    for name in ("model.pt", "config.yaml", "metrics.json", "report.md"):
        if (out / name).is_file():
            client.log_artifact(run_id, str(out / name))
    if (out / "figures").is_dir():
        client.log_artifacts(run_id, str(out / "figures"), artifact_path="figures")
    client.set_terminated(run_id, "FINISHED")
    return run_id
