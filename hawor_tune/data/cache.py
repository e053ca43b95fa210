"""Letterboxed frames, decoding a dataset's JPEGs, and where prepared artefacts live and how they are keyed.

Everything a run reads besides the dataset lives in one cache folder (:func:`cache_root`), each artefact under
a key that hashes what it depends on (:func:`spec_key`): the prepared form (:mod:`hawor_tune.data.build`),
the hand-pretrained start, the flow-head fit.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from hawor_tune.errors import HaworTuneError


class CacheError(HaworTuneError, ValueError):
    """A source image or a prepared file is unusable; the message names the file and the fix."""


@dataclass(frozen=True)
class Letterbox:
    """Fit a ``width`` x ``height`` image into a ``size`` x ``size`` square: scale keeping the aspect,
    centre it, pad the rest with black."""

    width: int
    height: int
    size: int

    @property
    def resized(self) -> tuple[int, int]:
        """(width, height) of the scaled image inside the square."""
        scale = self.size / max(self.width, self.height)
        return (min(self.size, max(1, round(self.width * scale))), min(self.size, max(1, round(self.height * scale))))

    @property
    def pad(self) -> tuple[int, int]:
        """(left, top) padding in pixels."""
        w, h = self.resized
        return (self.size - w) // 2, (self.size - h) // 2

    def transform_K(self, K: np.ndarray) -> np.ndarray:
        """Intrinsics for the letterboxed pixels.

        ``cv2.resize`` maps the centre of source pixel ``u`` to ``s (u + 0.5) - 0.5`` (pixel centres at
        integers, OpenCV's convention), so ``u' = s u + (s / 2 - 1 / 2 + pad)``: rows 0 and 1 of K scale and
        the principal point shifts. Lens distortion acts on normalised coordinates, so it is unchanged.

        Args:
            K: (3, 3) intrinsics of the original image.

        Returns:
            (3, 3) float64 intrinsics of the letterboxed image.
        """
        (w, h), (pad_x, pad_y) = self.resized, self.pad
        sx, sy = w / self.width, h / self.height
        out = np.array(K, dtype=np.float64)
        out[0] *= sx
        out[1] *= sy
        out[0, 2] += 0.5 * sx - 0.5 + pad_x
        out[1, 2] += 0.5 * sy - 0.5 + pad_y
        return out

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Letterbox a decoded BGR image (H, W, 3) into an RGB (3, S, S) uint8 array."""
        w, h = self.resized
        pad_x, pad_y = self.pad
        resized = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        out = np.zeros((3, self.size, self.size), dtype=np.uint8)
        out[:, pad_y:pad_y + h, pad_x:pad_x + w] = resized[..., ::-1].transpose(2, 0, 1)  # BGR -> RGB, CHW
        return out


def cache_root(cache_dir: str | os.PathLike | None, root: str | os.PathLike) -> Path:
    """The folder that holds a dataset's caches: ``cache_dir`` when given, else ``<root>/../cache`` (beside
    the dataset, never inside it). The prepared form, the pretrained start and the flow-head fit live there."""
    return Path(cache_dir) if cache_dir else Path(root).parent / "cache"


def spec_key(spec: object) -> str:
    """The 12-hex-digit key of a cached artefact: a hash of ``spec``, a JSON-serialisable description of
    everything the artefact depends on (values JSON cannot hold are written as their ``str``)."""
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def decode_image(path: str | os.PathLike, width: int, height: int, flags: int = cv2.IMREAD_COLOR,
                 reduce: int = 1) -> np.ndarray:
    """Decode one image of a dataset as (H, W, 3) uint8 BGR, checking it whole and of the expected size.

    Args:
        path: image file.
        width, height: its size (``reduce`` divides both).
        flags: ``cv2.imdecode`` flags; ``cv2.IMREAD_REDUCED_COLOR_<reduce>`` decodes a JPEG at 1/reduce.
        reduce: the factor ``flags`` reduces by.

    Raises:
        CacheError: the file is missing, not a decodable image, or not ``width`` x ``height``.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        reason = "does not exist" if isinstance(e, FileNotFoundError) else f"cannot be read ({e.strerror})"
        raise CacheError(f"image {path} {reason}; restore it from the dataset") from None
    # OpenCV decodes a JPEG cut short without an error, filling the missing rows with grey: check its end
    # marker (EOI), which no byte of the compressed data can imitate.
    truncated = data[:2] == b"\xff\xd8" and not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
    image = None if truncated else cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None:
        raise CacheError(f"image {path} cannot be decoded (truncated or not an image); restore it from the dataset")
    if image.shape[:2] != (height // reduce, width // reduce):
        h, w = image.shape[0] * reduce, image.shape[1] * reduce
        raise CacheError(f"image {path} is {w}x{h} pixels, expected {width}x{height} like the other frames of "
                         f"its sequence")
    return image


def read_frame(path: str | os.PathLike, box: Letterbox) -> np.ndarray:
    """Decode one JPEG and letterbox it.

    Args:
        path: image file.
        box: its letterbox; ``box.width`` x ``box.height`` must be the image's size.

    Returns:
        (3, S, S) uint8 RGB.

    Raises:
        CacheError: the file is missing, not a decodable image, or not ``box.width`` x ``box.height``.
    """
    return box.apply(decode_image(path, box.width, box.height))
