"""One frame made ready for the model, once: each hand's crop with a margin, the camera branch's frame, the flow.

HaMeR and HaWoR cut each hand's crop from the original image. A frame is prepared from its full-resolution
JPEG (:func:`prepare_rows`) into:

- ``left.jpg``, ``right.jpg``: each hand's crop at ``crop_size + 2 * margin`` pixels, at the density of the
  unjittered training crop (``crop_size`` pixels across the box around the hand's visible 2D keypoints), the
  margin wide enough for every box the training jitter draws (:func:`crop_margin`). Unmirrored.
- ``cam.jpg``: the whole frame letterboxed to ``img_size``, the camera branch's input.
- ``flow.npy``: the pooled optical flow to it from the frames 1, 2, 4 and 8 before it in the sequence (zero
  where there is none), computed on the frames letterboxed to ``frame_size`` (:mod:`hawor_tune.data.flow`).
- ``json``: the image, its index, and each hand's box and stored-crop map (for readers other than this one).

The loader then cuts the model's crop from the stored one (:func:`cut_crops`): with the jitter for training,
without it (an exact integer shift, no resampling) for evaluation. Every map is an affine map of pixel
coordinates (pixel centres at integers, OpenCV's convention), so a crop's intrinsics stay exact: the crop map
times the stored image's K, whatever the resampling did to the pixels.

A full-size ARCTIC frame (2800 x 2000) takes most of the preparation's time to decode. libjpeg decodes at 1/2,
1/4 or 1/8 of the size in the DCT for far less (OpenCV's ``IMREAD_REDUCED_COLOR_*``); a frame is decoded at
the smallest size that still has at least one pixel for every pixel of its densest crop and of the letterboxed
frames (:func:`choose_reduction`). A reduced pixel ``i`` covers original pixels ``r i .. r i + r - 1``, so it
maps by ``u_r = (u + 0.5) / r - 0.5``, the same convention as ``cv2.resize``.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from hawor_tune.data.cache import CacheError, Letterbox, decode_image
from hawor_tune.data.crop import crop_matrix, unflip_matrix
from hawor_tune.data.flow import FLOW_STRIDES, flow_path, pair_flow

# Bump when a prepared frame's content or the shard layout changes: old shards are then prepared again, and the
# artefacts made from them (the pretrained start, the flow-head fit) made again.
PREPARED_VERSION = 1
# JPEG quality of the stored crops and frames: at 95 a photograph's crops would take ARCTIC's p2 splits to
# about 25 GB; 90 leaves room (benchmarks/bench_prepare.py prints the bytes a photograph's crop takes).
JPEG_QUALITY = 90
MEMBERS = ("left.jpg", "right.jpg", "cam.jpg", "flow.npy", "json")
MIN_MARGIN_JITTER = 0.1  # data.crop_jitter's default
_REDUCTIONS = (8, 4, 2)  # OpenCV's IMREAD_REDUCED_COLOR_* factors, largest first
_READ_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
               8: cv2.IMREAD_REDUCED_COLOR_8}
_AREA_BELOW = 0.75  # shrinking by more than this averages areas first: a bilinear warp alone would alias


@dataclass(frozen=True)
class FrameSpec:
    """What a prepared frame holds; every field is part of the prepared form's key."""

    crop_size: int  # the model's crop side
    margin: int  # stored pixels on each side of the unjittered crop
    img_size: int  # the camera branch's letterboxed frame
    frame_size: int  # the letterboxed frame the flow is computed on
    flow_grid: int  # cells per side of the pooled flow (0: none)
    quality: int = JPEG_QUALITY

    @classmethod
    def from_data(cls, *, crop_size: int, crop_jitter: float, img_size: int, frame_size: int,
                  flow_grid: int) -> FrameSpec:
        """The spec of the ``data`` settings: the margin is that of ``crop_jitter`` (:func:`crop_margin`)."""
        return cls(crop_size=crop_size, margin=crop_margin(crop_size, crop_jitter), img_size=img_size,
                   frame_size=frame_size, flow_grid=flow_grid)

    @property
    def stored_size(self) -> int:
        """Side of a stored hand crop."""
        return self.crop_size + 2 * self.margin


