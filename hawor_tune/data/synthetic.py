"""Synthetic stand-in for ARCTIC's egocentric data, written in ARCTIC's own on-disk layout.

:func:`generate` writes ``raw_seqs/<sid>/<seq>.{mano,egocam.dist,object}.npy``, the egocentric frames
``images/<sid>/<seq>/0/%05d.jpg`` (numbered ``annotation index + ioi_offset``), ``meta/misc.json`` and
``splits_json/protocol_p2.json`` with the same keys, shapes and conventions as the real files, so the one
reader in :mod:`hawor_tune.data.arctic` serves both.

What a sequence contains: a head-mounted camera (about 90 degrees wide, mildly barrel-distorted) that
drifts and turns a little, looking forward-down at two hands working 0.25-0.55 m in front of it. Wrists
follow smooth random paths, global orientations swing up to +-60 degrees around palm-down, fingers move
along the first six pose-space directions around the mean hand. Some sequences steer one hand out of view
for a while and some move a box between the camera and a hand, so hands are sometimes invalid or hidden.
Frames are rendered by :mod:`hawor_tune.data.render`: hands and box over a room at finite depth (a cluttered
table just under the hands and a back wall 0.7-1.3 m ahead), ray-cast per pixel through the lens with the
full camera pose, so the head's few centimetres of drift show as parallax, not only its turns.

With ``motion: frames`` the same subjects (same seed) get other sequences whose every frame draws the
hands' wrist offsets, orientations and finger poses on its own, from the same distributions the smooth
motion passes through: a single-image hand set, the kind HaMeR trains on, for the one-time pretraining
(:mod:`hawor_tune.pretrain`); within a video sequence the fingers barely change, so a network trained on
its frames sees few distinct hands.

Everything is drawn from ``numpy.random.SeedSequence(seed)``, each sequence from its own stream: the same seed
gives byte-identical files, however many processes render them (one per CPU for a large set).
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from hawor_tune.config import ManoConfig, SyntheticConfig
from hawor_tune.data.render import (
    Backdrop,
    TexturedPlane,
    box_mesh,
    clutter_background,
    draw_meshes,
    outward_faces,
)
from hawor_tune.mano import HANDS, MANOLayer, build_mano

FPS = 30.0
# ARCTIC's readers drop this many annotated frames at each end of a sequence; events the data must show
# (a hand leaving the view) are placed between them.
EDGE_FRAMES = 10
MARKER = ".synthetic.json"  # written last; records what was generated (not part of ARCTIC's layout)
GENERATOR_VERSION = 7
JPEG_QUALITY = 90
NEAR = 0.05  # metres; nothing closer to the camera is drawn
EDGE_TAN = 0.55  # tan of the half field of view across the width (about 58 degrees in all)

_OBJECTS = ("box", "capsulemachine", "espressomachine", "ketchup", "laptop", "microwave", "mixer",
            "notebook", "phone", "scissors", "waffleiron")
_ACTIONS = ("grab", "use")
# Skin tones (BGR), light to dark; each subject gets one, each hand a slight variation of it.
_SKIN = np.array([[176, 198, 234], [146, 172, 218], [118, 152, 200], [92, 126, 176], [66, 96, 140],
                  [48, 68, 104]], dtype=np.float64)
# Amplitudes (norm of the 45-d pose offset, radians) along the first pose-space directions.
_FINGER_AMPLITUDE = (0.9, 0.6, 0.5, 0.4, 0.3, 0.3)
# Orientation swing around the neutral pose: about the finger axis, the palm normal, their cross product.
_ORIENT_AMPLITUDE = np.radians([60.0, 30.0, 45.0])
_FRAMES_STREAM = 1_000_000  # spawn key of the ``frames`` sets' sequence seeds, beyond any video sequence's
_ORIENT_GAIN = 1.3  # a sum of sines with unit total weight rarely nears 1; this widens the typical swing


def generate(root: str | os.PathLike, synth: SyntheticConfig, mano_cfg: ManoConfig,
             workers: int | None = None) -> dict[str, dict[str, Any]]:
    """Write a synthetic dataset in ARCTIC's layout at ``root`` and return its ground truth.

    Args:
        root: folder to create (it must not exist, or be empty); it plays ``arctic_data/data``.
        synth: sizes, seed and motion. The last 2 x ``held_out`` subjects alternate validation and test (s<N>
            is test), the rest (and the ``extra_subjects`` after s<N>) training.
        mano_cfg: the hand model the hands are posed and rendered with; read the data with the same one.
        workers: processes that render sequences side by side (the files are the same for any number).
            None: one per CPU this process may use, or only this process for a set under
            ``_POOL_MIN_FRAMES`` frames.

    Returns:
        Per sequence ``"<sid>/<seq>"``, arrays over all annotated frames computed in the generator's own
        code path (float64): ``joints_cam`` (F, 2, 21, 3) camera-frame joints, ``joints2d`` (F, 2, 21, 2)
        pixels of the written images (``cv2.projectPoints``), ``global_orient_cam`` (F, 2, 3, 3),
        ``betas`` (2, 10), ``cam_R`` (F, 3, 3), ``cam_t`` (F, 3), ``K`` (3, 3), ``dist`` (8,), and
        ``image_size`` (W, H), ``ioi_offset``. Hands are stacked left, right.
    """
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"cannot generate a synthetic dataset into {root}: the folder is not empty")
    n = synth.subjects
    if n <= 2 * synth.held_out:
        raise ValueError(f"cannot generate {n} subjects with {synth.held_out} each in val and test: training needs one")
    layers = _hand_layers(mano_cfg)
    misc: dict[str, Any] = {}
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    jobs: list[_SequenceJob] = []
    for i, seed in enumerate(np.random.SeedSequence(synth.seed).spawn(n + synth.extra_subjects)):
        sid = f"s{i + 1:02d}"
        rng = np.random.default_rng(seed)
        subject = _make_subject(rng, synth.image_width, synth.image_height)
        misc[sid] = subject["misc"]
        held = i - (n - 2 * synth.held_out)  # the last 2 x held_out subjects: val, test, val, test, ...
        split = "train" if held < 0 or i >= n else ("val", "test")[held % 2]
        pairs = [(o, a) for o in _OBJECTS for a in _ACTIONS]
        pairs = [pairs[k] for k in rng.permutation(len(pairs))]
        for j, seq_seed in enumerate(_sequence_seeds(seed, synth, held_out=split != "train")):
            obj, action = pairs[j % len(pairs)]
            name = f"{obj}_{action}_{j // len(pairs) + 1:02d}"
            events = {"excursion": (i + j) % 3 != 2, "excursion_hand": (i + j) % 2}
            jobs.append(_SequenceJob(root, sid, name, seq_seed, subject, synth.frames_per_sequence, events,
                                     independent=synth.motion == "frames", finger_speed=synth.finger_speed))
            splits[split].append(f"{sid}/{name}")
    if workers is None:
        workers = _usable_cpus() if len(jobs) * synth.frames_per_sequence >= _POOL_MIN_FRAMES else 1
    truth = dict(zip((f"{job.sid}/{job.name}" for job in jobs), _write_sequences(jobs, mano_cfg, layers, workers)))
    _write_json(root / "meta" / "misc.json", misc)
    _write_json(root / "splits_json" / "protocol_p2.json", splits)
    _write_json(root / MARKER, {"generator_version": GENERATOR_VERSION, "mano_kind": layers[0].kind,
                                "synthetic": dataclasses.asdict(synth)})
    return truth


# Rendering is single-threaded Python (one fill per triangle), so one process per CPU renders sequences side
# by side. Starting one costs about 2 s (it imports torch): smaller sets stay in the calling process.
_POOL_MIN_FRAMES = 2000


@dataclass(frozen=True)
class _SequenceJob:
    """One sequence to write: everything it needs but the hand model, which each process builds once."""

    root: Path
    sid: str
    name: str
    seed: np.random.SeedSequence  # the sequence's own stream: its files do not depend on which process writes it
    subject: dict[str, Any]
    frames: int
    events: dict[str, Any]
    independent: bool
    finger_speed: float = 1.0


def _hand_layers(mano_cfg: ManoConfig) -> tuple[MANOLayer, MANOLayer]:
    # Annotations in ARCTIC's left-hand convention, the network's too (hawor_tune.mano.FIX_LEFT_SHAPEDIRS).
    return tuple(build_mano(mano_cfg, side) for side in HANDS)


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _spawn_can_start() -> bool:
    """Whether a spawned process can import this program's main module, as multiprocessing's spawn makes
    it: not when the program was read from standard input (``python -``, ``__file__`` '<stdin>'), where
    every worker process would fail before its first job; and not for a script without an
    ``if __name__ == "__main__"`` guard, which every worker would run again from the top (a script that
    trains would then wait in each worker for the lock its own parent holds, for ever)."""
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None):  # python -m module
        return True
    path = getattr(main, "__file__", None)
    if path is None:  # python -c, an interactive session, a notebook: nothing is run again
        return True
    try:
        return "__main__" in Path(path).read_text(errors="replace")
    except OSError:
        return False


def _write_sequences(jobs: list[_SequenceJob], mano_cfg: ManoConfig, layers: tuple[MANOLayer, MANOLayer],
                     workers: int) -> list[dict[str, Any]]:
    """Each job's ground truth, in order, its files written by ``workers`` processes (1: this one, with
    ``layers``; others build them from ``mano_cfg``)."""
    if workers <= 1 or len(jobs) <= 1 or not _spawn_can_start():
        axes = [_hand_axes(layer) for layer in layers]
        return [_write_job(job, (layers, axes)) for job in jobs]
    # Spawned, not forked: the caller may be a threaded process (a search's driver prepares its data beside
    # ray.init), and a fork copies only the forking thread, with whatever locks the others held.
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_writer, initargs=(mano_cfg,)) as pool:
        return list(pool.map(_write_job, jobs))


_HandModel = tuple[tuple[MANOLayer, MANOLayer], list[np.ndarray]]  # both hands' layers and their axes
_worker_hands: _HandModel | None = None  # a rendering process's own, built once by _init_writer


def _init_writer(mano_cfg: ManoConfig) -> None:
    global _worker_hands
    layers = _hand_layers(mano_cfg)
    _worker_hands = layers, [_hand_axes(layer) for layer in layers]


def _write_job(job: _SequenceJob, hands: _HandModel | None = None) -> dict[str, Any]:
    layers, axes = hands or _worker_hands
    return _write_sequence(job.root, job.sid, job.name, np.random.default_rng(job.seed), job.subject, layers,
                           axes, job.frames, job.events, independent=job.independent,
                           finger_speed=job.finger_speed)


def _sequence_seeds(subject: np.random.SeedSequence, synth: SyntheticConfig,
                    held_out: bool) -> list[np.random.SeedSequence]:
    """Seeds of one subject's sequences. A ``frames`` set draws from its own stream (no sequence repeats
    one of the video set's) and gives a held-out subject a single sequence: enough for a validation log."""
    if synth.motion == "video":
        return subject.spawn(synth.sequences_per_subject)
    stream = np.random.SeedSequence(subject.entropy, spawn_key=(*subject.spawn_key, _FRAMES_STREAM))
    return stream.spawn(1 if held_out else synth.sequences_per_subject)


