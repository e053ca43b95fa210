"""Dense optical flow of a clip's background: the camera branch's view of the camera's motion.

HaWoR does not read the camera's motion off a low-resolution frame: it runs DROID-SLAM, whose updates are
dense optical flow, with the hands masked out, and takes the metric scale from a depth network (Zhang et al.,
"HaWoR: World-Space Hand Motion Reconstruction from Egocentric Videos", CVPR 2025). A small
CNN on the whole frame at low resolution does not see that motion: the background's parallax over an 8-frame
clip is a few pixels at 224 px and under one pixel at 32 px, and such a camera branch did not beat a static
camera on the generated data. So the data module computes OpenCV's DIS optical flow (Kroeger et al., ECCV 2016) from each
clip's first frame to every frame at the frame cache's full resolution, and pools it onto a coarse grid.

The flow is divided by the focal length (so it is in radians of view angle near the image centre, the same
on any camera) and multiplied by 100: a 1 degree turn gives about 1.7.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import cv2
import numpy as np

FLOW_UNITS = 100.0  # flow in 1/100 focal lengths


@functools.lru_cache(maxsize=1)
def _dis() -> cv2.DISOpticalFlow:
    # The ultrafast preset: 0.6 ms per 224 px pair on one core; the fast preset (1.7 ms) gave a linear
    # probe 5 % lower camera error on the generated data, not worth 3x the loader's time.
    return cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)


def clip_flow(frames: Sequence[np.ndarray], focal: float, grid: int) -> np.ndarray:
    """Flow from a clip's first frame to each of its frames, pooled onto ``grid`` x ``grid`` cells.

    Args:
        frames: T (S, S, 3) uint8 RGB frames of one clip.
        focal: focal length of the frames in pixels.
        grid: cells per side of the pooled flow.

    Returns:
        (T, 2, grid, grid) float32 flow (x, y) in 1/100 focal lengths; frame 0's is zero.
    """
    if grid < 1 or focal <= 0:
        raise ValueError(f"clip_flow: grid must be >= 1 and focal > 0, got {grid} and {focal}")
    out = np.zeros((len(frames), 2, grid, grid), dtype=np.float32)
    if len(frames) < 2:
        return out
    first = cv2.cvtColor(frames[0], cv2.COLOR_RGB2GRAY)
    for t in range(1, len(frames)):
        flow = _dis().calc(first, cv2.cvtColor(frames[t], cv2.COLOR_RGB2GRAY), None)  # (S, S, 2) pixels
        out[t] = cv2.resize(flow, (grid, grid), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)
    out *= FLOW_UNITS / focal
    return out
