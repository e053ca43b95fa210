"""Atomic writes: write under a temporary name in the same folder, then ``os.replace`` it into place.

A reader, a concurrent writer or a crash sees the old file or the new one, never a torn one: a rename within
one file system replaces the name in one step. Everything a running search, a resume or a report may read
(parquet results, checkpoints, configs, figures, metrics) is written through here. :func:`build_once` makes
a cached artefact (the generated dataset, the prepared shards, the pretrained start) once however many
processes ask for it at the same time.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock

from hawor_tune.errors import HaworTuneError

T = TypeVar("T")

_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(HaworTuneError, OSError):
    """A write found no space left (ENOSPC, or the user's quota: EDQUOT); the file kept its previous content."""


@contextlib.contextmanager
def _full_disk_is_one_line(path: Path) -> Iterator[None]:
    try:
        yield
    except DiskFullError:
        raise
    except OSError as e:
        if e.errno not in _FULL:
            raise
        error = DiskFullError(f"no space left to write {path} ({os.strerror(e.errno)}); it keeps its previous "
                              f"content: free space on that disk, then run again (a search: add --resume)")
        error.errno = e.errno
        raise error from None


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Write the file ``path`` through ``writer``, atomically.

    ``writer(tmp)`` must create the file ``tmp``, a name unique to this call in ``path``'s folder
    (``.<name>.tmp-<hex>``), so concurrent writers never share one. The file is flushed to disk and renamed to
    ``path``. If ``writer`` raises, the temporary file is removed and the error propagates: ``path`` keeps its
    old content.

    Args:
        path: the file to write; its folder is created if missing.
        writer: called once with the temporary path, e.g. ``lambda tmp: torch.save(state, tmp)``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        DiskFullError: the disk (or quota) is full; ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path, "tmp")
    try:
        with _full_disk_is_one_line(path):
            writer(tmp)
            _fsync_file(tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; left only when the writer or the rename failed
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_replace_dir(path: str | os.PathLike, writer: Callable[[Path], Any]) -> Path:
    """Write the folder ``path`` through ``writer``, then swap it in whole.

    ``writer(tmp)`` fills ``tmp``, an empty folder beside ``path``. An existing ``path`` is renamed aside and
    removed only once the new folder is in place, so ``path`` holds the old folder complete, the new one
    complete, or (for an instant between the two renames) nothing; never a mix. If ``writer`` raises, the
    temporary folder is removed and ``path`` is untouched.

    Args:
        path: the folder to write; its parent is created if missing.
        writer: called once with the temporary folder.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        DiskFullError: the disk (or quota) is full; ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path, "tmp")
    try:
        with _full_disk_is_one_line(path):
            tmp.mkdir()
            writer(tmp)
            for file in tmp.rglob("*"):
                if file.is_file():
                    _fsync_file(file)
        if not path.exists():
            os.replace(tmp, path)
        else:  # os.replace cannot overwrite a non-empty folder: move the old one aside first
            old = _temp_path(path, "old")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(path.parent)
    return path


def build_once(path: str | os.PathLike, find: Callable[[], T | None], build: Callable[[], Any]) -> T | None:
    """What ``find()`` returns, after ``build()`` has made it if ``find()`` found nothing (None).

    Many processes (the search's driver, its trials) may ask at the same time: the build runs under the file
    lock ``<path>.lock`` and ``find()`` looks again once the lock is taken, since another process may have
    built it meanwhile. ``build`` should write atomically, so that a killed build leaves nothing ``find``
    accepts.

    Args:
        path: the artefact; its lock file sits beside it and its folder is created if missing.
        find: the artefact if it is there and sound, else None.
        build: makes it.

    Returns:
        ``find()``'s answer after the build: still None if the build made nothing it accepts (callers say why).
    """
    found = find()
    if found is not None:
        return found
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        found = find()
        if found is None:
            build()
            found = find()
    return found


def _temp_path(path: Path, tag: str) -> Path:
    # Hidden, beside the target (a rename across file systems is not atomic), unique per call and per process.
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:12]}")


def _fsync_file(path: Path) -> None:
    # Without this a crash soon after the rename can leave the new name pointing at an empty file.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable. Best effort: Windows cannot open a folder, some file systems refuse.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
