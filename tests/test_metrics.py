"""Tests for hawor_tune.metrics against values worked out by hand or by an independent numpy loop."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from hawor_tune import metrics
from hawor_tune.evaluation import Predictions, compute_metrics
from hawor_tune.geometry import axis_angle_to_matrix, relative_camera_pose
from hawor_tune.metrics import (
    accel_error,
    camera_accel_error,
    camera_jerk,
    camera_rotation_error,
    camera_translation_error,
    jerk,
    mpjpe,
    pa_mpjpe,
    per_joint_error,
    w_mpjpe,
    wa_mpjpe,
)

# Each metric must accept numpy arrays and torch tensors of any float dtype (even ones that need grad).
CONVERTERS: dict[str, tuple[Callable[[np.ndarray], object], float]] = {
    "numpy64": (lambda a: np.asarray(a, dtype=np.float64), 1e-9),
    "numpy32": (lambda a: np.asarray(a, dtype=np.float32), 1e-4),
    "torch64": (lambda a: torch.tensor(a, dtype=torch.float64), 1e-9),
    "torch32_grad": (lambda a: torch.tensor(a, dtype=torch.float32, requires_grad=True), 1e-4),
}


@pytest.fixture(params=list(CONVERTERS))
def conv(request: pytest.FixtureRequest) -> tuple[Callable[[np.ndarray], object], float]:
    """(convert numpy -> the input type under test, absolute tolerance for that precision)."""
    return CONVERTERS[request.param]


def _assert_f64(result: np.ndarray, expected: np.ndarray | list[float], atol: float) -> None:
    assert isinstance(result, np.ndarray) and result.dtype == np.float64
    np.testing.assert_allclose(result, np.asarray(expected, dtype=np.float64), atol=atol, rtol=0)


def _joints(n: int, j: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, (n, j, 3))


def _rot_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _rot_x(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


# A 3-4-5 offset: length 5 whatever else is going on.
OFFSET = np.array([3.0, 4.0, 0.0])


@pytest.mark.parametrize("root", [0, None])
def test_mpjpe_of_one_offset_joint(conv, root: int | None) -> None:
    to, atol = conv
    gt = _joints(2, j=4)
    pred = gt.copy()
    pred[:, 2] += OFFSET  # one of 4 joints is 5 away, the root is untouched
    _assert_f64(mpjpe(to(pred), to(gt), root=root), [5.0 / 4, 5.0 / 4], atol)


def test_mpjpe_offset_root_moves_every_other_joint(conv) -> None:
    to, atol = conv
    gt = _joints(2, j=4)
    pred = gt.copy()
    pred[:, 0] += OFFSET  # after root alignment the other 3 joints are each 5 away
    _assert_f64(mpjpe(to(pred), to(gt), root=0), [15.0 / 4, 15.0 / 4], atol)
    _assert_f64(mpjpe(to(pred), to(gt), root=None), [5.0 / 4, 5.0 / 4], atol)


def test_root_alignment_removes_a_global_shift(conv) -> None:
    to, atol = conv
    gt = _joints(3)
    pred = gt + np.array([1.0, 2.0, 2.0])
    _assert_f64(mpjpe(to(pred), to(gt), root=0), [0.0, 0.0, 0.0], atol)
    _assert_f64(mpjpe(to(pred), to(gt), root=None), [3.0, 3.0, 3.0], atol)


def test_per_joint_error_averages_over_samples(conv) -> None:
    to, atol = conv
    gt = _joints(2, j=4)
    pred = gt.copy()
    pred[0, 2] += OFFSET  # joint 2 is off by 5 in one of two samples
    _assert_f64(per_joint_error(to(pred), to(gt)), [0.0, 0.0, 2.5, 0.0], atol)


def test_pa_mpjpe_of_a_similar_copy_is_zero(conv) -> None:
    to, atol = conv
    gt = _joints(3, j=21)
    rots = np.stack([_rot_z(0.4) @ _rot_x(-1.1), _rot_x(2.0), _rot_z(math.pi - 0.01)])
    pred = np.array([0.5, 1.0, 3.0])[:, None, None] * gt @ rots.transpose(0, 2, 1) + np.array([0.2, -1.0, 4.0])
    _assert_f64(pa_mpjpe(to(pred), to(gt)), [0.0, 0.0, 0.0], 10 * atol)
    # A pure doubling about the root is invisible to PA but not to root-aligned MPJPE.
    doubled = 2.0 * (gt - gt[:, :1]) + gt[:, :1]
    expected = np.linalg.norm(gt - gt[:, :1], axis=-1).mean(-1)
    _assert_f64(mpjpe(to(doubled), to(gt)), expected, atol)
    _assert_f64(pa_mpjpe(to(doubled), to(gt)), [0.0, 0.0, 0.0], 10 * atol)


def test_pa_mpjpe_does_not_undo_a_reflection() -> None:
    gt = _joints(1, j=8)
    mirrored = gt * np.array([-1.0, 1.0, 1.0])
    assert pa_mpjpe(mirrored, gt)[0] > 0.05


def test_accel_error_of_quadratic_trajectories(conv) -> None:
    to, atol = conv
    t = np.arange(6, dtype=np.float64)[:, None, None]  # (T, 1, 1)
    base = _joints(1, j=3)[0]  # (J, 3)
    gt = base + 0.1 * t + 0.0 * t**2  # constant velocity: zero acceleration
    pred = base + 0.1 * t + (OFFSET / 10) * t**2  # second difference 2 * (0.3, 0.4, 0) -> norm 1
    _assert_f64(accel_error(to(pred), to(gt)), np.ones(4), atol)
    # Same acceleration with a constant offset and a different velocity: no error.
    _assert_f64(accel_error(to(pred + 5.0 + 0.3 * t), to(pred)), np.zeros(4), 10 * atol)


@pytest.mark.parametrize("angle", [0.0, 1e-6, 0.3, 2.0, math.pi - 1e-3])
def test_camera_rotation_error_about_z_is_the_angle(conv, angle: float) -> None:
    to, atol = conv
    R_pred = np.stack([np.eye(3), _rot_z(0.25)])
    R_gt = np.stack([_rot_z(angle), _rot_z(0.25 + angle)])  # second pair differs by angle about z too
    _assert_f64(camera_rotation_error(to(R_pred), to(R_gt)), [angle, angle], atol)


def test_camera_translation_error_is_euclidean(conv) -> None:
    to, atol = conv
    t_pred = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    t_gt = np.array([[3.0, 4.0, 0.0], [2.0, 3.0, 3.0]])
    _assert_f64(camera_translation_error(to(t_pred), to(t_gt)), [5.0, 3.0], atol)


def _umeyama_np(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Reference similarity fit dst ~ s R src + t, written out from Umeyama (1991) in numpy."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    U, S, Vt = np.linalg.svd(b.T @ a / len(src))
    D = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        D[2, 2] = -1.0
    R = U @ D @ Vt
    s = np.trace(np.diag(S) @ D) / (a**2).sum(1).mean()
    return s, R, mu_d - s * R @ mu_s


def _world_errors_np(pred: np.ndarray, gt: np.ndarray, chunk: int, fit_frames: int | None) -> list[float]:
    errors = []
    for start in range(0, len(pred), chunk):
        p, g = pred[start:start + chunk], gt[start:start + chunk]
        n = len(p) if fit_frames is None else fit_frames
        s, R, t = _umeyama_np(p[:n].reshape(-1, 3), g[:n].reshape(-1, 3))
        aligned = np.einsum("ij,tkj->tki", s * R, p) + t
        errors.append(float(np.mean([np.linalg.norm(aligned[f] - g[f], axis=-1).mean() for f in range(len(p))])))
    return errors


def _drifting_sequence(T: int = 6, drift: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """gt walks along y while turning; pred equals gt up to frame 2, then drifts along x by drift per frame."""
    base = _joints(1, j=5, seed=3)[0]
    gt = np.stack([base @ _rot_z(0.2 * f).T + np.array([0.0, 0.5 * f, 0.0]) for f in range(T)])
    lag = np.clip(np.arange(T) - 2, 0, None).astype(np.float64)  # 0, 0, 0, 1, 2, 3, ...
    pred = gt + drift * lag[:, None, None] * np.array([1.0, 0.0, 0.0])
    return pred, gt


def test_w_mpjpe_sees_drift_that_wa_mpjpe_partly_absorbs(conv) -> None:
    to, atol = conv
    pred, gt = _drifting_sequence(T=6, drift=0.3)
    w = w_mpjpe(to(pred), to(gt), chunk=100)
    wa = wa_mpjpe(to(pred), to(gt), chunk=100)
    # The first two frames match exactly, so W applies the identity: mean drift = 0.3 * (0+0+0+1+2+3)/6.
    _assert_f64(w, [0.3], 10 * atol)
    _assert_f64(wa, _world_errors_np(pred, gt, chunk=100, fit_frames=None), 10 * atol)
    assert 0.0 < wa[0] < w[0]


@pytest.mark.parametrize("chunk", [2, 3, 4, 7])
def test_world_metrics_per_chunk_match_a_numpy_loop(chunk: int) -> None:
    pred, gt = _drifting_sequence(T=7, drift=0.2)
    pred = pred + 0.01 * _joints(7, j=5, seed=4)  # noise so that every chunk's fit is nontrivial
    n_chunks = math.ceil(7 / chunk)
    w, wa = w_mpjpe(pred, gt, chunk=chunk), wa_mpjpe(pred, gt, chunk=chunk)
    assert w.shape == wa.shape == (n_chunks,)
    _assert_f64(w, _world_errors_np(pred, gt, chunk, fit_frames=2), 1e-10)
    _assert_f64(wa, _world_errors_np(pred, gt, chunk, fit_frames=None), 1e-10)


def test_jerk_of_a_cubic_trajectory(conv) -> None:
    to, atol = conv
    fps, a = 30.0, 1e-3
    t = np.arange(7, dtype=np.float64)[:, None, None]  # (T, 1, 1) frame index
    base = _joints(1, j=2)[0]
    # The third difference of a t^3 + b t^2 + c t is 6 a per frame; fps^3 turns it into units per s^3.
    x = base + (OFFSET / 5) * (a * t**3 + 0.02 * t**2 - 0.1 * t)
    _assert_f64(jerk(to(x), fps=fps), np.full(4, 6 * a * fps**3), 1e3 * atol)
    _assert_f64(jerk(to(x), fps=1.0), np.full(4, 6 * a), atol)


def test_camera_accel_error_of_constant_accelerations(conv) -> None:
    to, atol = conv
    t = np.arange(6, dtype=np.float64)[:, None]  # (T, 1) frame index
    start, gt_accel = np.array([0.1, -0.2, 1.0]), np.array([0.0, 0.0, 0.2])
    # The second difference of 0.5 a t^2 + v t + c is a; accelerations differing by (0.3, 0.4, 0) are 0.5 apart.
    gt = start + 0.05 * t + 0.5 * gt_accel * t**2
    pred = start - 0.3 * t + 0.5 * (gt_accel + OFFSET / 10) * t**2
    _assert_f64(camera_accel_error(to(pred), to(gt)), np.full(4, 0.5), 10 * atol)
    _assert_f64(camera_accel_error(to(gt + 0.7 * t), to(gt)), np.zeros(4), 10 * atol)  # velocity only


def test_camera_jerk_of_a_cubic_trajectory(conv) -> None:
    to, atol = conv
    fps, k = 30.0, 1e-3
    t = np.arange(6, dtype=np.float64)[:, None]  # (T, 1) frame index
    c = np.array([0.2, 0.0, 1.0]) + (OFFSET / 5) * (k * t**3 - 0.04 * t**2 + 0.1 * t)  # unit direction
    _assert_f64(camera_jerk(to(c), fps=fps), np.full(3, 6 * k * fps**3), 1e3 * atol)
    _assert_f64(camera_jerk(to(c), fps=1.0), np.full(3, 6 * k), atol)


def _rotating_camera(T: int, accel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World-to-camera poses (T, 3, 3), (T, 3) of a camera turning about z whose centre accelerates uniformly."""
    centre = np.array([0.3, -0.1, 0.5]) + 0.5 * accel * np.arange(T, dtype=np.float64)[:, None] ** 2  # (T, 3)
    R = np.stack([_rot_z(0.4 * f) @ _rot_x(0.1) for f in range(T)])
    return R, -np.einsum("tij,tj->ti", R, centre)  # x_cam = R (x_world - centre)


