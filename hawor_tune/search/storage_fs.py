"""The filesystem Ray Tune writes the experiment folder through: the local one, with every file written atomically.

Ray copies its experiment state, the trials' result files and every reported checkpoint into the storage
with ``pyarrow.fs.copy_files``, which writes a file in place. On a full disk that leaves a file cut short:
an experiment state a resume cannot read, a ``result.json`` whose last line is half a result. Through this
filesystem each file is written under a temporary name in its folder and renamed into place once whole
(:mod:`hawor_tune.atomic`'s rule), so a write that fails leaves the previous file as it was.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs


class _AtomicFile:
    """A file written to a temporary name and renamed to ``path`` when closed after only successful writes; a
    failed write removes the temporary file at once (pyarrow does not always close a stream that failed)."""

    def __init__(self, path: str) -> None:
        self.path = path
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)  # copy_files makes only the folders below its destination
        self.tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        self._file = open(self.tmp, "wb")  # noqa: SIM115  (closed in close() or _abort())

    @property
    def closed(self) -> bool:
        return self._file.closed

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._file.tell()

    def write(self, data: Any) -> int:
        try:
            return self._file.write(data)
        except BaseException:
            self._abort()
            raise

    def flush(self) -> None:
        try:
            self._file.flush()
        except BaseException:
            self._abort()
            raise

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except BaseException:
            self._abort()
            raise
        self._file.close()
        os.replace(self.tmp, self.path)

    def _abort(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


class AtomicLocalHandler(pafs.FileSystemHandler):
    """``pyarrow.fs.LocalFileSystem`` with atomic file writes (see the module docstring); everything else is
    the local filesystem's own."""

    def __init__(self) -> None:
        self._fs = pafs.LocalFileSystem()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AtomicLocalHandler)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __reduce__(self) -> tuple:
        return AtomicLocalHandler, ()

    def get_type_name(self) -> str:
        return "hawor-atomic-local"

    def normalize_path(self, path: str) -> str:
        return self._fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self._fs.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._fs.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self._fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self._fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("hawor-atomic-local: refusing to delete the contents of the root folder")

    def delete_file(self, path: str) -> None:
        self._fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self._fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        with self._fs.open_input_stream(src) as source, self.open_output_stream(dest, None) as target:
            while chunk := source.read(1 << 20):
                target.write(chunk)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self._fs.open_input_stream(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self._fs.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return pa.PythonFile(_AtomicFile(path), mode="w")

    def open_append_stream(self, path: str, metadata: Any) -> pa.NativeFile:
        return self._fs.open_append_stream(path)


def atomic_local_fs() -> pafs.FileSystem:
    """The experiment storage's filesystem for Ray Tune (``RunConfig(storage_filesystem=...)``)."""
    return pafs.PyFileSystem(AtomicLocalHandler())
