"""Reader for ARCTIC's egocentric data (the real download or the synthetic stand-in): files, splits, labels.

Layout (zc-alexfan/arctic, ``docs/data/data_doc.md``), under ``root`` = ARCTIC's ``arctic_data/data``::

    raw_seqs/<sid>/<seq>.mano.npy          {'right'|'left': {rot (F,3), pose (F,45), trans (F,3), shape (10,),
                                            fitting_err (F,)}}, world frame, pose relative to hands_mean
    raw_seqs/<sid>/<seq>.egocam.dist.npy   {R_k_cam_np (F,3,3), T_k_cam_np (F,3,1), intrinsics (3,3), dist8 (8,)}
    raw_seqs/<sid>/<seq>.object.npy        (F, 7): articulation (rad), axis-angle (3), translation (3, mm)
    meta/object_vtemplates/<obj>/          mesh.obj (mm) and parts.json: the object ARCTIC's is_valid looks at
    images/<sid>/<seq>/0/%05d.jpg          egocentric view, image index = annotation index + ioi_offset;
                                           ARCTIC keeps image indices 10 .. F-11 (frame_window)
    meta/misc.json                         per subject: image_size, ioi_offset, ...
    splits_json/protocol_p2.json           {"train": [...], "val": [...], "test": [...]}, "<sid>/<seq>"

The clip dataset over these labels is :class:`hawor_tune.data.clips.ArcticClips`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from hawor_tune.data.cache import Letterbox
from hawor_tune.errors import HaworTuneError
from hawor_tune.geometry import axis_angle_to_matrix, project_points
from hawor_tune.mano import HANDS, MANOLayer

SPLITS = ("train", "val", "test")
SPLITS_FILE = Path("splits_json") / "protocol_p2.json"
MISC_FILE = Path("meta") / "misc.json"
EGO_VIEW = 0
SKIP_FRAMES = 10  # ARCTIC drops this many image indices at each end of a sequence
# Hand-validity rules (``load_sequence``'s ``valid_rule``).
VALID_RULES = ("arctic", "visible_joints")
ARCTIC_MIN_JOINTS = 3  # ARCTIC: the wrist and at least 3 joints inside the (distorted) image
OBJECT_TEMPLATES = Path("meta") / "object_vtemplates"  # <object>/mesh.obj (mm) and parts.json, ARCTIC's meta
_ARTICULATION_AXIS = np.array([0.0, 0.0, -1.0])  # ARCTIC's top part turns about the object's -z (object_tensors.py)
_OBJECT_CHUNK = 2_000_000  # object vertices projected per call: vectorised, with bounded memory
NEAR_Z = 0.05  # metres; a joint closer to (or behind) the camera is not visible
_MANO_CHUNK = 4096  # frames per MANO call: vectorised, with bounded memory


class DatasetError(HaworTuneError, ValueError):
    """The dataset on disk is missing a file or holds bad content; the message names the file and the fault."""


class UnlabelledSplitError(DatasetError):
    """A split whose sequences have no labels (ARCTIC's protocol-p2 test subject); ``sequences`` names them."""

    def __init__(self, message: str, *, split: str, sequences: list[str]) -> None:
        super().__init__(message)
        self.split, self.sequences = split, sequences


# ---- Files --------------------------------------------------------------------------------------------

def read_split(root: str | os.PathLike, split: str, *, splits_file: str | os.PathLike | None = None,
               labelled: bool = True) -> list[str]:
    """The ``"<sid>/<seq>"`` names of a split, from ``splits_json/protocol_p2.json`` (or ``splits_file``).

    An empty or missing ``train`` list means every sequence under ``raw_seqs`` that is not in val or test,
    as ARCTIC's own code does.

    Args:
        root: ARCTIC ``arctic_data/data`` folder.
        split: one of :data:`SPLITS`.
        splits_file: a splits file in ``protocol_p2.json``'s format to read instead (``data.splits``): a
            subject held out as a labelled test split, say.
        labelled: require the split's labels (``raw_seqs/<sid>/<seq>.mano.npy``). False lists the names
            whatever files exist: an unlabelled split to predict from hand boxes.

    Raises:
        ValueError: ``split`` is not one of :data:`SPLITS`.
        UnlabelledSplitError: ``labelled`` and none of the split's sequences has labels (ARCTIC keeps protocol
            p2's test labels for its leaderboard).
        DatasetError: the file is missing or malformed, or some (not all) entries have no ``raw_seqs`` files.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    root = Path(root)
    path = Path(splits_file) if splits_file else root / SPLITS_FILE
    splits = _read_json(path)
    if not isinstance(splits, dict):
        raise DatasetError(f"{path}: expected a mapping of split -> list of '<sid>/<seq>', got {type(splits).__name__}")
    lists = {}
    for name in SPLITS:
        entries = splits.get(name) or []
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise DatasetError(f"{path}: '{name}' must be a list of '<sid>/<seq>' strings, got {entries!r:.80}")
        bad = [e for e in entries if e.count("/") != 1]
        if bad:
            raise DatasetError(f"{path}: split '{name}' lists {bad[0]!r}; entries are '<sid>/<seq>'")
        lists[name] = entries
    if split == "train" and not lists["train"]:
        held_out = set(lists["val"]) | set(lists["test"])
        found = sorted(f"{p.parent.name}/{p.name[: -len('.mano.npy')]}"
                       for p in (root / "raw_seqs").glob("*/*.mano.npy"))
        return [name for name in found if name not in held_out]
    if not labelled:
        return list(lists[split])
    missing = [e for e in lists[split] if not (root / "raw_seqs" / f"{e}.mano.npy").is_file()]
    if missing and len(missing) == len(lists[split]):
        raise UnlabelledSplitError(
            f"split '{split}' of {path} has no labels: none of its {len(missing)} sequences has "
            f"{root / 'raw_seqs'}/<sid>/<seq>.mano.npy (ARCTIC keeps protocol p2's test labels for its "
            f"leaderboard); evaluate on a labelled split, or predict this one from hand boxes "
            f"(run_best.py --boxes DIR, docs/evaluation.md)", split=split, sequences=list(lists[split]))
    if missing:
        raise DatasetError(f"{path}: split '{split}' lists {missing[0]!r}, but there is no "
                           f"{root / 'raw_seqs' / missing[0]}.mano.npy (entries are '<sid>/<seq>')")
    return list(lists[split])


def split_is_labelled(root: str | os.PathLike, split: str, *, splits_file: str | os.PathLike | None = None) -> bool:
    """Whether :func:`read_split` finds the split's labels (False: none of its sequences has any).

    Raises:
        DatasetError: as :func:`read_split`, for a malformed splits file or a partly labelled split.
    """
    try:
        read_split(root, split, splits_file=splits_file)
    except UnlabelledSplitError:
        return False
    return True


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path} does not exist") from None
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: not readable JSON ({e})") from None


def _load_npy_dict(path: Path) -> dict[str, Any]:
    """A pickled dict saved with ``np.save``, as ARCTIC stores its per-sequence files."""
    if not path.is_file():
        raise DatasetError(f"{path} does not exist")
    try:
        obj = np.load(path, allow_pickle=True)
        value = obj.item() if obj.dtype == object and obj.shape == () else obj
    except Exception as e:  # truncated data surfaces as EOFError, ValueError, UnpicklingError, ...
        raise DatasetError(f"{path}: truncated or corrupt .npy ({type(e).__name__}: {e}); restore it from the "
                           f"dataset") from None
    if not isinstance(value, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(value).__name__} "
                           f"{getattr(value, 'shape', '')}")
    return value


def _load_npy_array(path: Path) -> np.ndarray:
    """A plain float array saved with ``np.save`` (ARCTIC's ``object.npy``)."""
    if not path.is_file():
        raise DatasetError(f"{path} does not exist")
    try:
        return np.asarray(np.load(path, allow_pickle=False), dtype=np.float64)
    except Exception as e:  # truncated data surfaces as EOFError, ValueError, ...
        raise DatasetError(f"{path}: truncated or corrupt .npy ({type(e).__name__}: {e}); restore it from the "
                           f"dataset") from None


def _field(path: Path, node: dict[str, Any], key: str, shape: tuple[int | str, ...], sizes: dict[str, int],
           prefix: str = "") -> np.ndarray:
    """``node[key]`` as float64 with ``shape``; a str dimension (e.g. 'F') must agree wherever it appears."""
    name = prefix + key
    if key not in node:
        raise DatasetError(f"{path}: missing key '{name}' (has {sorted(map(str, node))})")
    try:
        arr = np.asarray(node[key], dtype=np.float64)
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: '{name}' is not numeric ({type(node[key]).__name__})") from None
    want = tuple(sizes.setdefault(d, arr.shape[i]) if isinstance(d, str) and i < arr.ndim else d
                 for i, d in enumerate(shape))
    if arr.shape != want:
        named = "(" + ", ".join(map(str, shape)) + ")"
        raise DatasetError(f"{path}: '{name}' has shape {arr.shape}, expected {named} = {want}")
    if not np.isfinite(arr).all():
        raise DatasetError(f"{path}: '{name}' holds non-finite values")
    return arr


def _subject_meta(root: Path, misc: dict[str, Any], sid: str) -> tuple[tuple[int, int], int]:
    """(egocentric image (width, height), ioi_offset) of a subject from misc.json."""
    path = root / MISC_FILE
    if sid not in misc:
        raise DatasetError(f"{path}: no entry for subject '{sid}' (has {sorted(misc)})")
    entry = misc[sid]
    try:
        size = entry["image_size"]
        size = size[EGO_VIEW] if isinstance(size[0], (list, tuple)) else size  # per-view list, or one [W, H]
        width, height = int(size[0]), int(size[1])
        ioi = int(entry["ioi_offset"])
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise DatasetError(f"{path}: subject '{sid}' needs 'image_size' ([W, H] per view) and integer "
                           f"'ioi_offset' ({type(e).__name__}: {e})") from None
    if width <= 0 or height <= 0:
        raise DatasetError(f"{path}: subject '{sid}' image_size {[width, height]} must be positive")
    return (width, height), ioi


# ---- One sequence ---------------------------------------------------------------------------------------

@dataclass
class SequenceLabels:
    """Per-frame annotations of one sequence: the frames ARCTIC keeps, subsampled by ``frame_step``.

    Hands are stacked (left, right); arrays are float32 except where named. ``K`` is in letterboxed
    pixels; ``joints2d`` are projected with it and ``dist``.
    """

    name: str
    image_paths: list[Path]
    letterbox: Letterbox
    K: np.ndarray  # (3, 3)
    dist: np.ndarray  # (8,)
    frame_index: np.ndarray  # (N,) int64 annotation indices
    joints3d: np.ndarray  # (N, 2, 21, 3) camera frame, metres
    joints2d: np.ndarray  # (N, 2, 21, 2)
    rotmats: np.ndarray  # (N, 2, 16, 3, 3), [..., 0] global orientation in the camera frame
    betas: np.ndarray  # (N, 2, 10)
    hand_valid: np.ndarray  # (N, 2) bool
    joints_visible: np.ndarray  # (N, 2, 21) bool: in front of the camera and inside the image
    cam_R: np.ndarray  # (N, 3, 3) world-to-camera
    cam_t: np.ndarray  # (N, 3)


def frame_window(frames: int, ioi_offset: int) -> np.ndarray:
    """The annotation indices ARCTIC keeps for a sequence of ``frames`` annotated frames.

    ARCTIC lists image indices ``range(10, frames - 10)`` (zc-alexfan/arctic, ``src/arctic/split.py``,
    ``glob_fnames``) and reads the annotation ``image index - ioi_offset`` of each
    (``src/datasets/arctic_dataset.py``); indices that fall before the first annotation are dropped.

    Returns:
        (N,) int64 annotation indices in increasing order.
    """
    vidx = np.arange(SKIP_FRAMES, frames - SKIP_FRAMES, dtype=np.int64) - ioi_offset
    return vidx[(vidx >= 0) & (vidx < frames)]


def arctic_valid(joints3d: np.ndarray, K: np.ndarray, dist: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """ARCTIC's hand validity: the wrist and at least 3 of the 21 joints project inside the distorted image.

    As ``forward_valid`` in zc-alexfan/arctic, ``src/arctic/processing.py``: egocentric joints are projected
    with the lens distortion, a joint counts when 1 <= u <= width and 1 <= v <= height (ARCTIC's box
    ``[1, 1, 2800, 2000]`` for its 2800x2000 egocentric frames) and, as there, without a depth test.

    Args:
        joints3d: (..., 21, 3) camera-frame joints, wrist first.
        K: (3, 3) intrinsics of the ``size`` image.
        dist: (8,) OpenCV rational distortion.
        size: (width, height) of the image K refers to.

    Returns:
        (...) bool.
    """
    uv = project_points(torch.from_numpy(np.asarray(joints3d, dtype=np.float64)), torch.from_numpy(K),
                        torch.from_numpy(dist)).numpy()  # (..., 21, 2)
    width, height = size
    with np.errstate(invalid="ignore"):  # a joint at depth 0 projects to inf or nan: outside
        inside = (uv[..., 0] >= 1) & (uv[..., 0] <= width) & (uv[..., 1] >= 1) & (uv[..., 1] <= height)
    return inside[..., 0] & (inside.sum(-1) >= ARCTIC_MIN_JOINTS)


def object_in_view(vertices: np.ndarray, K: np.ndarray, dist: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """ARCTIC's per-frame ``is_valid``: the mean of the object's projected vertices lies inside the image.

    As ``forward_valid`` in zc-alexfan/arctic, ``src/arctic/processing.py``, for the egocentric view: every
    vertex is projected with the lens distortion, the 2D points are averaged, and the frame counts when
    1 <= u <= width and 1 <= v <= height (its box ``[1, 1, 2800, 2000]``), without a depth test. ARCTIC's
    loader multiplies each hand's validity by it (``src/datasets/arctic_dataset.py``).

    Args:
        vertices: (N, V, 3) camera-frame object vertices of N frames.
        K: (3, 3) intrinsics of the ``size`` image.
        dist: (8,) OpenCV rational distortion.
        size: (width, height) of the image K refers to.

    Returns:
        (N,) bool.
    """
    n, v = vertices.shape[:2]
    centre = np.empty((n, 2))
    step = max(1, _OBJECT_CHUNK // max(v, 1))
    K_t, dist_t = torch.from_numpy(np.asarray(K, np.float64)), torch.from_numpy(np.asarray(dist, np.float64))
    for s in range(0, n, step):
        uv = project_points(torch.from_numpy(np.asarray(vertices[s:s + step], np.float64)), K_t, dist_t)
        centre[s:s + step] = uv.mean(dim=-2).numpy()  # (chunk, 2) mean of the projections, as ARCTIC
    width, height = size
    with np.errstate(invalid="ignore"):  # a vertex at depth 0 projects to inf or nan: outside
        return (centre[:, 0] >= 1) & (centre[:, 0] <= width) & (centre[:, 1] >= 1) & (centre[:, 1] <= height)


def read_object_template(root: str | os.PathLike, name: str) -> tuple[np.ndarray, np.ndarray]:
    """An ARCTIC object template: vertices (V, 3) in metres (``mesh.obj`` holds mm) and (V,) bool, the vertices
    that turn with the articulation.

    ARCTIC's code turns the vertices that ``parts.json`` marks 0 (``common/object_tensors.py``: part ids
    ``parts + 1``, and ``parts_ids == 1`` take the articulated ``v_top``); its data documentation calls 1 the
    top. The code made the released flags, so the code is followed.

    Raises:
        DatasetError: a file is missing or malformed (the message names it).
    """
    folder = Path(root) / OBJECT_TEMPLATES / name
    mesh, parts_path = folder / "mesh.obj", folder / "parts.json"
    try:
        lines = mesh.read_text().splitlines()
    except FileNotFoundError:
        raise DatasetError(f"{mesh} does not exist: ARCTIC's validity rule (data.valid_rule arctic, the default "
                           f"on real data) needs the object templates of ARCTIC's meta download; restore them, or "
                           f"set data.valid_rule=visible_joints") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{mesh}: not a readable OBJ file ({e})") from None
    try:
        vertices = np.array([[float(x) for x in line.split()[1:4]] for line in lines if line.startswith("v ")])
    except ValueError as e:
        raise DatasetError(f"{mesh}: a 'v' line is not three numbers ({e})") from None
    if vertices.ndim != 2 or vertices.shape[1:] != (3,) or not np.isfinite(vertices).all():
        raise DatasetError(f"{mesh}: expected 'v x y z' lines of finite numbers, got {vertices.shape[0]} vertices")
    parts = _read_json(parts_path)
    if (not isinstance(parts, list) or len(parts) != len(vertices)
            or not all(isinstance(p, (bool, int)) and p in (0, 1) for p in parts)):
        raise DatasetError(f"{parts_path}: expected a list of {len(vertices)} part flags (0 or 1), one per vertex "
                           f"of {mesh.name}; got {str(parts)[:60]}")
    return vertices / 1000.0, ~np.asarray(parts, dtype=bool)


def _object_vertices(template: tuple[np.ndarray, np.ndarray], pose: np.ndarray, R: np.ndarray,
                     T: np.ndarray) -> np.ndarray:
    """(N, V, 3) camera-frame vertices of an articulated ARCTIC object.

    As ``ObjectTensors.forward_7d_batch`` (zc-alexfan/arctic, ``common/object_tensors.py``): the articulated part
    turns by the articulation angle about the object's -z, then the whole object is rotated (axis-angle) and
    translated (mm); then world to camera with ``R`` (N, 3, 3), ``T`` (N, 3).
    """
    vertices, turns = template
    arti = axis_angle_to_matrix(torch.from_numpy(pose[:, :1] * _ARTICULATION_AXIS)).numpy()  # (N, 3, 3)
    rot = axis_angle_to_matrix(torch.from_numpy(np.ascontiguousarray(pose[:, 1:4]))).numpy()  # (N, 3, 3)
    local = np.broadcast_to(vertices, (len(pose), *vertices.shape)).copy()  # (N, V, 3)
    local[:, turns] = np.einsum("nij,vj->nvi", arti, vertices[turns])
    world = np.einsum("nij,nvj->nvi", rot, local) + pose[:, None, 4:7] / 1000.0
    return np.einsum("nij,nvj->nvi", R, world) + T[:, None]


def load_sequence(root: str | os.PathLike, name: str, *, mano: Sequence[MANOLayer], frame_size: int,
                  frame_step: int = 1, min_visible_joints: int = 8, valid_rule: str = "visible_joints",
                  misc: dict[str, Any] | None = None) -> SequenceLabels:
    """Read and check one sequence's files and compute its per-frame annotations.

    Args:
        root: ARCTIC ``arctic_data/data`` folder.
        name: ``"<sid>/<seq>"``.
        mano: MANO layers for (left, right); the model the annotations were fitted with.
        frame_size: letterboxed side S of the frames (``K`` and ``joints2d`` are in its pixels).
        frame_step: keep every ``frame_step``-th frame of ARCTIC's window (:func:`frame_window`).
        min_visible_joints: with ``valid_rule='visible_joints'``, a hand is valid when its wrist and at least
            this many of its 21 joints are visible (``joints_visible``: in front of the camera, z > 0.05 m,
            inside the lens's field of view and projected inside the image).
        valid_rule: 'arctic' (ARCTIC's own rule: :func:`arctic_valid` and the object's :func:`object_in_view`,
            which reads ``object.npy`` and the object templates) or 'visible_joints'.
        misc: parsed ``meta/misc.json`` (read from ``root`` when None).

    Raises:
        DatasetError: a file is missing, truncated or has wrong keys or shapes (the message names it).
    """
    return load_sequences(root, [name], mano=mano, frame_size=frame_size, frame_step=frame_step,
                          min_visible_joints=min_visible_joints, valid_rule=valid_rule, misc=misc)[0]


def load_sequences(root: str | os.PathLike, names: Sequence[str], *, mano: Sequence[MANOLayer], frame_size: int,
                   frame_step: int = 1, min_visible_joints: int = 8, valid_rule: str = "visible_joints",
                   misc: dict[str, Any] | None = None) -> list[SequenceLabels]:
    """:func:`load_sequence` of each of ``names``, in order, with each hand's MANO posed once for all of them
    (one call per hand instead of one per sequence and hand: a trial builds its splits' labels while it
    starts). The labels are the same, to the last bit, as one sequence at a time."""
    root = Path(root)
    if valid_rule not in VALID_RULES:
        raise ValueError(f"valid_rule must be one of {list(VALID_RULES)}, got {valid_rule!r}")
    if [layer.side for layer in mano] != list(HANDS):
        raise ValueError(f"mano must be layers for {HANDS} in that order, got {[layer.side for layer in mano]}")
    misc = _read_json(root / MISC_FILE) if misc is None else misc
    templates: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # one read per object, not per sequence
    raw = [_read_sequence(root, name, frame_size, frame_step, misc, templates if valid_rule == "arctic" else None)
           for name in names]
    counts = [len(r.vidx) for r in raw]
    posed = []  # per hand: world joints (N, 21, 3) and rotations (N, 16, 3, 3) of every sequence's frames
    for h, layer in enumerate(mano):
        p = {key: np.concatenate([r.hands[h][key] for r in raw]) for key in ("rot", "pose", "trans", "shape")}
        posed.append(_posed_joints(layer, p["rot"], p["pose"], p["trans"], p["shape"]))
    ends = np.cumsum(counts)
    return [_label_sequence(r, [(j[e - n:e], rm[e - n:e]) for j, rm in posed], min_visible_joints, valid_rule)
            for r, n, e in zip(raw, counts, ends)]


@dataclass
class _RawSequence:
    """One sequence's checked files, cut to the kept frames: what :func:`_label_sequence` needs besides the
    posed hands."""

    name: str
    hands: list[dict[str, np.ndarray]]  # per hand (left, right): rot (N, 3), pose (N, 45), trans (N, 3), shape (N, 10)
    vidx: np.ndarray  # (N,) annotation indices kept
    image_paths: list[Path]
    box: Letterbox
    K_img: np.ndarray  # (3, 3) intrinsics of the stored frames
    K: np.ndarray  # (3, 3) intrinsics of the capture size (ARCTIC's)
    dist: np.ndarray  # (8,)
    size: tuple[int, int]  # capture (width, height)
    R: np.ndarray  # (N, 3, 3) world to camera
    T: np.ndarray  # (N, 3)
    object_valid: np.ndarray | None  # (N,) bool, ARCTIC's is_valid (:func:`object_in_view`); None: not read


def _read_sequence(root: Path, name: str, frame_size: int, frame_step: int, misc: dict[str, Any],
                   templates: dict[str, tuple[np.ndarray, np.ndarray]] | None) -> _RawSequence:
    """One sequence's files, checked and cut to the kept frames; with ``templates`` (a cache of object
    templates by name) also ARCTIC's per-frame ``is_valid`` from its object."""
    sid, seq = name.split("/")
    (width, height), ioi = _subject_meta(root, misc, sid)

    mano_path = root / "raw_seqs" / sid / f"{seq}.mano.npy"
    params = _load_npy_dict(mano_path)
    sizes: dict[str, int] = {}
    hands = {}
    for side in HANDS:
        if not isinstance(params.get(side), dict):
            raise DatasetError(f"{mano_path}: missing hand '{side}' (expected keys 'right' and 'left' holding "
                               f"dicts, has {sorted(map(str, params))})")
        hands[side] = {key: _field(mano_path, params[side], key, shape, sizes, f"{side}.") for key, shape in (
            ("rot", ("F", 3)), ("pose", ("F", 45)), ("trans", ("F", 3)), ("shape", (10,)), ("fitting_err", ("F",)))}
    frames = sizes["F"]
    cam_path = root / "raw_seqs" / sid / f"{seq}.egocam.dist.npy"
    cam = _load_npy_dict(cam_path)
    cam_sizes: dict[str, int] = {}
    R_all = _field(cam_path, cam, "R_k_cam_np", ("F", 3, 3), cam_sizes)
    T_all = _field(cam_path, cam, "T_k_cam_np", ("F", 3, 1), cam_sizes)[..., 0]
    K = _field(cam_path, cam, "intrinsics", (3, 3), cam_sizes)
    dist = _field(cam_path, cam, "dist8", (8,), cam_sizes)
    if cam_sizes["F"] != frames:
        raise DatasetError(f"{cam_path} has {cam_sizes['F']} frames but {mano_path} has {frames}; "
                           "they must annotate the same frames")
    vidx = frame_window(frames, ioi)[::frame_step]  # (N,) annotation indices kept
    if len(vidx) == 0:
        raise DatasetError(f"{mano_path}: {frames} frames leave none after skipping {SKIP_FRAMES} image indices "
                           f"at each end (ioi_offset {ioi})")
    image_paths = _image_paths(root, sid, seq, vidx + ioi, ioi)
    box, K_img = _frame_geometry(root, sid, image_paths[0], K, (width, height), frame_size)
    kept = [{"rot": hands[side]["rot"][vidx], "pose": hands[side]["pose"][vidx], "trans": hands[side]["trans"][vidx],
             "shape": np.broadcast_to(hands[side]["shape"], (len(vidx), 10))} for side in HANDS]
    object_valid = None
    if templates is not None:
        obj_path = root / "raw_seqs" / sid / f"{seq}.object.npy"
        obj = _load_npy_array(obj_path)
        if obj.shape != (frames, 7) or not np.isfinite(obj).all():
            raise DatasetError(f"{obj_path}: expected ({frames}, 7) finite values (articulation, axis-angle, "
                               f"translation in mm per annotated frame), got shape {obj.shape}")
        name_obj = seq.split("_")[0]  # ARCTIC's object of a sequence: its name's first word
        if name_obj not in templates:
            templates[name_obj] = read_object_template(root, name_obj)
        vertices = _object_vertices(templates[name_obj], obj[vidx], R_all[vidx], T_all[vidx])
        object_valid = object_in_view(vertices, K, dist, (width, height))
    return _RawSequence(name=name, hands=kept, vidx=vidx, image_paths=image_paths, box=box, K_img=K_img, K=K,
                        dist=dist, size=(width, height), R=R_all[vidx], T=T_all[vidx], object_valid=object_valid)


def _label_sequence(raw: _RawSequence, posed: list[tuple[np.ndarray, np.ndarray]], min_visible_joints: int,
                    valid_rule: str) -> SequenceLabels:
    """A sequence's labels from its files and its hands posed in the world (per hand: joints (N, 21, 3),
    rotations (N, 16, 3, 3)): into the camera of each frame, projected, and checked for visibility."""
    R, T = raw.R, raw.T  # (N, 3, 3), (N, 3)
    joints3d, rotmats = [], []
    for j, r in posed:
        joints3d.append(np.einsum("nij,nkj->nki", R, j) + T[:, None])  # (N, 21, 3)
        r = r.copy()
        r[:, 0] = R @ r[:, 0]  # global orientation relative to the camera
        rotmats.append(r)
    joints3d = np.stack(joints3d, axis=1)  # (N, 2, 21, 3)
    K_box = raw.box.transform_K(raw.K_img)
    joints2d = project_points(torch.from_numpy(joints3d), torch.from_numpy(K_box), torch.from_numpy(raw.dist)).numpy()
    visible = _joints_visible(joints3d, joints2d, raw.box, raw.K_img, raw.dist)  # (N, 2, 21)
    if valid_rule == "arctic":
        valid = arctic_valid(joints3d, raw.K, raw.dist, raw.size)  # (N, 2)
        if raw.object_valid is not None:
            valid &= raw.object_valid[:, None]  # ARCTIC's loader: left_valid * is_valid, right_valid * is_valid
    else:
        valid = visible[..., 0] & (visible.sum(-1) >= min_visible_joints)  # (N, 2)

    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    return SequenceLabels(name=raw.name, image_paths=raw.image_paths, letterbox=raw.box, K=f32(K_box),
                          dist=f32(raw.dist), frame_index=raw.vidx.astype(np.int64), joints3d=f32(joints3d),
                          joints2d=f32(joints2d), rotmats=f32(np.stack(rotmats, axis=1)),
                          betas=f32(np.stack([hand["shape"] for hand in raw.hands], axis=1)),
                          hand_valid=valid, joints_visible=visible, cam_R=f32(R), cam_t=f32(T))


def _image_paths(root: Path, sid: str, seq: str, image_idx: np.ndarray, ioi: int) -> list[Path]:
    folder = root / "images" / sid / seq / str(EGO_VIEW)
    try:
        present = set(os.listdir(folder))
    except FileNotFoundError:
        raise DatasetError(f"image folder {folder} does not exist (egocentric view of {sid}/{seq})") from None
    names = [f"{i:05d}.jpg" for i in image_idx]
    for i, n in zip(image_idx, names):
        if n not in present:
            raise DatasetError(f"missing image {folder / n} for annotation frame {i - ioi} of {sid}/{seq} "
                               f"(image index = frame + ioi_offset {ioi} from {root / MISC_FILE}); restore it "
                               f"from the dataset")
    return [folder / n for n in names]


def _frame_geometry(root: Path, sid: str, first: Path, K: np.ndarray, size: tuple[int, int],
                    frame_size: int) -> tuple[Letterbox, np.ndarray]:
    """The letterbox of the stored frames and K for their pixels.

    misc.json gives the capture size that K refers to; stored frames may be a uniformly downscaled copy
    (ARCTIC also ships reduced images), in which case K is scaled with cv2.resize's pixel-centre convention.
    The size comes from the first frame's header alone: decoding a full-size ARCTIC frame costs far more than
    reading its header, and every dataset build reads one per sequence (the preparation decodes and checks
    every frame once, when it prepares it).
    """
    try:
        with Image.open(first) as image:
            w, h = image.size
    except OSError:  # PIL.UnidentifiedImageError is one
        raise DatasetError(f"image {first} cannot be decoded (truncated or not an image)") from None
    width, height = size
    sx, sy = w / width, h / height
    if abs(sx - sy) * max(width, height) > 1.0:  # not the same scale on both axes, up to rounding
        raise DatasetError(f"image {first} is {w}x{h} pixels but {root / MISC_FILE} gives subject '{sid}' an "
                           f"image_size of {width}x{height}; frames must be that size or a uniform downscale")
    K_img = K.copy()
    K_img[0] *= sx
    K_img[1] *= sy
    K_img[0, 2] += 0.5 * sx - 0.5
    K_img[1, 2] += 0.5 * sy - 0.5
    return Letterbox(w, h, frame_size), K_img


def _posed_joints(layer: MANOLayer, rot: np.ndarray, pose: np.ndarray, trans: np.ndarray,
                  shape: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World joints (N, 21, 3) and rotation matrices (N, 16, 3, 3) of ARCTIC's MANO parameters, ``shape``
    (N, 10) per frame.

    float32, like the stored parameters: float64 would cost more for no precision the labels can use. Only
    the joints are posed (:meth:`MANOLayer.joints`): a trial builds its splits' labels while it starts.
    """
    joints, rotmats = [], []
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    with torch.no_grad():
        for s in range(0, len(rot), _MANO_CHUNK):
            sl = slice(s, s + _MANO_CHUNK)
            r = layer.pose_to_rotmats(as_tensor(rot[sl]), as_tensor(pose[sl]), relative_to_mean=True)
            betas = as_tensor(shape[sl])
            joints.append(layer.joints(r, betas, as_tensor(trans[sl])).double().numpy())
            rotmats.append(r.double().numpy())
    return np.concatenate(joints), np.concatenate(rotmats)


def _joints_visible(joints3d: np.ndarray, joints2d: np.ndarray, box: Letterbox, K_img: np.ndarray,
                    dist: np.ndarray) -> np.ndarray:
    """(N, 2, 21) bool: joints in front of the camera, inside the lens's field of view and the image."""
    z = joints3d[..., 2]
    # Far outside the field of view a distortion polynomial can fold back into the image; points beyond
    # the image corners' undistorted radius (plus a margin) are out of view whatever they project to.
    corners = np.array([[0, 0], [box.width - 1, 0], [0, box.height - 1], [box.width - 1, box.height - 1],
                        [box.width / 2, 0], [box.width / 2, box.height - 1], [0, box.height / 2],
                        [box.width - 1, box.height / 2]], dtype=np.float64)
    undist = cv2.undistortPoints(corners[:, None], K_img, dist, None, None, None,
                                 (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 100, 1e-12))[:, 0]
    max_r2 = (1.2**2) * float((undist**2).sum(-1).max()) if np.isfinite(undist).all() else np.inf
    xy = joints3d[..., :2] / np.maximum(z, 1e-9)[..., None]
    (w, h), (pad_x, pad_y) = box.resized, box.pad
    u, v = joints2d[..., 0], joints2d[..., 1]
    return ((z > NEAR_Z) & ((xy**2).sum(-1) <= max_r2)
            & (u >= pad_x - 0.5) & (u <= pad_x + w - 0.5) & (v >= pad_y - 0.5) & (v <= pad_y + h - 0.5))
