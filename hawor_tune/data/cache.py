"""Letterboxed frames and the packed on-disk frame cache.

Decoding JPEGs is far slower than a training step needs, so the first use of a split decodes and
letterboxes every frame once into one uint8 array on disk, ``frames.npy`` (N, 3, S, S) RGB, plus
``index.json`` (the sequences in order, their offsets and frame counts, their letterbox). Later runs and
concurrent Ray trials map it read-only and share it through the page cache; a clip is then one slice.

The cache folder's name holds a hash of everything the pixels depend on: the dataset root's real path,
the split, the image size, each sequence's frame file names and its image folder's modification time,
and :data:`CACHE_FORMAT_VERSION`. A file replaced in place under the same name, without touching its
folder, is not noticed; delete the cache folder then. A damaged cache (``frames.npy`` or ``index.json`` cut
short) is rebuilt, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from hawor_tune.atomic import build_once
from hawor_tune.errors import HaworTuneError

# Bump when the cache's content or layout changes, so that old caches are not read.
CACHE_FORMAT_VERSION = 1
_INDEX = "index.json"
_FRAMES = "frames.npy"
_JOBS_PER_ROUND = 4096

log = logging.getLogger(__name__)


class CacheError(HaworTuneError, ValueError):
    """A frame cache or a source image is unusable; the message names the file and the fix."""


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
    the dataset, never inside it). Frame caches and the pretrained start both live there."""
    return Path(cache_dir) if cache_dir else Path(root).parent / "cache"


def spec_key(spec: object) -> str:
    """The 12-hex-digit key of a cached artefact: a hash of ``spec``, a JSON-serialisable description of
    everything the artefact depends on (values JSON cannot hold are written as their ``str``)."""
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


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
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        reason = "does not exist" if isinstance(e, FileNotFoundError) else f"cannot be read ({e.strerror})"
        raise CacheError(f"image {path} {reason}; restore it from the dataset") from None
    # OpenCV decodes a JPEG cut short without an error, filling the missing rows with grey: check its end
    # marker (EOI), which no byte of the compressed data can imitate.
    truncated = data[:2] == b"\xff\xd8" and not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
    image = None if truncated else cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise CacheError(f"image {path} cannot be decoded (truncated or not an image); restore it from the dataset")
    if image.shape[:2] != (box.height, box.width):
        raise CacheError(f"image {path} is {image.shape[1]}x{image.shape[0]} pixels, expected "
                         f"{box.width}x{box.height} like the other frames of its sequence")
    return box.apply(image)


@dataclass(frozen=True)
class FrameSource:
    """The frames of one sequence, in the order the dataset indexes them."""

    name: str
    paths: tuple[Path, ...]
    letterbox: Letterbox


