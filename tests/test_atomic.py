"""Tests for hawor_tune.atomic: writes land whole, a failed write changes nothing, concurrent writes never tear,
a full disk is one line, a cached artefact is built once however many ask for it."""

from __future__ import annotations

import errno
import io
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import run_concurrently

from hawor_tune.atomic import (
    DiskFullError,
    atomic_replace_dir,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    build_once,
)

OLD = b"old content\n"


class WriterFailed(RuntimeError):
    pass


def _write_with_writer(path: str | Path, data: bytes) -> Path:
    def writer(tmp: Path) -> None:
        assert tmp.parent == Path(path).parent and not tmp.exists()  # beside the target (same file system), fresh
        tmp.write_bytes(data)

    return atomic_write(path, writer)


WRITERS: dict[str, Callable[[str | Path, bytes], Path]] = {
    "atomic_write": _write_with_writer,
    "atomic_write_bytes": atomic_write_bytes,
    "atomic_write_text": lambda path, data: atomic_write_text(path, data.decode("utf-8")),
}


@pytest.mark.parametrize("exists", [False, True])
@pytest.mark.parametrize("write", WRITERS.values(), ids=WRITERS.keys())
def test_write_lands_and_leaves_nothing_else(tmp_path: Path, write: Callable[[str | Path, bytes], Path],
                                            exists: bool) -> None:
    path = tmp_path / "new" / "folder" / "out.txt"
    if exists:
        path.parent.mkdir(parents=True)
        path.write_bytes(OLD)
    data = "new content, ünïcode\n".encode()
    assert write(str(path), data) == path
    assert path.read_bytes() == data
    assert list(path.parent.iterdir()) == [path]


def _fail_before_writing(tmp: Path) -> None:
    raise WriterFailed("nothing written")


def _fail_half_way(tmp: Path) -> None:
    tmp.write_bytes(b"half a fi")
    raise WriterFailed("half written")


@pytest.mark.parametrize("writer", [_fail_before_writing, _fail_half_way])
def test_failing_writer_keeps_the_old_file_and_no_temp_file(tmp_path: Path, writer: Callable[[Path], None]) -> None:
    path = tmp_path / "out.bin"
    path.write_bytes(OLD)
    with pytest.raises(WriterFailed):
        atomic_write(path, writer)
    assert path.read_bytes() == OLD
    assert list(tmp_path.iterdir()) == [path]


def test_concurrent_writers_never_leave_a_torn_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.bin"
    size, rounds, writers = 1 << 20, 8, 4
    payloads = [bytes([i]) * size for i in range(writers)]  # each writer's file is one byte value throughout
    atomic_write_bytes(path, payloads[0])
    ids = iter(range(writers))
    stop, torn = threading.Event(), []

    def read_until_stopped() -> None:
        while not stop.is_set():
            with open(path, "rb") as f:  # one handle: sees one file, whatever is renamed meanwhile
                data = f.read()
            if len(data) != size or data.count(data[:1]) != size:
                torn.append((len(data), set(data)))

    def write_rounds() -> None:
        payload = payloads[next(ids)]
        for _ in range(rounds):
            atomic_write_bytes(path, payload)

    reader = threading.Thread(target=read_until_stopped)
    reader.start()
    try:
        _, errors = run_concurrently(write_rounds, n=writers)
    finally:
        stop.set()
        reader.join()
    assert not errors and not torn
    assert path.read_bytes() in payloads
    assert list(tmp_path.iterdir()) == [path]


def _fill(folder: Path, names: tuple[str, ...]) -> None:
    for name in names:
        (folder / name).write_text(name)


@pytest.mark.parametrize("exists", [False, True])
def test_replace_dir_swaps_the_whole_folder(tmp_path: Path, exists: bool) -> None:
    path = tmp_path / "ckpt" / "epoch_0001"
    if exists:
        path.mkdir(parents=True)
        _fill(path, ("old_a", "old_b"))
    assert atomic_replace_dir(path, lambda tmp: _fill(tmp, ("new",))) == path
    assert sorted(p.name for p in path.iterdir()) == ["new"]
    assert list(path.parent.iterdir()) == [path]


