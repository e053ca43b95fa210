"""Tests for hawor_tune.pretrain: the cached per-frame pretraining that every run fine-tunes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL_OVERRIDES, run_concurrently

from hawor_tune.checkpoint import load_checkpoint
from hawor_tune.model import FlowHead, build_model
from hawor_tune.pretrain import (
    ensure_pretrained,
    fit_flow_head,
    pretrain_config,
    pretrain_key,
    pretrained_file,
)

PRETRAIN = {"pretrain.epochs": 1, "pretrain.max_train_batches": 2, "pretrain.batch_size": 4}


@pytest.fixture()
def cfg(synthetic_dataset, tmp_path):
    return synthetic_dataset.config({**TINY_MODEL_OVERRIDES, **PRETRAIN, "data.cache_dir": str(tmp_path / "cache"),
                                     "train.out_dir": str(tmp_path / "run")})


@pytest.mark.parametrize("key, value", [
    ("optim.lr", 0.123), ("optim.weight_decay", 0.5), ("loss.keypoint_3d", 7.0), ("data.seq_len", 2),
    ("data.batch_size", 3), ("train.seed", 5), ("train.epochs", 9), ("model.infill_mask_prob", 0.5),
])
def test_the_key_ignores_what_a_run_may_vary(synthetic_dataset, key, value):
    base = synthetic_dataset.config({**TINY_MODEL_OVERRIDES, **PRETRAIN})
    assert pretrain_key(synthetic_dataset.config({**TINY_MODEL_OVERRIDES, **PRETRAIN, key: value})) == pretrain_key(base)


@pytest.mark.parametrize("key, value", [
    ("model.temporal_dim", 64), ("model.backbone_kwargs", {"depth": 2, "patch_size": 16}), ("data.crop_size", 48),
    ("data.crop_scale", 1.5), ("pretrain.epochs", 2), ("pretrain.lr", 0.01),
])
def test_the_key_follows_what_the_weights_depend_on(synthetic_dataset, key, value):
    base = synthetic_dataset.config({**TINY_MODEL_OVERRIDES, **PRETRAIN})
    assert pretrain_key(synthetic_dataset.config({**TINY_MODEL_OVERRIDES, **PRETRAIN, key: value})) != pretrain_key(base)


def test_pretraining_is_single_frame_hand_terms_only(cfg, tmp_path):
    p = pretrain_config(cfg, tmp_path / "p")
    assert (p.data.seq_len, p.train.epochs, p.pretrain.epochs) == (1, 1, 0)
    assert p.loss.temporal == p.loss.camera == p.loss.hand_world == 0.0
    assert p.loss.keypoint_3d > 0


def test_built_once_then_reused_and_loaded(cfg):
    assert not pretrained_file(cfg).exists()
    results, errors = run_concurrently(lambda: ensure_pretrained(cfg), n=2)
    assert not errors
    path = pretrained_file(cfg)
    assert {r.model.pretrained_path for r in results} == {str(path)}
    stamp = path.stat().st_mtime_ns
    again = ensure_pretrained(cfg)
    assert again.model.pretrained_path == str(path) and path.stat().st_mtime_ns == stamp  # re-used, not re-made
    assert cfg.model.pretrained_path == ""  # the caller's config is not changed
    # The file is a self-describing hawor-tune model whose weights a fresh model starts from.
    state = load_checkpoint(path)
    assert state["config"]["data"]["seq_len"] == 1
    model = build_model(again)
    for name in ("backbone", "spatial_head", "hand_head"):
        for key, value in getattr(model, name).state_dict().items():
            torch.testing.assert_close(value, state["model"][f"{name}.{key}"], msg=f"{name}.{key}")


def test_disabled_or_own_weights_need_no_pretraining(cfg, synthetic_dataset):
    off = synthetic_dataset.config({**TINY_MODEL_OVERRIDES, "pretrain.epochs": 0})
    assert ensure_pretrained(off) is off
    own = synthetic_dataset.config({**TINY_MODEL_OVERRIDES, **PRETRAIN, "model.pretrained_path": "/x/y.pt"})
    assert ensure_pretrained(own) is own


def test_the_flow_head_is_fitted_once_and_the_hand_stage_reused(cfg, synthetic_dataset, tmp_path):
    start = ensure_pretrained(cfg)
    state = load_checkpoint(start.model.pretrained_path)
    assert float(state["model"]["flow_head.weight"].abs().sum()) > 0  # fitted, not the static camera's zeros
    hands = sorted(p.name for p in (tmp_path / "cache" / "pretrained").glob("hand-*.pt"))
    assert len(hands) == 2  # the hand stage and the start with its flow head
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "pretrained").glob("hand-*.pt")}
    coarser = synthetic_dataset.config({**TINY_MODEL_OVERRIDES, **PRETRAIN, "data.flow_grid": 2,
                                        "data.cache_dir": str(tmp_path / "cache"), "train.out_dir": str(tmp_path / "run")})
    other = ensure_pretrained(coarser)
    assert other.model.pretrained_path != start.model.pretrained_path
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())  # the hands were not pretrained again
    assert load_checkpoint(other.model.pretrained_path)["model"]["flow_head.weight"].shape == (9, 2 * 2 * 2)


def _rot(axis_angle: np.ndarray) -> np.ndarray:
    """Rodrigues' formula, written out."""
    theta = np.linalg.norm(axis_angle)
    if theta < 1e-12:
        return np.eye(3)
    k = axis_angle / theta
    Kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(theta) * Kx + (1 - np.cos(theta)) * Kx @ Kx


