"""The prepared form on disk: one WebDataset-style tar shard per sequence, and an index beside it.

Under ``<data.cache_dir>/prepared-<key>/``::

    spec.json               what every shard holds: the frame spec, the dataset, the hand model, the version
    <sid>/<seq>.tar         per frame of ARCTIC's window, in order, five members sharing the key
                            <sid>/<seq>/<image index>: .left.jpg .right.jpg .cam.jpg .flow.npy .json
                            (hawor_tune.data.frames)
    <sid>/<seq>.idx.npz     the index: each member's byte offset and size in the tar, each frame's image index
                            and hand boxes, and the shard's meta (its spec key, the sequence's fingerprint, the
                            tar's size)

Why tar shards: they are what HaMeR trains from (WebDataset), so ``webdataset``, ``tar`` or any tar reader
streams them as they are; the index adds the random access a clip dataset needs (one ``pread`` per frame at
its recorded offset), which a plain WebDataset stream lacks. Why one shard per sequence: a sequence is the
unit of work (one process or Ray task prepares it, its frames in order, each frame's flow from the one before)
and so the unit an interrupted build resumes from; ARCTIC's sequences make shards of tens of MB.

Each file is written atomically (:func:`hawor_tune.atomic.atomic_write`): the tar first, then the index, so
a shard with an index whose meta matches is complete; anything else is prepared again.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hawor_tune.atomic import atomic_write
from hawor_tune.data.cache import CacheError
from hawor_tune.data.frames import MEMBERS, FrameRows, FrameSpec, SequenceFrames, prepare_rows

_INDEX_SUFFIX = ".idx.npz"


def shard_paths(folder: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """The tar and the index of sequence ``name`` ("<sid>/<seq>") in the prepared folder."""
    base = Path(folder) / name
    return base.with_name(base.name + ".tar"), base.with_name(base.name + _INDEX_SUFFIX)


def fingerprint(root: str | os.PathLike, name: str) -> dict[str, Any]:
    """What a sequence's shard depends on in the dataset, cheaply: its image folder's modification time (files
    added, removed or renamed) and its label files' sizes and modification times. A file rewritten in place
    without touching its folder is not noticed: delete the shard then."""
    root = Path(root)
    sid, seq = name.split("/")
    out: dict[str, Any] = {}
    for key, path in (("images", root / "images" / sid / seq / "0"), ("mano", root / "raw_seqs" / sid / f"{seq}.mano.npy"),
                      ("egocam", root / "raw_seqs" / sid / f"{seq}.egocam.dist.npy")):
        try:
            st = path.stat()
        except OSError:
            out[key] = None
            continue
        out[key] = [st.st_mtime_ns] if key == "images" else [st.st_size, st.st_mtime_ns]
    return out


def write_shard(folder: str | os.PathLike, seq: SequenceFrames, spec: FrameSpec, *, spec_key: str,
                stamp: dict[str, Any]) -> tuple[int, int]:
    """Prepare every frame of ``seq`` into its shard and index, atomically.

    Args:
        folder: the prepared folder.
        seq: the sequence and its boxes.
        spec: what each frame holds.
        spec_key: the prepared form's key, recorded in the index.
        stamp: the sequence's :func:`fingerprint`, recorded in the index.

    Returns:
        (frames, bytes written).

    Raises:
        CacheError: an image is missing or damaged. DiskFullError: the disk filled; nothing half-written is left.
    """
    tar_path, index_path = shard_paths(folder, seq.name)
    n, m = len(seq.paths), len(MEMBERS)
    offsets, sizes = np.zeros((n, m), np.int64), np.zeros((n, m), np.int64)
    reduce = np.ones(n, np.int8)

    def write_tar(tmp: Path) -> None:
        with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for row, members in prepare_rows(seq, spec):
                key = f"{seq.name}/{int(seq.image_index[row]):05d}"
                reduce[row] = json.loads(members["json"])["reduce"]
                for j, member in enumerate(MEMBERS):
                    data = members[member]
                    info = tarfile.TarInfo(f"{key}.{member}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644  # the same bytes every build
                    tar.addfile(info, io.BytesIO(data))
                    # tar.offset is now past the data and its padding to the next 512-byte block.
                    offsets[row, j] = tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                    sizes[row, j] = len(data)

    atomic_write(tar_path, write_tar)
    tar_bytes = tar_path.stat().st_size
    meta = {"name": seq.name, "spec_key": spec_key, "fingerprint": stamp, "tar_bytes": tar_bytes, "frames": n,
            "members": list(MEMBERS), "image_size": [seq.width, seq.height], "K": np.asarray(seq.K).tolist()}

    def write_index(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, offsets=offsets, sizes=sizes, image_index=np.asarray(seq.image_index, np.int64),
                     boxes=np.asarray(seq.boxes, np.float64), reduce=reduce, meta=np.array(json.dumps(meta)))

    atomic_write(index_path, write_index)
    return n, tar_bytes + index_path.stat().st_size


@dataclass
class ShardIndex:
    """A shard's index as read back."""

    name: str
    tar: Path
    image_index: np.ndarray  # (N,) int64
    offsets: np.ndarray  # (N, M) int64 byte offsets of each member's data in the tar
    sizes: np.ndarray  # (N, M) int64
    boxes: np.ndarray  # (N, 2, 3) float64 per hand: centre x, y and side in stored-image pixels
    meta: dict[str, Any]


