"""The clip dataset of one split: labels from :mod:`hawor_tune.data.arctic`, pixels from the prepared form.

Every annotation a clip needs is computed once per sequence when the dataset is built (vectorised MANO calls);
``__getitem__`` slices those arrays and cuts the clip's crops out of its prepared frames
(:func:`hawor_tune.data.frames.clip_pixels`), read from the shards (built on first use, or ahead with
``python -m hawor_tune.data.prepare``) or, with ``prepared=False``, made from the images as it reads them.
Both give the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from hawor_tune.data.arctic import (
    MISC_FILE,
    SKIP_FRAMES,
    SPLITS_FILE,
    DatasetError,
    _read_json,
    load_sequences,
    read_split,
)
from hawor_tune.data.build import ensure_prepared, sequence_frames, window_frames
from hawor_tune.data.cache import Letterbox, read_frame
from hawor_tune.data.crop import jitter_boxes, map_points
from hawor_tune.data.frames import FrameRows, FrameSpec, OnTheFly, clip_pixels
from hawor_tune.mano import MANOLayer


class ArcticClips(Dataset):
    """Clips of ``seq_len`` frames from one split, as the batch dicts of the project spec.

    Each frame gives one ``crop_size`` crop per hand, centred on the hand's visible 2D keypoints (box side
    ``crop_scale`` x their extent; left hands mirrored) and cut from the original image; for the camera branch
    the whole frame letterboxed to ``img_size`` and, with ``flow_grid``, the dense optical flow from the clip's
    first frame to each frame (key ``flow``, :mod:`hawor_tune.data.flow`). Training crops are jittered
    (``crop_jitter``); val/test use the unjittered box, the ground-truth-box protocol of hand-pose benchmarks
    (HaMeR, HaWoR).

    Training clips start every ``stride`` frames. Val/test clips start every ``eval_hop`` frames (half a clip
    by default), each on a frame an earlier clip placed, and the last one is aligned to the sequence's end, so
    every kept frame is evaluated whatever ``seq_len`` is; ``scored`` marks each frame in exactly one clip.

    Args:
        root: ARCTIC ``arctic_data/data`` folder.
        split: 'train', 'val' or 'test'.
        mano: MANO layers for (left, right); the labels' hand model.
        seq_len: frames per clip (after subsampling).
        stride: frames between training clip starts.
        eval_hop: frames between val/test clip starts, 1 .. seq_len - 1; 0: half a clip.
        frame_step: temporal subsampling.
        frame_size: side of the letterboxed frame the labels' 2D keypoints and the flow are computed in.
        crop_size: side of each hand crop.
        crop_scale: box side over the keypoints' extent.
        crop_jitter: random shift (fraction of the side) and scale (1 +- this) of training boxes; the prepared
            crops keep a margin for it, also for val and test, which share the training split's preparation.
        img_size: side of the whole-frame input.
        flow_grid: cells per side of the pooled optical flow; 0 gives no ``flow``.
        min_visible_joints, valid_rule: see :func:`hawor_tune.data.arctic.load_sequence`.
        cache_dir: where the prepared form lives (default: ``<root>/../cache``).
        prepared: read the prepared shards (prepared first where missing) instead of making each frame from its
            image when it is read.
        prepare_workers: processes that prepare missing shards (None: every usable CPU for a large build).
        extra_splits: further splits whose sequences join this one (the final retrain's train + val).
        splits_file: a splits file to read instead of ``splits_json/protocol_p2.json`` (:func:`read_split`).
    """

    def __init__(self, root: str | os.PathLike, split: str, *, mano: Sequence[MANOLayer], seq_len: int,
                 stride: int, eval_hop: int = 0, frame_step: int = 1, frame_size: int = 224, crop_size: int = 64,
                 crop_scale: float = 1.3, crop_jitter: float = 0.0, img_size: int = 64, flow_grid: int = 0,
                 min_visible_joints: int = 8, valid_rule: str = "visible_joints",
                 cache_dir: str | os.PathLike | None = None, prepared: bool = True, prepare_workers: int | None = None,
                 extra_splits: Sequence[str] = (), splits_file: str | os.PathLike | None = None) -> None:
        self.root, self.split, self.seq_len = Path(root), split, seq_len
        self.frame_size, self.crop_size, self.img_size, self.flow_grid = frame_size, crop_size, img_size, flow_grid
        self.crop_scale, self.crop_jitter = crop_scale, crop_jitter if split == "train" else 0.0
        self.spec = FrameSpec.from_data(crop_size=crop_size, crop_jitter=crop_jitter, img_size=img_size,
                                        frame_size=frame_size, flow_grid=flow_grid)
        self.sequences = [name for s in (split, *extra_splits)
                          for name in read_split(self.root, s, splits_file=splits_file)]
        if not self.sequences:
            raise DatasetError(f"{splits_file or self.root / SPLITS_FILE}: split '{split}' has no sequences")
        misc = _read_json(self.root / MISC_FILE)
        labels = load_sequences(self.root, self.sequences, mano=mano, frame_size=frame_size, frame_step=frame_step,
                                min_visible_joints=min_visible_joints, valid_rule=valid_rule, misc=misc)
        counts = [len(lab.frame_index) for lab in labels]
        self._clips = [(s, p, first) for s, n in enumerate(counts)
                       for p, first in _clip_starts(n, seq_len, stride, split, eval_hop)]
        if not self._clips:
            raise DatasetError(f"split '{split}' of {self.root} has no clip of {seq_len} frames: its sequences have "
                               f"at most {max(counts)} frames after skipping {SKIP_FRAMES} image indices at each end and keeping "
                               f"every {frame_step}th; lower data.seq_len or data.frame_step")
        self._offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        keys = ("frame_index", "joints3d", "joints2d", "rotmats", "betas", "hand_valid", "joints_visible",
                "cam_R", "cam_t")
        # One array per field over all frames of the split: cheap to index, shared by forked workers.
        self._frames = {k: np.concatenate([getattr(lab, k) for lab in labels]) for k in keys}
        self._dist = np.stack([lab.dist for lab in labels])  # (S, 8)
        self._paths = [p for lab in labels for p in lab.image_paths]
        self._letterboxes = [lab.letterbox for lab in labels]
        # Per sequence: the letterboxed frame's pixels (the labels') -> the stored image's, the image's K, and
        # the image -> the camera branch's letterboxed frame.
        to_frame = np.stack([lab.letterbox.transform_K(np.eye(3)) for lab in labels])  # (S, 3, 3)
        self._K_frame = np.stack([lab.K for lab in labels]).astype(np.float64)  # (S, 3, 3)
        self._to_image = np.linalg.inv(to_frame)
        self._K_img = self._to_image @ self._K_frame
        self._to_cam = np.stack([Letterbox(lab.letterbox.width, lab.letterbox.height, img_size).transform_K(np.eye(3))
                                 for lab in labels])
        image_index = [np.array([int(p.stem) for p in lab.image_paths], np.int64) for lab in labels]
        self.source: FrameRows
        if prepared:
            self.source = ensure_prepared(self.root, self.sequences, mano=mano, spec=self.spec, crop_scale=crop_scale,
                                          cache_dir=cache_dir, misc=misc, workers=prepare_workers)
        else:
            frames = ([sequence_frames(lab, crop_scale=crop_scale, frame_size=frame_size) for lab in labels]
                      if frame_step == 1 else
                      window_frames(self.root, self.sequences, mano=mano, spec=self.spec, crop_scale=crop_scale, misc=misc))
            self.source = OnTheFly(frames, self.spec)
        self._rows = np.concatenate([self.source.row(s, ix) for s, ix in enumerate(image_index)])  # (frames,)

    def __len__(self) -> int:
        return len(self._clips)

    @property
    def hand_valid(self) -> np.ndarray:
        """(frames, 2) validity of every frame of the split (for statistics)."""
        return self._frames["hand_valid"]

    def frame_with_intrinsics(self, index: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame ``t`` of clip ``index`` letterboxed to frame_size from its image, (S, S, 3) uint8 RGB, and its
        (3, 3) intrinsics (for figures)."""
        s, p, _ = self._clips[index]
        i = int(self._offsets[s]) + p + t
        return cv2.merge(list(read_frame(self._paths[i], self._letterboxes[s]))), self._K_frame[s].copy()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s, p, first_scored = self._clips[index]
        T = self.seq_len
        start = int(self._offsets[s]) + p
        sl = slice(start, start + T)
        rows = self._rows[sl]
        boxes = self.source.boxes[rows]  # (T, 2, 3) image pixels
        centre, side = boxes[..., :2], boxes[..., 2]
        if self.crop_jitter:
            centre, side = jitter_boxes(centre, side, self.crop_jitter, np.random.default_rng(
                int(torch.randint(0, 2**31 - 1, ()).item())))  # drawn from torch's RNG: seeded and checkpointed
        crops, maps, images, flow = clip_pixels(self.source, rows, centre, side, self.spec)
        K_img = self._K_img[s]
        joints2d = self._frames["joints2d"][sl]  # (T, 2, 21, 2) letterboxed-frame pixels
        to_cam = self._to_cam[s] @ self._to_image[s]
        # Intrinsics and keypoints of the unmirrored crop: the model mirrors its left-hand output back.
        joints2d_img = map_points(self._to_image[s], joints2d.astype(np.float64))
        crop_joints2d = np.einsum("thij,thkj->thki", maps[..., :2, :2], joints2d_img) + maps[..., None, :2, 2]
        scored = np.arange(T) >= first_scored
        item = {"crops": torch.from_numpy(crops), "crop_K": torch.from_numpy((maps @ K_img).astype(np.float32)),
                "crop_joints2d": torch.from_numpy(crop_joints2d.astype(np.float32)),
                "images": torch.from_numpy(images),
                "K": torch.from_numpy((self._to_cam[s] @ K_img).astype(np.float32)),
                "joints2d": torch.from_numpy(map_points(to_cam, joints2d).astype(np.float32)),
                "dist": torch.from_numpy(self._dist[s].copy()), "scored": torch.from_numpy(scored)}
        if self.flow_grid:
            item["flow"] = torch.from_numpy(flow)
        for key in ("joints3d", "rotmats", "betas", "hand_valid", "joints_visible", "cam_R", "cam_t"):
            item[key] = torch.from_numpy(self._frames[key][sl].copy())
        item["seq_index"] = torch.tensor(s, dtype=torch.int64)
        item["frame_index"] = torch.from_numpy(self._frames["frame_index"][sl].copy())
        return item


def _clip_starts(frames: int, seq_len: int, stride: int, split: str, hop: int = 0) -> list[tuple[int, int]]:
    """(start, first scored frame) of each clip of one sequence.

    Training clips start every ``stride`` frames and every frame counts. Evaluation clips start every ``hop``
    frames (0: half a clip), so that each clip starts on a frame an earlier clip has placed: the sequence's
    camera path is chained through predicted poses alone, never guessed across a junction. The first clip scores all its
    frames, each later one its frames past the previous clip's end (its second half); when the hops do not
    reach the sequence's end, one more clip is aligned to it. Each frame is scored exactly once. A smaller hop
    gives each frame more clips' predictions to blend (:func:`hawor_tune.evaluation.world_sequences`), at the
    cost of more clips to run.
    """
    if frames < seq_len:
        return []
    if split == "train":
        return [(p, 0) for p in range(0, frames - seq_len + 1, stride)]
    hop = max(1, min(hop, seq_len - 1)) if hop > 0 else max(1, seq_len // 2)
    starts = [(0, 0)] + [(p, seq_len - hop) for p in range(hop, frames - seq_len + 1, hop)]
    covered = starts[-1][0] + seq_len
    if covered < frames:
        starts.append((frames - seq_len, seq_len - (frames - covered)))
    return starts