@pytest.mark.parametrize("T", [2, 3, 5])
def test_compute_metrics_camera_smoothness(T: int) -> None:
    """Camera centres are the relative translations (not -R^T t): a uniformly accelerating centre has constant
    acceleration there even while the camera turns. A static prediction is off by that acceleration; adding
    k t^3 along a unit direction to the truth gives jerk 6 k fps^3 and acceleration error 6 k f at frame f."""
    C, fps, k, accel = 2, 10.0, 2e-3, np.array([0.0, 0.003, 0.004])  # |accel| = 5 mm/frame^2
    R, t = _rotating_camera(T, accel)
    gt_R, gt_t = (x.numpy() for x in relative_camera_pose(torch.from_numpy(R), torch.from_numpy(t)))
    cubic = (OFFSET / 5) * k * np.arange(T, dtype=np.float64)[:, None] ** 3  # (T, 3)

    def predictions(pred_t: np.ndarray) -> Predictions:
        zeros = np.zeros((C, T, 2, 21, 3))
        return Predictions(pred_joints=zeros, gt_joints=zeros, valid=np.zeros((C, T, 2), bool),
                           pred_cam_R=np.broadcast_to(gt_R, (C, T, 3, 3)), pred_cam_t=np.broadcast_to(pred_t, (C, T, 3)),
                           gt_cam_R=np.broadcast_to(gt_R, (C, T, 3, 3)), gt_cam_t=np.broadcast_to(gt_t, (C, T, 3)),
                           world_to_cam_R=np.broadcast_to(R, (C, T, 3, 3)), world_to_cam_t=np.broadcast_to(t, (C, T, 3)),
                           seq_index=np.arange(C), frame_index=np.broadcast_to(np.arange(T), (C, T)))

    static = compute_metrics(predictions(np.zeros((T, 3))), fps=fps)
    cubic_off = compute_metrics(predictions(gt_t + cubic), fps=fps)
    if T < 3:
        assert all(math.isnan(static[name]) for name in ("cam_accel_error", "cam_jerk", "cam_jerk_gt"))
        return
    assert static["cam_accel_error"] == pytest.approx(5.0)
    interior = np.arange(1, T - 1)  # frames with a second difference
    assert cubic_off["cam_accel_error"] == pytest.approx(6 * k * interior.mean() * 1000.0)
    if T < 4:
        assert math.isnan(cubic_off["cam_jerk"]) and math.isnan(cubic_off["cam_jerk_gt"])
        return
    assert cubic_off["cam_jerk"] == pytest.approx(6 * k * fps**3)
    assert cubic_off["cam_jerk_gt"] == pytest.approx(0.0, abs=1e-9) and static["cam_jerk"] == 0.0


