"""Hand boxes for a split without labels, and the clips the model reads from them.

ARCTIC's protocol-p2 test subject has images but no released labels, so its crops cannot come from ground-truth
keypoints: they come from per-frame hand boxes, a hand detector's output, as HaWoR runs on new videos. One JSON
file per sequence, ``<boxes>/<sid>/<seq>.json`` (docs/evaluation.md)::

    {"image_index": [10, 11, ..., 709],          consecutive image numbers: images/<sid>/<seq>/0/%05d.jpg
     "left":  [[x1, y1, x2, y2, score], null, ...],   one entry per image; null: the hand was not detected
     "right": [[x1, y1, x2, y2, score], ...],
     "intrinsics": [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]}   optional, pixels of the stored images

Boxes are in pixels of the images as stored. A box is taken as the hand's keypoint extent, as the labelled
splits' boxes are: its crop has side ``data.crop_scale`` x its larger side. Without ``intrinsics`` the camera
comes from ``raw_seqs/<sid>/<seq>.egocam.dist.npy`` (scaled to the stored images), as for labelled sequences.

:class:`BoxClips` cuts the same inputs as :class:`hawor_tune.data.clips.ArcticClips` (crops from the
original image, crop intrinsics, the low-resolution frame, optical flow) without labels. With
``frame_step`` S > 1 a sequence's images form S interleaved streams (image offsets 0 .. S-1), each clipped
like an evaluation split, so that every image is predicted once at the model's frame rate.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from hawor_tune.data.arctic import (
    EGO_VIEW,
    MISC_FILE,
    _field,
    _frame_geometry,
    _load_npy_dict,
    _read_json,
    _subject_meta,
)
from hawor_tune.data.cache import Letterbox
from hawor_tune.data.clips import _clip_starts
from hawor_tune.data.crop import MIN_BOX_SIDE
from hawor_tune.data.frames import FrameSpec, OnTheFly, SequenceFrames, clip_pixels
from hawor_tune.errors import HaworTuneError
from hawor_tune.mano import HANDS

BOX_ALLOWED = "null, or [x1, y1, x2, y2, score] with x1 < x2, y1 < y2 and 0 <= score <= 1"


class BoxFileError(HaworTuneError, ValueError):
    """A hand-box file or folder is missing or malformed; the message names the file, the key, the value and
    what is allowed."""


@dataclass
class SequenceBoxes:
    """One sequence's hand boxes, read and checked.

    Attributes:
        name: ``"<sid>/<seq>"``.
        path: the box file.
        image_index: (N,) int64 consecutive image numbers.
        boxes: (N, 2, 5) float64 (x1, y1, x2, y2, score) per hand (left, right); nan where no box was given.
        intrinsics: (3, 3) in stored-image pixels, or None (read from the sequence's egocam file).
    """

    name: str
    path: Path
    image_index: np.ndarray
    boxes: np.ndarray
    intrinsics: np.ndarray | None


def box_file(folder: str | os.PathLike, name: str) -> Path:
    """Where the boxes of sequence ``"<sid>/<seq>"`` live under ``folder``."""
    return Path(folder) / f"{name}.json"


def read_box_file(path: str | os.PathLike, name: str) -> SequenceBoxes:
    """Read and check one sequence's box file (format in the module docstring).

    Raises:
        BoxFileError: the file is missing, not JSON, or a key holds a bad value (the message names the file,
            the key, the value and what is allowed).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BoxFileError(f"{path}: no box file for sequence {name} (one JSON file per sequence, "
                           f"<boxes>/<sid>/<seq>.json; docs/evaluation.md)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BoxFileError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise BoxFileError(f"{path}: expected an object with keys image_index, left, right, got {type(data).__name__}")
    allowed = {"image_index", "left", "right", "intrinsics"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise BoxFileError(f"{path}: unknown key {unknown[0]!r}; allowed keys are {sorted(allowed)}")
    index = data.get("image_index")
    if (not isinstance(index, list) or not index
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in index)):
        raise BoxFileError(f"{path}: key 'image_index' is {_short(index)}; allowed: a non-empty list of image "
                           f"numbers (integers >= 0)")
    steps = np.diff(index)
    if (steps != 1).any():
        k = int(np.flatnonzero(steps != 1)[0])
        raise BoxFileError(f"{path}: key 'image_index' goes from {index[k]} to {index[k + 1]} at position {k + 1}; "
                           f"allowed: consecutive image numbers, every image from the first to the last (a frame "
                           f"with no detection gives null boxes)")
    boxes = np.full((len(index), len(HANDS), 5), np.nan)
    for h, hand in enumerate(HANDS):
        entries = data.get(hand)
        if not isinstance(entries, list) or len(entries) != len(index):
            got = f"a list of {len(entries)}" if isinstance(entries, list) else _short(entries)
            raise BoxFileError(f"{path}: key '{hand}' is {got}; allowed: a list of {len(index)} entries, one per "
                               f"image_index, each {BOX_ALLOWED}")
        for k, box in enumerate(entries):
            if box is None:
                continue
            if not _is_box(box):
                raise BoxFileError(f"{path}: key '{hand}'[{k}] (image {index[k]}) is {_short(box)}; allowed: "
                                   f"{BOX_ALLOWED}")
            boxes[k, h] = box
    intrinsics = None
    if "intrinsics" in data:
        K = data["intrinsics"]
        try:
            intrinsics = np.array(K, dtype=np.float64)
        except (TypeError, ValueError):
            intrinsics = None
        if (intrinsics is None or intrinsics.shape != (3, 3) or not np.isfinite(intrinsics).all()
                or intrinsics[0, 0] <= 0 or intrinsics[1, 1] <= 0 or intrinsics[1, 0] or intrinsics[2, 0]
                or intrinsics[2, 1] or intrinsics[2, 2] != 1):
            raise BoxFileError(f"{path}: key 'intrinsics' is {_short(K)}; allowed: [[fx, s, cx], [0, fy, cy], "
                               f"[0, 0, 1]] with fx, fy > 0, in pixels of the stored images")
    return SequenceBoxes(name=name, path=path, image_index=np.asarray(index, dtype=np.int64), boxes=boxes,
                         intrinsics=intrinsics)


def read_boxes(folder: str | os.PathLike, names: Sequence[str]) -> list[SequenceBoxes]:
    """The boxes of every sequence in ``names``, in order, from ``folder``.

    Raises:
        BoxFileError: the folder does not exist, or a sequence's file is missing or malformed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BoxFileError(f"--boxes {folder}: no such folder (it holds one JSON file per sequence, "
                           f"<sid>/<seq>.json; docs/evaluation.md)")
    return [read_box_file(box_file(folder, name), name) for name in names]


def _is_box(box: Any) -> bool:
    if not isinstance(box, list) or len(box) != 5:
        return False
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        return False
    x1, y1, x2, y2, score = box
    return x1 < x2 and y1 < y2 and 0.0 <= score <= 1.0


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, np.ndarray) else str(value.tolist())
    return text if len(text) <= 60 else text[:57] + "..."


# ---- Clips --------------------------------------------------------------------------------------------------

class BoxClips(Dataset):
    """Evaluation clips of unlabelled sequences, with crops cut around given hand boxes.

    Items hold the model's inputs as :class:`~hawor_tune.data.clips.ArcticClips` gives them (``crops``,
    ``crop_K``, ``images``, ``K``, ``hand_valid`` = a box was given, ``flow`` with ``flow_grid``) and where
    each frame belongs: ``seq_index``, ``stream`` (image offset modulo ``frame_step``), ``position`` (T,)
    within the stream, ``image_index`` (T,) and ``scored`` (T,), each image scored in exactly one clip. Each
    frame is prepared from its image as it is read (:class:`hawor_tune.data.frames.OnTheFly`), the bytes the
    labelled splits' shards hold: a sequence is predicted once.

    Args:
        root: ARCTIC ``arctic_data/data`` folder (images, ``meta/misc.json``, egocam files where given).
        boxes: per sequence, from :func:`read_boxes`.
        seq_len, eval_hop, frame_step, frame_size, crop_size, crop_scale, crop_jitter, img_size, flow_grid: as
            ``ArcticClips`` (``crop_jitter`` only sets the prepared crops' margin, as for the labelled splits).

    Raises:
        BoxFileError: an image the boxes name is missing, a sequence has no intrinsics, or a stream is shorter
            than a clip.
    """

    def __init__(self, root: str | os.PathLike, boxes: Sequence[SequenceBoxes], *, seq_len: int, eval_hop: int = 0,
                 frame_step: int = 1, frame_size: int = 224, crop_size: int = 64, crop_scale: float = 1.3,
                 crop_jitter: float = 0.0, img_size: int = 64, flow_grid: int = 0) -> None:
        self.root, self.seq_len, self.frame_step = Path(root), seq_len, frame_step
        self.crop_size, self.img_size, self.flow_grid, self.frame_size = crop_size, img_size, flow_grid, frame_size
        self.spec = FrameSpec.from_data(crop_size=crop_size, crop_jitter=crop_jitter, img_size=img_size,
                                        frame_size=frame_size, flow_grid=flow_grid)
        misc = _read_json(self.root / MISC_FILE)
        sequences = [self._sequence(b, misc, crop_scale) for b in boxes]
        self.source = OnTheFly([seq for seq, _ in sequences], self.spec)
        self._observed = [observed for _, observed in sequences]
        self._to_cam = [Letterbox(seq.width, seq.height, img_size).transform_K(np.eye(3)) for seq, _ in sequences]
        self.names = [b.name for b in boxes]
        self.image_index = [b.image_index for b in boxes]
        self._clips = []  # (sequence, stream, first position, first scored)
        for s, b in enumerate(boxes):
            for stream in range(frame_step):
                n = len(range(stream, len(b.image_index), frame_step))
                starts = _clip_starts(n, seq_len, 1, "test", eval_hop)
                if not starts:
                    raise BoxFileError(f"{b.path}: {len(b.image_index)} images give streams of {n} frames at "
                                       f"data.frame_step {frame_step}, shorter than a clip (data.seq_len "
                                       f"{seq_len}); give boxes for at least {seq_len * frame_step} images")
                self._clips += [(s, stream, p, first) for p, first in starts]

    def _sequence(self, b: SequenceBoxes, misc: dict[str, Any], crop_scale: float) -> tuple[SequenceFrames, np.ndarray]:
        sid, seq = b.name.split("/")
        folder = self.root / "images" / sid / seq / str(EGO_VIEW)
        paths = [folder / f"{i:05d}.jpg" for i in b.image_index]
        missing = next((p for p in paths if not p.is_file()), None)
        if missing is not None:
            raise BoxFileError(f"{b.path}: key 'image_index' names image {missing.stem}, but {missing} does not "
                               f"exist; allowed: the numbers of the sequence's images")
        size, _ = _subject_meta(self.root, misc, sid)
        cam_path = self.root / "raw_seqs" / sid / f"{seq}.egocam.dist.npy"
        if b.intrinsics is None and not cam_path.is_file():
            raise BoxFileError(f"{b.path}: no key 'intrinsics' and no {cam_path} to read the camera from; "
                               f"allowed: add 'intrinsics' [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] in pixels of "
                               f"the stored images")
        K = np.eye(3) if b.intrinsics is not None else _field(cam_path, _load_npy_dict(cam_path), "intrinsics",
                                                             (3, 3), {})
        letterbox, K_img = _frame_geometry(self.root, sid, paths[0], K, size, self.frame_size)  # K at capture size
        if b.intrinsics is not None:
            K_img = b.intrinsics  # given in stored-image pixels already
        # The labelled splits' box rule (hand_boxes), in the letterboxed frame, mapped back to the image.
        to_frame = letterbox.transform_K(np.eye(3))  # stored-image pixels -> letterboxed-frame pixels
        lo, hi = b.boxes[..., :2], b.boxes[..., 2:4]  # (N, 2, 2)
        observed = np.isfinite(b.boxes[..., 0])  # (N, 2)
        centre = (lo + hi) / 2 * to_frame[0, 0] + to_frame[:2, 2]  # the letterbox scales both axes alike
        side = np.maximum((hi - lo).max(-1) * to_frame[0, 0] * crop_scale, MIN_BOX_SIDE)
        # No box: the whole frame, as a labelled hand with too few visible joints gets (it is masked anyway).
        centre = np.where(observed[..., None], centre, (self.frame_size - 1) / 2)
        side = np.where(observed, side, self.frame_size)
        centre = (centre - to_frame[:2, 2]) / np.diag(to_frame)[:2]
        side = side / to_frame[0, 0]
        frames = SequenceFrames(name=b.name, paths=tuple(paths), image_index=b.image_index, width=letterbox.width,
                                height=letterbox.height, K=np.asarray(K_img, np.float64),
                                boxes=np.concatenate([centre, side[..., None]], axis=-1))
        return frames, observed

    def __len__(self) -> int:
        return len(self._clips)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s, stream, p, first_scored = self._clips[index]
        T = self.seq_len
        rows = stream + self.frame_step * np.arange(p, p + T)  # (T,) rows of the sequence's images
        global_rows = int(self.source.start[s]) + rows
        boxes = self.source.boxes[global_rows]
        crops, maps, images, flow = clip_pixels(self.source, global_rows, boxes[..., :2], boxes[..., 2], self.spec)
        K_img = self.source.sequences[s].K
        item = {"crops": torch.from_numpy(crops), "crop_K": torch.from_numpy((maps @ K_img).astype(np.float32)),
                "images": torch.from_numpy(images),
                "K": torch.from_numpy((self._to_cam[s] @ K_img).astype(np.float32)),
                "hand_valid": torch.from_numpy(self._observed[s][rows].copy()),
                "scored": torch.from_numpy(np.arange(T) >= first_scored),
                "seq_index": torch.tensor(s, dtype=torch.int64), "stream": torch.tensor(stream, dtype=torch.int64),
                "position": torch.arange(p, p + T, dtype=torch.int64),
                "image_index": torch.from_numpy(self.image_index[s][rows].copy())}
        if self.flow_grid:
            item["flow"] = torch.from_numpy(flow)
        return item
