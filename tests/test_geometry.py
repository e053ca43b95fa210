"""Tests for hawor_tune.geometry, against cv2 (Rodrigues, projectPoints) and hand-derived values."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from hawor_tune.geometry import (
    axis_angle_to_matrix,
    camera_steps,
    compose_steps,
    matrix_to_axis_angle,
    matrix_to_rot6d,
    project_points,
    relative_camera_pose,
    rot6d_to_matrix,
    similarity_procrustes,
    umeyama,
)

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _random_axes(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    axes = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    return axes / axes.norm(dim=-1, keepdim=True)


def _random_rotations(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, 3) float64 rotations built by cv2.Rodrigues, independent of the code under test."""
    rng = np.random.default_rng(seed)
    mats = [cv2.Rodrigues(rng.uniform(-2.0, 2.0, 3))[0] for _ in range(n)]
    return torch.tensor(np.stack(mats))


def _assert_rotation(R: torch.Tensor, tol: float) -> None:
    eye = torch.eye(3, dtype=R.dtype).expand_as(R)
    torch.testing.assert_close(R.transpose(-1, -2) @ R, eye, atol=tol, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(R.shape[:-2], dtype=R.dtype), atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("angle", [0.0, 1e-7, 1.0, math.pi - 1e-4])
def test_axis_angle_round_trip(angle: float, dtype: torch.dtype) -> None:
    aa = (_random_axes(6) * angle).to(dtype)
    R = axis_angle_to_matrix(aa)
    assert R.dtype == dtype and R.shape == (6, 3, 3)
    _assert_rotation(R, 10 * TOL[dtype])
    back = matrix_to_axis_angle(R)
    assert back.dtype == dtype
    torch.testing.assert_close(back, aa, atol=10 * TOL[dtype], rtol=0)


@pytest.mark.parametrize("angle", [1e-7, 0.3, 2.0, math.pi - 1e-4])
def test_axis_angle_to_matrix_matches_cv2_rodrigues(angle: float) -> None:
    aa = _random_axes(4, seed=1) * angle
    expected = np.stack([cv2.Rodrigues(a.numpy())[0] for a in aa])
    np.testing.assert_allclose(axis_angle_to_matrix(aa).numpy(), expected, atol=1e-12)


def test_matrix_to_axis_angle_matches_cv2_rodrigues() -> None:
    R = _random_rotations(8, seed=2)
    expected = np.stack([cv2.Rodrigues(r)[0][:, 0] for r in R.numpy()])
    np.testing.assert_allclose(matrix_to_axis_angle(R).numpy(), expected, atol=1e-10)


def test_matrix_to_axis_angle_at_exactly_pi_gives_a_valid_axis() -> None:
    # A half turn about x: the sign of the axis is ambiguous, the angle and the line are not.
    R = torch.diag(torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
    aa = matrix_to_axis_angle(R)
    assert aa[0].abs().item() == pytest.approx(math.pi)
    torch.testing.assert_close(axis_angle_to_matrix(aa), R, atol=1e-12, rtol=0)


def test_conversions_batch_over_leading_dims() -> None:
    aa = torch.randn(2, 3, 4, 3, dtype=torch.float64)
    R = axis_angle_to_matrix(aa)
    assert R.shape == (2, 3, 4, 3, 3)
    flat = axis_angle_to_matrix(aa.reshape(-1, 3)).reshape(2, 3, 4, 3, 3)
    torch.testing.assert_close(R, flat, atol=0, rtol=0)
    assert matrix_to_axis_angle(R).shape == (2, 3, 4, 3)
    assert matrix_to_rot6d(R).shape == (2, 3, 4, 6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_axis_angle_to_matrix_gradient_at_zero(dtype: torch.dtype) -> None:
    # At aa = 0, d(R x)/d aa_i = e_i x x, so d sum(R x)/d aa = x x (1, 1, 1) (scalar triple product).
    x = torch.tensor([1.0, 2.0, 3.0], dtype=dtype)
    aa = torch.zeros(3, dtype=dtype, requires_grad=True)
    (axis_angle_to_matrix(aa) @ x).sum().backward()
    expected = torch.linalg.cross(x, torch.ones(3, dtype=dtype), dim=-1)
    torch.testing.assert_close(aa.grad, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matrix_to_axis_angle_gradient_at_identity(dtype: torch.dtype) -> None:
    # Near I, aa = vee(R - R^T) / 2, so d sum(aa) / dR is +-1/2 on the off-diagonal entries.
    R = torch.eye(3, dtype=dtype, requires_grad=True)
    matrix_to_axis_angle(R).sum().backward()
    expected = 0.5 * torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], dtype=dtype)
    torch.testing.assert_close(R.grad, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale", [0.0, 1e-4, 1.0])
def test_conversions_pass_gradcheck(scale: float) -> None:
    aa = (_random_axes(2, seed=3) * scale).requires_grad_()
    assert torch.autograd.gradcheck(axis_angle_to_matrix, (aa,))
    x6 = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(rot6d_to_matrix, (x6,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rot6d_round_trip(dtype: torch.dtype) -> None:
    R = _random_rotations(5, seed=4).to(dtype)
    x6 = matrix_to_rot6d(R)
    torch.testing.assert_close(x6, torch.cat([R[..., :, 0], R[..., :, 1]], dim=-1), atol=0, rtol=0)
    torch.testing.assert_close(rot6d_to_matrix(x6), R, atol=10 * TOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rot6d_to_matrix_of_random_input_is_a_rotation(dtype: torch.dtype) -> None:
    x6 = torch.randn(4, 7, 6, generator=torch.Generator().manual_seed(5), dtype=dtype)
    R = rot6d_to_matrix(x6)
    assert R.shape == (4, 7, 3, 3) and R.dtype == dtype
    _assert_rotation(R, 10 * TOL[dtype])
    # Gram-Schmidt keeps the direction of the first column and the plane of the first two.
    a1 = x6[..., :3] / x6[..., :3].norm(dim=-1, keepdim=True)
    torch.testing.assert_close(R[..., :, 0], a1, atol=10 * TOL[dtype], rtol=0)
    torch.testing.assert_close((R[..., :, 2] * x6[..., 3:]).sum(-1), torch.zeros(4, 7, dtype=dtype),
                               atol=100 * TOL[dtype], rtol=0)


def _camera_points(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pts = rng.uniform(-0.3, 0.3, (n, 3))
    pts[:, 2] += 0.8  # in front of the camera
    return pts


K_NP = np.array([[520.0, 0.0, 131.0], [0.0, 505.0, 118.0], [0.0, 0.0, 1.0]])
DIST_NP = np.array([0.12, -0.07, 0.003, -0.002, 0.02, 0.04, -0.015, 0.005])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_dist", [False, True])
def test_project_points_matches_cv2(dtype: torch.dtype, with_dist: bool) -> None:
    pts = _camera_points(30, seed=6)
    dist = DIST_NP if with_dist else np.zeros(8)
    expected, _ = cv2.projectPoints(pts, np.zeros(3), np.zeros(3), K_NP, dist)
    out = project_points(torch.tensor(pts, dtype=dtype), torch.tensor(K_NP, dtype=dtype),
                         torch.tensor(DIST_NP, dtype=dtype) if with_dist else None)
    assert out.shape == (30, 2) and out.dtype == dtype
    np.testing.assert_allclose(out.numpy(), expected[:, 0], atol=1e-4 if dtype == torch.float32 else 1e-9)


def test_project_points_broadcasts_per_batch_intrinsics() -> None:
    pts = np.stack([_camera_points(5, seed=7), _camera_points(5, seed=8)])  # (2, 5, 3)
    Ks = np.stack([K_NP, K_NP * np.array([[2.0], [0.5], [1.0]])])  # (2, 3, 3)
    dists = np.stack([DIST_NP, -DIST_NP])  # (2, 8)
    out = project_points(torch.tensor(pts), torch.tensor(Ks), torch.tensor(dists))
    for b in range(2):
        expected, _ = cv2.projectPoints(pts[b], np.zeros(3), np.zeros(3), Ks[b], dists[b])
        np.testing.assert_allclose(out[b].numpy(), expected[:, 0], atol=1e-9)


def test_relative_camera_pose_maps_each_camera_into_the_first() -> None:
    T = 5
    cam_R = _random_rotations(T, seed=9)  # (T, 3, 3) world-to-camera
    cam_t = torch.randn(T, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    X = torch.randn(7, 3, generator=torch.Generator().manual_seed(10), dtype=torch.float64)  # world points
    x_cam = X @ cam_R.transpose(-1, -2) + cam_t[:, None, :]  # (T, 7, 3)
    R_rel, t_rel = relative_camera_pose(cam_R[None], cam_t[None])  # leading batch dim of 1
    assert R_rel.shape == (1, T, 3, 3) and t_rel.shape == (1, T, 3)
    torch.testing.assert_close(R_rel[0, 0], torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(t_rel[0, 0], torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
    in_first = x_cam @ R_rel[0].transpose(-1, -2) + t_rel[0][:, None, :]  # (T, 7, 3)
    torch.testing.assert_close(in_first, x_cam[:1].expand(T, 7, 3), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_similarity_procrustes_undoes_scale_rotation_shift(dtype: torch.dtype) -> None:
    X = torch.randn(3, 21, 3, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    R = _random_rotations(3, seed=12)
    s = torch.tensor([0.5, 1.0, 2.5], dtype=torch.float64)
    t = torch.tensor([[0.1, -0.2, 0.3], [1.0, 2.0, 3.0], [-5.0, 0.0, 0.5]], dtype=torch.float64)
    Y = s[:, None, None] * X @ R.transpose(-1, -2) + t[:, None, :]
    X, Y = X.to(dtype), Y.to(dtype)
    aligned = similarity_procrustes(X, Y)
    assert aligned.dtype == dtype
    torch.testing.assert_close(aligned, Y, atol=1e3 * TOL[dtype], rtol=0)
    s_fit, R_fit, t_fit = umeyama(X, Y)
    torch.testing.assert_close(s_fit, s.to(dtype), atol=1e3 * TOL[dtype], rtol=0)
    torch.testing.assert_close(R_fit, R.to(dtype), atol=1e3 * TOL[dtype], rtol=0)
    torch.testing.assert_close(t_fit, t.to(dtype), atol=1e3 * TOL[dtype], rtol=0)


def test_umeyama_without_scale_is_rigid() -> None:
    X = torch.randn(10, 3, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    R = _random_rotations(1, seed=14)[0]
    Y = 3.0 * X @ R.T
    s, R_fit, _ = umeyama(X, Y, with_scale=False)
    assert s.item() == 1.0
    torch.testing.assert_close(R_fit, R, atol=1e-10, rtol=0)


def test_umeyama_does_not_align_a_mirror_image_by_reflection() -> None:
    X = torch.randn(12, 3, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    Y = X * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)  # mirrored in the x = 0 plane
    _, R_fit, _ = umeyama(X, Y)
    assert torch.linalg.det(R_fit).item() == pytest.approx(1.0, abs=1e-12)
    # A reflection would give zero residual; the best proper rotation cannot.
    residual = (similarity_procrustes(X, Y) - Y).norm(dim=-1).mean().item()
    assert residual > 0.1


def test_camera_steps_map_each_camera_into_the_previous_one() -> None:
    T = 5
    cam_R = _random_rotations(T, seed=11)
    cam_t = torch.randn(T, 3, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    X = torch.randn(7, 3, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    x_cam = X @ cam_R.transpose(-1, -2) + cam_t[:, None, :]  # (T, 7, 3)
    R_step, t_step = camera_steps(cam_R, cam_t)
    assert R_step.shape == (T - 1, 3, 3) and t_step.shape == (T - 1, 3)
    in_previous = x_cam[1:] @ R_step.transpose(-1, -2) + t_step[:, None, :]
    torch.testing.assert_close(in_previous, x_cam[:-1], atol=1e-12, rtol=0)


def test_a_camera_sliding_right_steps_one_centimetre_a_frame() -> None:
    # No turn, the centre 1 cm further along x each frame (world-to-camera: X_t = X - c_t).
    centres = torch.tensor([[0.01 * t, 0.0, 0.0] for t in range(4)], dtype=torch.float64)
    R_step, t_step = camera_steps(torch.eye(3, dtype=torch.float64).expand(4, 3, 3), -centres)
    torch.testing.assert_close(R_step, torch.eye(3, dtype=torch.float64).expand(3, 3, 3), atol=1e-15, rtol=0)
    torch.testing.assert_close(t_step, torch.tensor([[0.01, 0.0, 0.0]] * 3, dtype=torch.float64), atol=1e-15, rtol=0)
    R, t = compose_steps(R_step, t_step)
    torch.testing.assert_close(t, centres[1:], atol=1e-15, rtol=0)


def test_composed_steps_are_the_poses_in_the_first_camera() -> None:
    cam_R = _random_rotations(6, seed=13)[None].expand(2, 6, 3, 3)  # a leading batch dim
    cam_t = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    R, t = compose_steps(*camera_steps(cam_R, cam_t))
    R_rel, t_rel = relative_camera_pose(cam_R, cam_t)
    torch.testing.assert_close(R, R_rel[:, 1:], atol=1e-12, rtol=0)
    torch.testing.assert_close(t, t_rel[:, 1:], atol=1e-12, rtol=0)


@pytest.mark.parametrize(("fn", "args", "name"), [
    (axis_angle_to_matrix, (torch.zeros(4, 4),), "aa"),
    (matrix_to_axis_angle, (torch.zeros(3, 4),), "R"),
    (rot6d_to_matrix, (torch.zeros(2, 5),), "x"),
    (project_points, (torch.ones(4, 2), torch.eye(3)), "points"),
    (project_points, (torch.ones(4, 3), torch.eye(3), torch.zeros(5)), "dist"),
    (relative_camera_pose, (torch.eye(3).expand(4, 3, 3), torch.zeros(3, 3)), "cam_R"),
    (camera_steps, (torch.eye(3).expand(1, 3, 3), torch.zeros(1, 3)), "T >= 2"),
    (compose_steps, (torch.eye(3).expand(2, 3, 3), torch.zeros(2, 4)), "t_step"),
    (umeyama, (torch.zeros(5, 3), torch.zeros(4, 3)), "src"),
])
def test_bad_shapes_raise_naming_the_argument(fn, args, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        fn(*args)
