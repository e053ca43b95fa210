"""Evaluation: gather predictions over a split and compute every metric from them and the ground truth.

What is scored, frame by frame (see :func:`compute_metrics` for units):

- Each kept frame is scored in exactly one clip (``scored`` in the batch), whatever ``data.seq_len`` is.
- A fixed, seeded subset of the valid hand-frames (:data:`INFILL_EVAL_RATE`) is hidden from the model, as a
  tracker's misses would be: the model sees ``hand_valid`` false there, so the infiller fills them.
  ``mpjpe_infilled`` scores those frames; the hand metrics (``mpjpe``, ``pa_mpjpe``, per hand, joint and
  finger) score the frames the model observed.
- World metrics join each sequence: the predicted relative camera poses of its clips are chained in order,
  hands go to world coordinates through them, and W-MPJPE, WA-MPJPE, the acceleration error and jerk are
  computed on whole sequences as WHAM's evaluation does (:func:`world_sequences`). Per-clip versions carry
  a ``clip_`` prefix.
"""

from __future__ import annotations

import math
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

# Fraction of the valid hand-frames that evaluation hides from the model so that the infiller's output is
# scored. A constant, not a config key: every trial of a search is scored on the same observed and hidden
# frames (a searched model.infill_mask_prob must not move them).
INFILL_EVAL_RATE = 0.15
INFILL_EVAL_SEED = 0
WORLD_CHUNK = 100  # frames per W-MPJPE / WA-MPJPE chunk (WHAM's chunk_length)
DATASET_FPS = 30.0  # ARCTIC's (and the generated data's) frame rate before data.frame_step


@dataclass
class Predictions:
    """Per-clip predictions and ground truth gathered over a split (numpy, metres)."""

    pred_joints: np.ndarray   # (C, T, 2, 21, 3) camera frame
    gt_joints: np.ndarray     # (C, T, 2, 21, 3)
    valid: np.ndarray         # (C, T, 2) bool: hand valid and the frame scored in this clip
    pred_cam_R: np.ndarray    # (C, T, 3, 3) camera t in camera-0 coordinates
    pred_cam_t: np.ndarray    # (C, T, 3)
    gt_cam_R: np.ndarray      # (C, T, 3, 3)
    gt_cam_t: np.ndarray      # (C, T, 3)
    world_to_cam_R: np.ndarray  # (C, T, 3, 3) ground-truth absolute camera (for trajectories)
    world_to_cam_t: np.ndarray  # (C, T, 3)
    seq_index: np.ndarray     # (C,)
    frame_index: np.ndarray   # (C, T)
    hidden: np.ndarray | None = None  # (C, T, 2) bool: valid, scored, hidden from the model (None: none)
    scored: np.ndarray | None = None  # (C, T) bool: the frame is scored in this clip (None: every frame)
    pred_rotmats: np.ndarray | None = None  # (C, T, 2, 16, 3, 3) MANO rotations (None: not predicted)
    gt_rotmats: np.ndarray | None = None    # (C, T, 2, 16, 3, 3)
    pred_joints_gt_shape: np.ndarray | None = None  # (C, T, 2, 21, 3) the predicted pose on the true betas
    observed: np.ndarray | None = None  # (C, T, 2) bool: what the model was told it sees (None: every hand-frame)