def crop_margin(crop_size: int, jitter: float) -> int:
    """Stored pixels needed on each side of a ``crop_size`` crop for every box the jitter draws.

    :func:`hawor_tune.data.crop.jitter_boxes` shifts a box of side s by up to ``jitter * s`` on each axis and
    scales it by up to ``1 + jitter``: it reaches ``s (1/2 + 3 jitter / 2)`` from the centre, ``1.5 jitter s``
    beyond the unjittered box, which is ``1.5 jitter crop_size`` stored pixels. Never less than the margin of
    :data:`MIN_MARGIN_JITTER`, so that a run without jitter (the flow-head fit, an evaluation) reads the same
    shards as a training with the default jitter.
    """
    return math.ceil(1.5 * max(jitter, MIN_MARGIN_JITTER) * crop_size - 1e-9)


def stored_map(centre: np.ndarray, side: float, spec: FrameSpec) -> np.ndarray:
    """(3, 3) map from image pixels to the stored crop of the box (``centre``, ``side``): the unjittered
    crop's density, the box centre at the stored crop's centre."""
    return crop_matrix(centre, side * spec.stored_size / spec.crop_size, spec.stored_size)


def choose_reduction(width: int, height: int, sides: np.ndarray, spec: FrameSpec) -> int:
    """The largest factor (8, 4, 2, else 1) an image can be decoded smaller by and still have a pixel for
    every stored pixel of each hand's crop (boxes of ``sides`` image pixels) and of the letterboxed frames.
    Only factors that divide both sides, so that the reduced image is an exact downscale."""
    need = spec.crop_size / float(np.min(sides))  # stored pixels per image pixel of the densest crop
    for r in _REDUCTIONS:
        if (width % r == 0 and height % r == 0 and need * r <= 1.0
                and max(width, height) / r >= max(spec.frame_size, spec.img_size)):
            return r
    return 1


def _reduce_map(r: int) -> np.ndarray:
    """(3, 3) image pixels -> pixels of the image decoded at 1/r."""
    return np.array([[1.0 / r, 0.0, 0.5 / r - 0.5], [0.0, 1.0 / r, 0.5 / r - 0.5], [0.0, 0.0, 1.0]])