def test_fit_flow_head_recovers_a_linear_flow_model():
    # Clips whose flow is an exact linear function of each frame's motion in the clip's first camera
    # (axis-angle and translation): the fitted head must read the translation back, far better than a
    # static camera does.
    rng = np.random.default_rng(0)
    G, T = 2, 6
    mixing = rng.normal(size=(2 * G * G, 6))
    clips, moved = [], []
    # Enough clips, and translations as large as the turns, for the ridge penalty's shrinkage to stay small.
    for _ in range(2000):
        aa = rng.normal(scale=0.01, size=(T, 3)).cumsum(0)  # camera t's rotation into camera 0 (world = camera 0)
        pos = rng.normal(scale=0.01, size=(T, 3)).cumsum(0)  # camera t's centre in camera 0
        aa[0], pos[0] = 0.0, 0.0
        rel_R = np.stack([_rot(a) for a in aa])
        cam_R = rel_R.transpose(0, 2, 1)  # world-to-camera: X_t = R_t^T (X_0 - c_t)
        cam_t = -np.einsum("tij,tj->ti", cam_R, pos)
        flow = np.concatenate([aa, pos], axis=1) @ mixing.T  # (T, 2 G G)
        clips.append({"cam_R": torch.tensor(cam_R, dtype=torch.float32), "cam_t": torch.tensor(cam_t, dtype=torch.float32),
                      "flow": torch.tensor(flow, dtype=torch.float32).view(T, 2, G, G)})
        moved.append(np.linalg.norm(pos[1:], axis=1))
    model = SimpleNamespace(flow_head=FlowHead(2 * G * G, 9))
    result = fit_flow_head(model, clips)
    assert result["static_mm"] == pytest.approx(np.mean(moved) * 1000, rel=1e-4)
    assert result["fit_mm"] < 0.1 * result["static_mm"]
    # The head itself reads a clip's translations back from its flow (the 3 last of its 9 outputs).
    clip = clips[0]
    pos = -torch.einsum("tji,tj->ti", clip["cam_R"], clip["cam_t"])[1:]  # camera centres, as built above
    error = (model.flow_head(clip["flow"][1:].flatten(1)))[:, 6:] - pos
    assert float(error.norm(dim=1).mean()) < 0.1 * float(pos.norm(dim=1).mean())