# batch -> {"joints", "cam_R", "cam_t"} and optionally "rotmats" (B, T, 2, 16, 3, 3) and "joints_gt_shape"
# (B, T, 2, 21, 3): what a model (or a baseline) predicts for a batch.
Predictor = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def hidden_frames(seq_index: torch.Tensor, frame_index: torch.Tensor, hand_valid: torch.Tensor, *,
                  rate: float = INFILL_EVAL_RATE, seed: int = INFILL_EVAL_SEED, span: int = 1) -> torch.Tensor:
    """The valid hand-frames evaluation hides from the model: (B,), (B, T), (B, T, 2) -> (B, T, 2) bool.

    Whether a hand-frame is hidden depends only on (seed, sequence, annotation frame // span, hand), through a
    fixed hash compared with ``rate``: the same frames are hidden in every clip that holds them, whatever the
    clip length, batch size or evaluation order; ``span`` > 1 hides runs of that many annotation frames, as a
    tracker loses a hand for a while.
    """
    if span < 1:
        raise ValueError(f"hidden_frames: span must be >= 1 frame, got {span}")
    if rate <= 0.0:
        return torch.zeros_like(hand_valid)
    seq = seq_index.detach().cpu().numpy().astype(np.uint64)[:, None, None]  # (B, 1, 1)
    frame = (frame_index.detach().cpu().numpy() // span).astype(np.uint64)[..., None]  # (B, T, 1)
    hand = np.arange(2, dtype=np.uint64)  # (2,)
    key = ((np.uint64(seed) << np.uint64(42)) | (seq << np.uint64(22))
           | (frame << np.uint64(1)) | hand)  # (B, T, 2) distinct for seq < 2^20, frame < 2^21
    hidden = torch.from_numpy(_uniform(key) < rate).to(hand_valid.device)
    return hand_valid & hidden


def _uniform(key: np.ndarray) -> np.ndarray:
    """uint64 keys -> floats in [0, 1) by splitmix64 (a fixed, well-mixed hash)."""
    z = key + np.uint64(0x9E3779B97F4A7C15)  # uint64 arithmetic wraps, as the hash intends
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


@torch.no_grad()
def gather(predictor: Predictor, loader: Iterable, device: torch.device, *, max_batches: int = 0,
           desc: str = "eval", hide_rate: float = 0.0, hide_span: int = 1) -> Predictions:
    """Run ``predictor(batch)`` (see :data:`Predictor`) over a loader and gather its predictions with the
    ground truth.

    With ``hide_rate`` > 0 the predictor sees ``hand_valid`` false on the :func:`hidden_frames` (in runs of
    ``hide_span`` frames), which are recorded in ``Predictions.hidden``.
    """
    keep: dict[str, list[np.ndarray]] = {k: [] for k in Predictions.__dataclass_fields__}
    batches, total = capped(loader, max_batches)
    for batch in tqdm(batches, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None,
                      file=sys.stderr):
        batch = to_device(batch, device)
        hidden = hidden_frames(batch["seq_index"], batch["frame_index"], batch["hand_valid"], rate=hide_rate,
                               span=hide_span)
        out = predictor({**batch, "hand_valid": batch["hand_valid"] & ~hidden})
        gt_R, gt_t = relative_camera_pose(batch["cam_R"].double(), batch["cam_t"].double())
        scored = batch["scored"]
        items = {
            # Each frame is scored in exactly one clip (see ArcticClips), whatever the clip length.
            "pred_joints": out["joints"], "gt_joints": batch["joints3d"],
            "valid": batch["hand_valid"] & scored[..., None],
            "pred_cam_R": out["cam_R"], "pred_cam_t": out["cam_t"], "gt_cam_R": gt_R, "gt_cam_t": gt_t,
            "world_to_cam_R": batch["cam_R"], "world_to_cam_t": batch["cam_t"],
            "seq_index": batch["seq_index"], "frame_index": batch["frame_index"],
            "hidden": hidden & scored[..., None], "scored": scored,
            "observed": batch["hand_valid"] & ~hidden,
        }
        if "rotmats" in out:
            items.update(pred_rotmats=out["rotmats"], gt_rotmats=batch["rotmats"])
        if "joints_gt_shape" in out:
            items["pred_joints_gt_shape"] = out["joints_gt_shape"]
        for k, v in items.items():
            v = v.detach().cpu()
            keep[k].append(v.numpy() if v.dtype == torch.bool or not v.is_floating_point()
                           else v.double().numpy())
    if not keep["valid"]:
        raise ValueError("evaluation loader yielded no batches")
    return Predictions(**{k: np.concatenate(v) for k, v in keep.items() if v})


def predict(model: nn.Module, loader: Iterable, device: torch.device, *, precision: str = "auto",
            max_batches: int = 0, desc: str = "eval", hide_rate: float = 0.0, hide_span: int = 1) -> Predictions:
    """Run the model over a loader and gather predictions with their ground truth (see :func:`gather`)."""
    model.eval()
    amp = autocast_dtype(device, precision)

    def run(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with autocast(device, amp):
            out = run_model(model, batch)
        # The predicted pose on the true shape: PA-MPJPE then measures articulation, not the unseen subject's
        # hand shape.
        gt_shape, _ = model.run_mano(out.rotmats, batch["betas"].float(), out.root)
        return {"joints": out.joints, "cam_R": out.cam_R, "cam_t": out.cam_t, "rotmats": out.rotmats,
                "joints_gt_shape": gt_shape}

    return gather(run, loader, device, max_batches=max_batches, desc=desc, hide_rate=hide_rate, hide_span=hide_span)


# ---- Whole sequences in world coordinates ---------------------------------------------------------------

@dataclass
class SequenceWorld:
    """One sequence joined from its clips, in frame order (numpy, metres).

    The predicted world is the predicted camera of the sequence's first frame, the ground-truth world the
    true camera of that frame; W-MPJPE and WA-MPJPE align the two anyway.
    """

    seq_index: int
    frame_index: np.ndarray   # (N,) annotation indices
    pred_joints: np.ndarray   # (N, 2, 21, 3) predicted world joints
    gt_joints: np.ndarray     # (N, 2, 21, 3) ground-truth world joints
    valid: np.ndarray         # (N, 2) bool
    pred_cam_to_world: np.ndarray  # (N, 4, 4) the chained predicted cameras
    hidden: np.ndarray | None = None  # (N, 2) bool: valid frames hidden from the model (infilled)
    bridged: np.ndarray | None = None  # (N, 2) bool: in no clip that observes the hand; filled across clips


def _homogeneous(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(..., 3, 3), (..., 3) -> (..., 4, 4)."""
    M = np.zeros((*R.shape[:-2], 4, 4))
    M[..., :3, :3], M[..., :3, 3], M[..., 3, 3] = R, t, 1.0
    return M


def _window_weights(T: int) -> np.ndarray:
    """(T,) how much a clip's frame counts where clips overlap: a triangle peaked at the clip's centre, so that
    each frame leans on the clip that sees most of its context and the hand-over between clips is gradual."""
    t = np.arange(T)
    return np.minimum(t + 1, T - t).astype(np.float64)


def _mean_rotation(R: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(K, 3, 3) rotations, (K,) weights -> their weighted chordal mean (the nearest rotation to the weighted sum)."""
    U, _, Vt = np.linalg.svd(np.einsum("k,kij->ij", w, R))
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))])
    return U @ D @ Vt