def warp(image: np.ndarray, A: np.ndarray, size: int) -> np.ndarray:
    """Resample an (H, W, 3) uint8 image through the map ``A`` (3, 3, a uniform scale and a shift) into
    (size, size, 3); black outside the image.

    When ``A`` shrinks by more than ``_AREA_BELOW``, the part of the image the output covers is first
    area-averaged (``cv2.INTER_AREA``) to about the output's density; a near-identity bilinear warp then places
    it exactly.
    """
    a = float(A[0, 0])
    if a >= _AREA_BELOW:
        return cv2.warpAffine(image, A[:2], (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    h, w = image.shape[:2]
    inv = np.linalg.inv(A)
    lo = inv[:2, :2] @ np.array([-0.5, -0.5]) + inv[:2, 2]
    hi = inv[:2, :2] @ np.array([size - 0.5, size - 0.5]) + inv[:2, 2]
    x0, y0 = max(0, math.floor(lo[0]) - 1), max(0, math.floor(lo[1]) - 1)
    x1, y1 = min(w, math.ceil(hi[0]) + 2), min(h, math.ceil(hi[1]) + 2)
    if x1 <= x0 or y1 <= y0:  # the output lies wholly outside the image
        return np.zeros((size, size, 3), np.uint8)
    pw, ph = max(1, round((x1 - x0) * a)), max(1, round((y1 - y0) * a))
    small = cv2.resize(image[y0:y1, x0:x1], (pw, ph), interpolation=cv2.INTER_AREA)
    sx, sy = pw / (x1 - x0), ph / (y1 - y0)
    B = np.array([[sx, 0.0, sx * (0.5 - x0) - 0.5], [0.0, sy, sy * (0.5 - y0) - 0.5], [0.0, 0.0, 1.0]])
    M = A @ np.linalg.inv(B)  # (3, 3) area-averaged pixels -> output pixels, a scale within 1/pw of 1
    return cv2.warpAffine(small, M[:2], (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def _encode(image: np.ndarray, quality: int, what: str) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise CacheError(f"cannot encode {what} as JPEG")
    return data.tobytes()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@dataclass(frozen=True)
class SequenceFrames:
    """What the preparation needs of one sequence: every frame of ARCTIC's window, and each hand's box."""

    name: str  # "<sid>/<seq>"
    paths: tuple[Path, ...]  # (N,) the images, in order
    image_index: np.ndarray  # (N,) int64 their numbers
    width: int  # stored image size
    height: int
    K: np.ndarray  # (3, 3) intrinsics of the stored images
    boxes: np.ndarray  # (N, 2, 3) float64 per hand (left, right): centre x, y and side, stored-image pixels

    def letterbox(self, size: int) -> Letterbox:
        return Letterbox(self.width, self.height, size)

    def flow_focal(self, spec: FrameSpec) -> float:
        """Focal length of the frame letterboxed to ``frame_size``, the flow's unit."""
        return float(self.letterbox(spec.frame_size).transform_K(self.K)[0, 0])


def _letterboxed(content: np.ndarray, box: Letterbox) -> np.ndarray:
    """An image already resized to ``box.resized``, padded black into the ``box.size`` square."""
    pad_x, pad_y = box.pad
    w, h = box.resized
    return cv2.copyMakeBorder(content, pad_y, box.size - h - pad_y, pad_x, box.size - w - pad_x,
                              cv2.BORDER_CONSTANT, value=0)


class _Decoded:
    """One row decoded (at its reduction) with its grey flow frame."""

    def __init__(self, seq: SequenceFrames, row: int, spec: FrameSpec) -> None:
        self.reduce = choose_reduction(seq.width, seq.height, seq.boxes[row, :, 2], spec)
        self.image = decode_image(seq.paths[row], seq.width, seq.height, _READ_FLAGS[self.reduce], self.reduce)
        frame_box = seq.letterbox(spec.frame_size)
        self.content = cv2.resize(self.image, frame_box.resized, interpolation=cv2.INTER_AREA)  # BGR
        self.grey = _letterboxed(cv2.cvtColor(self.content, cv2.COLOR_BGR2GRAY), frame_box) if spec.flow_grid else None


def prepare_rows(seq: SequenceFrames, spec: FrameSpec, rows: Sequence[int] | None = None
                 ) -> Iterator[tuple[int, dict[str, bytes]]]:
    """Prepare frames of one sequence: each row's members (:data:`MEMBERS`) as bytes, in row order.

    A row's ``flow.npy`` is (len(FLOW_STRIDES), 2, G, G) float16: the pair flow from the frame ``stride`` rows
    before it to it, for each stride of :data:`hawor_tune.data.flow.FLOW_STRIDES` (zero where there is no such
    frame).

    Args:
        seq: the sequence.
        spec: what to make.
        rows: which rows (increasing); None: all. A row's flows need the rows before it, decoded as their own
            preparation decodes them, so any subset gives the bytes the whole sequence gives.

    Raises:
        CacheError: an image is missing, does not decode, or has the wrong size (the message names it).
    """
    rows = range(len(seq.paths)) if rows is None else rows
    focal = seq.flow_focal(spec) if spec.flow_grid else 0.0
    cam_box = seq.letterbox(spec.img_size)
    decoded: dict[int, _Decoded] = {}  # the rows a later row's flows still need

    def get(row: int) -> _Decoded:
        if row not in decoded:
            decoded[row] = _Decoded(seq, row, spec)
        return decoded[row]

    for row in rows:
        current = get(row)
        flow = np.zeros((len(FLOW_STRIDES), 2, spec.flow_grid, spec.flow_grid), np.float16)
        for j, stride in enumerate(FLOW_STRIDES):
            if spec.flow_grid and row >= stride:
                flow[j] = pair_flow(get(row - stride).grey, current.grey, focal, spec.flow_grid)
        R = _reduce_map(current.reduce)
        members, hands = {}, {}
        for h, hand in enumerate(("left", "right")):
            (cx, cy, side) = seq.boxes[row, h]
            A = stored_map(np.array([cx, cy]), side, spec)
            crop = warp(current.image, A @ np.linalg.inv(R), spec.stored_size)
            members[f"{hand}.jpg"] = _encode(crop, spec.quality, f"the {hand} crop of {seq.paths[row]}")
            hands[hand] = {"box": [float(cx), float(cy), float(side)], "map": A[:2].tolist()}
        # The camera frame from the flow frame's content when that is larger: one area-average fewer.
        source = current.content if spec.frame_size >= spec.img_size else current.image
        cam = _letterboxed(cv2.resize(source, cam_box.resized, interpolation=cv2.INTER_AREA), cam_box)
        members["cam.jpg"] = _encode(cam, spec.quality, f"the camera frame of {seq.paths[row]}")
        members["flow.npy"] = _npy(flow)
        members["json"] = json.dumps({"sequence": seq.name, "image": os.path.join(*seq.paths[row].parts[-4:]),
                                      "image_index": int(seq.image_index[row]), "reduce": current.reduce,
                                      "flow_strides": list(FLOW_STRIDES), **hands}).encode()
        yield row, members
        current.image = current.content = None  # only its grey frame is needed from here on
        for old in [r for r in decoded if r <= row - max(FLOW_STRIDES)]:
            del decoded[old]


# ---- Reading prepared frames --------------------------------------------------------------------------------

def decode_jpeg(data: bytes, what: str) -> np.ndarray:
    """A stored JPEG as (H, W, 3) uint8 BGR.

    Raises:
        CacheError: it does not decode (``what`` names where it came from).
    """
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise CacheError(f"{what} does not decode as JPEG: the prepared file is damaged; delete it and run again "
                         f"to prepare it anew")
    return image


def read_flow(data: bytes, what: str) -> np.ndarray:
    """A stored row's pair flows, (len(FLOW_STRIDES), 2, G, G) float16."""
    try:
        return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CacheError(f"{what} is not a readable .npy ({e}): the prepared file is damaged; delete it and run "
                         f"again to prepare it anew") from None


class FrameRows:
    """Prepared frames of some sequences, numbered together: rows of sequence ``s`` are
    ``start[s] .. start[s] + count[s] - 1``, in image order, each with its hands' boxes (stored-image pixels).
    Subclasses read a row's members (:meth:`read_rows`): from shards, or made when asked."""

    def __init__(self, names: Sequence[str], image_index: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> None:
        self.names = list(names)
        counts = [len(ix) for ix in image_index]
        self.start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.count = np.array(counts, np.int64)
        self.image_index = np.concatenate(image_index).astype(np.int64)
        self.boxes = np.concatenate(boxes).astype(np.float64)  # (rows, 2, 3)
        self.sequence_of_row = np.repeat(np.arange(len(counts)), counts)

    def row(self, sequence: int, image_index: np.ndarray) -> np.ndarray:
        """Rows of sequence number ``sequence``'s frames with these image indices.

        Raises:
            CacheError: a frame is not there (the shard was prepared from another version of the dataset).
        """
        s0, n = int(self.start[sequence]), int(self.count[sequence])
        own = self.image_index[s0:s0 + n]
        pos = np.searchsorted(own, image_index)
        if n == 0 or np.any(pos >= n) or np.any(own[np.minimum(pos, n - 1)] != image_index):
            raise CacheError(f"the prepared frames of {self.names[sequence]} do not hold every frame the dataset "
                             f"reads ({self.where(sequence)}); delete them and run again to prepare them anew")
        return s0 + pos

    def where(self, sequence: int) -> str:
        """Where sequence number ``sequence``'s frames come from, for messages."""
        return "made from the images"

    def read_rows(self, wanted: dict[int, Sequence[str]]) -> dict[int, dict[str, bytes]]:
        """The bytes of the members ``wanted[row]`` of each row (rows of one sequence)."""
        raise NotImplementedError


class OnTheFly(FrameRows):
    """Frames prepared when read, from the dataset's images: the bytes a shard would hold, without one."""

    def __init__(self, sequences: Sequence[SequenceFrames], spec: FrameSpec) -> None:
        super().__init__([s.name for s in sequences], [s.image_index for s in sequences], [s.boxes for s in sequences])
        self.sequences, self.spec = list(sequences), spec

    def read_rows(self, wanted: dict[int, Sequence[str]]) -> dict[int, dict[str, bytes]]:
        rows = sorted(wanted)
        s = int(self.sequence_of_row[rows[0]])
        s0 = int(self.start[s])
        made = dict(prepare_rows(self.sequences[s], self.spec, [r - s0 for r in rows]))
        return {r: {m: made[r - s0][m] for m in wanted[r]} for r in rows}


def clip_pixels(source: FrameRows, rows: np.ndarray, centre: np.ndarray, side: np.ndarray, spec: FrameSpec
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The model's pixel inputs of one clip of a sequence.

    Args:
        source: where the prepared frames come from.
        rows: (T,) increasing rows of the clip's frames (one sequence; steps of ``data.frame_step``).
        centre, side: (T, 2, 2), (T, 2) the boxes to cut (``source.boxes[rows]``, jittered for training).
        spec: the prepared form's spec.

    Returns:
        crops (T, 2, 3, C, C) uint8 RGB (left mirrored), maps (T, 2, 3, 3) image pixels -> unmirrored crop,
        images (T, 3, I, I) uint8 RGB, and flow (T, 2, G, G) float32 from the clip's first frame (the stored pair
        flows summed along :func:`hawor_tune.data.flow.flow_path`, over rows, so also across the frames a
        ``frame_step`` skips), or None without a flow grid.
    """
    rows = [int(r) for r in rows]
    wanted: dict[int, list[str]] = {r: ["left.jpg", "right.jpg", "cam.jpg"] for r in rows}
    flow_rows = {rows[0] + start + stride for r in rows for start, stride in flow_path(r - rows[0])}
    for r in flow_rows if spec.flow_grid else ():
        wanted.setdefault(r, []).append("flow.npy")
    got = source.read_rows(wanted)
    what = f"a prepared frame of {source.names[int(source.sequence_of_row[rows[0]])]}"
    stored = [[decode_jpeg(got[r]["left.jpg"], what), decode_jpeg(got[r]["right.jpg"], what)] for r in rows]
    crops, maps = cut_crops(stored, source.boxes[rows], centre, side, spec)
    images = np.stack([cv2.cvtColor(decode_jpeg(got[r]["cam.jpg"], what), cv2.COLOR_BGR2RGB).transpose(2, 0, 1)
                       for r in rows])
    stored_flows = {r: read_flow(got[r]["flow.npy"], what) for r in flow_rows} if spec.flow_grid else {}
    flow = None
    if spec.flow_grid:
        flow = np.zeros((len(rows), 2, spec.flow_grid, spec.flow_grid), np.float32)
        for t, row in enumerate(rows):
            for start, stride in flow_path(row - rows[0]):
                end = rows[0] + start + stride  # a pair's flow is stored with its later frame
                flow[t] += stored_flows[end][FLOW_STRIDES.index(stride)]
    return crops, maps, images, flow


def cut_crops(stored: Sequence[Sequence[np.ndarray]], boxes: np.ndarray, centre: np.ndarray, side: np.ndarray,
              spec: FrameSpec) -> tuple[np.ndarray, np.ndarray]:
    """The model's crops of a clip from the stored ones.

    Args:
        stored: T x 2 (left, right) stored crops, (S, S, 3) uint8 BGR.
        boxes: (T, 2, 3) the boxes the stored crops were cut around (centre x, y, side; image pixels).
        centre, side: (T, 2, 2), (T, 2) the boxes to cut (jittered, or ``boxes`` themselves), within the margin.
        spec: the prepared form's spec.

    Returns:
        crops (T, 2, 3, C, C) uint8 RGB, left hands mirrored; and (T, 2, 3, 3) float64 maps from image pixels to
        each unmirrored crop (times the image's K: the crop's intrinsics).
    """
    T, C = len(stored), spec.crop_size
    crops = np.empty((T, 2, 3, C, C), dtype=np.uint8)
    maps = np.empty((T, 2, 3, 3))
    for t in range(T):
        for h in range(2):
            A = crop_matrix(centre[t, h], float(side[t, h]), C, flip=h == 0)  # left hands mirrored
            M = A @ np.linalg.inv(stored_map(boxes[t, h, :2], float(boxes[t, h, 2]), spec))
            crop = cv2.warpAffine(stored[t][h], M[:2], (C, C), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
            crops[t, h] = cv2.cvtColor(crop, cv2.COLOR_BGR2RGB).transpose(2, 0, 1)
            maps[t, h] = unflip_matrix(C) @ A if h == 0 else A
    return crops, maps