# ---- Subjects and cameras ------------------------------------------------------------------------------

def _make_subject(rng: np.random.Generator, width: int, height: int) -> dict[str, Any]:
    """Per-subject constants: hand shapes, skin, the head camera's lens, ioi_offset, misc.json entry."""
    betas = np.clip(rng.normal(0.0, 1.0, 10), -2.5, 2.5)
    betas = np.stack([np.clip(betas + rng.normal(0.0, 0.2, 10), -2.5, 2.5), betas])  # (2, 10) left, right
    skin = _SKIN[rng.integers(len(_SKIN))] + rng.uniform(-10, 10, (2, 3))  # (2, 3) BGR per hand
    K, dist, max_r2 = _make_lens(rng, width, height)
    ioi_offset = int(rng.integers(1, 4))
    ring = [_look_at(np.array([2.0 * math.cos(a), 2.0 * math.sin(a), 1.6]), np.array([0.0, 0.0, 1.0]))
            for a in np.linspace(0, 2 * math.pi, 8, endpoint=False)]
    misc = {"gender": str(rng.choice(["male", "female"])),
            "image_size": [[width, height]] + [[2800, 2000]] * 8,  # view 0 egocentric, 1-8 allocentric
            "intris_mat": [[[3400.0, 0.0, 1400.0], [0.0, 3400.0, 1000.0], [0.0, 0.0, 1.0]]] * 8,
            "world2cam": [m.round(6).tolist() for m in ring],
            "ioi_offset": ioi_offset}
    return {"betas": betas, "skin": skin, "K": K, "dist": dist, "max_r2": max_r2, "ioi_offset": ioi_offset,
            "size": (width, height), "rays": _pixel_rays(K, dist, (width, height)), "misc": misc}