def _sees(p: Predictions) -> np.ndarray:
    """(C, 2) bool: whether each clip observes each hand on some frame (every clip, without ``p.observed``)."""
    return np.ones((len(p.valid), 2), dtype=bool) if p.observed is None else p.observed.any(axis=1)


def _bridge(frames: np.ndarray, x: np.ndarray, blind: np.ndarray) -> np.ndarray:
    """(N,) frame numbers, (N, H, ...) values, (N, H) bool -> x with each hand's blind frames interpolated in
    time between its nearest frames that are not (the nearest one alone at the sequence's ends); unchanged for
    a hand blind everywhere."""
    x = x.copy()
    for h in range(blind.shape[1]):
        known = ~blind[:, h]
        if known.any() and not known.all():
            flat = x[:, h].reshape(len(frames), -1)  # (N, K)
            x[blind[:, h], h] = np.stack([np.interp(frames[blind[:, h]], frames[known], col[known])
                                          for col in flat.T], axis=-1).reshape(-1, *x.shape[2:])
    return x


def world_sequences(p: Predictions) -> list[SequenceWorld]:
    """Join each sequence's clips and chain the predicted relative camera poses over the whole sequence.

    Clips are taken in frame order. Within a clip the model predicts each camera in the clip's first camera
    (``pred_cam_R``, ``pred_cam_t``); a clip whose first frame an earlier clip already placed (every
    evaluation clip after the first: they overlap) continues from that clip's pose of it. Clips that do not
    overlap (other loaders) leave a junction the model predicts nothing for: it repeats the last predicted
    frame-to-frame step (constant velocity; a static camera when only one frame is placed so far). Where clips
    overlap, a frame's camera pose and world joints are the average of every clip's prediction of it, each
    weighted by :func:`_window_weights` (a sliding window blended, not cut: a cut at each hand-over would be a
    jump no moving hand makes). The ground truth, validity and hidden flags come from the clip in which the
    frame is scored.

    A hand's world joints average only the clips that observe it somewhere (with ``p.observed``): a clip that
    sees the hand nowhere has no neighbour to fill it from. Frames no such clip covers (a gap longer than a
    clip) are ``bridged``: interpolated in the world between the nearest frames that are not, across the clip
    boundaries (the interpolation HaWoR's infiller starts from).
    """
    scored = p.scored if p.scored is not None else np.ones(p.valid.shape[:2], dtype=bool)
    sees = _sees(p)  # (C, 2)
    eye = np.eye(4)
    out = []
    for s in np.unique(p.seq_index):
        clips = np.flatnonzero(p.seq_index == s)
        clips = clips[np.argsort(p.frame_index[clips, 0], kind="stable")]
        anchors: dict[int, np.ndarray] = {}  # frame -> (4, 4) camera-to-world, as the first clip placing it chained it
        order: list[int] = []
        rows: dict[int, tuple[int, int]] = {}  # frame -> (clip, t) its ground truth and flags are read from
        votes: dict[int, list[tuple[float, np.ndarray, np.ndarray, np.ndarray]]] = {}  # frame -> (weight, pose,
        # world joints, which hands the clip sees)
        for c in clips:
            frames = p.frame_index[c].tolist()
            M = _homogeneous(p.pred_cam_R[c], p.pred_cam_t[c])  # (T, 4, 4) camera t -> the clip's camera 0
            if frames[0] in anchors:
                first = anchors[frames[0]]
            elif order:
                step = np.linalg.inv(anchors[order[-2]]) @ anchors[order[-1]] if len(order) >= 2 else eye
                first = anchors[order[-1]] @ step
            else:
                first = eye
            G = first @ np.linalg.inv(M[0]) @ M  # (T, 4, 4); M[0] is the identity for the model; kept general
            world = np.einsum("tij,thkj->thki", G[:, :3, :3], p.pred_joints[c]) + G[:, None, None, :3, 3]
            for t, (f, w) in enumerate(zip(frames, _window_weights(len(frames)))):
                if f not in anchors:
                    anchors[f] = G[t]
                    order.append(f)
                votes.setdefault(f, []).append((w, G[t], world[t], sees[c]))
                if f not in rows or scored[c, t]:
                    rows[f] = (c, t)
        ci, ti = np.array([rows[f] for f in order]).T  # (N,), (N,)
        G = np.zeros((len(order), 4, 4))
        pred_world = np.zeros((len(order), *p.pred_joints.shape[2:]))
        blind = np.zeros((len(order), 2), dtype=bool)
        for n, f in enumerate(order):
            w = np.array([v[0] for v in votes[f]])
            poses = np.stack([v[1] for v in votes[f]])
            G[n, :3, :3] = _mean_rotation(poses[:, :3, :3], w)
            G[n, :3, 3] = w @ poses[:, :3, 3] / w.sum()
            G[n, 3, 3] = 1.0
            joints = np.stack([v[2] for v in votes[f]])  # (K, 2, 21, 3)
            informed = w[:, None] * np.stack([v[3] for v in votes[f]])  # (K, 2): weights of the clips seeing each hand
            blind[n] = ~informed.any(axis=0)
            wh = np.where(blind[n], w[:, None], informed)  # (K, 2): every clip where none sees the hand
            pred_world[n] = np.einsum("kh,kh...->h...", wh, joints) / wh.sum(axis=0)[:, None, None]
        pred_world = _bridge(np.asarray(order, dtype=np.float64), pred_world, blind)
        R, t = p.world_to_cam_R[ci, ti], p.world_to_cam_t[ci, ti]  # (N, 3, 3), (N, 3) world-to-camera
        gj = p.gt_joints[ci, ti]  # (N, 2, 21, 3) camera frames
        gt_world = np.einsum("nji,nhkj->nhki", R, gj - t[:, None, None])  # R^T (x - t)
        gt_first = np.einsum("ij,nhkj->nhki", R[0], gt_world) + t[0]  # in the true first camera
        out.append(SequenceWorld(seq_index=int(s), frame_index=np.asarray(order), pred_joints=pred_world,
                                 gt_joints=gt_first, valid=p.valid[ci, ti], pred_cam_to_world=G,
                                 hidden=None if p.hidden is None else p.hidden[ci, ti],
                                 bridged=blind & (~blind).any(axis=0)))
    return out


