"""run_best.py end to end on a tiny finished search, and its error cases."""

from __future__ import annotations

import json
import math
import shutil

import cv2
import numpy as np
import pytest
from conftest import write_search_space

import run_best
from hawor_tune.results import ExperimentRecord, read_rows, summarize_trials, write_parquet_atomic
from hawor_tune.retrain import (
    MODEL_FILE,
    Experiment,
    SelectionError,
    best_config,
    choose_best_trial,
    load_experiment,
)
from hawor_tune.search_space import load_search_space

# What metrics.json must hold for the test split (issue: per hand, per joint/finger, the infilled frames, accel,
# W/WA, camera, jerk).
TEST_METRICS = ["mpjpe", "mpjpe_left", "mpjpe_right", "pa_mpjpe", "pa_mpjpe_left", "pa_mpjpe_right",
                "mpjpe_infilled", "accel_error", "w_mpjpe", "wa_mpjpe", "cam_trans_error", "cam_rot_error", "jerk",
                "cam_accel_error", "cam_jerk", "cam_jerk_gt",
                *(f"joint_{j:02d}" for j in range(21)),
                *(f"finger_{f}" for f in ("thumb", "index", "middle", "ring", "pinky"))]


def _exit_code(argv) -> int:
    try:
        return run_best.main(argv)
    except SystemExit as e:
        return int(e.code)


def test_best_trial_is_the_best_in_trials_parquet(tiny_search):
    exp = load_experiment(experiment=tiny_search)
    trial, value, epoch = choose_best_trial(exp)
    trials = read_rows(tiny_search / "trials.parquet")
    usable = [t for t in trials if t["status"] != "ERROR" and not t["diverged"]
              and t["best/val/mpjpe"] is not None and math.isfinite(t["best/val/mpjpe"])]
    best = min(usable, key=lambda t: (t["best/val/mpjpe"], t["best_epoch"], t["trial_id"]))
    assert trial["trial_id"] == best["trial_id"]
    assert value == pytest.approx(best["best/val/mpjpe"]) and epoch == best["best_epoch"]


def test_ties_go_to_fewer_epochs_and_errors_and_nan_are_ignored(tmp_path, synthetic_dataset):
    epochs = [{"trial_id": "a", "epoch": 1, "val/mpjpe": 30.0}, {"trial_id": "a", "epoch": 2, "val/mpjpe": 20.0},
              {"trial_id": "b", "epoch": 1, "val/mpjpe": 20.0}, {"trial_id": "b", "epoch": 2, "val/mpjpe": math.nan},
              {"trial_id": "c", "epoch": 1, "val/mpjpe": 1.0},
              {"trial_id": "a", "epoch": 3, "val/mpjpe": -math.inf}]
    meta = {"a": {"status": "TERMINATED"}, "b": {"status": "TERMINATED"}, "c": {"status": "ERROR"}}
    trials = summarize_trials(epochs, meta, metric="val/mpjpe", mode="min", max_epochs=3, param_paths=[])
    space = load_search_space(write_search_space(tmp_path, synthetic_dataset))  # val/mpjpe, min
    exp = Experiment(tmp_path, ExperimentRecord("x", space, full_budget={}), trials, epochs)
    trial, value, epoch = choose_best_trial(exp)
    assert (trial["trial_id"], value, epoch) == ("b", 20.0, 1)


