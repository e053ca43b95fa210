"""Dense optical flow of the background: the camera branch's view of the camera's motion.

HaWoR does not read the camera's motion off a low-resolution frame: it runs DROID-SLAM, whose updates are
dense optical flow, with the hands masked out, and takes the metric scale from a depth network (Zhang et al.,
"HaWoR: World-Space Hand Motion Reconstruction from Egocentric Videos", CVPR 2025). A small CNN on the whole
frame at low resolution does not see that motion: the background's parallax over a clip is a few pixels at
224 px and under one pixel at 32 px. So the data module computes OpenCV's DIS optical flow (Kroeger et al.,
ECCV 2016) between frames letterboxed to ``data.frame_size``, larger than the camera branch's own frame, and
pools it onto a coarse grid.

The flow is stored once per pair of frames 1, 2, 4 and 8 frames apart (:data:`FLOW_STRIDES`; in the prepared
form, with the later frame of each pair), so one pass serves every clip length and every ``data.frame_step``: a
clip's flow from its first frame to frame t is the sum of the pair flows along the path from the first frame that
takes the longest stride that fits at each step (:func:`flow_path`), at most four terms for a 16-frame clip.
Pooling is linear, so a sum of pooled pair flows is the pooled sum of the per-pixel flows; it differs from the
flow of the first frame to frame t where a pixel's motion changes within a cell between the terms, and each term
adds DIS's own error. Summing consecutive pairs alone (up to 15 terms) fits the camera's flow head worse than
these strides, which fit it about as well as the flow from the first frame (``benchmarks/bench_flow.py``).

The flow is divided by the focal length (so it is in radians of view angle near the image centre, the same on
any camera) and multiplied by 100: a 1 degree turn gives about 1.7.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import cv2
import numpy as np

FLOW_UNITS = 100.0  # flow in 1/100 focal lengths
FLOW_STRIDES = (1, 2, 4, 8)  # frames between the two frames of a stored pair flow


@functools.lru_cache(maxsize=1)
def _dis() -> cv2.DISOpticalFlow:
    # The ultrafast preset: a fraction of a millisecond per 224 px pair on one core; the fast preset (three
    # times slower) gave a linear probe only slightly lower camera error on the generated data.
    return cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)


def pair_flow(previous: np.ndarray, current: np.ndarray, focal: float, grid: int) -> np.ndarray:
    """Flow from one grey frame to the next, pooled onto ``grid`` x ``grid`` cells.

    Args:
        previous, current: (S, S) uint8 grey frames.
        focal: focal length of the frames in pixels.
        grid: cells per side of the pooled flow.

    Returns:
        (2, grid, grid) float32 flow (x, y) in 1/100 focal lengths.
    """
    if grid < 1 or focal <= 0:
        raise ValueError(f"pair_flow: grid must be >= 1 and focal > 0, got {grid} and {focal}")
    flow = _dis().calc(previous, current, None)  # (S, S, 2) pixels
    pooled = cv2.resize(flow, (grid, grid), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)
    return np.ascontiguousarray(pooled * np.float32(FLOW_UNITS / focal), dtype=np.float32)


def flow_path(offset: int) -> list[tuple[int, int]]:
    """The pairs ``(start, stride)`` whose flows sum to the flow over ``offset`` frames: from frame 0, the
    longest stride of :data:`FLOW_STRIDES` that does not pass ``offset``, repeatedly."""
    path, start = [], 0
    while start < offset:
        stride = max(k for k in FLOW_STRIDES if start + k <= offset)
        path.append((start, stride))
        start += stride
    return path


def clip_flow(frames: Sequence[np.ndarray], focal: float, grid: int) -> np.ndarray:
    """A clip's flow from its first frame to each frame, summed along :func:`flow_path` from pair flows.

    Args:
        frames: T (S, S, 3) uint8 RGB or (S, S) grey frames of one clip, consecutive.
        focal: focal length of the frames in pixels.
        grid: cells per side of the pooled flow.

    Returns:
        (T, 2, grid, grid) float32 flow (x, y) in 1/100 focal lengths; frame 0's is zero.
    """
    if grid < 1 or focal <= 0:
        raise ValueError(f"clip_flow: grid must be >= 1 and focal > 0, got {grid} and {focal}")
    grey = [f if f.ndim == 2 else cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    pairs: dict[tuple[int, int], np.ndarray] = {}
    out = np.zeros((len(frames), 2, grid, grid), dtype=np.float32)
    for t in range(1, len(grey)):
        for start, stride in flow_path(t):
            if (start, stride) not in pairs:
                pairs[start, stride] = pair_flow(grey[start], grey[start + stride], focal, grid)
            out[t] += pairs[start, stride]
    return out
