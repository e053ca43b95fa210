"""Tests for hawor_tune.flow_fit: the camera's flow head, fitted by least squares once and cached."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL_OVERRIDES, run_concurrently

from hawor_tune.atomic import DiskFullError
from hawor_tune.flow_fit import FlowFitError, ensure_flow_fit, fit_flow_head, flow_fit_file, load_flow_fit
from hawor_tune.model import FlowHead, build_model


@pytest.fixture()
def cfg(synthetic_dataset, tmp_path):
    def make(**overrides):
        return synthetic_dataset.config({**TINY_MODEL_OVERRIDES, "data.cache_dir": str(tmp_path / "cache"),
                                         **{k.replace("__", "."): v for k, v in overrides.items()}})
    return make


def _rot(axis_angle: np.ndarray) -> np.ndarray:
    """Rodrigues' formula, written out."""
    theta = np.linalg.norm(axis_angle)
    if theta < 1e-12:
        return np.eye(3)
    k = axis_angle / theta
    Kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(theta) * Kx + (1 - np.cos(theta)) * Kx @ Kx


def test_the_fit_reads_translation_back_from_a_linear_flow_model():
    # Clips whose flow is an exact linear function of each frame's motion in the clip's first camera
    # (axis-angle and camera centre): the fitted head must read the centre back, far better than a static
    # camera does. Enough clips, and translations as large as the turns, keep the ridge's shrinkage small.
    rng = np.random.default_rng(0)
    G, T = 2, 6
    mixing = rng.normal(size=(2 * G * G, 6))
    clips, moved = [], []
    for _ in range(2000):
        aa = rng.normal(scale=0.01, size=(T, 3)).cumsum(0)  # rotation of camera t into camera 0
        pos = rng.normal(scale=0.01, size=(T, 3)).cumsum(0)  # centre of camera t in camera 0 (the world)
        aa[0], pos[0] = 0.0, 0.0
        cam_R = np.stack([_rot(a).T for a in aa])  # world-to-camera: X_t = R_t (X_0 - c_t)
        cam_t = -np.einsum("tij,tj->ti", cam_R, pos)
        flow = np.concatenate([aa, pos], axis=1) @ mixing.T  # (T, 2 G G)
        clips.append({"cam_R": torch.tensor(cam_R, dtype=torch.float32),
                      "cam_t": torch.tensor(cam_t, dtype=torch.float32),
                      "flow": torch.tensor(flow, dtype=torch.float32).view(T, 2, G, G)})
        moved.append(np.linalg.norm(pos[1:], axis=1))
    fit = fit_flow_head(clips)
    assert fit["frames"] == 2000 * (T - 1)
    assert fit["static_mm"] == pytest.approx(np.mean(moved) * 1000, rel=1e-4)
    assert fit["fit_mm"] < 0.1 * fit["static_mm"]
    # The head, given the fit, reads a clip's camera centres back from its flow (its last 3 outputs).
    head = FlowHead(2 * G * G, 9)
    head.weight.copy_(fit["weight"])
    head.bias.copy_(fit["bias"])
    clip = clips[0]
    centres = -torch.einsum("tji,tj->ti", clip["cam_R"], clip["cam_t"])[1:]
    error = head(clip["flow"][1:].flatten(1))[:, 6:] - centres
    assert float(error.norm(dim=1).mean()) < 0.1 * float(centres.norm(dim=1).mean())


def test_fitted_once_then_reused_and_loaded(cfg):
    c = cfg()
    assert not flow_fit_file(c).exists()
    results, errors = run_concurrently(lambda: ensure_flow_fit(c), n=2)
    assert not errors and set(results) == {flow_fit_file(c)}
    stamp = flow_fit_file(c).stat().st_mtime_ns
    assert ensure_flow_fit(c) == flow_fit_file(c) and flow_fit_file(c).stat().st_mtime_ns == stamp  # re-used
    model = build_model(c)
    assert float(model.flow_head.weight.abs().sum()) == 0.0  # as built: a static camera
    load_flow_fit(model, flow_fit_file(c))
    assert float(model.flow_head.weight.abs().sum()) > 0.0
    # What the fit does not depend on keeps it; the flow's grid does not.
    assert flow_fit_file(cfg(data__seq_len=2, optim__lr=0.1, data__crop_jitter=0.2)) == flow_fit_file(c)
    assert flow_fit_file(cfg(data__flow_grid=2)) != flow_fit_file(c)


def test_no_flow_no_fit(cfg):
    assert ensure_flow_fit(cfg(data__flow_grid=0)) is None


def test_a_fit_for_another_grid_is_refused_in_one_line(cfg):
    path = ensure_flow_fit(cfg(data__flow_grid=2))
    with pytest.raises(FlowFitError) as info:
        load_flow_fit(build_model(cfg()), path)  # flow_grid 4: 2 x 4 x 4 flow values per frame
    assert str(info.value) == (f"the flow-head fit {path} has weight (9, 8), bias (9,); expected weight (9, 32) for "
                               f"this model's data.flow_grid=4; delete {path} and it is fitted again")
    assert isinstance(info.value, ValueError)  # what callers caught before


def test_an_unreadable_fit_is_refused_in_one_line(cfg, tmp_path):
    path = tmp_path / "flow.pt"
    path.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(FlowFitError, match=f"the flow-head fit {path} cannot be read \\(.*\\); expected weight "
                                           "\\(9, 32\\)") as info:
        load_flow_fit(build_model(cfg()), path)
    assert "\n" not in str(info.value)


def _torch_save_on_a_full_disk(obj, target, *args, **kwargs):
    """torch.save on a full disk: given a file, the OSError (ENOSPC) comes through; given a path, its zip
    writer reports a bare RuntimeError."""
    if isinstance(target, (str, os.PathLike)):
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file data/0")
    target.write(b"PK\x03\x04")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_caching_the_fit_is_one_line_and_leaves_no_file(cfg, monkeypatch):
    c = cfg()
    monkeypatch.setattr(torch, "save", _torch_save_on_a_full_disk)
    with pytest.raises(DiskFullError, match=f"no space left to write {flow_fit_file(c)}") as info:
        ensure_flow_fit(c)
    assert "\n" not in str(info.value)
    assert [p.name for p in flow_fit_file(c).parent.iterdir()] == [flow_fit_file(c).name + ".lock"]
