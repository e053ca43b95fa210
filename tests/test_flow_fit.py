"""Tests for hawor_tune.flow_fit: the camera's flow head, fitted once and cached."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL_OVERRIDES, run_concurrently

from hawor_tune.atomic import DiskFullError
from hawor_tune.flow_fit import FlowFitError, ensure_flow_fit, fit_flow_head, flow_fit_file, load_flow_fit
from hawor_tune.geometry import rot6d_to_matrix
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


def _room_flow(R: np.ndarray, centre: np.ndarray, G: int) -> np.ndarray:
    """(2, G, G) flow (1/100 focal lengths) of a G x G grid of points seen from camera 0, as camera t (rotation
    R and centre in camera 0: X_0 = R X_t + centre) sees them moved: a room whose depth grows from the bottom
    row (a table, 0.5 m) to the top (a wall, 1.5 m), the same on the left and the right."""
    c = (np.arange(G) + 0.5) / G - 0.5  # normalised image coordinates of the cells' centres
    y, x = np.meshgrid(c, c, indexing="ij")  # rows top to bottom, columns left to right
    depth = np.linspace(1.5, 0.5, G)[:, None].repeat(G, axis=1)
    points = np.stack([x * depth, y * depth, depth], axis=-1)  # (G, G, 3) in camera 0
    seen = (points - centre) @ R  # R^T (X_0 - centre), row vectors
    return np.stack([seen[..., 0] / seen[..., 2] - x, seen[..., 1] / seen[..., 2] - y]) * 100


def _room_clip(rng: np.random.Generator, T: int, G: int, rightward: float) -> dict[str, torch.Tensor]:
    """A clip of turns and shifts of a few millimetres per frame; each shift's x is +-|x| with rightward its sign
    (0: either way)."""
    aa = rng.normal(scale=0.005, size=(T, 3)).cumsum(0)  # rotation of camera t into camera 0
    step = rng.normal(scale=0.005, size=(T, 3))
    if rightward:
        step[:, 0] = rightward * np.abs(step[:, 0])
    pos = step.cumsum(0)  # centre of camera t in camera 0 (the world)
    aa[0], pos[0] = 0.0, 0.0
    rotations = [_rot(a) for a in aa]
    cam_R = np.stack([R.T for R in rotations])  # world-to-camera: X_t = R_t (X_0 - c_t)
    return {"cam_R": torch.tensor(cam_R, dtype=torch.float32),
            "cam_t": torch.tensor(-np.einsum("tij,tj->ti", cam_R, pos), dtype=torch.float32),
            "flow": torch.tensor(np.stack([_room_flow(R, c, G) for R, c in zip(rotations, pos)]), dtype=torch.float32),
            "centres": torch.tensor(pos)}


def _centres(head: FlowHead, flow: torch.Tensor) -> np.ndarray:
    """(T, 3) camera centres in camera 0 chained from the head's steps (each frame's rotation offset and centre
    in the previous camera), read from the flow between consecutive frames."""
    with torch.no_grad():
        steps = head((flow[1:] - flow[:-1]).flatten(1)).double()
    R, centre, out = np.eye(3), np.zeros(3), [np.zeros(3)]
    for step in steps:
        R_step = rot6d_to_matrix(step[:6] + torch.tensor([1.0, 0, 0, 0, 1, 0], dtype=torch.float64)).numpy()
        R, centre = R @ R_step, R @ step[6:].numpy() + centre
        out.append(centre)
    return np.stack(out)


def _centre_error(fit: dict, clips: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """Mean error of the fitted head's chained camera centres over the clips' frames but the first, and a static
    camera's."""
    head = FlowHead(fit["state"]["w1"].shape[1], 9)
    head.load_state_dict(fit["state"])
    errors = [np.linalg.norm(_centres(head, c["flow"])[1:] - c["centres"][1:].numpy(), axis=1) for c in clips]
    return float(np.concatenate(errors).mean()), float(torch.cat([c["centres"][1:].norm(dim=1) for c in clips]).mean())


def test_the_fit_reads_translation_back_from_a_rooms_flow():
    # Clips whose flow is what a rigid room (nearer at the bottom, as a table under the hands) shows a moving
    # camera, as a head moves. The fitted head must read each frame's camera centre back far better than a
    # static camera does, on the fitted clips and on clips it never saw.
    rng = np.random.default_rng(0)
    G, T = 4, 6
    clips = [_room_clip(rng, T, G, 0.0) for _ in range(1500)]
    fit = fit_flow_head(clips)
    assert fit["frames"] == 1500 * (T - 1)
    assert fit["static_mm"] == pytest.approx(np.mean([float(c["centres"][1:].norm(dim=1).mean()) for c in clips])
                                             * 1000, rel=1e-4)
    assert fit["fit_mm"] < 0.05 * fit["static_mm"]
    error, static = _centre_error(fit, [_room_clip(rng, T, G, 0.0) for _ in range(20)])
    assert error < 0.05 * static


def test_the_fit_learns_each_clip_in_a_mirror_too():
    # Fitted on a camera that only ever moves right, the head still reads a camera moving left back from its
    # flow: each clip is also fitted seen in a mirror.
    rng = np.random.default_rng(1)
    G, T = 4, 6
    fit = fit_flow_head([_room_clip(rng, T, G, 1.0) for _ in range(1500)])
    error, static = _centre_error(fit, [_room_clip(rng, T, G, -1.0) for _ in range(20)])
    assert error < 0.05 * static  # 0.07 when fitted on the clips alone


def test_fitted_once_then_reused_and_loaded(cfg):
    c = cfg()
    assert not flow_fit_file(c).exists()
    results, errors = run_concurrently(lambda: ensure_flow_fit(c), n=2)
    assert not errors and set(results) == {flow_fit_file(c)}
    stamp = flow_fit_file(c).stat().st_mtime_ns
    assert ensure_flow_fit(c) == flow_fit_file(c) and flow_fit_file(c).stat().st_mtime_ns == stamp  # re-used
    model = build_model(c)
    assert float(model.flow_head.w3.abs().sum()) == 0.0  # as built: a static camera
    load_flow_fit(model, flow_fit_file(c))
    assert float(model.flow_head.w3.abs().sum()) > 0.0
    # What the fit does not depend on keeps it; the flow's grid does not.
    assert flow_fit_file(cfg(data__seq_len=2, optim__lr=0.1, data__crop_jitter=0.2)) == flow_fit_file(c)
    assert flow_fit_file(cfg(data__flow_grid=2)) != flow_fit_file(c)


def test_no_flow_no_fit(cfg):
    assert ensure_flow_fit(cfg(data__flow_grid=0)) is None


def test_a_fit_for_another_grid_is_refused_in_one_line(cfg):
    path = ensure_flow_fit(cfg(data__flow_grid=2))
    with pytest.raises(FlowFitError) as info:
        load_flow_fit(build_model(cfg()), path)  # flow_grid 4: 2 x 4 x 4 flow values per frame
    assert str(info.value) == (f"the flow-head fit {path} has w1 (256, 8); expected w1 (256, 32) for this model's "
                               f"data.flow_grid=4; delete {path} and it is fitted again")
    assert isinstance(info.value, ValueError)  # what callers caught before


def test_an_unreadable_fit_is_refused_in_one_line(cfg, tmp_path):
    path = tmp_path / "flow.pt"
    path.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(FlowFitError, match=f"the flow-head fit {path} cannot be read \\(.*\\); expected w1 "
                                           "\\(256, 32\\)") as info:
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
