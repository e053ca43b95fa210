"""Evaluation: gather predictions over a split and compute every metric from them and the ground truth."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from hawor_tune import metrics
from hawor_tune.config import ExperimentConfig
from hawor_tune.geometry import relative_camera_pose
from hawor_tune.mano import FINGERS, HANDS
from hawor_tune.model import run_model
from hawor_tune.runtime import autocast, autocast_dtype, capped, to_device


@dataclass
class Predictions:
    """Per-clip predictions and ground truth gathered over a split (numpy, metres)."""

    pred_joints: np.ndarray   # (C, T, 2, 21, 3) camera frame
    gt_joints: np.ndarray     # (C, T, 2, 21, 3)
    valid: np.ndarray         # (C, T, 2) bool
    pred_cam_R: np.ndarray    # (C, T, 3, 3) camera t in camera-0 coordinates
    pred_cam_t: np.ndarray    # (C, T, 3)
    gt_cam_R: np.ndarray      # (C, T, 3, 3)
    gt_cam_t: np.ndarray      # (C, T, 3)
    world_to_cam_R: np.ndarray  # (C, T, 3, 3) ground-truth absolute camera (for trajectories)
    world_to_cam_t: np.ndarray  # (C, T, 3)
    seq_index: np.ndarray     # (C,)
    frame_index: np.ndarray   # (C, T)


Predictor = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@torch.no_grad()
def gather(predictor: Predictor, loader: Iterable, device: torch.device, *, max_batches: int = 0,
           desc: str = "eval") -> Predictions:
    """Run ``predictor(batch) -> (joints (B,T,2,21,3), cam_R (B,T,3,3), cam_t (B,T,3))`` over a loader and
    gather its predictions with the ground truth."""
    keep: dict[str, list[np.ndarray]] = {k: [] for k in Predictions.__dataclass_fields__}
    batches, total = capped(loader, max_batches)
    for batch in tqdm(batches, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None,
                      file=sys.stderr):
        batch = to_device(batch, device)
        joints, cam_R, cam_t = predictor(batch)
        gt_R, gt_t = relative_camera_pose(batch["cam_R"].double(), batch["cam_t"].double())
        items = {
            # Each frame is scored in exactly one clip (see ArcticClips), whatever the clip length.
            "pred_joints": joints, "gt_joints": batch["joints3d"], "valid": batch["hand_valid"] & batch["scored"][..., None],
            "pred_cam_R": cam_R, "pred_cam_t": cam_t, "gt_cam_R": gt_R, "gt_cam_t": gt_t,
            "world_to_cam_R": batch["cam_R"], "world_to_cam_t": batch["cam_t"],
            "seq_index": batch["seq_index"], "frame_index": batch["frame_index"],
        }
        for k, v in items.items():
            v = v.detach().cpu()
            keep[k].append(v.numpy() if v.dtype == torch.bool or not v.is_floating_point()
                           else v.double().numpy())
    if not keep["valid"]:
        raise ValueError("evaluation loader yielded no batches")
    return Predictions(**{k: np.concatenate(v) for k, v in keep.items()})


def predict(model: nn.Module, loader: Iterable, device: torch.device, *, precision: str = "auto",
            max_batches: int = 0, desc: str = "eval") -> Predictions:
    """Run the model over a loader and gather predictions with their ground truth."""
    model.eval()
    amp = autocast_dtype(device, precision)

    def run(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with autocast(device, amp):
            out = run_model(model, batch)
        return out.joints, out.cam_R, out.cam_t

    return gather(run, loader, device, max_batches=max_batches, desc=desc)


def compute_metrics(p: Predictions, *, fps: float = 30.0) -> dict[str, float]:
    """Every evaluation metric from gathered predictions (mm, mm/frame^2, degrees).

    Hand metrics use the frames where the hand is valid; acceleration, jerk and world metrics use clips in
    which the hand is valid in every frame. World metrics place both hands in the clip's first camera
    frame with the predicted (resp. ground-truth) camera motion, one chunk per clip.

    Camera smoothness (``cam_accel_error`` in mm/frame^2, ``cam_jerk`` and ``cam_jerk_gt`` in m/s^3) uses
    every clip; it is nan when clips are shorter than 3 (acceleration) or 4 (jerk) frames.
    """
    out: dict[str, float] = {}
    mm = 1000.0
    pooled: dict[str, list[np.ndarray]] = {"mpjpe": [], "pa_mpjpe": [], "accel_error": [],
                                          "w_mpjpe": [], "wa_mpjpe": [], "jerk": [], "jerk_gt": []}
    per_joint = []
    for h, hand in enumerate(HANDS):
        valid = p.valid[:, :, h]                                 # (C, T)
        pred = p.pred_joints[:, :, h][valid]                     # (N, 21, 3)
        gt = p.gt_joints[:, :, h][valid]
        if len(pred) == 0:
            for name in ("mpjpe", "pa_mpjpe"):
                out[f"{name}_{hand}"] = float("nan")
            continue
        e = metrics.mpjpe(pred, gt) * mm
        pa = metrics.pa_mpjpe(pred, gt) * mm
        per_joint.append(metrics.per_joint_error(pred, gt) * mm * len(pred))
        out[f"mpjpe_{hand}"], out[f"pa_mpjpe_{hand}"] = float(e.mean()), float(pa.mean())
        pooled["mpjpe"].append(e)
        pooled["pa_mpjpe"].append(pa)
        full = valid.all(axis=1)                                 # clips with this hand in every frame
        for c in np.flatnonzero(full):
            pj, gj = p.pred_joints[c, :, h], p.gt_joints[c, :, h]          # (T, 21, 3)
            if len(pj) >= 3:
                rel_p, rel_g = pj - pj[:, :1], gj - gj[:, :1]
                pooled["accel_error"].append(metrics.accel_error(rel_p, rel_g) * mm)
            world_p = np.einsum("tij,tkj->tki", p.pred_cam_R[c], pj) + p.pred_cam_t[c][:, None]
            world_g = np.einsum("tij,tkj->tki", p.gt_cam_R[c], gj) + p.gt_cam_t[c][:, None]
            if len(pj) >= 2:
                pooled["w_mpjpe"].append(metrics.w_mpjpe(world_p, world_g, chunk=len(pj)) * mm)
                pooled["wa_mpjpe"].append(metrics.wa_mpjpe(world_p, world_g, chunk=len(pj)) * mm)
            if len(pj) >= 4:
                pooled["jerk"].append(metrics.jerk(world_p, fps=fps))
                pooled["jerk_gt"].append(metrics.jerk(world_g, fps=fps))
    for name, values in pooled.items():
        out[name] = float(np.concatenate(values).mean()) if values else float("nan")
    total_valid = int(p.valid.sum())
    if per_joint and total_valid:
        joint_err = np.sum(per_joint, axis=0) / total_valid      # (21,) pooled over both hands
        for j, v in enumerate(joint_err):
            out[f"joint_{j:02d}"] = float(v)
        for finger, idx in FINGERS.items():
            out[f"finger_{finger}"] = float(joint_err[list(idx)].mean())
    # Camera: frames after the first of each clip (frame 0 is the identity by construction).
    C, T = p.valid.shape[:2]
    if T > 1:
        te = metrics.camera_translation_error(p.pred_cam_t[:, 1:].reshape(-1, 3), p.gt_cam_t[:, 1:].reshape(-1, 3))
        re = metrics.camera_rotation_error(p.pred_cam_R[:, 1:].reshape(-1, 3, 3), p.gt_cam_R[:, 1:].reshape(-1, 3, 3))
        out["cam_trans_error"], out["cam_rot_error"] = float(te.mean() * mm), float(np.degrees(re.mean()))
    else:
        out["cam_trans_error"] = out["cam_rot_error"] = float("nan")
    # (cam_R, cam_t) take camera t's coordinates into camera 0's (X_0 = R X_t + t, relative_camera_pose), so
    # camera t's centre in camera 0 is t itself; -R^T t is the centre only for world-to-camera poses.
    if T >= 3:
        accel = [metrics.camera_accel_error(pc, gc) for pc, gc in zip(p.pred_cam_t, p.gt_cam_t)]  # C x (T-2,)
        out["cam_accel_error"] = float(np.mean(accel) * mm)
    else:
        out["cam_accel_error"] = float("nan")
    if T >= 4:
        out["cam_jerk"] = float(np.mean([metrics.camera_jerk(pc, fps=fps) for pc in p.pred_cam_t]))
        out["cam_jerk_gt"] = float(np.mean([metrics.camera_jerk(gc, fps=fps) for gc in p.gt_cam_t]))
    else:
        out["cam_jerk"] = out["cam_jerk_gt"] = float("nan")
    out["valid_hand_frames"] = float(total_valid)
    return out


def evaluate(model: nn.Module, split: str | Iterable, config: ExperimentConfig, *,
             device: torch.device | None = None, max_batches: int = 0,
             return_predictions: bool = False) -> dict[str, float] | tuple[dict[str, float], Predictions]:
    """Evaluate ``model`` on a split name ('val', 'test', 'train') or on a ready loader.

    Returns:
        Metrics keyed without a split prefix (``mpjpe``, ``pa_mpjpe_left``, ...); with
        ``return_predictions`` also the gathered :class:`Predictions`.
    """
    from hawor_tune.data import build_dataloader

    device = device or next(model.parameters()).device
    loader = build_dataloader(config, split, shuffle=False) if isinstance(split, str) else split
    preds = predict(model, loader, device, precision=config.train.precision, max_batches=max_batches,
                    desc=f"eval {split if isinstance(split, str) else ''}".strip())
    result = compute_metrics(preds, fps=30.0 / config.data.frame_step)
    return (result, preds) if return_predictions else result


def mean_pose_baseline(config: ExperimentConfig, split: str = "val") -> dict[str, float]:
    """Every metric of a baseline that predicts the training set's mean root-relative pose of each hand,
    placed at the ground-truth wrist, and a static camera (the identity relative pose)."""
    from hawor_tune.data import build_dataloader

    cpu = torch.device("cpu")
    rel_sum, count = torch.zeros(2, 21, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    for batch in build_dataloader(config, "train", shuffle=False):
        joints, valid = batch["joints3d"].double(), batch["hand_valid"]           # (B, T, 2, 21, 3), (B, T, 2)
        rel = (joints - joints[..., :1, :]) * valid[..., None, None]
        rel_sum += rel.sum(dim=(0, 1))
        count += valid.sum(dim=(0, 1))
    if not bool((count > 0).all()):
        raise ValueError("mean-pose baseline: the training split has no valid frame of some hand")
    mean_rel = (rel_sum / count[:, None, None]).float()                            # (2, 21, 3)

    def static_mean(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gt = batch["joints3d"]
        B, T = gt.shape[:2]
        eye = torch.eye(3).expand(B, T, 3, 3)
        return mean_rel + gt[..., :1, :], eye, torch.zeros(B, T, 3)

    preds = gather(static_mean, build_dataloader(config, split, shuffle=False), cpu, desc=f"baseline {split}")
    return compute_metrics(preds, fps=30.0 / config.data.frame_step)
