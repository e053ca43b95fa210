"""Training losses of the HaWoR-style model, and the one function that weights them.

Hand terms are masked by ``batch["hand_valid"]`` (B, T, 2) and follow HaMeR's conventions: keypoint
errors are summed over joints and coordinates and averaged over the valid hand-frames; parameter errors
are squared errors summed per hand-frame, averaged the same way. An empty mask gives a zero that is still
connected to the graph, and masked-out samples contribute neither value nor gradient.
"""

from __future__ import annotations

import dataclasses

import torch

from hawor_tune.config import LossConfig
from hawor_tune.geometry import project_points, relative_camera_pose
from hawor_tune.model import HaWoROutput

# Points closer than this (or behind the camera) are projected as if at this depth, so a bad early
# prediction gives a large but finite 2D error instead of inf/NaN.
MIN_PROJECTION_DEPTH = 1e-2


def _mask_out(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (*mask.shape, ...) with the samples where mask (bool) is False set to 0.

    Applied to differences before abs/square: torch.where also zeroes the gradient there, so ground truth
    that is not finite in masked-out samples (e.g. an invisible hand) cannot turn into 0 * inf = NaN.
    """
    mask = mask.view(*mask.shape, *(1,) * (x.dim() - mask.dim()))
    return torch.where(mask, x, torch.zeros_like(x))


def _mean_over(per_sample: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of per_sample (already zero where masked out) over the count of mask; 0 with grad when empty."""
    return per_sample.sum() / mask.sum().clamp(min=1)


def mano_params_loss(pred_rotmats: torch.Tensor, gt_rotmats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared errors of the 16 rotation matrices (global orientation and fingers), summed per hand-frame
    (HaMeR's reduction, ``hamer/models/losses.py`` ``ParameterLoss``), averaged over valid hand-frames.

    Args:
        pred_rotmats, gt_rotmats: (B, T, 2, 16, 3, 3).
        mask: (B, T, 2) bool.

    Returns:
        Scalar.
    """
    return _mean_over(_mask_out(pred_rotmats - gt_rotmats, mask).square().sum(dim=(-3, -2, -1)), mask)


def betas_loss(pred_betas: torch.Tensor, gt_betas: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared errors of the 10 shape coefficients, summed per hand-frame, averaged over valid hand-frames
    (HaMeR's ``ParameterLoss`` on betas, which has its own weight, 0.0005 against the pose's 0.001).

    Args:
        pred_betas, gt_betas: (B, T, 2, 10).
        mask: (B, T, 2) bool.

    Returns:
        Scalar.
    """
    return _mean_over(_mask_out(pred_betas - gt_betas, mask).square().sum(dim=-1), mask)


def keypoint_3d_loss(pred_joints: torch.Tensor, gt_joints: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 of wrist-relative 3D joints (metres), summed over joints and xyz, averaged over valid hand-frames.

    Args:
        pred_joints, gt_joints: (B, T, 2, 21, 3) camera frame.
        mask: (B, T, 2) bool.

    Returns:
        Scalar.
    """
    pred = pred_joints - pred_joints[..., :1, :]  # (B, T, 2, 21, 3)
    gt = gt_joints - gt_joints[..., :1, :]
    return _mean_over(_mask_out(pred - gt, mask).abs().sum(dim=(-2, -1)), mask)


def hand_frame_loss(pred_joints: torch.Tensor, pred_rotmats: torch.Tensor, gt_joints: torch.Tensor,
                    gt_rotmats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 of the wrist-relative 3D joints in each hand's own frame (each hand's joints rotated by the inverse
    of its own global orientation), summed over joints and xyz, averaged over valid hand-frames.

    What is left is the articulation (fingers and shape): an error of the global orientation, which
    ``keypoint_3d`` multiplies by every joint's distance from the wrist, does not enter, so it cannot swamp
    the fingers' gradients.

    Args:
        pred_joints, gt_joints: (B, T, 2, 21, 3) camera frame.
        pred_rotmats, gt_rotmats: (B, T, 2, 16, 3, 3); index 0 is the global orientation in the same frame.
        mask: (B, T, 2) bool.

    Returns:
        Scalar.
    """
    # Row vectors: x R is R^T x, the inverse rotation.
    pred = (pred_joints - pred_joints[..., :1, :]) @ pred_rotmats[..., 0, :, :]  # (B, T, 2, 21, 3)
    gt = (gt_joints - gt_joints[..., :1, :]) @ gt_rotmats[..., 0, :, :]
    return _mean_over(_mask_out(pred - gt, mask).abs().sum(dim=(-2, -1)), mask)


def keypoint_2d_loss(pred_joints: torch.Tensor, gt_joints2d: torch.Tensor, crop_K: torch.Tensor,
                     dist: torch.Tensor | None, crop_size: int, visible: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """L1 of projected joints in each hand's crop, in units of the crop side, weighted per joint.

    Predicted camera-frame joints are projected with the crop's intrinsics and the lens distortion (depth
    clamped to MIN_PROJECTION_DEPTH). Only joints in view count (HaMeR's ``Keypoint2DLoss`` weights joints
    by their confidence): a joint far outside the image has a distorted projection that can fold back into
    it. Summed over joints and uv, averaged over valid hand-frames.

    Args:
        pred_joints: (B, T, 2, 21, 3) camera frame, metres.
        gt_joints2d: (B, T, 2, 21, 2) crop pixels (unmirrored crop).
        crop_K: (B, T, 2, 3, 3) intrinsics of each unmirrored crop.
        dist: (B, 8) OpenCV rational distortion, or None.
        crop_size: C.
        visible: (B, T, 2, 21) bool, joints in view.
        mask: (B, T, 2) bool.

    Returns:
        Scalar.
    """
    depth = pred_joints[..., 2:].clamp(min=MIN_PROJECTION_DEPTH)  # (B, T, 2, 21, 1)
    points = torch.cat([pred_joints[..., :2], depth], dim=-1)
    dist = dist[:, None, None] if dist is not None else None  # (B, 1, 1, 8)
    uv = project_points(points, crop_K, dist)  # (B, T, 2, 21, 2)
    err = _mask_out((uv - gt_joints2d) / crop_size, mask)  # (B, T, 2, 21, 2)
    err = torch.where(visible[..., None], err, torch.zeros_like(err))
    return _mean_over(err.abs().sum(dim=(-2, -1)), mask)


def temporal_loss(pred_joints: torch.Tensor, gt_joints: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 of frame-to-frame velocities of wrist-relative joints, on pairs of consecutive valid frames.

    Summed over joints and xyz, averaged over valid pairs; zero for single-frame clips.

    Args:
        pred_joints, gt_joints: (B, T, 2, 21, 3).
        mask: (B, T, 2) bool.

    Returns:
        Scalar.
    """
    if pred_joints.shape[1] < 2:
        return pred_joints.sum() * 0.0
    pred = pred_joints - pred_joints[..., :1, :]  # (B, T, 2, 21, 3)
    gt = gt_joints - gt_joints[..., :1, :]
    pairs = mask[:, 1:] & mask[:, :-1]  # (B, T-1, 2)
    diff = (pred[:, 1:] - pred[:, :-1]) - (gt[:, 1:] - gt[:, :-1])  # (B, T-1, 2, 21, 3)
    return _mean_over(_mask_out(diff, pairs).abs().sum(dim=(-2, -1)), pairs)


def camera_loss(pred_R: torch.Tensor, pred_t: torch.Tensor, gt_cam_R: torch.Tensor,
                gt_cam_t: torch.Tensor) -> torch.Tensor:
    """Relative camera pose error over frames 1..T-1 (frame 0 is the identity on both sides).

    Rotation: L1 summed over the 9 matrix entries (about twice the angle in radians for a small turn);
    translation: L1 summed over xyz (metres); both averaged over frames. Both stay linear at the small
    per-clip motions of a head camera, where an MSE on the entries gave the rotation no gradient to speak
    of (a 0.5 degree error costs 2e-5 that way, 0.02 this way). Not masked by hand visibility. Zero for
    single-frame clips.

    Args:
        pred_R: (B, T, 3, 3), pred_t: (B, T, 3) pose of camera t in camera 0.
        gt_cam_R: (B, T, 3, 3), gt_cam_t: (B, T, 3) ground-truth world-to-camera poses.

    Returns:
        Scalar.
    """
    if pred_R.shape[1] < 2:
        return (pred_R.sum() + pred_t.sum()) * 0.0
    gt_R, gt_t = relative_camera_pose(gt_cam_R, gt_cam_t)  # (B, T, 3, 3), (B, T, 3)
    rot = (pred_R[:, 1:] - gt_R[:, 1:]).abs().sum(dim=(-2, -1))  # (B, T-1)
    trans = (pred_t[:, 1:] - gt_t[:, 1:]).abs().sum(dim=-1)  # (B, T-1)
    return (rot + trans).mean()


def hand_world_loss(pred_root: torch.Tensor, pred_R: torch.Tensor, pred_t: torch.Tensor,
                    gt_joints: torch.Tensor, gt_cam_R: torch.Tensor, gt_cam_t: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """L1 (summed over xyz, metres) of wrists in the first camera's frame, averaged over valid hand-frames.

    The predicted wrist goes through the predicted relative camera pose, the ground-truth wrist
    (joint 0 of the ground-truth joints) through the ground-truth one.

    Args:
        pred_root: (B, T, 2, 3) camera-frame wrists.
        pred_R: (B, T, 3, 3), pred_t: (B, T, 3) predicted pose of camera t in camera 0.
        gt_joints: (B, T, 2, 21, 3) camera frame.
        gt_cam_R: (B, T, 3, 3), gt_cam_t: (B, T, 3) ground-truth world-to-camera poses.
        mask: (B, T, 2) bool.

    Returns:
        Scalar.
    """
    pred_world, gt_world = _first_camera_wrists(pred_root, pred_R, pred_t, gt_joints, gt_cam_R, gt_cam_t)
    return _mean_over(_mask_out(pred_world - gt_world, mask).abs().sum(dim=-1), mask)


def _first_camera_wrists(pred_root: torch.Tensor, pred_R: torch.Tensor, pred_t: torch.Tensor, gt_joints: torch.Tensor,
                         gt_cam_R: torch.Tensor, gt_cam_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true wrists (B, T, 2, 3) in the clip's first camera, each through its own camera poses."""
    gt_R, gt_t = relative_camera_pose(gt_cam_R, gt_cam_t)
    pred_world = (pred_R[:, :, None] @ pred_root[..., None]).squeeze(-1) + pred_t[:, :, None]
    gt_world = (gt_R[:, :, None] @ gt_joints[..., 0, :, None]).squeeze(-1) + gt_t[:, :, None]
    return pred_world, gt_world


def _motion_l1(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 (summed over xyz) of velocity and acceleration errors of (B, T, ..., 3) trajectories, each averaged
    over the pairs / triples of consecutive frames that ``mask`` (B, T, ...) keeps."""
    vel = (pred[:, 1:] - pred[:, :-1]) - (gt[:, 1:] - gt[:, :-1])
    pairs = mask[:, 1:] & mask[:, :-1]
    total = _mean_over(_mask_out(vel, pairs).abs().sum(-1), pairs)
    if pred.shape[1] >= 3:
        acc = (pred[:, 2:] - 2 * pred[:, 1:-1] + pred[:, :-2]) - (gt[:, 2:] - 2 * gt[:, 1:-1] + gt[:, :-2])
        triples = mask[:, 2:] & mask[:, 1:-1] & mask[:, :-2]
        total = total + _mean_over(_mask_out(acc, triples).abs().sum(-1), triples)
    return total


def motion_loss(pred_root: torch.Tensor, pred_R: torch.Tensor, pred_t: torch.Tensor, gt_joints: torch.Tensor,
                gt_cam_R: torch.Tensor, gt_cam_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Smooth motion where the truth is smooth: velocity and acceleration errors (metres per frame and per
    frame^2, L1 over xyz) of the camera-frame wrists, of the wrists in the first camera's frame, and of the
    camera's path, as HaWoR's and WHAM's trainings supervise motion and not only positions.

    Wrists count on consecutive valid hand-frames, the camera on every frame. Zero for single-frame clips.

    Args:
        pred_root: (B, T, 2, 3) camera-frame wrists.
        pred_R: (B, T, 3, 3), pred_t: (B, T, 3) predicted pose of camera t in camera 0.
        gt_joints: (B, T, 2, 21, 3) camera frame.
        gt_cam_R: (B, T, 3, 3), gt_cam_t: (B, T, 3) ground-truth world-to-camera poses.
        mask: (B, T, 2) bool.

    Returns:
        Scalar.
    """
    if pred_root.shape[1] < 2:
        return (pred_root.sum() + pred_t.sum()) * 0.0
    _, gt_t = relative_camera_pose(gt_cam_R, gt_cam_t)
    pred_world, gt_world = _first_camera_wrists(pred_root, pred_R, pred_t, gt_joints, gt_cam_R, gt_cam_t)
    every_frame = torch.ones(pred_t.shape[:2], dtype=torch.bool, device=pred_t.device)  # (B, T)
    return (_motion_l1(pred_root, gt_joints[..., 0, :], mask) + _motion_l1(pred_world, gt_world, mask)
            + _motion_l1(pred_t, gt_t, every_frame))


def compute_losses(out: HaWoROutput, batch: dict[str, torch.Tensor], weights: LossConfig
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the loss terms; a term whose weight is 0 is not computed.

    Args:
        out: model predictions.
        batch: a data batch (see hawor_tune.data); uses joints3d, crop_joints2d, crop_K, crops (for C),
            joints_visible, rotmats, betas, dist, hand_valid, cam_R, cam_t.
        weights: one weight per term.

    Returns:
        total: scalar tensor to backpropagate; terms: detached float per LossConfig field (0.0 when skipped).
    """
    mask = batch["hand_valid"]
    crop_size = batch["crops"].shape[-1]
    # Lambdas so that a skipped term costs nothing (and the functions are looked up at call time).
    term_fns = {
        "mano_params": lambda: mano_params_loss(out.rotmats, batch["rotmats"], mask),
        "betas": lambda: betas_loss(out.betas, batch["betas"], mask),
        "keypoint_3d": lambda: keypoint_3d_loss(out.joints, batch["joints3d"], mask),
        "hand_frame": lambda: hand_frame_loss(out.joints, out.rotmats, batch["joints3d"], batch["rotmats"], mask),
        "keypoint_2d": lambda: keypoint_2d_loss(out.joints, batch["crop_joints2d"], batch["crop_K"],
                                                batch.get("dist"), crop_size, batch["joints_visible"], mask),
        "temporal": lambda: temporal_loss(out.joints, batch["joints3d"], mask),
        "camera": lambda: camera_loss(out.cam_R, out.cam_t, batch["cam_R"], batch["cam_t"]),
        "hand_world": lambda: hand_world_loss(out.root, out.cam_R, out.cam_t, batch["joints3d"],
                                              batch["cam_R"], batch["cam_t"], mask),
        "motion": lambda: motion_loss(out.root, out.cam_R, out.cam_t, batch["joints3d"], batch["cam_R"],
                                      batch["cam_t"], mask),
    }
    total = out.joints.new_zeros(())
    terms: dict[str, float] = {}
    for f in dataclasses.fields(weights):
        weight = getattr(weights, f.name)
        if weight == 0:
            terms[f.name] = 0.0
            continue
        value = term_fns[f.name]()
        total = total + weight * value
        terms[f.name] = float(value.detach())
    return total, terms