def _make_lens(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Intrinsics (about 58 degrees across the width), OpenCV rational distortion, and the largest squared
    normalised radius whose projection is trusted. Values are float32-exact, as they are stored."""
    while True:  # redraw until the radial map is monotonic well beyond the image corners
        k1 = rng.uniform(-0.10, -0.05)
        k2 = k1 * k1 * rng.uniform(0.55, 0.8)  # 9 k1^2 < 20 k2: r (1 + k1 r^2 + k2 r^4) never folds back
        dist = np.array([k1, k2, *rng.uniform(-5e-4, 5e-4, 2), rng.uniform(1e-4, 5e-4),
                         rng.uniform(-0.01, 0.01), 0.0, 0.0]).astype(np.float32).astype(np.float64)
        r = np.linspace(0.0, 2.5, 501)
        radial = r * _radial_factor(dist, r * r)
        if np.all(np.diff(radial) > 0.2 * (r[1] - r[0])):
            break
    # The image's side edges see rays at atan(EDGE_TAN): hands at working distance fill a good part of
    # the frame, as in ARCTIC's egocentric view, instead of a few pixels of the model's small input.
    fx = 0.5 * width / (EDGE_TAN * _radial_factor(dist, EDGE_TAN**2))
    fy = fx * rng.uniform(0.998, 1.002)
    cx, cy = 0.5 * width + rng.uniform(-0.02, 0.02) * width, 0.5 * height + rng.uniform(-0.02, 0.02) * height
    K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]]).astype(np.float32).astype(np.float64)
    corner_rd = math.hypot(max(cx, width - cx) / fx, max(cy, height - cy) / fy)
    corner_r = float(np.interp(corner_rd, radial, r))  # radial is increasing, so invertible
    return K, dist, min(2.5, 1.2 * corner_r) ** 2


def _radial_factor(dist: np.ndarray, r2: np.ndarray | float) -> np.ndarray | float:
    k1, k2, _, _, k3, k4, k5, k6 = dist
    return (1 + k1 * r2 + k2 * r2**2 + k3 * r2**3) / (1 + k4 * r2 + k5 * r2**2 + k6 * r2**3)


def _look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """4x4 world-to-camera (OpenCV axes, world z up) of a camera at ``eye`` looking at ``target``."""
    z = (target - eye) / np.linalg.norm(target - eye)
    x = np.cross(z, [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x)
    R = np.stack([x, np.cross(z, x), z])  # rows: camera axes in world coordinates
    return np.block([[R, -R @ eye[:, None]], [np.zeros((1, 3)), np.ones((1, 1))]])


# ---- Trajectories -------------------------------------------------------------------------------------

def _smooth(rng: np.random.Generator, t: np.ndarray, dims: int, freqs: tuple[float, float] = (0.1, 0.6),
            terms: int = 3) -> np.ndarray:
    """(F, dims) smooth random signals in [-1, 1]: weighted sums of sines of random frequency (Hz)."""
    f = rng.uniform(*freqs, (terms, dims))
    phase = rng.uniform(0.0, 2 * math.pi, (terms, dims))
    w = rng.uniform(0.5, 1.0, (terms, dims))
    w /= w.sum(axis=0)
    return np.einsum("kd,tkd->td", w, np.sin(2 * math.pi * f * t[:, None, None] + phase))


def _window(rng: np.random.Generator, frames: int, hold: int, ramp: int) -> np.ndarray:
    """(F,) 0 -> 1 -> 0 with raised-cosine ramps of ``ramp`` frames; at 1 for ``hold`` frames placed inside
    the readers' frame range (the ramps may reach into the skipped frames)."""
    usable = frames - 2 * EDGE_FRAMES
    hold = max(1, min(hold, usable))
    start = EDGE_FRAMES + int(rng.integers(0, usable - hold + 1))
    x = np.arange(frames, dtype=np.float64)
    up = np.clip((x - (start - ramp)) / ramp, 0, 1)
    down = np.clip(((start + hold - 1 + ramp) - x) / ramp, 0, 1)
    return 0.5 - 0.5 * np.cos(math.pi * np.minimum(up, down))


def _rotmats(aa: np.ndarray) -> np.ndarray:
    """(..., 3) axis-angle -> (..., 3, 3) with cv2.Rodrigues (independent of the reader's conversion)."""
    flat = aa.reshape(-1, 3)
    return np.stack([cv2.Rodrigues(v)[0] for v in flat]).reshape(*aa.shape[:-1], 3, 3)


def _axis_angles(R: np.ndarray) -> np.ndarray:
    return np.stack([cv2.Rodrigues(m)[0][:, 0] for m in R.reshape(-1, 3, 3)]).reshape(*R.shape[:-2], 3)


def _hand_axes(layer: MANOLayer) -> np.ndarray:
    """(3, 3) columns: finger direction, palm normal, their cross product, of the rest hand."""
    rot = layer.pose_to_rotmats(torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1, 45, dtype=torch.float64),
                                relative_to_mean=True)
    j = layer(rot, torch.zeros(1, layer.num_betas, dtype=torch.float64)).joints[0].numpy()  # (21, 3)
    finger = j[9] - j[0]  # wrist -> middle knuckle
    palm = np.cross(j[5] - j[0], j[17] - j[0]) * (1.0 if layer.side == "right" else -1.0)
    return _frame(finger, palm)