@pytest.mark.parametrize(("call", "match"), [
    (lambda: mpjpe(np.zeros((2, 4, 2)), np.zeros((2, 4, 2))), r"pred must have shape \(N, J, 3\)"),
    (lambda: mpjpe(np.zeros((2, 4, 3)), np.zeros((3, 4, 3))), "pred and gt must have the same shape"),
    (lambda: mpjpe(np.zeros((2, 4, 3)), np.zeros((2, 4, 3)), root=4), "root must be None or a joint index"),
    (lambda: pa_mpjpe(np.zeros((2, 2, 3)), np.zeros((2, 2, 3))), "J >= 3"),
    (lambda: accel_error(np.zeros((2, 4, 3)), np.zeros((2, 4, 3))), "T >= 3"),
    (lambda: camera_translation_error(np.zeros((2, 3)), np.zeros((2, 4))), r"t_gt must have shape \(N, 3\)"),
    (lambda: camera_rotation_error(np.zeros((2, 3)), np.zeros((2, 3))), r"R_pred must have shape \(N, 3, 3\)"),
    (lambda: w_mpjpe(np.zeros((5, 4, 3)), np.zeros((5, 4, 3)), chunk=0), "chunk must be a positive int"),
    (lambda: wa_mpjpe(np.zeros((3, 1, 3)), np.zeros((3, 1, 3)), chunk=2), "needs >= 3 points"),
    (lambda: jerk(np.zeros((3, 4, 3))), "T >= 4"),
    (lambda: jerk(np.zeros((5, 4, 3)), fps=0.0), "fps must be a positive number"),
    (lambda: camera_accel_error(np.zeros((2, 3)), np.zeros((2, 3))), "T >= 3"),
    (lambda: camera_accel_error(np.zeros((4, 3)), np.zeros((5, 3))), "c_pred and c_gt must have the same shape"),
    (lambda: camera_jerk(np.zeros((3, 3))), "T >= 4"),
    (lambda: camera_jerk(np.zeros((5, 1, 3))), r"c must have shape \(T, 3\)"),
    (lambda: mpjpe("abc", np.zeros((2, 4, 3))), "pred must be a numeric"),
])
def test_bad_input_raises_a_clear_error(call: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_rte_ignores_a_rigid_motion_and_divides_by_the_path_length():
    t = np.linspace(0.0, 1.0, 11)
    gt = np.stack([t, np.zeros_like(t), np.zeros_like(t)], axis=-1)  # 1 m along x
    R = axis_angle_to_matrix(torch.tensor([0.2, -0.4, 0.3], dtype=torch.float64)).numpy()
    np.testing.assert_allclose(metrics.rte(gt @ R.T + [0.5, -1.0, 2.0], gt), 0.0, atol=1e-9)
    # A bend is not a rigid motion: the path's middle raised 2 cm leaves residuals, in percent of 1 m.
    bent = gt.copy()
    bent[5, 1] = 0.02
    err = metrics.rte(bent, gt)
    assert err.shape == (11,) and err[5] > 1.0 and err.mean() < 2.0
    # Scale is not fitted: a path twice as long is wrong by about half of it.
    assert metrics.rte(gt * 2.0, gt).max() == pytest.approx(50.0, rel=1e-6)


def test_joint_angle_error_is_the_angle_between_rotations_in_degrees():
    Rz = lambda deg: axis_angle_to_matrix(torch.tensor([0.0, 0.0, np.radians(deg)], dtype=torch.float64)).numpy()  # noqa: E731
    pred = np.stack([np.stack([Rz(30.0), Rz(-10.0)])])  # (1, 2, 3, 3)
    gt = np.stack([np.stack([Rz(0.0), Rz(45.0)])])
    np.testing.assert_allclose(metrics.joint_angle_error(pred, gt), [[30.0, 55.0]], atol=1e-9)
