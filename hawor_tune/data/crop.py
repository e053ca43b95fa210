"""Per-hand square crops, as HaMeR and HaWoR feed their backbone, with exact crop intrinsics.

A crop is an affine map of the frame's pixels: ``A = [[a, 0, tx], [0, a, ty], [0, 0, 1]]`` with
``a = crop_size / side``, placing the box centre on the crop centre (pixel centres at integers, OpenCV's
convention). Left hands are mirrored (``u -> crop_size - 1 - u``) so that one right-hand network serves
both (HaMeR, ``hamer/datasets/utils.py``: ``generate_image_patch_cv2`` with ``do_flip``).

Lens distortion acts on normalised camera coordinates, before the intrinsics, so the crop of a frame
with intrinsics ``K`` and distortion ``dist`` is exactly the image of a camera with ``A_unflipped @ K`` and
the same ``dist``: 2D keypoints in crop pixels are the distorted projection mapped through the crop.
"""

from __future__ import annotations

import cv2
import numpy as np

# A box never shrinks below this many frame pixels (a hand seen edge-on or far away).
MIN_BOX_SIDE = 8.0


def hand_boxes(joints2d: np.ndarray, visible: np.ndarray, *, scale: float, frame_size: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Square boxes around each hand's visible 2D keypoints.

    Args:
        joints2d: (..., 21, 2) frame pixels.
        visible: (..., 21) bool, joints in view.
        scale: box side over the larger extent of the visible keypoints (HaMeR uses 1.2-1.3).
        frame_size: side of the square frame; a hand with fewer than two visible joints gets the whole
            frame as its box (it is masked as invalid anyway).

    Returns:
        centres (..., 2) and sides (...,) in frame pixels.
    """
    enough = visible.sum(-1) >= 2  # (...)
    big = np.float32(1e9)
    lo = np.where(visible[..., None], joints2d, big).min(-2)  # (..., 2)
    hi = np.where(visible[..., None], joints2d, -big).max(-2)
    centre = np.where(enough[..., None], (lo + hi) / 2, (frame_size - 1) / 2)
    side = np.where(enough, np.maximum((hi - lo).max(-1) * scale, MIN_BOX_SIDE), frame_size)
    return centre.astype(np.float32), side.astype(np.float32)


def jitter_boxes(centres: np.ndarray, sides: np.ndarray, amount: float, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Training augmentation: shift each centre by up to ``amount`` of its side and scale the side by
    ``1 +- amount`` (uniform)."""
    if amount == 0:
        return centres, sides
    shift = rng.uniform(-amount, amount, centres.shape) * sides[..., None]
    return (centres + shift).astype(np.float32), (sides * rng.uniform(1 - amount, 1 + amount, sides.shape)).astype(np.float32)


def crop_matrix(centre: np.ndarray, side: float, size: int, *, flip: bool = False) -> np.ndarray:
    """(3, 3) affine map from frame pixels to crop pixels; ``flip`` mirrors the crop horizontally."""
    a = size / float(side)
    half = (size - 1) / 2
    A = np.array([[a, 0.0, half - a * centre[0]], [0.0, a, half - a * centre[1]], [0.0, 0.0, 1.0]])
    if flip:
        A = np.array([[-1.0, 0.0, size - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ A
    return A


def unflip_matrix(size: int) -> np.ndarray:
    """(3, 3) the mirror ``u -> size - 1 - u`` (its own inverse)."""
    return np.array([[-1.0, 0.0, size - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def warp_crop(frame: np.ndarray, A: np.ndarray, size: int) -> np.ndarray:
    """Cut a crop out of an (H, W, 3) uint8 frame with the map ``A``; outside the frame is black.

    Returns:
        (3, size, size) uint8.
    """
    crop = cv2.warpAffine(frame, A[:2], (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return crop.transpose(2, 0, 1)


def map_points(A: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Apply the affine map ``A`` (3, 3) to pixels (..., 2)."""
    return uv @ A[:2, :2].T + A[:2, 2]