def read_index(folder: str | os.PathLike, name: str) -> ShardIndex | None:
    """The index of sequence ``name``'s shard; None when there is none or it cannot be read."""
    tar_path, index_path = shard_paths(folder, name)
    try:
        with np.load(index_path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("offsets", "sizes", "image_index", "boxes", "meta")}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return ShardIndex(name=name, tar=tar_path, meta=meta, **arrays)


def stale_reason(index: ShardIndex | None, *, spec_key: str, stamp: dict[str, Any]) -> str | None:
    """Why a shard must be prepared (again), or None when it is complete and current."""
    if index is None:
        return "not prepared"
    meta = index.meta
    if meta.get("spec_key") != spec_key or meta.get("members") != list(MEMBERS):
        return "prepared with other settings"
    if meta.get("fingerprint") != stamp:
        return "its images or labels changed since it was prepared"
    try:
        size = index.tar.stat().st_size
    except OSError:
        return f"{index.tar} is missing"
    if size != meta.get("tar_bytes"):
        return f"{index.tar} holds {size} bytes, its index says {meta.get('tar_bytes')} (cut short?)"
    n = meta.get("frames")
    if any(len(a) != n for a in (index.image_index, index.offsets, index.sizes, index.boxes)):
        return "its index is inconsistent"
    return None


class Shards(FrameRows):
    """The shards of some sequences, opened for reading by frame row (:class:`FrameRows`).

    Files are opened lazily in each process (a DataLoader worker opens its own), and each frame is one
    ``pread`` of the members asked for, which lie next to each other in the tar.
    """

    def __init__(self, folder: str | os.PathLike, indexes: list[ShardIndex]) -> None:
        super().__init__([ix.name for ix in indexes], [ix.image_index for ix in indexes], [ix.boxes for ix in indexes])
        self.folder = Path(folder)
        self.tars = [ix.tar for ix in indexes]
        self.offsets = np.concatenate([ix.offsets for ix in indexes])  # (rows, M)
        self.sizes = np.concatenate([ix.sizes for ix in indexes])
        self._files: dict[int, int] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = {}  # file descriptors belong to the process that opened them
        return state

    def where(self, sequence: int) -> str:
        return f"shard {self.tars[sequence]}"

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker: its parent's descriptors are not its own to share
            self._files, self._pid = {}, os.getpid()
        fd = self._files.get(shard)
        if fd is None:
            try:
                fd = self._files[shard] = os.open(self.tars[shard], os.O_RDONLY)
            except OSError as e:
                raise CacheError(f"shard {self.tars[shard]} cannot be opened ({e.strerror}); run again to prepare "
                                 f"it anew") from None
        return fd

    def read_rows(self, wanted: dict[int, Sequence[str]]) -> dict[int, dict[str, bytes]]:
        out = {}
        for row, members in wanted.items():
            cols = [MEMBERS.index(m) for m in members]
            off, size = self.offsets[row, cols], self.sizes[row, cols]
            lo, hi = int(off.min()), int((off + size).max())
            shard = int(self.sequence_of_row[row])
            data = os.pread(self._fd(shard), hi - lo, lo)
            if len(data) != hi - lo:
                raise CacheError(f"shard {self.tars[shard]} is cut short; delete it and run again to prepare it anew")
            out[row] = {m: data[o - lo:o - lo + n] for m, o, n in zip(members, off.tolist(), size.tolist())}
        return out

    def close(self) -> None:
        """Close this process's open shard files."""
        if self._pid == os.getpid():
            for fd in self._files.values():
                os.close(fd)
        self._files = {}

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError):
            pass
