from __future__ import annotations

import math
from pathlib import Path

import cv2
import pytest
import torch
from conftest import TINY_MODEL_OVERRIDES

from hawor_tune import train
from hawor_tune.checkpoint import (
    CheckpointError,
    export_model,
    latest_checkpoint,
    load_checkpoint,
    load_model,
)
from hawor_tune.config import ConfigError, save_config
from hawor_tune.epoch_metrics import REPORTED_METRICS
from hawor_tune.evaluation import evaluate, mean_pose_baseline
from hawor_tune.flow_fit import ensure_flow_fit
from hawor_tune.model import build_model
from hawor_tune.train import fit, lr_factor, prepare_run


@pytest.fixture
def tiny_cfg(synthetic_dataset, tmp_path):
    def make(**overrides):
        return synthetic_dataset.config({**TINY_MODEL_OVERRIDES, "train.out_dir": str(tmp_path / "run"),
                                         **{k.replace("__", "."): v for k, v in overrides.items()}})
    return make


def test_fit_reports_every_epoch_with_a_checkpoint(tiny_cfg):
    cfg = prepare_run(tiny_cfg(train__epochs=2))
    seen = []
    result = fit(cfg, on_epoch=lambda m, d: seen.append((m, d)))
    assert result.status == "completed" and result.epochs_run == 2
    assert [int(m["epoch"]) for m, _ in seen] == [1, 2]
    for record, ckpt_dir in seen[-1:]:
        assert set(REPORTED_METRICS) <= set(record)
        assert all(math.isfinite(record[k]) for k in REPORTED_METRICS)
        state = load_checkpoint(ckpt_dir)
        assert state["epoch"] == 2 and state["config"] == cfg.to_dict() and state["optimizer"]
    # keep_checkpoints (2) bounds what stays on disk; the newest is found for resuming
    assert latest_checkpoint(cfg.train.out_dir).name == "epoch_0002"
    # The camera's flow head is the cached fit, held fixed by training.
    fitted = torch.load(ensure_flow_fit(cfg), weights_only=True)["state"]
    assert all(torch.equal(v.cpu(), fitted[k]) for k, v in result.model.flow_head.state_dict().items())


def test_fit_refuses_a_run_that_needs_a_start_it_was_not_given(tiny_cfg):
    cfg = tiny_cfg(pretrain__epochs=1)
    with pytest.raises(ConfigError) as info:
        fit(cfg)
    message = str(info.value)
    assert "\n" not in message and "prepare_run" in message and "pretrain.epochs is 1" in message
    assert not Path(cfg.train.out_dir).exists()  # refused before writing anything


def test_fit_keeps_torch_and_opencv_to_the_run_s_threads(tiny_cfg):
    # A 1-CPU trial: OpenCV's pool runs one thread per CPU of the machine unless told otherwise.
    saved = torch.get_num_threads(), cv2.getNumThreads()
    cv2.setNumThreads(2)
    try:
        fit(tiny_cfg(train__epochs=1, train__threads=1))
        assert (torch.get_num_threads(), cv2.getNumThreads()) == (1, 1)
    finally:
        torch.set_num_threads(saved[0])
        cv2.setNumThreads(saved[1])


def test_resumed_run_ends_with_the_same_weights(tiny_cfg, tmp_path):
    full = fit(tiny_cfg(train__epochs=3, train__out_dir=str(tmp_path / "full")))
    part_cfg = tiny_cfg(train__epochs=3, train__out_dir=str(tmp_path / "part"))
    fit(part_cfg, epochs=1)  # interrupted after epoch 1
    resumed = fit(part_cfg, resume_from=latest_checkpoint(part_cfg.train.out_dir))
    assert [h["epoch"] for h in resumed.history] == [1.0, 2.0, 3.0]
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.history[-1]["val/mpjpe"] == pytest.approx(full.history[-1]["val/mpjpe"], rel=1e-6)


def test_non_finite_loss_stops_with_a_reason(tiny_cfg, monkeypatch):
    real = train.compute_losses

    def poisoned(out, batch, weights):
        total, terms = real(out, batch, weights)
        return total * float("nan"), {**terms, "keypoint_3d": float("nan")}

    monkeypatch.setattr(train, "compute_losses", poisoned)
    result = fit(tiny_cfg(train__epochs=2))
    assert result.status == "diverged" and result.epochs_run == 0
    assert "non-finite loss" in result.reason and "keypoint_3d" in result.reason