def world_metrics(sequences: Iterable[SequenceWorld], *, fps: float, chunk: int = WORLD_CHUNK) -> dict[str, float]:
    """Published world metrics over whole sequences, both hands pooled.

    As WHAM's evaluation (yohanshin/WHAM, ``lib/eval/evaluate_emdb.py``; alignments ``first_align_joints``
    and ``global_align_joints`` in ``lib/eval/eval_utils.py``, taken from SLAHMR): per sequence and hand the
    valid frames are concatenated, cut into ``chunk``-frame chunks (a sequence shorter than a chunk is one
    chunk; the last chunk may be shorter), each chunk similarity-aligned on its first two frames (W-MPJPE)
    or on all its frames (WA-MPJPE), and the per-frame errors pooled over every sequence.

    Returns:
        ``w_mpjpe``, ``wa_mpjpe`` (mm); ``accel_error`` (m/s^2: |a_pred - a_gt| of the world joints, second
        differences over three consecutive valid frames, times fps^2, no alignment: both worlds start at
        their first camera); ``jerk`` and ``jerk_gt`` (m/s^3, of the predicted and true world joints over
        four consecutive valid frames); ``rte`` (%: HaWoR's root translation error, the wrist's valid
        trajectory rigidly aligned over the whole sequence, over its path length, :func:`metrics.rte`);
        ``w_mpjpe_infilled`` and ``accel_error_infilled``: the same errors at the infilled frames alone (the
        frames hidden from the model, bridged ones included; the acceleration centred on one). nan where no
        frame qualifies. ``bridged_hand_frames`` counts the valid frames filled across clips.
    """
    names = ("w_mpjpe", "wa_mpjpe", "accel_error", "jerk", "jerk_gt", "rte", "w_mpjpe_infilled",
             "accel_error_infilled")
    pooled: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for sq in sequences:
        for h in range(len(HANDS)):
            v = sq.valid[:, h]  # (N,)
            gone = sq.hidden[:, h] if sq.hidden is not None else np.zeros_like(v)  # (N,)
            pw, gw = sq.pred_joints[:, h], sq.gt_joints[:, h]  # (N, 21, 3)
            if v.any():
                w = metrics.w_mpjpe(pw[v], gw[v], chunk=chunk, per_frame=True) * 1000.0  # (V,)
                pooled["w_mpjpe"].append(w)
                pooled["w_mpjpe_infilled"].append(w[gone[v]])
                pooled["wa_mpjpe"].append(metrics.wa_mpjpe(pw[v], gw[v], chunk=chunk, per_frame=True) * 1000.0)
            if v.sum() >= 2:
                pooled["rte"].append(metrics.rte(pw[v, 0], gw[v, 0]))
            if len(v) >= 3:
                accel = metrics.accel_error(pw, gw, valid=v) * fps**2  # (K,) one per triplet of valid frames
                triples = v[:-2] & v[1:-1] & v[2:]  # (N-2,) those triplets, by their centre frame
                pooled["accel_error"].append(accel)
                pooled["accel_error_infilled"].append(accel[gone[1:-1][triples]])
            if len(v) >= 4:
                window = v[:-3] & v[1:-2] & v[2:-1] & v[3:]  # (N-3,) four valid frames in a row
                pooled["jerk"].append(metrics.jerk(pw, fps=fps)[window])
                pooled["jerk_gt"].append(metrics.jerk(gw, fps=fps)[window])
    bridged = sum(int((sq.bridged & sq.valid).sum()) for sq in sequences if sq.bridged is not None)
    return {**{k: _mean(v) for k, v in pooled.items()}, "bridged_hand_frames": float(bridged)}


