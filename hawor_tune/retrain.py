"""The final retrain: pick a search's best trial, train its configuration in full, judge it once on test.

Used by ``run_best.py``. :func:`load_experiment` reads the search's record and parquet files
(:mod:`hawor_tune.results`), :func:`choose_best_trial` picks the trial and :func:`best_config` rebuilds its config;
:func:`retrain` calls the shared :func:`hawor_tune.train.fit`; :func:`evaluate_and_report` evaluates on the
split :func:`evaluation_split` names (test, or validation when test has no labels, as ARCTIC's protocol-p2 test
subject has none) and writes ``model.pt``, ``metrics.json``, ``report.md`` and the figures.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hawor_tune import report
from hawor_tune.atomic import atomic_write_text
from hawor_tune.config import ExperimentConfig, load_config, save_config
from hawor_tune.errors import HaworTuneError
from hawor_tune.model import run_model
from hawor_tune.results import (
    EPOCHS_FILE,
    RECORD_FILE,
    TRIALS_FILE,
    ExperimentRecord,
    best_trial,
    read_rows,
    read_table,
)
from hawor_tune.runtime import to_device
from hawor_tune.tune_space import optuna_distributions

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.json"
PREDICTIONS_DIR = "predictions"
FALLBACK_SPLIT = "val"  # what the report scores when the test split has no labels


class SelectionError(HaworTuneError, ValueError):
    """No usable experiment, trial or file; the message says which and why."""


@dataclass
class Experiment:
    """What run_best needs from a finished (or interrupted) search."""

    directory: Path
    record: ExperimentRecord        # search.json: the search space and the full training budget
    trials: list[dict[str, Any]]    # trials.parquet rows
    epochs: list[dict[str, Any]]    # epochs.parquet rows

    @property
    def metric(self) -> str:
        return self.record.space.metric

    @property
    def mode(self) -> str:
        return self.record.space.mode


def find_latest_experiment(storage: str | os.PathLike) -> Path:
    """The most recently written experiment (a folder with search.json and trials.parquet) under storage."""
    storage = Path(storage)
    found = [d for d in storage.glob("*") if (d / RECORD_FILE).is_file() and (d / TRIALS_FILE).is_file()]
    if not found:
        raise SelectionError(f"no experiment found under {storage} (run run_search.py first, or pass "
                             f"--experiment DIR / --trials FILE.parquet / --config FILE)")
    return max(found, key=lambda d: (d / TRIALS_FILE).stat().st_mtime)


def load_experiment(*, experiment: str | os.PathLike | None = None,
                    trials: str | os.PathLike | None = None) -> Experiment:
    """Read an experiment folder, or the folder of a given ``trials.parquet``; checks the files are ours."""
    directory = Path(experiment) if experiment is not None else Path(trials).parent  # type: ignore[arg-type]
    trials_path = Path(trials) if trials is not None else directory / TRIALS_FILE
    if not trials_path.is_file():
        raise SelectionError(f"{trials_path}: no such file (an experiment folder holds {TRIALS_FILE})")
    try:
        table = read_table(trials_path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise SelectionError(f"{trials_path}: not a parquet file ({str(e).splitlines()[0][:120]})") from None
    if not (directory / RECORD_FILE).is_file():
        raise SelectionError(f"{trials_path}: not from a hawor-tune search ({RECORD_FILE} is missing beside it)")
    record = ExperimentRecord.load(directory)
    needed = {"trial_id", "status", "epochs", f"best/{record.space.metric}"}
    missing = needed - set(table.column_names)
    if missing:
        raise SelectionError(f"{trials_path}: not a hawor-tune trials file (missing columns {sorted(missing)})")
    epochs_path = directory / EPOCHS_FILE
    epochs = read_rows(epochs_path) if epochs_path.is_file() else []
    return Experiment(directory, record, table.to_pylist(), epochs)


def choose_best_trial(exp: Experiment, *, objective: str | None = None,
                      trial_id: str | None = None) -> tuple[dict[str, Any], float, int]:
    """The trial to retrain: by default the experiment's best by :func:`hawor_tune.results.best_trial`, the
    rule the search summary prints too (errored and diverged trials and non-finite values skipped; ties to
    fewer epochs, then the smaller trial id).

    A multi-objective search has no single best: its candidates are the Pareto-optimal trials (the ``pareto``
    column of trials.parquet), and of those the best in ``objective`` (default: the space's first metric)
    wins by the same rule; the best trial in one objective is always on the front.

    Args:
        exp: the experiment.
        objective: one of the space's metrics to rank by (default: its first).
        trial_id: retrain exactly this trial instead (it must have a finite value of the objective).

    Returns:
        (trial row, its best value of the objective, the first epoch that reached it)

    Raises:
        SelectionError: an unknown objective or trial, or no usable trial.
    """
    space = exp.record.space
    metric = objective or space.metric
    if metric not in space.metrics:
        raise SelectionError(f"--objective {metric}: not an objective of {exp.directory.name}; use one of "
                             f"{', '.join(space.metrics)}")
    mode = dict(space.objectives)[metric]
    if trial_id is not None:
        rows = [r for r in exp.trials if str(r["trial_id"]) == trial_id]
        if not rows:
            raise SelectionError(f"--trial {trial_id}: no such trial in {exp.directory / TRIALS_FILE}; its trials "
                                 f"are {', '.join(str(r['trial_id']) for r in exp.trials)}")
        best = best_trial(rows, metric, mode)
        if best is None:
            raise SelectionError(f"--trial {trial_id}: it errored, diverged or has no finite {metric}; "
                                 f"choose another trial")
    else:
        candidates = [r for r in exp.trials if r.get("pareto")] if space.is_multi_objective else exp.trials
        best = best_trial(candidates, metric, mode)
        if best is None:
            raise SelectionError(f"{exp.directory}: no trial completed an epoch with a finite {metric} "
                                 f"(errored and diverged trials are skipped)")
    value = float(best[f"best/{metric}"])
    if metric == space.metric:
        return dict(best), value, int(best["best_epoch"])
    epoch = min((int(r["epoch"]) for r in exp.epochs
                 if r["trial_id"] == best["trial_id"] and r.get(metric) == value), default=0)
    return dict(best), value, epoch


def best_config(exp: Experiment, trial: dict[str, Any], *, overrides: dict[str, Any]) -> ExperimentConfig:
    """The trial's config (:meth:`SearchSpace.trial_config`, as its trainable built it) with the base config
    file's full training budget (train.epochs, train.max_train_batches: a space may shorten trials) and the
    caller's overrides on top."""
    space = exp.record.space
    params = {p: trial[f"param/{p}"] for p in space.params if trial.get(f"param/{p}") is not None}
    return space.trial_config(params, {**exp.record.full_budget, **overrides})


# ----------------------------------------------------------------------------------------------------------
# Evaluation on test and the report
# ----------------------------------------------------------------------------------------------------------

def evaluation_split(cfg: ExperimentConfig) -> tuple[str, str | None]:
    """The split the final report scores, and, when that is not test, the sentence that says why.

    The test split when it has labels; else the validation split (ARCTIC keeps protocol p2's test labels for
    its leaderboard, so real ARCTIC lands here), with a warning that its figures are not a held-out estimate.
    ``data.splits`` can name a splits file whose test split is a labelled subject held out instead. Checked
    before anything trains.

    Raises:
        DatasetError: the splits file is malformed, or a split is only partly labelled.
    """
    from hawor_tune.data import ensure_dataset, split_is_labelled

    if split_is_labelled(ensure_dataset(cfg), "test", splits_file=cfg.data.splits or None):
        return "test", None
    why = ("The test split has no labels (ARCTIC keeps protocol p2's test labels for its leaderboard; data.splits "
           "can hold out a labelled subject as test instead): this report evaluates on the validation split")
    if cfg.data.train_on_val:
        return FALLBACK_SPLIT, (f"{why}, which this model was also trained on (data.train_on_val): its figures "
                                f"are training-set figures, not an estimate on unseen data.")
    return FALLBACK_SPLIT, (f"{why}, which the search also used to choose the configuration: its figures are "
                            f"optimistic.")


def _overlay_frames(model: torch.nn.Module, cfg: ExperimentConfig, split: str, n: int = 6) -> dict[str, np.ndarray]:
    """A few frames of ``split`` at the cache's full resolution (``data.frame_size``) with predicted and
    ground-truth 2D skeletons, spread over its first clips."""
    from torch.utils.data import default_collate

    from hawor_tune.data import build_dataset
    from hawor_tune.geometry import project_points

    device = next(model.parameters()).device
    dataset = build_dataset(cfg, split)
    clips = np.unique(np.linspace(0, len(dataset) - 1, num=min(n, len(dataset))).astype(int))
    batch = default_collate([dataset[int(i)] for i in clips])
    model.eval()
    with torch.no_grad():
        out = run_model(model, to_device(batch, device))
    images, pred2d, gt2d, valid = [], [], [], []
    for c, clip in enumerate(clips):
        t = c % cfg.data.seq_len  # a different frame of each clip
        frame, K = dataset.frame_with_intrinsics(int(clip), t)
        K = torch.as_tensor(K, dtype=torch.float32).expand(2, 3, 3)
        dist = batch["dist"][c].expand(2, 8)
        pred2d.append(project_points(out.joints[c, t].cpu().float(), K, dist).numpy())  # (2, 21, 2)
        gt2d.append(project_points(batch["joints3d"][c, t].float(), K, dist).numpy())
        images.append(frame)
        valid.append(batch["hand_valid"][c, t].numpy())
    return {"images": np.stack(images), "pred2d": np.stack(pred2d), "gt2d": np.stack(gt2d), "valid": np.stack(valid)}


def _trajectory(preds: Any) -> dict[str, np.ndarray]:
    """Camera centres of the first evaluated sequence: ground truth, and prediction re-anchored per clip."""
    clips = np.flatnonzero(preds.seq_index == preds.seq_index[0])
    order = clips[np.argsort(preds.frame_index[clips, 0])]
    gt, pred, seg = [], [], []
    for s, c in enumerate(order):
        R, t = preds.world_to_cam_R[c], preds.world_to_cam_t[c]             # (T, 3, 3), (T, 3)
        gt.append(-np.einsum("tji,tj->ti", R, t))                           # centre = -R^T t
        # camera t in camera-0 coordinates is at pred_cam_t; to world through the clip's first GT pose
        pred.append(np.einsum("ji,tj->ti", R[0], preds.pred_cam_t[c] - t[0]))
        seg.append(np.full(len(t), s))
    return {"gt": np.concatenate(gt), "pred": np.concatenate(pred), "segments": np.concatenate(seg)}


def base_config(exp: Experiment, *, overrides: dict[str, Any]) -> ExperimentConfig:
    """The search space's base configuration (its own values of the searched parameters) with the same full
    budget and overrides as :func:`best_config` gives the winner."""
    return exp.record.space.trial_config({}, {**exp.record.full_budget, **overrides})


def compare_with_base(winner: ExperimentConfig, base: ExperimentConfig, out_dir: str | os.PathLike, *,
                      seeds: list[int], split: str, first: dict[str, float] | None = None) -> dict[str, Any]:
    """Retrain the winner and the base config on each seed and score both on ``split``.

    Reported per metric of the winner's ``train.objective`` (and the objective itself, each term over the
    mean-pose baseline's on ``split``), or MPJPE when it declares none: the mean over the seeds, half their
    range, and whether the winner is lower by more than twice the larger half-range.

    Args:
        winner, base: the two configs (their train.seed is replaced by each seed).
        out_dir: where the runs go (``<out_dir>/<winner|base>-seed<N>``).
        seeds: training seeds, at least two.
        split: the split scored.
        first: the winner's metrics on ``split`` for ``seeds[0]`` when already trained and scored.
    """
    from hawor_tune.evaluation import cached_baseline, evaluate, objective

    out_dir = Path(out_dir)
    weights = dict(winner.train.objective) or {"mpjpe": 1.0}
    reference = cached_baseline(winner, split)
    scores: dict[str, list[dict[str, float]]] = {"winner": [], "base": []}
    for name, cfg in (("winner", winner), ("base", base)):
        for seed in seeds:
            if name == "winner" and seed == seeds[0] and first is not None:
                m = dict(first)
            else:
                run = out_dir / f"{name}-seed{seed}"
                c = load_config(cfg.to_dict(), {"train.seed": seed, "train.out_dir": str(run / "run")})
                log.info("comparison: training the %s with seed %d", name, seed)
                m = evaluate(retrain(c, run).model, split, c)
            m["objective"] = objective(m, reference, weights)
            scores[name].append(m)
    table = {}
    for metric in ("objective", *weights):
        w = np.array([m[metric] for m in scores["winner"]])
        b = np.array([m[metric] for m in scores["base"]])
        ws, bs = float(np.ptp(w) / 2), float(np.ptp(b) / 2)
        table[metric] = {"winner": float(w.mean()), "winner_spread": ws, "base": float(b.mean()),
                         "base_spread": bs, "beats": bool(b.mean() - w.mean() > 2 * max(ws, bs))}
    return {"seeds": list(seeds), "split": split, "weights": weights, "metrics": table}


def evaluate_and_report(model: torch.nn.Module, cfg: ExperimentConfig, out_dir: str | os.PathLike, *,
                        history: list[dict[str, float]] | None = None, exp: Experiment | None = None,
                        chosen: dict[str, Any] | None = None, split: str = "test",
                        notice: str | None = None, comparison: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate on ``split`` beside the mean-pose baseline; write metrics.json, report.md and figures/.

    ``notice`` (say, why the split is not test: :func:`evaluation_split`) opens the report and is kept in
    metrics.json; the metrics are stored under the split's name.
    """
    from hawor_tune.evaluation import (
        DATASET_FPS,
        cached_baseline,
        constraint_values,
        evaluate,
        world_sequences,
    )

    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    test, preds = evaluate(model, split, cfg, return_predictions=True)
    baseline = cached_baseline(cfg, split)  # the figures the search and the comparison divided by
    bounds = dict(cfg.train.constraints)
    constraints = {m: {"bound": b, "ratio": v + b, "met": v <= 0}
                   for (m, b), v in zip(bounds.items(), constraint_values(test, baseline, bounds).values())}
    figures: dict[str, str] = {}
    notes: list[str] = []

    def figure(name: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        path = fig_dir / f"{name}.png"
        try:
            if fn(*args, path, **kwargs) is not None:  # None: nothing to draw (a front of one objective)
                figures[name] = str(path.relative_to(out_dir))
        except ValueError as e:  # e.g. too few trials for an importance estimate
            notes.append(f"{name}: not drawn ({e})")

    if history:
        figure("training_curves", report.plot_training_curves, history)
    figure("per_finger", report.plot_per_finger, test, baseline=baseline)
    ov = _overlay_frames(model, cfg, split)
    figure("skeletons", report.plot_skeleton_overlays, ov["images"], ov["pred2d"], ov["gt2d"], ov["valid"])
    traj = _trajectory(preds)
    figure("camera_trajectory", report.plot_camera_trajectory, traj["gt"], traj["pred"], segments=traj["segments"])
    first = world_sequences(preds)[0]  # the same sequence, its wrists in its world (the first camera)
    figure("wrist_trajectories", report.plot_wrist_trajectories, first.gt_joints[:, :, 0], first.pred_joints[:, :, 0],
           first.valid, fps=DATASET_FPS / cfg.data.frame_step)
    search = None
    if exp is not None and chosen is not None:
        space = exp.record.space
        metric, params = exp.metric, list(space.params)
        figure("trial_curves", report.plot_trial_curves, exp.epochs, exp.trials, metric,
               best_trial_id=chosen["trial_id"])
        figure("pareto_front", report.plot_pareto_front, exp.trials, space.objectives,
               chosen_trial_id=chosen["trial_id"])
        log_params = {p for p, spec in space.params.items() if spec.type == "loguniform"}
        figure("params_vs_metric", report.plot_params_vs_metric, exp.trials, params, metric, log_params=log_params)
        try:
            dists = optuna_distributions(space.params)
            importance = report.hyperparameter_importance(exp.trials, params, metric, exp.mode, dists)
            figure("importance", report.plot_importance, importance)
        except ValueError as e:
            importance = {}
            notes.append(f"importance: not computed ({e})")
        search = {"experiment": str(exp.directory), "trial_id": chosen["trial_id"], "params": chosen["params"],
                  "metric": metric, "val_value": chosen["value"], "epochs": chosen["epoch"],
                  "config_path": str(out_dir / "config.yaml"), "importance": importance}
    result = {"split": split, split: test, "baseline": baseline, "notice": notice, "search": search,
              "model": str(out_dir / MODEL_FILE), "figures": figures, "notes": notes, "comparison": comparison,
              "constraints": constraints}
    atomic_write_text(out_dir / METRICS_FILE, json.dumps(result, indent=2, default=_json_default, allow_nan=True))
    report.write_report(out_dir, metrics=test, baseline=baseline, search=search, figures=figures, notes=notes,
                        split=split, notice=notice, comparison=comparison, constraints=constraints)
    return result


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def retrain(cfg: ExperimentConfig, out_dir: str | os.PathLike, *, resume: bool = False) -> Any:
    """Train ``cfg`` from scratch (or from the latest checkpoint in ``out_dir`` with ``resume``)."""
    from hawor_tune.checkpoint import export_model, latest_checkpoint
    from hawor_tune.train import fit, prepare_run

    out_dir = Path(out_dir)
    save_config(cfg, out_dir / "config.yaml")
    resume_from = latest_checkpoint(cfg.train.out_dir) if resume else None
    if resume and resume_from is None:
        log.info("--resume: no checkpoint in %s yet, starting from scratch", cfg.train.out_dir)
    result = fit(prepare_run(cfg) if resume_from is None else cfg, resume_from=resume_from)
    if result.status != "completed":
        raise RuntimeError(f"retrain {result.status}: {result.reason}")
    export_model(out_dir / MODEL_FILE, model=result.model, config=cfg, epoch=result.epochs_run,
                 history=result.history)
    return result
