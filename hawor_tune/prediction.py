"""Predictions for a split without labels: hands and camera per sequence and image, from given hand boxes.

ARCTIC's protocol-p2 test labels go through its leaderboard, so such a split cannot be scored here; it can be
predicted. :func:`predict_from_boxes` runs the model over :class:`hawor_tune.data.boxes.BoxClips` and writes one
``.npz`` per sequence under ``out_dir/<sid>/<seq>.npz`` (atomically) and ``out_dir/index.json``. Per image
(``N`` images of the box file, in order), both hands, camera frame, metres:

- ``image_index`` (N,) int64; ``stream`` (N,) int64: image offset modulo ``data.frame_step``.
- ``<hand>_rot`` (N, 3) global orientation, axis-angle; ``<hand>_pose`` (N, 45) finger rotations, axis-angle
  relative to MANO's ``hands_mean`` (ARCTIC's ``mano.npy`` convention, smplx ``flat_hand_mean=False``);
  ``<hand>_shape`` (N, 10) betas; ``<hand>_trans`` (N, 3) the translation a MANO layer adds to its output
  (smplx's ``transl``, the ``cam_t`` of ARCTIC's leaderboard files). The left hand is in the convention of the
  official MANO_LEFT.pkl as stored (:data:`hawor_tune.mano.FIX_LEFT_SHAPEDIRS`), ARCTIC's.
- ``<hand>_joints`` (N, 21, 3) camera-frame joints, OpenPose order (:data:`hawor_tune.mano.OPENPOSE_ORDER`).
- ``<hand>_observed`` (N,) bool: a box was given (else the infiller filled the hand); ``<hand>_bridged`` (N,)
  bool: no clip around the image saw the hand, so it was interpolated in the first camera between the nearest
  images one did (a hand lost for longer than a clip); ``<hand>_box`` (N, 5).
- ``cam_R`` (N, 3, 3), ``cam_t`` (N, 3): camera n in the first camera of its stream, ``X_first = R X_n + t``;
  clips are chained as the evaluation chains them (:func:`hawor_tune.evaluation.world_sequences`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from hawor_tune.atomic import atomic_write, atomic_write_text
from hawor_tune.config import ExperimentConfig
from hawor_tune.data import ensure_dataset, read_split
from hawor_tune.data.boxes import BoxClips, SequenceBoxes, read_boxes
from hawor_tune.evaluation import Predictions, world_sequences
from hawor_tune.geometry import matrix_to_axis_angle
from hawor_tune.mano import HANDS, build_mano
from hawor_tune.model import interpolate_observed, run_model, slerp_observed
from hawor_tune.runtime import autocast, autocast_dtype, to_device

INDEX_FILE = "index.json"
FORMAT = "hawor-tune predictions 1"


def split_boxes(cfg: ExperimentConfig, split: str, boxes_dir: str | os.PathLike) -> list[SequenceBoxes]:
    """Read and check the boxes of every sequence of ``split`` (labelled or not) before anything runs.

    Raises:
        BoxFileError: the folder, a file or a value is missing or malformed.
    """
    root = ensure_dataset(cfg)
    return read_boxes(boxes_dir, read_split(root, split, splits_file=cfg.data.splits or None, labelled=False))


def build_box_clips(cfg: ExperimentConfig, boxes: list[SequenceBoxes]) -> BoxClips:
    """The :class:`BoxClips` of ``boxes`` with ``cfg.data``'s clip, crop and frame settings."""
    d = cfg.data
    return BoxClips(ensure_dataset(cfg), boxes, seq_len=d.seq_len, eval_hop=d.eval_hop, frame_step=d.frame_step,
                    frame_size=d.frame_size, crop_size=d.crop_size, crop_scale=d.crop_scale,
                    crop_jitter=d.crop_jitter, img_size=d.img_size, flow_grid=d.flow_grid)