def _mean(values: list[np.ndarray]) -> float:
    """Mean of the pooled values, nan when there are none."""
    flat = np.concatenate(values) if values else np.empty(0)
    return float(flat.mean()) if len(flat) else float("nan")


def _articulation(p: Predictions, observed: np.ndarray) -> dict[str, float]:
    """The fingers' own errors over the observed valid frames: ``finger_angle_error`` (degrees, the geodesic
    angle of MANO's 15 parent-relative finger rotations) and ``pa_mpjpe_gt_shape`` (mm, PA-MPJPE of the
    predicted pose on the true hand shape). nan when the predictor gives neither or no frame is observed."""
    out = {"finger_angle_error": float("nan"), "pa_mpjpe_gt_shape": float("nan")}
    if not observed.any():
        return out
    if p.pred_rotmats is not None and p.gt_rotmats is not None:
        out["finger_angle_error"] = float(metrics.joint_angle_error(
            p.pred_rotmats[observed][:, 1:], p.gt_rotmats[observed][:, 1:]).mean())
    if p.pred_joints_gt_shape is not None:
        out["pa_mpjpe_gt_shape"] = float(metrics.pa_mpjpe(p.pred_joints_gt_shape[observed],
                                                          p.gt_joints[observed]).mean() * 1000.0)
    return out


