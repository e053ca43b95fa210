"""Tests for hawor_tune.losses: each term against a value worked out by hand on a tiny constructed case."""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np
import pytest
import torch

from hawor_tune import losses
from hawor_tune.config import LossConfig
from hawor_tune.model import HaWoROutput

S = 64  # whole-frame size of the constructed cases
C = 32  # hand crop size
FX = FY = 50.0
CX, CY = 31.0, 33.0
TERMS = [f.name for f in dataclasses.fields(LossConfig)]


def _rotz(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _crop_K(K: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Intrinsics of a random C-pixel crop of the frame: crop pixels = a * frame pixels + (tx, ty)."""
    a = rng.uniform(0.5, 2.0)
    tx, ty = rng.uniform(-40.0, 10.0, 2)
    return np.array([[a, 0.0, tx], [0.0, a, ty], [0.0, 0.0, 1.0]]) @ K


def _project(points: np.ndarray, K: np.ndarray, dist8: np.ndarray) -> np.ndarray:
    """(N, 3) camera-frame points -> (N, 2) pixels, with OpenCV."""
    return cv2.projectPoints(points.reshape(-1, 3), np.zeros(3), np.zeros(3), K, dist8)[0].reshape(-1, 2)


def _case(B: int = 2, T: int = 3, seed: int = 0, dist: bool = False) -> tuple[HaWoROutput, dict]:
    """A batch and a prediction that equals it exactly (every loss 0), built with numpy and cv2.

    Every hand-frame has its own crop intrinsics; its 2D keypoints are the cv2 projection with them.
    Ground-truth cameras rotate about z only (so that a z offset of a wrist keeps its L1 norm after the
    mapping to camera 0); the predicted relative poses are worked out here from the definition
    R_rel = R_0 R_t^T, t_rel = t_0 - R_rel t_t.
    """
    rng = np.random.default_rng(seed)
    joints3d = rng.uniform(-0.1, 0.1, (B, T, 2, 21, 3))
    joints3d[..., 2] += 0.45  # in front of the camera
    K = np.array([[FX, 0.0, CX], [0.0, FY, CY], [0.0, 0.0, 1.0]])
    dist8 = np.array([0.05, -0.01, 0.001, -0.002, 0.002, 0.01, 0.0, 0.001]) if dist else np.zeros(8)
    crop_K = np.stack([_crop_K(K, rng) for _ in range(B * T * 2)]).reshape(B, T, 2, 3, 3)
    crop_joints2d = np.stack([_project(joints3d[b, t, h], crop_K[b, t, h], dist8)
                              for b in range(B) for t in range(T) for h in range(2)]).reshape(B, T, 2, 21, 2)
    rotmats = np.stack([cv2.Rodrigues(rng.uniform(-1, 1, 3))[0] for _ in range(B * T * 2 * 16)])
    rotmats = rotmats.reshape(B, T, 2, 16, 3, 3)
    betas = rng.normal(0, 1, (B, T, 2, 10))
    cam_R = np.stack([_rotz(a) for a in rng.uniform(-1, 1, B * T)]).reshape(B, T, 3, 3)
    cam_t = rng.uniform(-0.5, 0.5, (B, T, 3))
    rel_R = np.zeros_like(cam_R)
    rel_t = np.zeros_like(cam_t)
    for b in range(B):
        for t in range(T):
            rel_R[b, t] = cam_R[b, 0] @ cam_R[b, t].T
            rel_t[b, t] = cam_t[b, 0] - rel_R[b, t] @ cam_t[b, t]

    def f32(x: np.ndarray) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.float32)

    batch = {
        "images": torch.zeros(B, T, 3, S, S, dtype=torch.uint8),
        "crops": torch.zeros(B, T, 2, 3, C, C, dtype=torch.uint8),
        "crop_K": f32(crop_K),
        "dist": f32(np.broadcast_to(dist8, (B, 8)).copy()),
        "joints3d": f32(joints3d),
        "crop_joints2d": f32(crop_joints2d),
        "joints_visible": torch.ones(B, T, 2, 21, dtype=torch.bool),
        "rotmats": f32(rotmats),
        "betas": f32(betas),
        "hand_valid": torch.ones(B, T, 2, dtype=torch.bool),
        "cam_R": f32(cam_R),
        "cam_t": f32(cam_t),
    }
    out = HaWoROutput(
        rot6d=torch.cat([f32(rotmats[..., :, 0]), f32(rotmats[..., :, 1])], dim=-1),
        rotmats=f32(rotmats), betas=f32(betas), root=f32(joints3d[..., 0, :]), joints=f32(joints3d),
        vertices=torch.zeros(B, T, 2, 5, 3), cam_R=f32(rel_R), cam_t=f32(rel_t),
        observed=torch.ones(B, T, 2, dtype=torch.bool))
    return out, batch


def _invalidate(batch: dict, frames: list[tuple[int, int, int]]) -> None:
    """Mark (b, t, hand) invalid and fill its ground truth with NaN: it must affect neither value nor grad."""
    for b, t, h in frames:
        batch["hand_valid"][b, t, h] = False
        for key in ("joints3d", "crop_joints2d", "rotmats", "betas"):
            batch[key][b, t, h] = float("nan")


def _grad_is_finite(value: torch.Tensor, leaf: torch.Tensor) -> bool:
    (grad,) = torch.autograd.grad(value, leaf)
    return bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("dist", [False, True])
def test_every_term_is_zero_when_prediction_equals_ground_truth(T: int, dist: bool) -> None:
    out, batch = _case(T=T, dist=dist)
    total, terms = losses.compute_losses(out, batch, LossConfig())
    assert set(terms) == set(TERMS)
    for name, value in terms.items():
        assert value == pytest.approx(0.0, abs=1e-5), name
    assert float(total) == pytest.approx(0.0, abs=1e-5)


def _keypoint_2d(joints: torch.Tensor, batch: dict, *, with_dist: bool = True) -> torch.Tensor:
    """keypoint_2d_loss of ``joints`` against the batch's crop keypoints."""
    return losses.keypoint_2d_loss(joints, batch["crop_joints2d"], batch["crop_K"],
                                   batch["dist"] if with_dist else None, C, batch["joints_visible"],
                                   batch["hand_valid"])


def test_keypoint_2d_uses_the_distortion() -> None:
    # Ground truth projected with distortion; dropping it from the loss must leave an error.
    out, batch = _case(dist=True)
    assert float(_keypoint_2d(out.joints, batch)) == pytest.approx(0.0, abs=1e-5)
    assert float(_keypoint_2d(out.joints, batch, with_dist=False)) > 1e-3


def test_keypoint_2d_uses_each_hand_frames_crop() -> None:
    # The same ground truth against the intrinsics of another hand-frame's crop must leave an error.
    out, batch = _case()
    batch["crop_K"] = batch["crop_K"].flip(2)  # left and right crops swapped
    assert float(_keypoint_2d(out.joints, batch)) > 1e-2


def test_mano_params_known_offset_and_mask() -> None:
    out, batch = _case()
    _invalidate(batch, [(0, 1, 0), (1, 2, 1)])
    rotmats = (out.rotmats + 0.1).requires_grad_()  # 144 entries off by 0.1 -> sum 1.44
    betas = out.betas + 0.2  # 10 entries off by 0.2 -> sum 0.4
    value = losses.mano_params_loss(rotmats, batch["rotmats"], batch["hand_valid"])
    assert value.item() == pytest.approx(144 * 0.01, rel=1e-4)
    assert _grad_is_finite(value, rotmats)
    betas_value = losses.betas_loss(betas, batch["betas"], batch["hand_valid"])
    assert betas_value.item() == pytest.approx(10 * 0.04, rel=1e-4)


@pytest.mark.parametrize("offset, expected", [
    ("fingers", 20 * 3 * 0.01),  # 20 non-wrist joints x 3 coords x 1 cm
    ("whole_hand", 0.0),  # a translation of the whole hand is no root-relative error
])
def test_keypoint_3d_known_offset_and_mask(offset: str, expected: float) -> None:
    out, batch = _case()
    _invalidate(batch, [(0, 0, 1), (1, 1, 0)])
    shift = torch.full((21, 3), 0.01)
    if offset == "fingers":
        shift[0] = 0.0
    joints = (out.joints + shift).requires_grad_()
    value = losses.keypoint_3d_loss(joints, batch["joints3d"], batch["hand_valid"])
    assert value.item() == pytest.approx(expected, abs=1e-5)
    assert _grad_is_finite(value, joints)


def _shifted_2px(out: HaWoROutput, batch: dict) -> torch.Tensor:
    """The predicted joints moved by dx = 2 z / fx, fx of each hand-frame's crop: without distortion the
    pinhole projection in that crop moves by exactly 2 px in u."""
    joints = out.joints.clone()
    fx = batch["crop_K"][..., 0, 0]  # (B, T, 2)
    joints[..., 0] += 2.0 * joints[..., 2] / fx[..., None]
    return joints.requires_grad_()


def test_keypoint_2d_known_pixel_offset_and_mask() -> None:
    out, batch = _case()
    _invalidate(batch, [(0, 2, 0)])
    joints = _shifted_2px(out, batch)
    value = _keypoint_2d(joints, batch)
    assert value.item() == pytest.approx(21 * 2.0 / C, rel=1e-4)  # 21 joints x 2 px, in crop sides
    assert _grad_is_finite(value, joints)


def test_keypoint_2d_invisible_joint_contributes_nothing() -> None:
    out, batch = _case()
    hidden = [(0, 1, 0, 4), (1, 2, 1, 0), (1, 2, 1, 20)]  # (b, t, hand, joint)
    for b, t, h, j in hidden:
        batch["joints_visible"][b, t, h, j] = False
        batch["crop_joints2d"][b, t, h, j] = float("nan")  # out of view: its label means nothing
    joints = _shifted_2px(out, batch)
    with torch.no_grad():
        for b, t, h, j in hidden:
            joints[b, t, h, j] += torch.tensor([3.0, -2.0, 0.5])  # garbage where the joint is not seen
    value = _keypoint_2d(joints, batch)
    # Every visible joint is off by 2 px; the mean is still over all 2 x 3 x 2 = 12 hand-frames.
    assert value.item() == pytest.approx((12 * 21 - len(hidden)) * 2.0 / C / 12, rel=1e-4)
    (grad,) = torch.autograd.grad(value, joints)
    assert torch.isfinite(grad).all()
    for b, t, h, j in hidden:
        assert float(grad[b, t, h, j].abs().sum()) == 0.0
    assert float(grad[0, 1, 0, 5].abs().sum()) > 0.0


def test_keypoint_2d_is_finite_for_points_behind_the_camera() -> None:
    out, batch = _case()
    joints = out.joints.clone()
    joints[..., 2] = torch.linspace(-0.5, 0.0, 21)  # behind the camera and on its plane
    joints.requires_grad_()
    value = _keypoint_2d(joints, batch)
    assert torch.isfinite(value)
    assert _grad_is_finite(value, joints)


def test_temporal_known_velocity_and_mask() -> None:
    B, T = 2, 5
    out, batch = _case(B=B, T=T)
    gt = batch["joints3d"][:, :1].expand(B, T, 2, 21, 3).clone()  # a static hand
    batch["joints3d"] = gt
    pred = gt.clone()
    pred[..., 1:, 0] += 0.01 * torch.arange(T).view(1, T, 1, 1)  # fingers move 1 cm per frame along x
    pred[1, 2, 0] += 5.0  # garbage in an invalid frame: both pairs touching it are left out
    _invalidate(batch, [(1, 2, 0)])
    pred.requires_grad_()
    value = losses.temporal_loss(pred, batch["joints3d"], batch["hand_valid"])
    assert value.item() == pytest.approx(20 * 0.01, rel=1e-4)  # 20 joints x 1 cm per valid pair
    assert _grad_is_finite(value, pred)


def test_temporal_is_zero_for_single_frame_clips() -> None:
    out, batch = _case(T=1)
    joints = (out.joints + 1.0).requires_grad_()
    value = losses.temporal_loss(joints, batch["joints3d"], batch["hand_valid"])
    assert value.item() == 0.0
    value.backward()  # still part of the graph


def test_camera_known_rotation_and_translation() -> None:
    B, T, theta = 1, 3, 0.3
    out, batch = _case(B=B, T=T)
    # World-to-camera: R_0 = I, t_0 = 0; R_t = Rz(-theta), t_t = (-0.1 t, 0, 0) for t >= 1, so
    # R_rel = Rz(theta) and t_rel = -Rz(theta) t_t = 0.1 t (cos theta, sin theta, 0).
    cam_R = torch.tensor(np.stack([np.eye(3)] + [_rotz(-theta)] * (T - 1)), dtype=torch.float32)
    cam_t = torch.tensor([[-0.1 * t, 0.0, 0.0] for t in range(T)])
    batch["cam_R"], batch["cam_t"] = cam_R[None], cam_t[None]
    batch["hand_valid"][:] = False  # camera loss is not masked by hand visibility
    pred_R = torch.eye(3).expand(B, T, 3, 3)
    pred_t = torch.zeros(B, T, 3)
    # Rz(theta) - I has entries cos theta - 1 (twice) and -+sin theta: L1 2 (1 - cos theta) + 2 sin theta.
    rot = 2 * (1 - math.cos(theta)) + 2 * math.sin(theta)
    expected = np.mean([rot + 0.1 * t * (math.cos(theta) + math.sin(theta)) for t in range(1, T)])
    value = losses.camera_loss(pred_R, pred_t, batch["cam_R"], batch["cam_t"])
    assert value.item() == pytest.approx(expected, rel=1e-4)
    _, terms = losses.compute_losses(out, batch, LossConfig())
    assert terms["camera"] > 0.0


def test_motion_known_velocity_acceleration_and_mask() -> None:
    B, T = 2, 5
    out, batch = _case(B=B, T=T)
    batch["cam_R"] = torch.eye(3).expand(B, T, 3, 3).clone()  # a still camera: world = camera frame
    batch["cam_t"] = torch.zeros(B, T, 3)
    batch["hand_valid"][:] = True
    gt = batch["joints3d"]
    t = torch.arange(T, dtype=torch.float32)
    root = gt[..., 0, :].clone()
    root[..., 0] += (0.01 * t ** 2).view(1, T, 1)  # x off by 1 cm x t^2: velocity error 1, 3, 5, 7 cm; accel 2 cm
    root[1, 2, 0] += 5.0  # garbage in an invalid frame: every pair and triple touching it is left out
    _invalidate(batch, [(1, 2, 0)])
    root.requires_grad_()
    eye, zero = torch.eye(3).expand(B, T, 3, 3), torch.zeros(B, T, 3)
    value = losses.motion_loss(root, eye, zero, gt, batch["cam_R"], batch["cam_t"], batch["hand_valid"])
    # Velocity pairs: clip 0 both hands and clip 1's right hand have all 4 pairs (1+3+5+7 cm); clip 1's left
    # hand keeps pairs (0,1) and (3,4): 1 and 7 cm. Triples: 3 with 2 cm each, and clip 1's left hand none.
    vel = (3 * (0.01 + 0.03 + 0.05 + 0.07) + 0.01 + 0.07) / (3 * 4 + 2)
    acc = 0.02
    # Camera frame and world (the same here), and a perfect camera path.
    assert value.item() == pytest.approx(2 * (vel + acc), rel=1e-4)
    assert _grad_is_finite(value, root)


def test_motion_sees_a_shaking_camera() -> None:
    B, T = 1, 4
    out, batch = _case(B=B, T=T)
    batch["cam_R"] = torch.eye(3).expand(B, T, 3, 3).clone()
    batch["cam_t"] = torch.zeros(B, T, 3)
    batch["hand_valid"][:] = False  # the camera's path counts on every frame
    pred_t = torch.zeros(B, T, 3)
    pred_t[0, :, 1] = torch.tensor([0.0, 0.01, 0.0, 0.01])  # a 1 cm zig-zag on a still camera
    value = losses.motion_loss(out.root, torch.eye(3).expand(B, T, 3, 3), pred_t, batch["joints3d"],
                               batch["cam_R"], batch["cam_t"], batch["hand_valid"])
    assert value.item() == pytest.approx(0.01 + 0.02 * 2 / 2, rel=1e-4)  # velocity 1 cm; accel 2 cm


def test_hand_world_known_offset_and_mask() -> None:
    out, batch = _case()
    _invalidate(batch, [(0, 1, 1), (1, 0, 0)])
    # Cameras rotate about z only, so a 1 cm z offset of a wrist stays 1 cm along z in camera 0.
    root = out.root.clone()
    root[..., 2] += 0.01
    root[0, 1, 1] = 100.0  # garbage in an invalid frame
    root.requires_grad_()
    value = losses.hand_world_loss(root, out.cam_R, out.cam_t, batch["joints3d"], batch["cam_R"],
                                   batch["cam_t"], batch["hand_valid"])
    assert value.item() == pytest.approx(0.01, rel=1e-4)
    assert _grad_is_finite(value, root)


def test_hand_world_sees_camera_translation_error() -> None:
    B, T = 2, 3
    out, batch = _case(B=B, T=T)
    cam_t = out.cam_t.clone()
    cam_t[:, 1:, 0] += 0.02  # every frame but the reference
    value = losses.hand_world_loss(out.root, out.cam_R, cam_t, batch["joints3d"], batch["cam_R"],
                                   batch["cam_t"], batch["hand_valid"])
    assert value.item() == pytest.approx(0.02 * (T - 1) / T, rel=1e-4)  # mean over all hand-frames


def test_hand_frame_known_articulation_offset_and_mask() -> None:
    out, batch = _case()
    _invalidate(batch, [(0, 2, 1), (1, 0, 0)])
    # 1 cm along each axis of every hand's own frame (R0 d), on the 20 non-wrist joints: 20 x 3 x 0.01.
    shift = torch.full((21, 3), 0.01)
    shift[0] = 0.0
    joints = (out.joints + shift @ out.rotmats[..., 0, :, :].transpose(-1, -2)).requires_grad_()
    value = losses.hand_frame_loss(joints, out.rotmats, batch["joints3d"], batch["rotmats"], batch["hand_valid"])
    assert value.item() == pytest.approx(20 * 3 * 0.01, rel=1e-4)
    assert _grad_is_finite(value, joints)


def test_hand_frame_ignores_the_global_orientation() -> None:
    """A hand turned about its wrist, joints and global orientation together, keeps its articulation: no
    hand_frame error, where keypoint_3d sees one."""
    out, batch = _case()
    turn = torch.tensor(cv2.Rodrigues(np.array([0.4, -0.7, 0.2]))[0], dtype=torch.float32)
    wrist = out.joints[..., :1, :]
    joints = (out.joints - wrist) @ turn.T + wrist
    rotmats = out.rotmats.clone()
    rotmats[..., 0, :, :] = turn @ out.rotmats[..., 0, :, :]
    assert losses.hand_frame_loss(joints, rotmats, batch["joints3d"], batch["rotmats"],
                                  batch["hand_valid"]).item() == pytest.approx(0.0, abs=1e-5)
    assert losses.keypoint_3d_loss(joints, batch["joints3d"], batch["hand_valid"]).item() > 0.1


def test_empty_mask_gives_zero_hand_terms_with_a_graph() -> None:
    out, batch = _case()
    _invalidate(batch, [(b, t, h) for b in range(2) for t in range(3) for h in range(2)])
    joints = (out.joints + 0.05).requires_grad_()
    out = dataclasses.replace(out, joints=joints, root=joints[..., 0, :])
    total, terms = losses.compute_losses(out, batch, LossConfig())
    for name in ("mano_params", "betas", "keypoint_3d", "keypoint_2d", "temporal", "hand_world"):
        assert terms[name] == 0.0, name
    total.backward()
    assert torch.isfinite(joints.grad).all()
    assert float(joints.grad.abs().sum()) == 0.0


def _perturbed_case() -> tuple[HaWoROutput, dict]:
    """A prediction with a nonzero error in every term."""
    out, batch = _case(T=4)
    joints = out.joints.clone()
    joints[..., 1:, :] += 0.01 * torch.arange(4).view(1, 4, 1, 1, 1)
    out = dataclasses.replace(out, joints=joints, root=out.root + 0.02, rotmats=out.rotmats + 0.1,
                              betas=out.betas + 0.2, cam_t=out.cam_t + torch.tensor([0.0, 0.03, 0.0]))
    return out, batch


def test_total_is_the_weighted_sum_of_the_terms() -> None:
    out, batch = _perturbed_case()
    weights = LossConfig(mano_params=0.3, betas=0.4, keypoint_3d=2.0, hand_frame=0.8, keypoint_2d=0.7, temporal=1.5,
                         camera=0.2, hand_world=3.0)
    total, terms = losses.compute_losses(out, batch, weights)
    assert all(terms[name] > 0 for name in TERMS)
    expected = sum(getattr(weights, name) * terms[name] for name in TERMS)
    assert float(total) == pytest.approx(expected, rel=1e-5)


_FUNCTIONS = {"mano_params": "mano_params_loss", "betas": "betas_loss", "keypoint_3d": "keypoint_3d_loss",
              "hand_frame": "hand_frame_loss",
              "keypoint_2d": "keypoint_2d_loss", "temporal": "temporal_loss", "camera": "camera_loss",
              "hand_world": "hand_world_loss", "motion": "motion_loss"}


@pytest.mark.parametrize("skipped", TERMS)
def test_zero_weight_skips_the_term(skipped: str, monkeypatch: pytest.MonkeyPatch) -> None:
    out, batch = _perturbed_case()

    def must_not_run(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError(f"{skipped} was computed with weight 0")

    monkeypatch.setattr(losses, _FUNCTIONS[skipped], must_not_run)
    weights = LossConfig(**{name: (0.0 if name == skipped else 1.0) for name in TERMS})
    total, terms = losses.compute_losses(out, batch, weights)
    assert terms[skipped] == 0.0
    assert float(total) == pytest.approx(sum(terms[name] for name in TERMS if name != skipped), rel=1e-5)