@torch.no_grad()
def predict_from_boxes(model: nn.Module, cfg: ExperimentConfig, boxes: list[SequenceBoxes],
                       out_dir: str | os.PathLike, *, split: str = "test",
                       device: torch.device | None = None) -> Path:
    """Predict every image of ``boxes`` and write the files described in the module docstring.

    Args:
        model: a trained model.
        cfg: its config (clip length, crops, frames, MANO).
        boxes: per sequence, from :func:`split_boxes`.
        out_dir: folder for ``<sid>/<seq>.npz`` and ``index.json``.
        split: the split's name, recorded in ``index.json``.
        device: where to run (default: the model's).

    Returns:
        ``out_dir/index.json``.
    """
    out_dir = Path(out_dir)
    device = device or next(model.parameters()).device
    dataset = build_box_clips(cfg, boxes)
    loader = DataLoader(dataset, batch_size=cfg.data.batch_size, shuffle=False, num_workers=cfg.data.num_workers)
    amp = autocast_dtype(device, cfg.train.precision)
    model.eval()
    keys = ("joints", "rotmats", "betas", "root", "cam_R", "cam_t")
    got: dict[str, list[np.ndarray]] = {k: [] for k in (*keys, "observed", "scored", "seq_index", "stream", "position")}
    for batch in loader:
        with autocast(device, amp):
            out = run_model(model, to_device(batch, device))
        for k in keys:
            got[k].append(getattr(out, k).detach().double().cpu().numpy())
        got["observed"].append(batch["hand_valid"].numpy())
        for k in ("scored", "seq_index", "stream", "position"):
            got[k].append(batch[k].numpy())
    clips = {k: np.concatenate(v) for k, v in got.items()}
    layers = [build_mano(cfg.mano, side) for side in HANDS]  # the network's convention, by the same call
    written = {}
    for s, seq_boxes in enumerate(boxes):
        arrays = _sequence_arrays(clips, s, cfg.data.frame_step, seq_boxes, layers)
        path = out_dir / f"{seq_boxes.name}.npz"
        atomic_write(path, lambda tmp, a=arrays: _savez(tmp, a))
        written[seq_boxes.name] = path.relative_to(out_dir).as_posix()
    index = {"format": FORMAT, "split": split, "sequences": written,
             "frame_step": cfg.data.frame_step, "seq_len": cfg.data.seq_len,
             "keys": "see hawor_tune/prediction.py and docs/evaluation.md"}
    return atomic_write_text(out_dir / INDEX_FILE, json.dumps(index, indent=1))


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:  # a file object: np.savez would add '.npz' to the temporary name
        np.savez_compressed(fh, **arrays)