def compute_metrics(p: Predictions, *, fps: float = DATASET_FPS) -> dict[str, float]:
    """Every evaluation metric from gathered predictions.

    - Hand metrics (mm, wrist-relative): ``mpjpe``, ``pa_mpjpe`` (pooled and ``_left``/``_right``),
      ``joint_NN``, ``finger_<name>`` over the valid frames the model observed; ``mpjpe_infilled`` over the
      valid frames hidden from it in clips that observe the hand elsewhere, the infiller's own work (nan
      when none was hidden; frames no such clip holds are bridged in the world, see :func:`world_sequences`).
      ``valid_hand_frames`` and ``infilled_hand_frames`` count the observed and the hidden frames.
    - Articulation (:func:`_articulation`): ``finger_angle_error`` (degrees), ``pa_mpjpe_gt_shape`` (mm).
    - World metrics over whole sequences (:func:`world_metrics`): ``w_mpjpe``, ``wa_mpjpe`` (mm),
      ``accel_error`` (m/s^2), ``jerk``, ``jerk_gt`` (m/s^3), ``rte`` (%), on every valid frame (observed or
      infilled), and ``w_mpjpe_infilled``, ``accel_error_infilled`` on the infilled ones.
    - Clip-level versions, in clips where the hand is valid in every frame: ``clip_accel_error``
      (wrist-relative joints, mm/frame^2), ``clip_w_mpjpe`` and ``clip_wa_mpjpe`` (mm, both hands placed in
      the clip's first camera, one chunk per clip), ``clip_jerk`` and ``clip_jerk_gt`` (m/s^3).
    - Camera, per clip in its first camera: ``cam_trans_error`` (mm), ``cam_rot_error`` (degrees) over the
      frames after the first; ``cam_accel_error`` (mm/frame^2), ``cam_jerk`` and ``cam_jerk_gt`` (m/s^3)
      over every clip, nan when clips are shorter than 3 (acceleration) or 4 (jerk) frames.

    Args:
        p: gathered predictions.
        fps: frame rate of the evaluated frames (the dataset's over ``data.frame_step``).
    """
    out: dict[str, float] = {}
    mm = 1000.0
    hidden = p.hidden if p.hidden is not None else np.zeros_like(p.valid)
    observed = p.valid & ~hidden  # (C, T, 2)
    sees = _sees(p)  # (C, 2)
    pooled: dict[str, list[np.ndarray]] = {k: [] for k in ("mpjpe", "pa_mpjpe", "mpjpe_infilled", "clip_accel_error",
                                                           "clip_w_mpjpe", "clip_wa_mpjpe", "clip_jerk",
                                                           "clip_jerk_gt")}
    per_joint = []
    for h, hand in enumerate(HANDS):
        seen = observed[:, :, h]  # (C, T)
        pred, gt = p.pred_joints[:, :, h][seen], p.gt_joints[:, :, h][seen]  # (N, 21, 3)
        if len(pred):
            e, pa = metrics.mpjpe(pred, gt) * mm, metrics.pa_mpjpe(pred, gt) * mm
            per_joint.append(metrics.per_joint_error(pred, gt) * mm * len(pred))
            out[f"mpjpe_{hand}"], out[f"pa_mpjpe_{hand}"] = float(e.mean()), float(pa.mean())
            pooled["mpjpe"].append(e)
            pooled["pa_mpjpe"].append(pa)
        else:
            out[f"mpjpe_{hand}"] = out[f"pa_mpjpe_{hand}"] = float("nan")
        gone = hidden[:, :, h] & sees[:, None, h]  # (C, T)
        if gone.any():
            pooled["mpjpe_infilled"].append(metrics.mpjpe(p.pred_joints[:, :, h][gone], p.gt_joints[:, :, h][gone]) * mm)
        for c in np.flatnonzero(p.valid[:, :, h].all(axis=1)):  # clips with this hand in every frame
            pj, gj = p.pred_joints[c, :, h], p.gt_joints[c, :, h]  # (T, 21, 3)
            if len(pj) >= 3:
                pooled["clip_accel_error"].append(metrics.accel_error(pj - pj[:, :1], gj - gj[:, :1]) * mm)
            world_p = np.einsum("tij,tkj->tki", p.pred_cam_R[c], pj) + p.pred_cam_t[c][:, None]
            world_g = np.einsum("tij,tkj->tki", p.gt_cam_R[c], gj) + p.gt_cam_t[c][:, None]
            if len(pj) >= 2:
                pooled["clip_w_mpjpe"].append(metrics.w_mpjpe(world_p, world_g, chunk=len(pj)) * mm)
                pooled["clip_wa_mpjpe"].append(metrics.wa_mpjpe(world_p, world_g, chunk=len(pj)) * mm)
            if len(pj) >= 4:
                pooled["clip_jerk"].append(metrics.jerk(world_p, fps=fps))
                pooled["clip_jerk_gt"].append(metrics.jerk(world_g, fps=fps))
    out.update({name: _mean(values) for name, values in pooled.items()})
    out.update(_articulation(p, observed))
    total_observed = int(observed.sum())
    if per_joint and total_observed:
        joint_err = np.sum(per_joint, axis=0) / total_observed   # (21,) pooled over both hands
        for j, v in enumerate(joint_err):
            out[f"joint_{j:02d}"] = float(v)
        for finger, idx in FINGERS.items():
            out[f"finger_{finger}"] = float(joint_err[list(idx)].mean())
    out.update(world_metrics(world_sequences(p), fps=fps))
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
    out["valid_hand_frames"] = float(total_observed)
    out["infilled_hand_frames"] = float(hidden.sum())
    return out