class FrameCache:
    """A built cache folder, mapped read-only: ``frames[i]`` is (3, S, S) uint8 RGB.

    Frames are stored sequence after sequence in the order of the sources it was built from, so frame
    ``j`` of source ``k`` is ``frames[offsets[k] + j]``. Pickling (DataLoader workers started with
    spawn) drops the mapping; it is reopened on first access.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index_path = self.folder / _INDEX
        try:
            self.index: dict[str, Any] = json.loads(index_path.read_text())
        except (OSError, ValueError) as e:
            raise CacheError(f"frame cache index {index_path} is unreadable ({e}); delete {self.folder}") from None
        if self.index.get("version") != CACHE_FORMAT_VERSION:
            raise CacheError(f"frame cache {self.folder} has format version {self.index.get('version')}, "
                             f"expected {CACHE_FORMAT_VERSION}; delete it")
        self.names = [s["name"] for s in self.index["sequences"]]
        self.offsets = [s["offset"] for s in self.index["sequences"]]
        self.counts = [s["count"] for s in self.index["sequences"]]
        self._frames: np.ndarray | None = None
        # Mapping checks the file's size against its header; the header against the index. A frames.npy cut
        # short (a full disk, a copy interrupted) fails here, not as a raw error inside a training step.
        expected = (self.index.get("frames"), 3, self.index.get("size"), self.index.get("size"))
        try:
            frames = self.frames
        except (OSError, ValueError, EOFError) as e:
            raise CacheError(f"frame cache {self.folder / _FRAMES} is unreadable ({e}); delete {self.folder}") from None
        if frames.shape != expected or frames.dtype != np.uint8:
            raise CacheError(f"frame cache {self.folder / _FRAMES} holds {frames.dtype} {frames.shape}, its index "
                             f"says uint8 {expected}; delete {self.folder}")

    @property
    def frames(self) -> np.ndarray:
        """(N, 3, S, S) uint8, memory-mapped read-only."""
        if self._frames is None:
            self._frames = np.load(self.folder / _FRAMES, mmap_mode="r")
        return self._frames

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_frames"] = None  # never pickle the mapped pixels
        return state

    @classmethod
    def open_or_build(cls, cache_dir: str | os.PathLike, *, root: str | os.PathLike, split: str, size: int,
                      sources: Sequence[FrameSource], threads: int | None = None) -> FrameCache:
        """Open the cache for these frames, building it first if no process has yet.

        Building runs under a file lock, into a temporary folder renamed into place when complete, so
        concurrent callers build it once and never see a partial cache.

        Args:
            cache_dir: folder holding caches (created if missing).
            root: dataset root (its real path is part of the key).
            split: split name (part of the key and the folder name).
            size: letterboxed side S.
            sources: the sequences' frames, in dataset order.
            threads: decoding threads (default: CPU count, at most 16); OpenCV releases the GIL.
        """
        cache_dir = Path(cache_dir)
        folder = cache_dir / f"frames-{split}-{size}px-{_cache_key(root, split, size, sources)}"

        def build() -> None:
            for stale in cache_dir.glob(f".{folder.name}.tmp-*"):  # left by a killed builder
                shutil.rmtree(stale, ignore_errors=True)
            shutil.rmtree(folder, ignore_errors=True)  # incomplete (no index) or damaged
            tmp = cache_dir / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                _build(tmp, root=root, split=split, size=size, sources=sources, threads=threads)
                os.replace(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

        cache = build_once(folder, lambda: cls._open_valid(folder), build)
        return cache if cache is not None else cls(folder)  # built but unreadable: cls() says why

    @classmethod
    def _open_valid(cls, folder: Path) -> FrameCache | None:
        """The cache in ``folder``; None when there is none yet or it is damaged (logged; it is rebuilt)."""
        if not (folder / _INDEX).is_file():
            return None
        try:
            return cls(folder)
        except CacheError as e:
            log.warning("rebuilding a damaged frame cache: %s", e)
            return None


def _cache_key(root: str | os.PathLike, split: str, size: int, sources: Sequence[FrameSource]) -> str:
    h = hashlib.sha1()
    h.update(json.dumps({"version": CACHE_FORMAT_VERSION, "root": os.path.realpath(root), "split": split,
                         "size": size}).encode())
    for src in sources:
        folder = src.paths[0].parent if src.paths else Path(".")
        mtime = folder.stat().st_mtime_ns if src.paths else 0
        names = "\n".join(p.name for p in src.paths)
        h.update(json.dumps([src.name, len(src.paths), mtime, hashlib.sha1(names.encode()).hexdigest(),
                             src.letterbox.width, src.letterbox.height]).encode())
    return h.hexdigest()[:16]


def _build(folder: Path, *, root: str | os.PathLike, split: str, size: int, sources: Sequence[FrameSource],
           threads: int | None) -> None:
    folder.mkdir(parents=True)
    total = sum(len(s.paths) for s in sources)
    frames = np.lib.format.open_memmap(folder / _FRAMES, mode="w+", dtype=np.uint8, shape=(total, 3, size, size))
    jobs, entries, offset = [], [], 0
    for src in sources:
        jobs += [(offset + j, path, src.letterbox) for j, path in enumerate(src.paths)]
        (w, h), (pad_x, pad_y) = src.letterbox.resized, src.letterbox.pad
        entries.append({"name": src.name, "offset": offset, "count": len(src.paths),
                        "image_size": [src.letterbox.width, src.letterbox.height],
                        "letterbox": {"resized": [w, h], "pad": [pad_x, pad_y]},
                        "first": src.paths[0].name if src.paths else None})
        offset += len(src.paths)

    def decode(job: tuple[int, Path, Letterbox]) -> None:
        i, path, box = job
        frames[i] = read_frame(path, box)

    workers = threads or min(16, os.cpu_count() or 1)
    log.info("building the %s frame cache: %d frames at %d px, %.1f GiB, %d threads -> %s", split, total, size,
             total * 3 * size * size / 2**30, workers, folder)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(jobs), _JOBS_PER_ROUND):  # bounded: a real split has ~10^5 frames
            for _ in pool.map(decode, jobs[start:start + _JOBS_PER_ROUND]):  # re-raises a decoding error
                pass
    frames.flush()
    # The index is written last: a folder with an index is a complete cache.
    index = {"version": CACHE_FORMAT_VERSION, "root": os.path.realpath(root), "split": split, "size": size,
             "frames": total, "sequences": entries}
    (folder / _INDEX).write_text(json.dumps(index, indent=1))