def _frame(forward: np.ndarray, up: np.ndarray) -> np.ndarray:
    f = forward / np.linalg.norm(forward)
    u = up - f * (f @ up)
    u /= np.linalg.norm(u)
    return np.stack([f, u, np.cross(f, u)], axis=1)


def _camera_axes(yaw: float, pitch: float) -> np.ndarray:
    """Camera-to-world rotation (world z up) of a camera facing ``yaw`` pitched ``pitch`` down."""
    ahead = np.array([math.cos(yaw), math.sin(yaw), 0.0])
    down = np.array([0.0, 0.0, -1.0])
    z = math.cos(pitch) * ahead + math.sin(pitch) * down
    y = -math.sin(pitch) * ahead + math.cos(pitch) * down
    return np.stack([np.cross(y, z), y, z], axis=1)


# ---- One sequence -------------------------------------------------------------------------------------

@dataclass
class _Head:
    """The egocentric camera over a sequence."""

    pitch: float  # nominal downward tilt, radians
    R_wc0: np.ndarray  # (3, 3) nominal camera-to-world rotation
    position: np.ndarray  # (3,) nominal camera centre, world (z up, metres)
    cam_R: np.ndarray  # (F, 3, 3) world-to-camera
    cam_t: np.ndarray  # (F, 3)

    def to_world(self, x: np.ndarray) -> np.ndarray:
        """Points (..., 3) given in the nominal camera frame -> world."""
        return self.position + x @ self.R_wc0.T

    def to_camera(self, x: np.ndarray) -> np.ndarray:
        """World points (F, ..., 3) -> each frame's camera."""
        t = self.cam_t.reshape(len(x), *([1] * (x.ndim - 2)), 3)
        return np.einsum("fij,f...j->f...i", self.cam_R, x) + t


