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

A clip's flow depends only on its frames, so :func:`cached_clip_flows` computes every clip's once and keeps
them in a file beside the frame cache, memory-mapped and shared by every run and trial that uses the same
clips: a search's trials draw the same training clips again and again, and the flow would otherwise be most
of the loader's work.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from hawor_tune.atomic import atomic_write, build_once

log = logging.getLogger(__name__)

FLOW_UNITS = 100.0  # flow in 1/100 focal lengths
# Bump when clip_flow's output changes, so that cached flows are not re-used.
FLOW_VERSION = 1


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


def cached_clip_flows(folder: str | Path, *, name: str, key: object, shape: tuple[int, ...],
                      compute: Callable[[int], np.ndarray]) -> np.ndarray | None:
    """Every clip's flow, computed once and kept in ``folder``; memory-mapped, read-only.

    The file is ``flow-<name>-<hash>.npy``, the hash of ``key`` (everything the flows depend on: which frames
    each clip holds, the grid, FLOW_VERSION), built once under a file lock however many processes ask at the
    same time, written atomically, and rebuilt when it is damaged. A folder this process may not write to
    (e.g. frame caches prepared on a read-only share) gives None, with a warning: the caller then computes
    each clip's flow when it is read, as without a cache.

    Args:
        folder: the cache folder (beside the frame cache).
        name: readable part of the file name (e.g. the split).
        key: JSON-serialisable description of the clips.
        shape: (clips, T, 2, G, G), the array's shape.
        compute: clip index -> its (T, 2, G, G) float32 flow (:func:`clip_flow`).

    Returns:
        A (clips, T, 2, G, G) float32 array, or None (see above).
    """
    spec = json.dumps({"version": FLOW_VERSION, "key": key, "shape": list(shape)}, sort_keys=True, default=str)
    path = Path(folder) / f"flow-{name}-{hashlib.sha1(spec.encode()).hexdigest()[:16]}.npy"

    def build() -> None:
        log.info("building the %s flow cache: %d clips -> %s", name, shape[0], path)
        out = np.empty(shape, dtype=np.float32)
        for i in range(shape[0]):
            out[i] = compute(i)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, out)

        atomic_write(path, write)

    try:
        flows = build_once(path, lambda: _open_valid(path, shape), build)
    except PermissionError as e:
        log.warning("cannot write the flow cache %s (%s): computing each clip's flow when it is read", path, e)
        return None
    if flows is None:
        raise OSError(f"flow cache {path} was written but cannot be read back")
    return flows


def _open_valid(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The flows in ``path``; None when there is no file yet or it is damaged (logged; it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        flows = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        log.warning("rebuilding a damaged flow cache %s: %s", path, e)
        return None
    if flows.dtype != np.float32 or flows.shape != tuple(shape):
        log.warning("rebuilding the flow cache %s: it holds %s %s, expected float32 %s", path, flows.dtype,
                    flows.shape, tuple(shape))
        return None
    return flows