def test_replace_dir_failing_writer_keeps_the_old_folder(tmp_path: Path) -> None:
    path = tmp_path / "epoch_0001"
    path.mkdir()
    _fill(path, ("old_a", "old_b"))

    def writer(tmp: Path) -> None:
        _fill(tmp, ("new",))
        raise WriterFailed("half written")

    with pytest.raises(WriterFailed):
        atomic_replace_dir(path, writer)
    assert {p.name: p.read_text() for p in path.iterdir()} == {"old_a": "old_a", "old_b": "old_b"}
    assert list(tmp_path.iterdir()) == [path]


def _full_after_half(write: Callable[..., Any]) -> Callable[..., Any]:
    """``write`` as on a full disk: half the bytes land, then ENOSPC."""
    def full(obj: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        buffer = io.BytesIO()
        write(obj, buffer, *args, **kwargs)
        target_file = open(target, "wb") if isinstance(target, (str, Path)) else target  # noqa: SIM115
        target_file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        target_file.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return full


def test_disk_full_while_writing_parquet_keeps_the_previous_file(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from hawor_tune.results import read_rows, write_parquet_atomic

    path = tmp_path / "trials.parquet"
    write_parquet_atomic([{"trial_id": "a", "epochs": 1}], path)
    monkeypatch.setattr(pq, "write_table", _full_after_half(pq.write_table))
    with pytest.raises(DiskFullError) as info:
        write_parquet_atomic([{"trial_id": "a", "epochs": 2}, {"trial_id": "b", "epochs": 1}], path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "free space" in message
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert read_rows(path) == [{"trial_id": "a", "epochs": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["trials.parquet"]  # no temporary file left behind


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    import torch

    from hawor_tune.checkpoint import load_checkpoint, save_checkpoint
    from hawor_tune.config import load_config

    model, config = torch.nn.Linear(2, 2), load_config(None, {})
    folder = save_checkpoint(tmp_path / "epoch_0001", model=model, config=config, epoch=1)
    monkeypatch.setattr(torch, "save", _full_after_half(torch.save))
    with pytest.raises(DiskFullError, match=f"no space left to write {folder}"):
        save_checkpoint(folder, model=model, config=config, epoch=2)
    assert load_checkpoint(folder)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_0001"]


def test_other_write_errors_are_not_disk_full(tmp_path):
    def denied(tmp: Path) -> None:
        raise PermissionError(errno.EACCES, "denied")

    with pytest.raises(PermissionError) as info:
        atomic_write(tmp_path / "f", denied)
    assert not isinstance(info.value, DiskFullError)


def _made(path: Path) -> Callable[[], Path | None]:
    """``find`` of an artefact that is sound when it holds exactly b"made"."""
    return lambda: path if path.is_file() and path.read_bytes() == b"made" else None


def test_build_once_builds_once_for_concurrent_callers(tmp_path: Path) -> None:
    path, builds = tmp_path / "sub" / "artefact.bin", []

    def build() -> None:
        builds.append(threading.get_ident())
        time.sleep(0.3)  # the other callers arrive meanwhile and wait on the lock
        atomic_write_bytes(path, b"made")

    results, errors = run_concurrently(lambda: build_once(path, _made(path), build), n=4)
    assert not errors and results == [path] * 4
    assert len(builds) == 1
    assert build_once(path, _made(path), build) == path and len(builds) == 1  # found: not built again


def test_build_once_rebuilds_what_find_rejects(tmp_path: Path) -> None:
    path, builds = tmp_path / "artefact.bin", []
    path.write_bytes(b"torn")

    def build() -> None:
        builds.append(1)
        atomic_write_bytes(path, b"made")

    assert build_once(path, _made(path), build) == path
    assert path.read_bytes() == b"made" and builds == [1]


def test_build_once_is_none_when_the_build_makes_nothing_and_raises_what_the_build_raises(tmp_path: Path) -> None:
    path = tmp_path / "artefact.bin"
    assert build_once(path, _made(path), lambda: None) is None

    def failing() -> None:
        raise WriterFailed("no")

    with pytest.raises(WriterFailed):
        build_once(path, _made(path), failing)
    assert build_once(path, _made(path), lambda: atomic_write_bytes(path, b"made")) == path  # lock released