def test_lr_schedule_warmup_then_cosine():
    kw = dict(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [lr_factor(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, **kw) == pytest.approx(1.0)
    assert lr_factor(9, **kw) == pytest.approx(0.1 + 0.9 * 0.5)      # half-way down the cosine
    assert lr_factor(14, **kw) == pytest.approx(0.1)
    assert lr_factor(40, **kw) == pytest.approx(0.1)


def test_backbone_learning_rate_is_scaled_and_one_d_parameters_are_not_decayed(tiny_cfg):
    cfg = tiny_cfg(optim__lr=1e-3, optim__backbone_lr_scale=0.1, optim__weight_decay=0.01)
    model = build_model(cfg, pretrained=False)
    optimizer = train.build_optimizer(model, cfg)
    setting = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    backbone = {id(p) for p in model.backbone.parameters()}
    for name, p in model.named_parameters():
        lr = 1e-4 if id(p) in backbone else 1e-3
        assert setting[id(p)] == pytest.approx((lr, 0.01 if p.ndim >= 2 else 0.0)), name
    assert len(setting) == sum(1 for p in model.parameters() if p.requires_grad)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # the run's own rate is reported


def test_evaluate_exported_model_and_baseline(tiny_cfg, tmp_path):
    cfg = tiny_cfg(train__epochs=1)
    result = fit(cfg)
    path = export_model(tmp_path / "model.pt", model=result.model, config=cfg, epoch=1, history=result.history)
    model, loaded_cfg = load_model(path)
    assert loaded_cfg == cfg
    val = evaluate(model, "val", loaded_cfg)
    assert val["mpjpe"] == pytest.approx(result.history[-1]["val/mpjpe"], rel=1e-6)
    base = mean_pose_baseline(cfg, "val")
    assert base["mpjpe"] > 0 and base["cam_rot_error"] >= 0 and "finger_index" in base


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_load_checkpoint_rejects_foreign_files(tmp_path, content):
    path = tmp_path / "x.pt"
    if content is None:
        torch.save({"weights": torch.zeros(2)}, path)  # a real torch file, but not ours
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match="not a hawor-tune checkpoint"):
        load_checkpoint(path)


def test_a_model_file_whose_flow_head_read_flow_from_the_first_frame_is_refused(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    model = build_model(cfg, pretrained=False)
    model.flow_head.w3.fill_(0.01)  # as fitted
    path = export_model(tmp_path / "model.pt", model=model, config=cfg, epoch=1)
    load_model(path)  # this version's file
    state = torch.load(path, weights_only=True)
    torch.save({**state, "version": 1}, path)
    with pytest.raises(CheckpointError, match="checkpoint version 1 was written before the camera's flow head read "
                                              "the flow between consecutive frames"):
        load_model(path)
    model.flow_head.w3.zero_()  # a head never fitted (a start, or a model without flow) reads nothing
    path = export_model(tmp_path / "start.pt", model=model, config=cfg, epoch=1)
    torch.save({**torch.load(path, weights_only=True), "version": 1}, path)
    load_model(path)


def test_cli_test_only_and_eval_only(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg(train__epochs=1)
    cfg_path = tmp_path / "cfg.yaml"
    save_config(cfg, cfg_path)
    assert train.main(["--config", str(cfg_path), "--test-only"]) == 0
    assert "test-only OK" in capsys.readouterr().out
    assert train.main(["--config", str(cfg_path)]) == 0
    ckpt = latest_checkpoint(cfg.train.out_dir)
    assert train.main(["--eval-only", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "val: MPJPE" in out and "test: MPJPE" in out
    # An inference setting given on the command line applies to the checkpoint's model.
    assert cfg.model.hand_trajectory_degree != 0
    assert train.main(["--eval-only", str(ckpt), "model.hand_trajectory_degree=0"]) == 0
    free = capsys.readouterr().out

    def val_line(text: str) -> str:
        return next(line for line in text.splitlines() if line.startswith("val:"))

    assert val_line(free).split("accel")[1] != val_line(out).split("accel")[1]  # each frame free: less smooth


def test_cli_bad_override_exits_2(tmp_path, capsys):
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    assert train.main(["--config", str(tiny), "optim.lr=-3"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "-3" in err and len(err.strip().splitlines()) == 1


def test_a_declared_objective_is_reported_every_epoch_over_the_baselines_figures(tiny_cfg):
    weights = {"mpjpe": 1.0, "w_mpjpe": 1.0, "accel_error": 0.5}
    cfg = tiny_cfg(train__epochs=2, train__objective=weights)
    result = fit(cfg)
    baseline = mean_pose_baseline(cfg, "val")  # computed afresh: the run read its cached copy
    for record in result.history:
        expected = sum(w * record[f"val/{m}"] / baseline[m] for m, w in weights.items())
        assert record["val/objective"] == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ConfigError, match="'wiggle' is not a reported validation metric"):
        fit(tiny_cfg(train__objective={"wiggle": 1.0}))