def test_run_best_end_to_end_and_eval_only_reproduces(tiny_search, tmp_path, capsys):
    out = tmp_path / "best"
    assert run_best.main(["--experiment", str(tiny_search), "--epochs", "2", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(TEST_METRICS) <= set(metrics["test"])
    assert all(np.isfinite(metrics["test"][k]) for k in TEST_METRICS)
    assert metrics["baseline"]["mpjpe"] > 0
    exp = load_experiment(experiment=tiny_search)
    trial, value, _ = choose_best_trial(exp)
    assert metrics["search"]["trial_id"] == trial["trial_id"] and metrics["search"]["val_value"] == pytest.approx(value)
    # the retrain ran the requested epochs, from scratch, with the chosen trial's parameters
    from hawor_tune.checkpoint import load_checkpoint
    state = load_checkpoint(out / "model.pt")
    assert state["epoch"] == 2 and len(state["history"]) == 2
    for p in exp.record.space.params:
        section, key = p.split(".")
        assert state["config"][section][key] == pytest.approx(trial[f"param/{p}"])
    assert (out / "config.yaml").is_file()
    # What the search bought: the winner and the space's base config, two seeds each, on test.
    comparison = metrics["comparison"]
    assert comparison["seeds"] == [0, 1] and set(comparison["metrics"]) == {"objective", "mpjpe"}
    for name in ("base-seed0", "base-seed1", "winner-seed1"):
        assert (out / "compare" / name / MODEL_FILE).is_file(), name
    from hawor_tune.checkpoint import load_model
    from hawor_tune.evaluation import evaluate

    second_model, second_cfg = load_model(out / "compare" / "winner-seed1" / MODEL_FILE)
    assert second_cfg.train.seed == 1
    first, second = metrics["test"]["mpjpe"], evaluate(second_model, "test", second_cfg)["mpjpe"]
    row = comparison["metrics"]["mpjpe"]
    assert row["winner"] == pytest.approx((first + second) / 2, rel=1e-6)
    assert row["winner_spread"] == pytest.approx(abs(first - second) / 2, rel=1e-6, abs=1e-9)
    assert row["beats"] == (row["base"] - row["winner"] > 2 * max(row["winner_spread"], row["base_spread"]))
    report = (out / "report.md").read_text()
    assert "## What the search bought" in report
    assert f"{metrics['test']['mpjpe']:.2f}" in report
    for name in ("training_curves", "trial_curves", "params_vs_metric", "importance", "per_finger", "skeletons",
                 "camera_trajectory", "wrist_trajectories"):
        assert name in metrics["figures"], (name, metrics["notes"])
        path = out / metrics["figures"][name]
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = cv2.imread(str(path))
        assert img is not None and img.shape[0] > 100 and img.std() > 10
        assert f"]({metrics['figures'][name]})" in report
    capsys.readouterr()
    assert run_best.main(["--eval-only", str(out / "model.pt"), "--out", str(tmp_path / "eval")]) == 0
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for k in TEST_METRICS:
        assert again["test"][k] == pytest.approx(metrics["test"][k], rel=1e-6, abs=1e-9), k


def _one_line_error(capsys, fragment: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err


def test_no_experiment_found(tmp_path, capsys):
    assert _exit_code(["--storage", str(tmp_path / "empty")]) == 2
    _one_line_error(capsys, "no experiment found")


def test_experiment_without_a_completed_trial(tiny_search, tmp_path, capsys):
    exp_dir = tmp_path / "exp"
    shutil.copytree(tiny_search, exp_dir, ignore=shutil.ignore_patterns("best", "*_0*"))
    rows = read_rows(exp_dir / "trials.parquet")
    write_parquet_atomic([{**r, "status": "ERROR"} for r in rows], exp_dir / "trials.parquet")
    assert _exit_code(["--experiment", str(exp_dir)]) == 2
    _one_line_error(capsys, "no trial completed an epoch")


def test_parquet_from_something_else(tmp_path, capsys):
    write_parquet_atomic([{"a": 1}], tmp_path / "trials.parquet")
    assert _exit_code(["--trials", str(tmp_path / "trials.parquet")]) == 2
    _one_line_error(capsys, "not from a hawor-tune search")
    (tmp_path / "junk.parquet").write_text("definitely not parquet")
    assert _exit_code(["--trials", str(tmp_path / "junk.parquet")]) == 2
    _one_line_error(capsys, "not a parquet file")


def test_model_file_that_is_not_ours(tmp_path, capsys):
    (tmp_path / "model.pt").write_bytes(b"\x00" * 64)
    assert _exit_code(["--eval-only", str(tmp_path / "model.pt")]) == 2
    _one_line_error(capsys, "not a hawor-tune checkpoint")


def test_retrain_budget_is_the_base_files_not_the_search_shortened_one(tiny_search, synthetic_dataset):
    exp = load_experiment(experiment=tiny_search)
    base_batches = synthetic_dataset.config().train.max_train_batches
    assert exp.record.full_budget == {"train.epochs": 3, "train.max_train_batches": base_batches}  # the base file's
    trial, _, _ = choose_best_trial(exp)
    exp.record.full_budget = {"train.epochs": 7, "train.max_train_batches": 5}  # as if trials were cut to fit
    assert (best_config(exp, trial, overrides={}).train.epochs, best_config(exp, trial, overrides={}).train.max_train_batches) == (7, 5)
    assert best_config(exp, trial, overrides={"train.epochs": 2}).train.epochs == 2  # --epochs wins


def test_best_config_rebuilds_the_config_the_trial_trained(tiny_search):
    # One way to build a trial's config: the retrain's, given the trial's own budget and folders, is the
    # config its trainable trained (as recorded in the trial's checkpoint).
    from hawor_tune.checkpoint import load_checkpoint

    exp = load_experiment(experiment=tiny_search)
    trial, _, _ = choose_best_trial(exp)
    trained = load_checkpoint(trial["checkpoint"])["config"]
    same_run = {f"train.{k}": trained["train"][k]
                for k in ("out_dir", "threads", "keep_checkpoints", "epochs", "max_train_batches")}
    assert best_config(exp, trial, overrides=same_run).to_dict() == trained


def test_retrain_imports_without_ray():
    # run_best.py reads a finished search's files; it needs no Ray (nor its start-up time).
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys\nsys.modules['ray'] = None\nimport hawor_tune.retrain"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def _multi_objective_experiment(tmp_path, dataset) -> Experiment:
    points = {"a": (40.0, 10.0), "b": (50.0, 5.0), "c": (45.0, 12.0), "d": (30.0, 20.0)}
    # d is best in mpjpe but errored: never chosen; without it a and b form the front
    epochs = [{"trial_id": t, "epoch": e, "val/mpjpe": m + 3 - e, "val/cam_trans_error": c + 3 - e}
              for t, (m, c) in points.items() for e in (1, 2, 3)]
    meta = {t: {"status": "ERROR" if t == "d" else "TERMINATED"} for t in points}
    objectives = [("val/mpjpe", "min"), ("val/cam_trans_error", "min")]
    trials = summarize_trials(epochs, meta, metric="val/mpjpe", mode="min", max_epochs=3, param_paths=[],
                              objectives=objectives)
    space = load_search_space(write_search_space(
        tmp_path, dataset, metric=["val/mpjpe", "val/cam_trans_error"], mode=["min", "min"],
        scheduler={"type": "fifo"}))
    return Experiment(tmp_path, ExperimentRecord("x", space, full_budget={}), trials, epochs)


def test_a_multi_objective_search_retrains_a_pareto_trial_by_the_documented_rule(tmp_path, synthetic_dataset):
    exp = _multi_objective_experiment(tmp_path, synthetic_dataset)
    assert [r["trial_id"] for r in exp.trials if r["pareto"]] == ["a", "b"]
    assert choose_best_trial(exp)[0]["trial_id"] == "a"  # the first objective ranks the front
    trial, value, epoch = choose_best_trial(exp, objective="val/cam_trans_error")
    assert (trial["trial_id"], value, epoch) == ("b", 5.0, 3)
    assert choose_best_trial(exp, trial_id="c")[0]["trial_id"] == "c"  # an explicit trial, even off the front
    for kwargs, fragment in (({"objective": "val/pa_mpjpe"}, "use one of val/mpjpe, val/cam_trans_error"),
                             ({"trial_id": "zz"}, "no such trial"), ({"trial_id": "d"}, "errored")):
        with pytest.raises(SelectionError, match=fragment):
            choose_best_trial(exp, **kwargs)


def test_trial_and_objective_do_not_go_with_an_explicit_config(capsys):
    assert _exit_code(["--config", "configs/tiny.yaml", "--trial", "a"]) == 2
    assert "do not go with --config" in capsys.readouterr().err


# ---- A test split without labels (ARCTIC's protocol p2) --------------------------------------------------

@pytest.fixture
def unlabelled_test(synthetic_dataset, tmp_path):
    """A copy of the dataset whose test subject has images but no raw_seqs (as ARCTIC's s03), its boxes written
    beforehand with the camera's intrinsics, and an untrained model file whose config reads the copy."""
    import torch
    from conftest import TINY_MODEL_OVERRIDES, write_box_files

    from hawor_tune.checkpoint import export_model
    from hawor_tune.data import read_split
    from hawor_tune.model import build_model

    boxes = tmp_path / "boxes"
    written = write_box_files(synthetic_dataset, boxes, "test", intrinsics=True)
    root = tmp_path / "data"
    shutil.copytree(synthetic_dataset.root, root)
    for sid in {name.split("/")[0] for name in read_split(root, "test")}:
        shutil.rmtree(root / "raw_seqs" / sid)
    cfg = synthetic_dataset.config({**TINY_MODEL_OVERRIDES, "data.root": str(root),
                                    "data.cache_dir": str(tmp_path / "cache")})
    torch.manual_seed(0)
    model = export_model(tmp_path / "model.pt", model=build_model(cfg), config=cfg, epoch=0)
    return model, boxes, written


def test_a_test_split_without_labels_reports_on_val_and_predicts_test_from_boxes(unlabelled_test, tmp_path, capsys):
    model, boxes, written = unlabelled_test
    out = tmp_path / "eval"
    assert run_best.main(["--eval-only", str(model), "--boxes", str(boxes), "--out", str(out)]) == 0
    console = capsys.readouterr().out
    assert "note: The test split has no labels" in console and "evaluates on the validation split" in console
    assert "test predictions: 1 sequences in" in console
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "val" and "test" not in metrics and "no labels" in metrics["notice"]
    assert all(np.isfinite(metrics["val"][k]) for k in ("mpjpe", "pa_mpjpe", "w_mpjpe"))
    head = (out / "report.md").read_text().splitlines()[:4]
    assert head[2].startswith("**Evaluated on the val split.** The test split has no labels"), head
    assert "## Results (val split)" in (out / "report.md").read_text()
    index = json.loads((out / "predictions" / "index.json").read_text())
    assert index["split"] == "test" and set(index["sequences"]) == set(written)
    for name, entry in written.items():
        with np.load(out / "predictions" / index["sequences"][name]) as p:
            assert p["image_index"].tolist() == entry["image_index"]
            assert p["right_joints"].shape == (len(entry["image_index"]), 21, 3)


def test_without_boxes_it_says_in_one_line_what_is_missing(unlabelled_test, tmp_path, capsys):
    model, _, _ = unlabelled_test
    out = tmp_path / "eval"
    assert run_best.main(["--eval-only", str(model), "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "no test predictions" in line]
    assert lines == ["no test predictions: the test split has no labels and no hand boxes were given (--boxes DIR, "
                     "one JSON per sequence; docs/evaluation.md)"]
    assert json.loads((out / "metrics.json").read_text())["split"] == "val"
    assert not (out / "predictions").exists()


def test_bad_boxes_fail_in_one_line_before_anything_runs(unlabelled_test, tmp_path, capsys):
    model, boxes, written = unlabelled_test
    assert _exit_code(["--eval-only", str(model), "--boxes", str(tmp_path / "nowhere")]) == 2
    _one_line_error(capsys, f"--boxes {tmp_path / 'nowhere'}: no such folder")
    name = next(iter(written))
    entry = {**written[name], "left": [[1, 2]] + written[name]["left"][1:]}
    (boxes / f"{name}.json").write_text(json.dumps(entry))
    assert _exit_code(["--eval-only", str(model), "--boxes", str(boxes), "--out", str(tmp_path / "eval")]) == 2
    _one_line_error(capsys, f"{boxes / name}.json: key 'left'[0] (image {entry['image_index'][0]}) is [1, 2]; "
                            "allowed: null, or [x1, y1, x2, y2, score]")
    assert not (tmp_path / "eval").exists()  # checked before the evaluation
    # A retrain checks them before it trains.
    from hawor_tune.checkpoint import load_checkpoint
    from hawor_tune.config import config_from_dict, save_config

    save_config(config_from_dict(load_checkpoint(model)["config"]), tmp_path / "cfg.yaml")
    assert _exit_code(["--config", str(tmp_path / "cfg.yaml"), "--boxes", str(boxes), "--out", str(tmp_path / "re")]) == 2
    _one_line_error(capsys, "key 'left'[0]")
    assert not (tmp_path / "re" / "run").exists()


def test_a_splits_file_can_hold_out_a_labelled_subject_as_test(unlabelled_test, tmp_path):
    from hawor_tune.checkpoint import load_model
    from hawor_tune.data import build_dataset, read_split
    from hawor_tune.retrain import evaluation_split

    _, cfg = load_model(unlabelled_test[0])
    split, notice = evaluation_split(cfg)
    assert split == "val" and "data.splits" in notice
    root = cfg.data.root
    held_out = read_split(root, "train")[:1]
    path = tmp_path / "held_out.json"
    path.write_text(json.dumps({"val": read_split(root, "val"), "test": held_out}))
    cfg.data.splits = str(path)
    assert evaluation_split(cfg) == ("test", None)
    assert build_dataset(cfg, "test", cached=False).sequences == held_out
    assert held_out[0] not in build_dataset(cfg, "train", cached=False).sequences


def test_the_train_clis_eval_only_scores_val_and_says_the_test_split_has_no_labels(unlabelled_test, capsys):
    from hawor_tune import train

    model, _, _ = unlabelled_test
    assert train.main(["--eval-only", str(model)]) == 0
    out = capsys.readouterr().out
    assert "val: MPJPE" in out and "test: no labels" in out and "test: MPJPE" not in out