def evaluate(model: nn.Module, split: str | Iterable, config: ExperimentConfig, *,
             device: torch.device | None = None, max_batches: int = 0, return_predictions: bool = False,
             hide_rate: float = INFILL_EVAL_RATE, hide_span: int = 1
             ) -> dict[str, float] | tuple[dict[str, float], Predictions]:
    """Evaluate ``model`` on a split name ('val', 'test', 'train') or on a ready loader.

    ``hide_rate`` of the valid hand-frames are hidden from the model for ``mpjpe_infilled`` (see the module
    docstring), in runs of ``hide_span`` frames; 0 hides none.

    Returns:
        Metrics keyed without a split prefix (``mpjpe``, ``pa_mpjpe_left``, ...); with
        ``return_predictions`` also the gathered :class:`Predictions`.
    """
    from hawor_tune.data import build_dataloader

    device = device or next(model.parameters()).device
    loader = build_dataloader(config, split, shuffle=False) if isinstance(split, str) else split
    preds = predict(model, loader, device, precision=config.train.precision, max_batches=max_batches,
                    desc=f"eval {split if isinstance(split, str) else ''}".strip(), hide_rate=hide_rate,
                    hide_span=hide_span)
    result = compute_metrics(preds, fps=DATASET_FPS / config.data.frame_step)
    return (result, preds) if return_predictions else result