def _sequence_arrays(clips: dict[str, np.ndarray], s: int, frame_step: int, boxes: SequenceBoxes,
                     layers: list[Any]) -> dict[str, np.ndarray]:
    """One sequence's per-image arrays from the clips' outputs.

    Each image's hand comes from the clip that scores the image when that clip observes the hand somewhere,
    else from the clip covering the image nearest its centre that does (the evaluation's rule: a clip that sees
    a hand nowhere has no neighbour to fill it from). Images no such clip covers (a hand lost for longer than a
    clip) are ``bridged``: the hand interpolated in the stream's first camera between the nearest images that
    are not (slerp for rotations), as the evaluation bridges its world joints.
    """
    n = len(boxes.image_index)
    rows = np.arange(n)
    T = clips["position"].shape[1]
    centrality = -np.abs(np.arange(T) - (T - 1) / 2)  # (T,) higher nearer the clip's centre
    sees = clips["observed"].any(axis=1)  # (C, 2) each clip observes each hand somewhere
    out: dict[str, np.ndarray] = {"image_index": boxes.image_index.copy(), "stream": rows % frame_step}
    pick = np.full((n, 2, 2), -1)  # (image, hand) -> (clip, t)
    best = np.full((n, 2), -np.inf)  # (image, hand) -> how well the pick suits: scoring first, then centrality
    scoring = np.full((n, 2), -1)  # image -> (clip, t) that scores it
    cam_R, cam_t = np.zeros((n, 3, 3)), np.zeros((n, 3))
    for stream in range(frame_step):
        mine = np.flatnonzero((clips["seq_index"] == s) & (clips["stream"] == stream))  # this stream's clips
        for c in mine:
            for t, pos in enumerate(clips["position"][c]):
                row = stream + frame_step * pos
                if clips["scored"][c, t]:
                    scoring[row] = (c, t)
                rank = np.where(sees[c], centrality[t] + (T if clips["scored"][c, t] else 0), -np.inf)  # (2,)
                better = rank > best[row]
                pick[row, better] = (c, t)
                best[row] = np.maximum(best[row], rank)
        # The evaluation's chaining of a sequence's clips, on this stream's predicted cameras alone.
        C = len(mine)
        chained = world_sequences(Predictions(
            pred_joints=clips["joints"][mine], gt_joints=np.zeros_like(clips["joints"][mine]),
            valid=np.zeros((C, T, 2), dtype=bool), pred_cam_R=clips["cam_R"][mine], pred_cam_t=clips["cam_t"][mine],
            gt_cam_R=np.broadcast_to(np.eye(3), (C, T, 3, 3)), gt_cam_t=np.zeros((C, T, 3)),
            world_to_cam_R=np.broadcast_to(np.eye(3), (C, T, 3, 3)), world_to_cam_t=np.zeros((C, T, 3)),
            seq_index=np.zeros(C, dtype=np.int64), frame_index=clips["position"][mine],
            scored=clips["scored"][mine]))[0]
        at = stream + frame_step * chained.frame_index  # (n_stream,) rows of this stream's images
        cam_R[at], cam_t[at] = chained.pred_cam_to_world[:, :3, :3], chained.pred_cam_to_world[:, :3, 3]
    assert (scoring >= 0).all(), "every image is scored in exactly one clip"
    bridged = best == -np.inf  # (n, 2)
    pick[bridged] = scoring[np.nonzero(bridged)[0]]  # its values are interpolated over below
    out["cam_R"], out["cam_t"] = cam_R.astype(np.float32), cam_t.astype(np.float32)
    for h, (hand, layer) in enumerate(zip(HANDS, layers)):
        c, t = pick[:, h, 0], pick[:, h, 1]
        R, betas, root = _bridged_hand(clips["rotmats"][c, t, h], clips["betas"][c, t, h], clips["root"][c, t, h],
                                       bridged[:, h], cam_R, cam_t, out["stream"])
        aa = matrix_to_axis_angle(torch.from_numpy(R)).numpy()  # (n, 16, 3)
        with torch.no_grad():
            joints = layer.joints(torch.from_numpy(R).float(), torch.from_numpy(betas).float()).double().numpy()
        trans = root - joints[:, 0]
        out[f"{hand}_rot"] = aa[:, 0].astype(np.float32)
        out[f"{hand}_pose"] = (aa[:, 1:].reshape(n, 45) - layer.hands_mean.double().numpy()).astype(np.float32)
        out[f"{hand}_shape"] = betas.astype(np.float32)
        out[f"{hand}_trans"] = trans.astype(np.float32)
        out[f"{hand}_joints"] = np.where(bridged[:, h, None, None], joints + trans[:, None],
                                         clips["joints"][c, t, h]).astype(np.float32)
        out[f"{hand}_observed"] = clips["observed"][c, t, h]
        out[f"{hand}_bridged"] = bridged[:, h]
        out[f"{hand}_box"] = boxes.boxes[:, h].astype(np.float32)
    return out


def _bridged_hand(R: np.ndarray, betas: np.ndarray, root: np.ndarray, bridged: np.ndarray, cam_R: np.ndarray,
                  cam_t: np.ndarray, stream: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, 16, 3, 3) rotations, (n, 10) betas, (n, 3) camera-frame wrists of one hand, (n,) bool, each image's
    camera in its stream's first camera and its stream -> the same with each stream's bridged images
    interpolated between its others in that first camera (a still hand stays still while the head turns)."""
    R, betas, root = R.copy(), betas.copy(), root.copy()
    for k in np.unique(stream):
        rows = np.flatnonzero(stream == k)
        seen = torch.from_numpy(~bridged[rows])[None, :, None]  # (1, N, 1)
        if not bridged[rows].any() or not seen.any():
            continue
        Rw = torch.from_numpy(R[rows])
        Rw[:, 0] = torch.from_numpy(cam_R[rows]) @ Rw[:, 0]  # global orientation into the first camera
        wrist = np.einsum("nij,nj->ni", cam_R[rows], root[rows]) + cam_t[rows]
        Rw = slerp_observed(Rw[None, :, None], seen)[0, :, 0]
        rest = interpolate_observed(torch.from_numpy(np.concatenate([betas[rows], wrist], axis=1))[None, :, None],
                                    seen)[0, :, 0].numpy()
        Rw[:, 0] = torch.from_numpy(cam_R[rows]).transpose(-1, -2) @ Rw[:, 0]
        R[rows], betas[rows] = Rw.numpy(), rest[:, :-3]
        root[rows] = np.einsum("nji,nj->ni", cam_R[rows], rest[:, -3:] - cam_t[rows])  # R^T (x - t)
    return R, betas, root