def _head_motion(rng: np.random.Generator, t: np.ndarray) -> _Head:
    """A nominal pose looking forward-down, plus small smooth turns and shifts of a few degrees and cm.

    The shifts (about 6 cm over a sequence at about 10 cm/s, as a seated person's head sways while working)
    are what the room's parallax reveals."""
    pitch = math.radians(rng.uniform(38.0, 52.0))
    R_wc0 = _camera_axes(rng.uniform(-math.pi, math.pi), pitch)
    position = np.array([*rng.uniform(-1.0, 1.0, 2), rng.uniform(1.45, 1.75)])
    turn = _rotmats(_smooth(rng, t, 3, (0.05, 0.4)) * np.radians([3.0, 5.0, 2.0]))  # pitch, yaw, roll
    shift = _smooth(rng, t, 3, (0.1, 0.6)) * np.array([0.05, 0.03, 0.05])  # (F, 3) metres
    cam_R = np.einsum("fji,jk->fik", turn, R_wc0.T)  # (F, 3, 3) = (R_wc0 turn)^T
    cam_t = -np.einsum("fij,fj->fi", cam_R, position + shift @ R_wc0.T)
    return _Head(pitch, R_wc0, position, cam_R, cam_t)


def _hand_motion(rng: np.random.Generator, t: np.ndarray, layer: MANOLayer, axes: np.ndarray, betas: np.ndarray,
                 head: _Head, away: np.ndarray | None, finger_speed: float = 1.0
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """One hand's world joints (F, 21, 3), vertices (F, V, 3), global orientation (F, 3, 3) and its
    ARCTIC parameters; ``away`` (F, 3) is an extra wrist offset that takes the hand out of view;
    ``finger_speed`` scales the fingers' frequencies (the same poses, more of them per second)."""
    frames, sign = len(t), (-1.0 if layer.side == "left" else 1.0)
    wrist = np.array([0.09 * sign, 0.06, 0.33]) + _smooth(rng, t, 3) * np.array([0.05, 0.04, 0.06])
    if away is not None:
        wrist = wrist + away * np.array([sign, 1.0, 1.0])
    # Neutral: palm down on the table, fingers away from the body and a little inwards.
    palm = np.array([0.0, math.cos(head.pitch), math.sin(head.pitch)])
    target = _frame(np.array([-0.3 * sign, -math.sin(head.pitch), math.cos(head.pitch)]), palm)
    # Brisk swings (up to about 1 Hz, as in manipulation) around the neutral pose: within every sequence
    # the hand sweeps much of the orientation range, so nothing constant over a sequence (its background,
    # the subject) tells the orientation; only the hand's appearance does.
    swing = _rotmats(_smooth(rng, t, 3, (0.3, 1.2)) * _ORIENT_GAIN * _ORIENT_AMPLITUDE)  # (F, 3, 3)
    orient = head.R_wc0 @ target @ swing @ axes.T  # (F, 3, 3) global orientation, world
    comps = layer.hands_components.double().numpy()[: len(_FINGER_AMPLITUDE)]
    comps = comps / np.linalg.norm(comps, axis=1, keepdims=True)
    fingers = _smooth(rng, t, len(_FINGER_AMPLITUDE), (0.2 * finger_speed, 1.0 * finger_speed))
    pose = (fingers * _FINGER_AMPLITUDE) @ comps  # (F, 45)
    absolute = pose + layer.hands_mean.double().numpy()  # ARCTIC stores pose relative to the mean
    rotmats = np.concatenate([orient[:, None], _rotmats(absolute.reshape(frames, 15, 3))], axis=1)
    with torch.no_grad():
        out = layer(torch.from_numpy(rotmats), torch.from_numpy(np.repeat(betas[None], frames, axis=0)))
    joints, verts = out.joints.numpy(), out.vertices.numpy()  # (F, 21, 3), (F, V, 3) at transl 0
    trans = head.to_world(wrist) - joints[:, 0]  # MANO adds transl to every point
    params = {"rot": _axis_angles(orient), "pose": pose, "trans": trans, "shape": betas,
              "fitting_err": rng.uniform(0.002, 0.006, frames)}
    return joints + trans[:, None], verts + trans[:, None], orient, params


def _box_motion(rng: np.random.Generator, t: np.ndarray, head: _Head,
                wrists: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A box resting low in view that, in some sequences, passes between the camera and a hand.

    Returns world vertices (F, 8, 3), rotations (F, 3, 3) and faces (12, 3).
    """
    size = rng.uniform([0.04, 0.03, 0.05], [0.08, 0.07, 0.10])
    centre = np.array([rng.uniform(-0.08, 0.08), 0.22, 0.50]) + _smooth(rng, t, 3, (0.05, 0.3)) * 0.03
    if rng.random() < 0.5:
        wrist = (wrists[int(rng.integers(2))] - head.position) @ head.R_wc0  # (F, 3) nominal camera frame
        centre = centre + _window(rng, len(t), int(FPS), int(0.4 * FPS))[:, None] * (0.55 * wrist - centre)
    R = head.R_wc0 @ _rotmats(_smooth(rng, t, 3, (0.05, 0.3)) * 0.6 + rng.uniform(-0.5, 0.5, 3))
    vertices, faces = box_mesh(size)
    return np.einsum("fij,vj->fvi", R, vertices) + head.to_world(centre)[:, None], R, faces


def _write_sequence(root: Path, sid: str, name: str, rng: np.random.Generator, subject: dict[str, Any],
                    layers: tuple[MANOLayer, MANOLayer], axes: list[np.ndarray], frames: int,
                    events: dict[str, Any], independent: bool = False, finger_speed: float = 1.0) -> dict[str, Any]:
    t = np.arange(frames) / FPS
    head = _head_motion(rng, t)
    # Independent frames read the hands' smooth signals at random, far-apart times: each frame's pose is a
    # fresh draw from the distribution the video's motion passes through.
    hand_t = rng.uniform(0.0, 1000.0, frames) if independent else t
    # Out of view for up to 1.5 s, reached in 0.4 s (brisk, but a human speed): sideways, down and back.
    excursion = _window(rng, frames, int(min(1.5 * FPS, 0.4 * (frames - 2 * EDGE_FRAMES))), int(0.4 * FPS))
    joints_w, verts_w, orient_w, params = [], [], [], {}
    for h, layer in enumerate(layers):
        away = excursion[:, None] * [0.35, 0.2, -0.12] if events["excursion"] and events["excursion_hand"] == h else None
        joints, verts, orient, params[layer.side] = _hand_motion(rng, hand_t, layer, axes[h], subject["betas"][h], head,
                                                                 away, finger_speed)
        joints_w.append(joints)
        verts_w.append(verts)
        orient_w.append(orient)
    box_w, box_R, box_f = _box_motion(rng, t, head, np.stack([j[:, 0] for j in joints_w]))

    # Camera-frame geometry and the images.
    joints_cam = np.stack([head.to_camera(j) for j in joints_w], axis=1)  # (F, 2, 21, 3)
    scene = np.concatenate([head.to_camera(v) for v in (*verts_w, box_w)], axis=1)  # (F, P, 3)
    K, dist = subject["K"], subject["dist"]
    joints2d = _project(joints_cam.reshape(-1, 3), K, dist).reshape(frames, 2, 21, 2)
    uv = _project(scene.reshape(-1, 3), K, dist).reshape(*scene.shape[:2], 2)
    z = np.maximum(scene[..., 2], 1e-9)
    drawable = (scene[..., 2] > NEAR) & ((scene[..., 0] ** 2 + scene[..., 1] ** 2) / z**2 <= subject["max_r2"])
    faces, colors = _scene_faces(layers, box_f, subject["skin"], rng)
    room = _make_room(rng, head, texel=float(np.clip(0.8 / K[0, 0], 0.002, 0.01)))  # a pixel's width at 0.8 m
    _render_frames(root / "images" / sid / name / "0", rng, uv, scene, faces, colors, drawable, head, room,
                   subject["rays"], subject["ioi_offset"])

    # ARCTIC's files, float32 as ARCTIC stores them.
    raw = root / "raw_seqs" / sid
    raw.mkdir(parents=True, exist_ok=True)
    np.save(raw / f"{name}.mano.npy", {s: {k: _f32(v) for k, v in p.items()} for s, p in params.items()})
    markers = np.array([[0.08, 0.0, 0.0], [-0.08, 0.0, 0.0], [0.0, -0.06, -0.02], [0.0, 0.04, -0.12]])
    np.save(raw / f"{name}.egocam.dist.npy", {
        "R_k_cam_np": _f32(head.cam_R), "T_k_cam_np": _f32(head.cam_t[..., None]), "intrinsics": _f32(K),
        "dist8": _f32(dist), "R0": _f32(head.cam_R[0]), "T0": _f32(head.cam_t[0, :, None]),
        "ego_markers.ref": _f32(markers), "ego_markers.label": [f"ego_{k}" for k in range(len(markers))]})
    obj = np.concatenate([np.zeros((frames, 1)), _axis_angles(box_R), 1000.0 * box_w.mean(axis=1)], axis=1)
    np.save(raw / f"{name}.object.npy", _f32(obj))  # articulation, axis-angle, translation in mm
    return {"joints_cam": joints_cam, "joints2d": joints2d,
            "global_orient_cam": head.cam_R[:, None] @ np.stack(orient_w, axis=1), "betas": subject["betas"].copy(),
            "cam_R": head.cam_R, "cam_t": head.cam_t, "K": K, "dist": dist, "image_size": subject["size"],
            "ioi_offset": subject["ioi_offset"]}


def _f32(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def _project(points: np.ndarray, K: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """(N, 3) camera-frame points -> (N, 2) pixels with OpenCV's rational lens model."""
    uv, _ = cv2.projectPoints(points.reshape(-1, 1, 3), np.zeros(3), np.zeros(3), K, dist)
    return uv.reshape(-1, 2)


def _scene_faces(layers: tuple[MANOLayer, MANOLayer], box_f: np.ndarray, skin: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """All triangles of (left hand, right hand, box) indexing the stacked vertices, and their colours."""
    faces, colors, offset = [], [], 0
    for h, layer in enumerate(layers):
        f = outward_faces(layer.v_template.double().numpy(), layer.faces.numpy())
        faces.append(f + offset)
        colors.append(np.repeat(skin[h][None], len(f), axis=0))
        offset += layer.num_vertices
    faces.append(box_f + offset)
    colors.append(rng.uniform(30, 230, 3) * rng.uniform(0.85, 1.0, (len(box_f), 1)))
    return np.concatenate(faces), np.concatenate(colors)


def _make_room(rng: np.random.Generator, head: _Head, texel: float) -> Backdrop:
    """A cluttered table a few cm under the nominal wrists and a back wall 0.7-1.3 m ahead of the head,
    turned up to 20 degrees from square; ``texel`` is the textures' resolution in metres."""
    ahead = head.R_wc0[:, 2] * [1.0, 1.0, 0.0]
    ahead /= np.linalg.norm(ahead)
    up = np.array([0.0, 0.0, 1.0])
    wrist_drop = 0.06 * math.cos(head.pitch) + 0.33 * math.sin(head.pitch)  # nominal wrist below the eye
    floor = head.position - (wrist_drop + rng.uniform(0.03, 0.08)) * up  # table point under the eye
    # Things on the table 3-25 cm across; the texture spans what the head can see of it, mirrored beyond.
    right = np.cross(ahead, up)
    table = TexturedPlane(origin=floor + 1.4 * ahead - 1.1 * right, u_axis=texel * right, v_axis=-texel * ahead,
                          texture=clutter_background(rng, round(2.2 / texel), round(1.5 / texel), (12, 30),
                                                     (0.02, 0.12)))
    yaw = math.radians(rng.uniform(-20.0, 20.0))
    normal = math.cos(yaw) * ahead + math.sin(yaw) * right
    across = np.cross(normal, up)
    top = head.position + rng.uniform(0.7, 1.3) * normal + 0.4 * up  # 0.4 m above the eye, centred
    height = top[2] - floor[2] + 0.05
    wall = TexturedPlane(origin=top - 1.4 * across, u_axis=texel * across, v_axis=-texel * up,
                         texture=clutter_background(rng, round(2.8 / texel), round(height / texel), (4, 10)))
    return Backdrop([table, wall])


def _pixel_rays(K: np.ndarray, dist: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(2, H, W) float32 x/z and y/z of the camera-frame ray through each pixel centre: the lens model
    inverted, so surfaces ray-cast along them land where :func:`_project` puts points."""
    width, height = size
    pix = np.stack(np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64)), axis=-1)
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 100, 1e-12)
    xy = cv2.undistortPoints(pix.reshape(-1, 1, 2), K, dist, R=np.eye(3), P=np.eye(3), criteria=criteria)
    return np.ascontiguousarray(xy.reshape(height, width, 2).transpose(2, 0, 1), dtype=np.float32)


def _render_frames(folder: Path, rng: np.random.Generator, uv: np.ndarray, scene: np.ndarray, faces: np.ndarray,
                   colors: np.ndarray, drawable: np.ndarray, head: _Head, room: Backdrop, rays: np.ndarray,
                   ioi_offset: int) -> None:
    """Render and write every frame: the room seen with each frame's full camera pose, then the meshes,
    which are always in front of it."""
    light = np.array([rng.uniform(-0.6, 0.6), -1.0, rng.uniform(-0.8, -0.2)])
    light /= np.linalg.norm(light)
    centres = -np.einsum("fji,fj->fi", head.cam_R, head.cam_t)  # (F, 3) camera centres, world
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(len(uv)):
        image, _ = room.draw(rays, head.cam_R[f], centres[f], NEAR)
        draw_meshes(image, scene[f], uv[f], faces, colors, light, drawable[f])
        cv2.imwrite(str(folder / f"{f + ioi_offset:05d}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