def mean_pose_baseline(config: ExperimentConfig, split: str = "val", *,
                       hide_rate: float = INFILL_EVAL_RATE) -> dict[str, float]:
    """Every metric of a baseline that knows only the training set: each hand's mean wrist-relative pose
    placed at that hand's mean camera-frame wrist position, and a static camera (the identity relative
    pose). It sees no ground truth of the evaluated split, so its world metrics compare fairly with the
    model's (which must predict its wrist); its wrist-relative hand metrics do not depend on the placement.
    """
    from hawor_tune.data import build_dataloader
    from hawor_tune.mano import build_mano

    cpu = torch.device("cpu")
    rel_sum, count = torch.zeros(2, 21, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    wrist_sum = torch.zeros(2, 3, dtype=torch.float64)
    rot_sum = torch.zeros(2, 16, 3, 3, dtype=torch.float64)
    for batch in build_dataloader(config, "train", shuffle=False):
        joints, valid = batch["joints3d"].double(), batch["hand_valid"]           # (B, T, 2, 21, 3), (B, T, 2)
        rel = (joints - joints[..., :1, :]) * valid[..., None, None]
        rel_sum += rel.sum(dim=(0, 1))
        wrist_sum += (joints[..., 0, :] * valid[..., None]).sum(dim=(0, 1))
        rot_sum += (batch["rotmats"].double() * valid[..., None, None, None]).sum(dim=(0, 1))
        count += valid.sum(dim=(0, 1))
    if not bool((count > 0).all()):
        raise ValueError("mean-pose baseline: the training split has no valid frame of some hand")
    mean_joints = (rel_sum / count[:, None, None] + (wrist_sum / count[:, None])[:, None]).float()  # (2, 21, 3)
    # The mean rotations: the rotation nearest to the average matrix (its SVD's U V^T, det +1).
    U, _, Vh = torch.linalg.svd(rot_sum / count[:, None, None, None])
    fix = torch.ones_like(rot_sum[..., 0])  # (2, 16, 3)
    fix[..., 2] = torch.linalg.det(U @ Vh).sign()
    mean_rotmats = (U * fix[..., None, :] @ Vh).float()  # (2, 16, 3, 3)
    layers = [build_mano(config.mano, side) for side in HANDS]

    def static_mean(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        B, T = batch["joints3d"].shape[:2]
        eye = torch.eye(3).expand(B, T, 3, 3)
        rotmats = mean_rotmats.expand(B, T, 2, 16, 3, 3)
        gt_shape = torch.stack([layer.joints(rotmats[:, :, h], batch["betas"][:, :, h].float())
                                for h, layer in enumerate(layers)], dim=2)  # (B, T, 2, 21, 3)
        return {"joints": mean_joints.expand(B, T, 2, 21, 3), "cam_R": eye, "cam_t": torch.zeros(B, T, 3),
                "rotmats": rotmats, "joints_gt_shape": gt_shape}

    preds = gather(static_mean, build_dataloader(config, split, shuffle=False), cpu, desc=f"baseline {split}",
                   hide_rate=hide_rate)
    return compute_metrics(preds, fps=DATASET_FPS / config.data.frame_step)


def objective(values: dict[str, float], baseline: dict[str, float], weights: dict[str, float]) -> float:
    """``sum(w * values[m] / baseline[m])`` over ``weights``: each metric as a fraction of the mean-pose
    baseline's on the same split, so that unitless weights compare millimetres with m/s^2 (1.0 per term:
    no better than a static mean hand). nan when a term is nan."""
    return float(sum(w * values[m] / baseline[m] for m, w in weights.items()))


def constraint_values(values: dict[str, float], baseline: dict[str, float], bounds: dict[str, float]) -> dict[str, float]:
    """Per constraint of ``bounds`` (metric -> largest allowed fraction of the baseline's value), its reported
    value ``values[m] / baseline[m] - bound``: <= 0 where it holds, as Optuna's constrained samplers read
    constraints. inf where the metric is not finite (a metric that could not be computed does not hold)."""
    out = {}
    for m, bound in bounds.items():
        ratio = values[m] / baseline[m]
        out[m] = float(ratio - bound) if math.isfinite(ratio) else math.inf
    return out


def cached_baseline(config: ExperimentConfig, split: str = "val") -> dict[str, float]:
    """:func:`mean_pose_baseline`, computed once per dataset and data settings and cached as JSON beside the
    dataset's other caches (every trial of a search normalises its objective by the same figures)."""
    import dataclasses
    import json
    from pathlib import Path

    from hawor_tune.atomic import atomic_write_text, build_once
    from hawor_tune.data.cache import cache_root, spec_key

    data = {k: v for k, v in dataclasses.asdict(config.data).items() if k not in ("batch_size", "num_workers")}
    key = spec_key({"data": data, "mano": dataclasses.asdict(config.mano), "split": split,
                    "hide_rate": INFILL_EVAL_RATE, "version": 1})
    path = cache_root(config.data.cache_dir, config.data.root) / "baselines" / f"{split}-{key}.json"

    def find() -> dict[str, float] | None:
        try:
            return json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None

    def build() -> None:
        atomic_write_text(path, json.dumps(mean_pose_baseline(config, split)))

    return build_once(path, find, build)
