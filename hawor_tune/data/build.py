"""Build the prepared form of a dataset once: in parallel, resumable, announced.

Every frame of every labelled sequence becomes each hand's crop with a margin, the camera branch's frame and
the flows to it from the frames before (:mod:`hawor_tune.data.frames`), in one shard per sequence
(:mod:`hawor_tune.data.shards`), under ``<data.cache_dir>/prepared-<key>/``. The key hashes what the pixels
depend on (the frame spec, the dataset's path, ``data.crop_scale``, the hand model): clip length, stride,
``data.frame_step`` and the validity rule are read at load time, so one preparation serves them all.

- **Parallel.** One job per sequence: on all local cores by default (a process pool; small jobs stay in this
  process), or as Ray tasks across a cluster's nodes (``address``, which ``run_search.py --address`` passes
  on), each writing its shard to ``data.cache_dir``, which must then be on a filesystem every node mounts.
- **Resumable.** Each shard is written atomically and checked on open (:func:`hawor_tune.data.shards.stale_reason`);
  an interrupted build, run again, prepares only the sequences it had not finished.
- **Announced.** Before starting, a few frames are prepared to measure the bytes and seconds a frame takes;
  the estimated size and time are printed and the free space is checked; a progress bar then gives the ETA.

A run that reads a split (``build_dataset``) prepares what is missing the same way, under a file lock, so
concurrent trials prepare each shard once; the command ``python -m hawor_tune.data.prepare`` does it ahead,
for every split, with a choice of workers.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np

from hawor_tune.atomic import DiskFullError, atomic_write_text, build_once
from hawor_tune.data.arctic import MISC_FILE, SequenceLabels, _read_json, load_sequences
from hawor_tune.data.cache import cache_root, spec_key
from hawor_tune.data.crop import hand_boxes
from hawor_tune.data.frames import PREPARED_VERSION, FrameSpec, SequenceFrames, prepare_rows
from hawor_tune.data.shards import ShardIndex, Shards, fingerprint, read_index, stale_reason, write_shard
from hawor_tune.data.synthetic import _spawn_can_start, _usable_cpus
from hawor_tune.errors import HaworTuneError
from hawor_tune.mano import MANOLayer

log = logging.getLogger(__name__)

_PROBE_FRAMES = 3  # frames prepared up front to measure a frame's bytes and seconds
_POOL_MIN_SECONDS = 10.0  # a build estimated shorter than this on one core stays in this process
_SPACE_MARGIN = 1.1  # free space wanted over the estimate
_SPACE_SLACK = 64 * 2**20


class PrepareError(HaworTuneError, RuntimeError):
    """The preparation cannot go on (a Ray node wrote where this machine cannot read); the message says why."""


def hand_digest(layers: Sequence[MANOLayer]) -> str:
    """A hash of the hand model's arrays: the joints, and so the crops' boxes, depend on them."""
    h = hashlib.sha1()
    for layer in layers:
        h.update(f"{layer.side}:{layer.kind}".encode())
        for name, buffer in sorted(layer.named_buffers()):
            h.update(name.encode())
            h.update(buffer.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def prepared_spec(root: str | os.PathLike, spec: FrameSpec, *, crop_scale: float, mano: Sequence[MANOLayer]) -> dict:
    """Everything the prepared frames depend on (written to the folder's ``spec.json``; its hash is the key)."""
    return {"version": PREPARED_VERSION, "root": os.path.realpath(root), "frame": dataclasses.asdict(spec),
            "crop_scale": crop_scale, "hand": hand_digest(mano)}


def prepared_folder(cache_dir: str | os.PathLike | None, root: str | os.PathLike, spec: dict) -> Path:
    """The prepared form's folder: ``<cache>/prepared-<key>``."""
    return cache_root(cache_dir, root) / f"prepared-{spec_key(spec)}"


def sequence_frames(labels: SequenceLabels, *, crop_scale: float, frame_size: int) -> SequenceFrames:
    """A sequence's frames and each hand's box in stored-image pixels: the square around the visible 2D
    keypoints, ``crop_scale`` times their extent (:func:`hawor_tune.data.crop.hand_boxes`, on the letterboxed
    frame the labels are in, then mapped back to the image)."""
    centre, side = hand_boxes(labels.joints2d, labels.joints_visible, scale=crop_scale, frame_size=frame_size)
    L = labels.letterbox.transform_K(np.eye(3))  # (3, 3) image pixels -> letterboxed pixels
    centre = (centre.astype(np.float64) - L[:2, 2]) / np.diag(L)[:2]  # (N, 2, 2)
    side = side.astype(np.float64) / L[0, 0]  # (N, 2)
    return SequenceFrames(name=labels.name, paths=tuple(labels.image_paths),
                          image_index=np.array([int(p.stem) for p in labels.image_paths], np.int64),
                          width=labels.letterbox.width, height=labels.letterbox.height,
                          K=np.linalg.solve(L, labels.K.astype(np.float64)),
                          boxes=np.concatenate([centre, side[..., None]], axis=-1))


def window_frames(root: str | os.PathLike, names: Sequence[str], *, mano: Sequence[MANOLayer], spec: FrameSpec,
                  crop_scale: float, misc: dict[str, Any] | None = None) -> list[SequenceFrames]:
    """:func:`sequence_frames` of every frame of ARCTIC's window of each sequence (``frame_step`` 1)."""
    labels = load_sequences(root, names, mano=mano, frame_size=spec.frame_size, frame_step=1,
                            valid_rule="visible_joints", misc=misc)
    return [sequence_frames(lab, crop_scale=crop_scale, frame_size=spec.frame_size) for lab in labels]


def ensure_prepared(root: str | os.PathLike, names: Sequence[str], *, mano: Sequence[MANOLayer], spec: FrameSpec,
                    crop_scale: float, cache_dir: str | os.PathLike | None = None, misc: dict[str, Any] | None = None,
                    workers: int | None = None, address: str | None = None,
                    on_shard: Callable[[str], None] | None = None) -> Shards:
    """The shards of ``names``, preparing those missing or stale first (once, under a file lock).

    Args:
        root: ARCTIC ``arctic_data/data`` folder.
        names: ``"<sid>/<seq>"`` sequences, all labelled.
        mano: (left, right) MANO layers the labels come from.
        spec: what each frame holds.
        crop_scale: box side over the visible keypoints' extent.
        cache_dir: ``data.cache_dir`` ('' or None: beside the dataset).
        misc: parsed ``meta/misc.json`` (read when None).
        workers: processes; None: every usable CPU, or this process alone for a build estimated under
            ``_POOL_MIN_SECONDS``. Ignored with ``address``.
        address: prepare with Ray tasks, one per sequence, on this cluster (or on the Ray this process has
            joined already).
        on_shard: called with each sequence's name as its shard is done (a progress hook).

    Raises:
        DiskFullError: the estimate does not fit the free space, or the disk filled.
        CacheError, DatasetError: a damaged image or label file (the message names it).
    """
    desc = prepared_spec(root, spec, crop_scale=crop_scale, mano=mano)
    folder = Path(os.path.abspath(prepared_folder(cache_dir, root, desc)))  # the same path in a Ray task
    key = spec_key(desc)
    stamps = {name: fingerprint(root, name) for name in names}
    indexes: dict[str, ShardIndex | None] = {}

    def stale() -> dict[str, str]:
        indexes.update({name: read_index(folder, name) for name in names})
        reasons = {name: stale_reason(indexes[name], spec_key=key, stamp=stamps[name]) for name in names}
        return {name: why for name, why in reasons.items() if why is not None}

    def find() -> Shards | None:
        return None if stale() else Shards(folder, [indexes[name] for name in names])

    def build() -> None:
        todo = stale()
        for name, why in todo.items():
            if why != "not prepared":
                log.warning("preparing %s again: %s", name, why)
        misc_ = _read_json(Path(root) / MISC_FILE) if misc is None else misc
        _build(folder, root, [n for n in names if n in todo], done=len(names) - len(todo), desc=desc, key=key,
               stamps=stamps, mano=mano, spec=spec, crop_scale=crop_scale, misc=misc_, workers=workers,
               address=address, on_shard=on_shard)

    shards = build_once(folder / "build", find, build)
    if shards is None:
        still = stale()
        raise PrepareError(f"{folder}: the shards of {len(still)} sequences are still not readable after preparing "
                           f"them ({next(iter(still.items()))}); with Ray, data.cache_dir must be on a filesystem "
                           f"every node mounts at the same path")
    return shards


def _build(folder: Path, root: str | os.PathLike, todo: list[str], *, done: int, desc: dict, key: str,
           stamps: dict[str, dict], mano: Sequence[MANOLayer], spec: FrameSpec, crop_scale: float,
           misc: dict[str, Any], workers: int | None, address: str | None,
           on_shard: Callable[[str], None] | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "spec.json", json.dumps(desc, indent=1, sort_keys=True))
    jobs = window_frames(root, todo, mano=mano, spec=spec, crop_scale=crop_scale, misc=misc)
    frames = sum(len(job.paths) for job in jobs)
    seconds, nbytes = _probe(jobs[0], spec)
    ray = _join_ray(address) if address is not None else None
    try:
        if ray is not None:
            processes, where = max(1, int(ray[0].cluster_resources().get("CPU", 1))), "Ray tasks on the cluster"
        else:
            processes = workers or _usable_cpus()
            if workers is None and frames * seconds < _POOL_MIN_SECONDS:
                processes = 1
            if processes > 1 and (len(jobs) == 1 or not _spawn_can_start()):
                processes = 1
            where = f"{processes} process{'es' if processes > 1 else ''}"
        total, eta = frames * nbytes, frames * seconds / min(processes, len(jobs))
        free = shutil.disk_usage(folder).free
        log.warning("preparing %d sequence(s) (%d frames; %d of %d prepared already) into %s: about %s and %s on %s "
                    "(measured on %d frames: %s and %.0f ms a frame on one core); %s free there", len(jobs), frames,
                    done, done + len(jobs), folder, format_bytes(total), _duration(eta), where, _PROBE_FRAMES,
                    format_bytes(nbytes), seconds * 1000, format_bytes(free))
        if free < total * _SPACE_MARGIN + _SPACE_SLACK:
            error = DiskFullError(f"preparing {frames} frames needs about {format_bytes(total)} in {folder} but "
                                  f"only {format_bytes(free)} are free there; free space, or set data.cache_dir to a "
                                  f"disk with room")
            error.errno = errno.ENOSPC
            raise error
        t0 = time.perf_counter()
        with _progress(frames) as bar:
            def finished(name: str, n: int) -> None:
                bar.update(n)
                if on_shard is not None:
                    on_shard(name)

            args = {"folder": folder, "spec": spec, "key": key, "stamps": stamps}
            if ray is not None:
                _run_ray(ray, jobs, args, finished)
            elif processes > 1:
                _run_pool(jobs, args, processes, finished)
            else:
                for job in jobs:
                    finished(job.name, _prepare_one(job, **args)[0])
        elapsed = time.perf_counter() - t0
        log.warning("prepared %d frames in %s (%.1f frames/s) into %s", frames, _duration(elapsed),
                    frames / max(elapsed, 1e-9), folder)
    finally:
        if ray is not None and ray[1]:
            ray[0].shutdown()


def _prepare_one(job: SequenceFrames, folder: Path, spec: FrameSpec, key: str, stamps: dict[str, dict]
                 ) -> tuple[int, int]:
    return write_shard(folder, job, spec, spec_key=key, stamp=stamps[job.name])


def _probe(job: SequenceFrames, spec: FrameSpec) -> tuple[float, float]:
    """(seconds, bytes in the tar) a frame takes, measured on the first frames of one sequence."""
    rows = range(min(_PROBE_FRAMES, len(job.paths)))
    t0 = time.perf_counter()
    made = [members for _, members in prepare_rows(job, spec, rows)]
    seconds = (time.perf_counter() - t0) / len(made)
    block = tarfile.BLOCKSIZE  # each member: a header block, its data padded to whole blocks
    nbytes = sum(block + -(-len(data) // block) * block for members in made for data in members.values())
    return seconds, nbytes / len(made) + 200.0  # and its row of the index


def _init_worker() -> None:
    import signal

    import cv2

    cv2.setNumThreads(1)  # one process per core: OpenCV's own threads would only contend
    # Ctrl-C reaches the whole process group: the parent alone decides (it stops handing out sequences and
    # waits for those being written), so that no worker dies with a traceback half-way through a shard.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_pool(jobs: list[SequenceFrames], args: dict, processes: int, finished: Callable[[str, int], None]) -> None:
    # Spawned, not forked: the caller may be a threaded process (a search's driver prepares its data beside
    # ray.init), and a fork copies only the forking thread, with whatever locks the others held.
    pool = ProcessPoolExecutor(min(processes, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker)
    try:
        pending = {pool.submit(_prepare_one, job, **args): job.name for job in jobs}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                finished(pending.pop(future), future.result()[0])
    except BaseException:
        # Interrupted or failed: no new sequence starts; those being written are finished (each atomically), so
        # that nothing writes here once this returns.
        log.warning("stopping: finishing the %d sequences being prepared", sum(not f.done() for f in pending))
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()


def _join_ray(address: str) -> tuple[Any, bool]:
    """Ray, and whether this call joined it (and so leaves it when done)."""
    import ray

    if ray.is_initialized():
        return ray, False
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise PrepareError(f"--address {address}: cannot join the Ray cluster ({str(e).splitlines()[0]})") from e
    return ray, True


def _run_ray(ray: tuple[Any, bool], jobs: list[SequenceFrames], args: dict,
             finished: Callable[[str, int], None]) -> None:
    """One Ray task per sequence (one CPU each, retried if its node fails); a task's user fault (a damaged
    image, a full disk) is raised here as itself."""
    ray_, _ = ray
    remote = ray_.remote(num_cpus=1, max_retries=2)(_prepare_one)
    pending = {remote.remote(job, **args): job.name for job in jobs}
    try:
        while pending:
            done, _ = ray_.wait(list(pending), num_returns=1)
            for ref in done:
                name = pending.pop(ref)
                try:
                    n, _ = ray_.get(ref)
                except ray_.exceptions.RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    raise (cause if isinstance(cause, HaworTuneError) else e) from None
                finished(name, n)
    except BaseException:
        for ref in pending:
            ray_.cancel(ref)
        raise


class _progress:
    """A tqdm bar over frames, with its ETA; redrawn at most every 5 s when stderr is not a terminal."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, unit="frame", desc="preparing", dynamic_ncols=True, smoothing=0.1,
                        mininterval=0.5 if tty else 5.0, file=sys.stderr)

    def __enter__(self) -> Any:
        return self.bar

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()


def format_bytes(n: float) -> str:
    """A byte count for people: 35.8 MB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def frame_spec(data: Any) -> FrameSpec:
    """The :class:`FrameSpec` of a ``data`` config section."""
    return FrameSpec.from_data(crop_size=data.crop_size, crop_jitter=data.crop_jitter, img_size=data.img_size,
                               frame_size=data.frame_size, flow_grid=data.flow_grid)
