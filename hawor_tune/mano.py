"""MANO hand layer in torch: shape blend, pose blend, forward kinematics and linear blend skinning.

The layer reads the official MANO_RIGHT.pkl / MANO_LEFT.pkl without chumpy, smplx or scipy (see
:func:`load_mano_pickle`), or uses the built-in procedural hand (:mod:`hawor_tune.procedural_hand`) when
no MANO files are configured. Both give vertices and 21 joints in OpenPose order: MANO's 16 kinematic
joints plus 5 fingertip vertices, re-ordered by :data:`OPENPOSE_ORDER`.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hawor_tune.config import ManoConfig
from hawor_tune.errors import HaworTuneError, MissingFileError
from hawor_tune.geometry import axis_angle_to_matrix
from hawor_tune.procedural_hand import make_procedural_hand

logger = logging.getLogger(__name__)

HANDS = ("left", "right")
KINDS = ("official", "procedural")
NUM_JOINTS = 21
NUM_KINEMATIC_JOINTS = 16
POSE_DIM = 45
# Indices into [16 kinematic joints, tips of thumb, index, middle, ring, pinky].
OPENPOSE_ORDER = [0, 13, 14, 15, 16, 1, 2, 3, 17, 4, 5, 6, 18, 10, 11, 12, 19, 7, 8, 9, 20]
# Finger name -> its 4 joints in OpenPose order, base to tip.
FINGERS = {"thumb": [1, 2, 3, 4], "index": [5, 6, 7, 8], "middle": [9, 10, 11, 12], "ring": [13, 14, 15, 16],
           "pinky": [17, 18, 19, 20]}
# Fingertip vertices of the official 778-vertex mesh (smplx's ids), thumb, index, middle, ring, pinky.
OFFICIAL_TIP_VERTEX_IDS = [744, 320, 443, 554, 671]
MANO_FILENAMES = {"left": "MANO_LEFT.pkl", "right": "MANO_RIGHT.pkl"}
MANO_DIR_ENV = "HAWOR_MANO_DIR"
# One left-hand convention for labels and predictions: ARCTIC's, the official MANO_LEFT.pkl as stored. ARCTIC
# fitted its labels and its own networks predict with smplx's MANO layer, which does not negate the left
# shapedirs' x-component (zc-alexfan/arctic, common/body_models.py, build_mano_aa; smplx issue 48): its left
# betas mean a shape only in that layer. docs/evaluation.md gives the size of the difference.
FIX_LEFT_SHAPEDIRS = False

_REQUIRED_KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f",
                  "hands_components", "hands_mean")
_INT_KEYS = ("kintree_table", "f")
# What a MANO file error tells the user to do.
_MANO_FILE_FIX = (f"use the official MANO_RIGHT.pkl / MANO_LEFT.pkl from https://mano.is.tue.mpg.de (in mano.model_dir "
                  f"or ${MANO_DIR_ENV}), or set neither for the built-in procedural hand")


class ManoFileError(HaworTuneError, ValueError):
    """A MANO file is not a MANO model (unreadable, or arrays missing or of the wrong shape)."""


# ---- Official pickle loading -------------------------------------------------------------------------

class _PickledState:
    """Holds the pickled ``__dict__`` of a class that is not imported; ``source`` names that class."""

    source = ""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple):  # (dict, slots) form
            state = state[0]
        self.__dict__.update(state or {})


class _ChumpyStandIn(_PickledState):
    """A chumpy object; :func:`_to_numpy` evaluates it."""


class _SparseStandIn(_PickledState):
    """A scipy.sparse matrix; :func:`_to_numpy` densifies it."""


@functools.cache
def _stand_in(base: type, module: str, name: str) -> type:
    return type(name, (base,), {"source": f"{module}.{name}"})


# Unpickling runs whatever callables a file names; MANO pickles need only numpy, chumpy, scipy.sparse and
# these, so anything else is refused rather than imported.
_SAFE_BUILTINS = {"object", "set", "frozenset", "list", "dict", "tuple", "slice", "complex", "bytearray",
                  "bytes", "str", "int", "float", "bool", "range"}


class _MANOUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "chumpy" or module.startswith("chumpy."):
            return _stand_in(_ChumpyStandIn, module, name)
        if module == "scipy.sparse" or module.startswith("scipy.sparse."):
            return _stand_in(_SparseStandIn, module, name)
        # Python 2 names (copy_reg, __builtin__) reach here before pickle maps them to Python 3's.
        allowed = (module == "numpy" or module.startswith("numpy.")
                   or module in ("copyreg", "copy_reg", "_codecs")
                   or (module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS))
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a MANO pickle holds only numpy, "
                                         "chumpy and scipy.sparse objects")
        return super().find_class(module, name)


def _dense_from_sparse(obj: _SparseStandIn) -> np.ndarray:
    state = obj.__dict__
    kind = obj.source.rsplit(".", 1)[-1]
    shape = state.get("_shape", state.get("shape"))
    if shape is None or not {"data", "indices", "indptr"} <= set(state) or kind not in (
            "csc_matrix", "csr_matrix", "csc_array", "csr_array"):
        raise ValueError(f"unsupported sparse object {obj.source} (state keys {sorted(state)}); "
                         "expected a csc/csr matrix with data, indices, indptr and _shape")
    data, indices, indptr = (np.asarray(state[k]) for k in ("data", "indices", "indptr"))
    compressed_axis = 1 if kind.startswith("csc") else 0  # csc compresses columns, csr rows
    compressed = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))  # (nnz,)
    rows, cols = (indices, compressed) if compressed_axis == 1 else (compressed, indices)
    dense = np.zeros(tuple(int(s) for s in shape), dtype=np.float64)
    np.add.at(dense, (rows, cols), data)  # sparse formats allow duplicate entries; they add up
    return dense


def _to_numpy(obj: Any) -> Any:
    """Turn chumpy/scipy stand-ins into numpy arrays (recursively); other objects pass through."""
    if isinstance(obj, _SparseStandIn):
        return _dense_from_sparse(obj)
    if not isinstance(obj, _ChumpyStandIn):
        return obj
    state, kind = obj.__dict__, obj.source.rsplit(".", 1)[-1]
    if "a" in state and kind in ("Select", "Reshape", "transpose"):
        a = np.asarray(_to_numpy(state["a"]))
        if kind == "Select":
            out = a.ravel()[np.asarray(state["idxs"])]
            return out.reshape(state["preferred_shape"]) if "preferred_shape" in state else out
        if kind == "Reshape":
            return a.reshape(state["newshape"])
        return np.transpose(a, axes=state.get("axes"))
    if "x" in state:
        return np.asarray(_to_numpy(state["x"]))
    raise ValueError(f"unsupported chumpy object {obj.source} (state keys {sorted(state)}); "
                     "expected a Ch holding 'x', or a Select/Reshape/transpose of one")


def load_mano_pickle(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an official MANO pickle into plain numpy arrays, with no chumpy, smplx or scipy installed.

    The files are Python 2 pickles (read with ``encoding='latin1'``); chumpy arrays and the scipy.sparse
    ``J_regressor`` are rebuilt from their pickled state by small stand-in classes.

    Args:
        path: MANO_RIGHT.pkl or MANO_LEFT.pkl.

    Returns:
        ``v_template`` (V, 3), ``shapedirs`` (V, 3, 10), ``posedirs`` (V, 3, 135), dense ``J_regressor``
        (16, V), ``weights`` (V, 16), ``hands_components`` (45, 45), ``hands_mean`` (45,) as float64 and
        ``kintree_table`` (2, 16), ``f`` (F, 3) as int64. Left-hand files are returned as stored:
        :class:`MANOLayer` applies the shapedirs fix where the file needs it.

    Raises:
        MissingFileError: ``path`` does not exist.
        ManoFileError: the file is not a MANO pickle (one line: the file, the problem and the fix).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"MANO file {path} does not exist")
    try:
        with path.open("rb") as fh:
            raw = _MANOUnpickler(fh, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError,
            ValueError) as e:
        raise ManoFileError(f"{path}: not a readable MANO pickle ({type(e).__name__}: {_first_line(e)}); "
                            f"{_MANO_FILE_FIX}") from None
    if not isinstance(raw, dict):
        raise ManoFileError(f"{path}: expected a MANO pickle holding a dict, got {type(raw).__name__}; {_MANO_FILE_FIX}")
    missing = [k for k in _REQUIRED_KEYS if k not in raw]
    if missing:
        raise ManoFileError(f"{path}: missing MANO keys {missing} (found {sorted(raw)}); {_MANO_FILE_FIX}")
    try:
        params = {k: np.array(_to_numpy(raw[k]), dtype=np.int64 if k in _INT_KEYS else np.float64)
                  for k in _REQUIRED_KEYS}
    except (TypeError, ValueError) as e:
        raise ManoFileError(f"{path}: {_first_line(e)}; {_MANO_FILE_FIX}") from None
    try:
        _check_params(params, str(path))  # names the file
    except ValueError as e:
        raise ManoFileError(f"{e}; {_MANO_FILE_FIX}") from None
    return params


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [""])[0][:200]


def _check_params(params: dict[str, Any], source: str) -> None:
    """Check that the model arrays have consistent MANO shapes; raise ValueError naming ``source``."""
    missing = [k for k in _REQUIRED_KEYS if k not in params]
    if missing:
        raise ValueError(f"{source}: missing MANO keys {missing}")
    shapes = {k: np.shape(params[k]) for k in _REQUIRED_KEYS}
    v = shapes["v_template"][0] if len(shapes["v_template"]) == 2 else -1
    betas = shapes["shapedirs"][-1] if len(shapes["shapedirs"]) == 3 else -1
    expected = {"v_template": (v, 3), "shapedirs": (v, 3, betas), "posedirs": (v, 3, 9 * (NUM_KINEMATIC_JOINTS - 1)),
                "J_regressor": (NUM_KINEMATIC_JOINTS, v), "weights": (v, NUM_KINEMATIC_JOINTS),
                "kintree_table": (2, NUM_KINEMATIC_JOINTS), "hands_components": (POSE_DIM, POSE_DIM),
                "hands_mean": (POSE_DIM,)}
    for key, want in expected.items():
        if v <= 0 or betas <= 0 or shapes[key] != want:
            raise ValueError(f"{source}: '{key}' has shape {shapes[key]}, expected {want} "
                             f"(V = vertex count, from v_template {shapes['v_template']})")
    faces = np.asarray(params["f"])
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.min() < 0 or faces.max() >= v:
        raise ValueError(f"{source}: 'f' must be (F, 3) vertex indices in [0, {v}), got shape {faces.shape}")


# ---- The layer ---------------------------------------------------------------------------------------

@dataclass
class MANOOutput:
    """Posed hands: ``vertices`` (..., V, 3) and ``joints`` (..., 21, 3) in OpenPose order, metres."""

    vertices: torch.Tensor
    joints: torch.Tensor


def _fk_levels(parents: list[int]) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """Group joints by depth for batched forward kinematics.

    Returns, per depth >= 1, the joints and the positions of their parents in the depth-ordered
    concatenation of the levels before it, and the permutation from that order back to joint order.
    """
    depth = [0] * len(parents)
    for j in range(1, len(parents)):
        depth[j] = depth[parents[j]] + 1
    order = [0]
    levels = []
    for d in range(1, max(depth) + 1):
        joints = [j for j in range(len(parents)) if depth[j] == d]
        levels.append((joints, [order.index(parents[j]) for j in joints]))
        order += joints
    return levels, [order.index(j) for j in range(len(parents))]


def _left_shapedirs(left: np.ndarray, right: np.ndarray | None, *, fix: bool,
                    source: str) -> tuple[np.ndarray, str]:
    """The shapedirs (V, 3, B) an official left model uses, and which case of the fix applied.

    Mirroring the right hand in x negates the x-component of every shape direction, but the official
    MANO_LEFT.pkl carries the right model's unchanged (smplx issue 48). Files patched by hand already hold
    the mirror, so the check, not the side alone, decides: negating those again would break them.
    """
    if not fix:
        return left, "off"
    if right is None:
        raise ValueError(f"{source}: the left shapedirs fix compares against the right model: pass "
                         "right_shapedirs (MANO_RIGHT.pkl's shapedirs), or fix_left_shapedirs=False to use "
                         "the shapedirs as stored")
    right = np.asarray(right, dtype=np.float64)
    if right.shape != left.shape:
        raise ValueError(f"{source}: right_shapedirs has shape {right.shape}, expected {left.shape} "
                         "(the left model's shapedirs)")
    if np.allclose(left[:, 0], right[:, 0]):
        fixed = left.copy()
        fixed[:, 0] *= -1.0  # (V, B) x-components
        return fixed, "fixed"
    if np.allclose(left[:, 0], -right[:, 0]):
        return left, "already fixed"
    return left, "unrecognised"


class MANOLayer(nn.Module):
    """Differentiable MANO: vertices and 21 OpenPose-ordered joints from rotation matrices and betas.

    All model arrays are non-persistent float32 buffers: they follow ``.to(device)`` but stay out of
    ``state_dict``, so checkpoints of models that hold a layer do not carry (or depend on) MANO data.

    Args:
        params: model arrays as returned by :func:`load_mano_pickle` or
            :func:`hawor_tune.procedural_hand.make_procedural_hand`; an optional ``tip_vertex_ids`` (5,)
            (thumb, index, middle, ring, pinky) overrides the official fingertip vertices.
        side: ``"left"`` or ``"right"``.
        kind: ``"official"`` or ``"procedural"``.
        fix_left_shapedirs: for an official left model, negate the x-component of ``shapedirs`` when it
            still equals the right model's (the official MANO_LEFT.pkl was not mirrored there; smplx issue 48);
            a file fixed already is used as stored. False uses the shapedirs as stored, as smplx does.
        right_shapedirs: (V, 3, B) the right model's ``shapedirs``, which that check compares against;
            required for an official left model with ``fix_left_shapedirs``, unused otherwise.

    Attributes:
        shapedirs_fix: for an official left model, which case applied: ``"fixed"``, ``"already fixed"``,
            ``"off"`` or ``"unrecognised"`` (the x-component matches neither the right model's nor its
            mirror, and is used as stored); None for other models.
    """

    def __init__(self, params: dict[str, Any], side: str, kind: str, *, fix_left_shapedirs: bool = True,
                 right_shapedirs: np.ndarray | None = None) -> None:
        super().__init__()
        if side not in HANDS:
            raise ValueError(f"MANO side must be one of {list(HANDS)}, got {side!r}")
        if kind not in KINDS:
            raise ValueError(f"MANO kind must be one of {list(KINDS)}, got {kind!r}")
        source = f"{kind} MANO params ({side})"
        _check_params(params, source)
        self.side, self.kind = side, kind

        def f64(key: str) -> np.ndarray:
            return np.array(params[key], dtype=np.float64)  # a copy: cached params are never modified

        v_template, shapedirs, posedirs = f64("v_template"), f64("shapedirs"), f64("posedirs")
        regressor, weights = f64("J_regressor"), f64("weights")
        self.shapedirs_fix: str | None = None
        if kind == "official" and side == "left":
            shapedirs, self.shapedirs_fix = _left_shapedirs(shapedirs, right_shapedirs, fix=fix_left_shapedirs,
                                                            source=source)
        self.num_vertices, self.num_betas = v_template.shape[0], shapedirs.shape[-1]

        tips = params.get("tip_vertex_ids")
        if tips is None:
            if kind != "official":
                raise ValueError(f"{source}: 'tip_vertex_ids' is required for a non-official hand")
            tips = OFFICIAL_TIP_VERTEX_IDS
        tips = [int(t) for t in np.asarray(tips).reshape(-1)]
        if len(tips) != 5 or min(tips) < 0 or max(tips) >= self.num_vertices:
            raise ValueError(f"{source}: tip_vertex_ids must be 5 vertex ids in [0, {self.num_vertices}), "
                             f"got {tips}")
        self.tip_vertex_ids = tips

        parents = [int(p) for p in np.asarray(params["kintree_table"])[0]]
        parents[0] = -1
        bad = [j for j in range(1, NUM_KINEMATIC_JOINTS) if not 0 <= parents[j] < j]
        if bad:
            raise ValueError(f"{source}: kintree_table parents must precede their joints; joints {bad} "
                             f"have parents {[parents[j] for j in bad]}")
        self.parents = parents
        self._levels, self._level_order_to_joint = _fk_levels(parents)
        # posedirs are all zero for the procedural hand; skipping the blend there saves a large matmul.
        self._use_posedirs = bool(np.any(posedirs))

        def buffer(name: str, value: np.ndarray, dtype: torch.dtype = torch.float32) -> None:
            self.register_buffer(name, torch.tensor(value, dtype=dtype), persistent=False)

        v = self.num_vertices
        buffer("v_template", v_template)  # (V, 3)
        buffer("shapedirs", shapedirs)  # (V, 3, B)
        buffer("posedirs", posedirs)  # (V, 3, 135)
        buffer("J_regressor", regressor)  # (16, V)
        buffer("weights", weights)  # (V, 16)
        buffer("faces", np.asarray(params["f"]), torch.long)  # (F, 3)
        buffer("hands_mean", f64("hands_mean"))  # (45,)
        buffer("hands_components", f64("hands_components"))  # (45, 45)
        # Joints are linear in betas, so regress the template and each shape direction once, in float64.
        buffer("_joint_template", regressor @ v_template)  # (16, 3)
        buffer("_joint_shapedirs", np.einsum("jv,vck->jck", regressor, shapedirs))  # (16, 3, B)
        # The forward pass works coordinate-major, (N, 3, V): every per-vertex op then runs over a contiguous
        # V axis instead of on N*V tiny 3x4 matrices (several times faster on CPU, forward and backward).
        buffer("_template_cm", v_template.T.copy())  # (3, V)
        buffer("_shapedirs_cm", shapedirs.transpose(2, 1, 0).reshape(self.num_betas, 3 * v).copy())  # (B, 3*V)
        buffer("_posedirs_cm", posedirs.transpose(2, 1, 0).reshape(-1, 3 * v).copy())  # (135, 3*V)
        buffer("_weights_t", weights.T.copy())  # (16, V)

    def extra_repr(self) -> str:
        fix = f", shapedirs_fix={self.shapedirs_fix}" if self.shapedirs_fix else ""
        return f"side={self.side}, kind={self.kind}, vertices={self.num_vertices}, betas={self.num_betas}{fix}"

    def pose_to_rotmats(self, global_orient: torch.Tensor, hand_pose: torch.Tensor,
                        relative_to_mean: bool) -> torch.Tensor:
        """Axis-angle MANO parameters to the rotation matrices :meth:`forward` takes.

        Args:
            global_orient: (..., 3) root rotation, axis-angle.
            hand_pose: (..., 45) 15 finger-joint rotations, axis-angle.
            relative_to_mean: True when ``hand_pose`` is relative to the mean hand (ARCTIC's and smplx's
                ``flat_hand_mean=False`` convention): ``hands_mean`` is added first. False for absolute poses.

        Returns:
            (..., 16, 3, 3) rotations, root first.
        """
        if global_orient.shape[-1:] != (3,) or hand_pose.shape[-1:] != (POSE_DIM,) or (
                global_orient.shape[:-1] != hand_pose.shape[:-1]):
            raise ValueError(f"pose_to_rotmats expects global_orient (..., 3) and hand_pose (..., {POSE_DIM}) "
                             f"with equal leading dims, got {tuple(global_orient.shape)} and "
                             f"{tuple(hand_pose.shape)}")
        if relative_to_mean:
            hand_pose = hand_pose + self.hands_mean.to(hand_pose.dtype)
        aa = torch.cat([global_orient[..., None, :], hand_pose.reshape(*hand_pose.shape[:-1], 15, 3)], dim=-2)
        return axis_angle_to_matrix(aa)  # (..., 16, 3, 3)

    def forward(self, rotmats: torch.Tensor, betas: torch.Tensor,
                transl: torch.Tensor | None = None) -> MANOOutput:
        """Pose and shape the hand.

        Args:
            rotmats: (..., 16, 3, 3) rotations; [..., 0] is the global orientation, [..., 1:] the finger
                joints relative to their parents (absolute pose, hands_mean already included).
            betas: (..., 10) shape coefficients.
            transl: optional (..., 3) translation added to every vertex and joint.

        Returns:
            :class:`MANOOutput` with vertices (..., V, 3) and joints (..., 21, 3), OpenPose order.
        """
        lead = tuple(rotmats.shape[:-3])
        self._check_shapes(rotmats, betas, transl)
        R = rotmats.reshape(-1, NUM_KINEMATIC_JOINTS, 3, 3)  # (N, 16, 3, 3)
        n, v = R.shape[0], self.num_vertices
        G_t, vertices = self._skin(R, betas.reshape(n, self.num_betas), None)  # (N, 16, 3), (N, 3, V)
        keypoints = _openpose_keypoints(G_t, vertices[:, :, self.tip_vertex_ids], transl)  # (N, 21, 3)
        vertices = vertices.transpose(1, 2).contiguous()  # (N, V, 3); contiguous so that callers can .view()
        if transl is not None:
            vertices = vertices + transl.reshape(n, 1, 3).to(vertices.dtype)
        return MANOOutput(vertices=vertices.reshape(*lead, v, 3),
                          joints=keypoints.reshape(*lead, NUM_JOINTS, 3))

    def joints(self, rotmats: torch.Tensor, betas: torch.Tensor, transl: torch.Tensor | None = None) -> torch.Tensor:
        """The joints of :meth:`forward`, (..., 21, 3), the same values, without the vertices: only the five
        fingertip vertices are skinned, not all V (778 for MANO). Labels need only the joints."""
        lead = tuple(rotmats.shape[:-3])
        self._check_shapes(rotmats, betas, transl)
        R = rotmats.reshape(-1, NUM_KINEMATIC_JOINTS, 3, 3)  # (N, 16, 3, 3)
        n = R.shape[0]
        G_t, tips = self._skin(R, betas.reshape(n, self.num_betas), self.tip_vertex_ids)  # (N, 16, 3), (N, 3, 5)
        return _openpose_keypoints(G_t, tips, transl).reshape(*lead, NUM_JOINTS, 3)

    def _check_shapes(self, rotmats: torch.Tensor, betas: torch.Tensor, transl: torch.Tensor | None) -> None:
        lead = tuple(rotmats.shape[:-3])
        if tuple(rotmats.shape[-3:]) != (NUM_KINEMATIC_JOINTS, 3, 3) or tuple(betas.shape) != (
                *lead, self.num_betas):
            raise ValueError(f"MANO forward expects rotmats (..., 16, 3, 3) and betas (..., {self.num_betas}) "
                             f"with equal leading dims, got {tuple(rotmats.shape)} and {tuple(betas.shape)}")
        if transl is not None and tuple(transl.shape) != (*lead, 3):
            raise ValueError(f"MANO forward expects transl {(*lead, 3)}, got {tuple(transl.shape)}")

    def _skin(self, R: torch.Tensor, betas: torch.Tensor,
              vertex_ids: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint positions (N, 16, 3) and skinned vertices (N, 3, V'), coordinate-major, of rotations
        (N, 16, 3, 3) and betas (N, B): all V vertices, or only ``vertex_ids`` (V',), each computed exactly
        as among all."""
        dtype, v = R.dtype, self.num_vertices
        b = betas.to(dtype)  # (N, B)
        n = R.shape[0]
        template, shapedirs = self._template_cm, self._shapedirs_cm  # (3, V), (B, 3*V)
        posedirs, weights = self._posedirs_cm, self._weights_t  # (135, 3*V), (16, V)
        if vertex_ids is not None:
            v = len(vertex_ids)
            template, weights = template[:, vertex_ids], weights[:, vertex_ids]
            shapedirs = shapedirs.view(-1, 3, self.num_vertices)[:, :, vertex_ids].reshape(-1, 3 * v)
            posedirs = posedirs.view(-1, 3, self.num_vertices)[:, :, vertex_ids].reshape(-1, 3 * v)

        v_posed = template.to(dtype) + (b @ shapedirs.to(dtype)).view(n, 3, v)  # (N, 3, V)
        joints = self._joint_template.to(dtype) + torch.einsum("jck,nk->njc", self._joint_shapedirs.to(dtype),
                                                               b)  # (N, 16, 3)
        if self._use_posedirs:
            eye = torch.eye(3, dtype=dtype, device=R.device)
            pose_feature = (R[:, 1:] - eye).reshape(n, -1)  # (N, 135)
            v_posed = v_posed + (pose_feature @ posedirs.to(dtype)).view(n, 3, v)

        G_R, G_t = self._forward_kinematics(R, joints)  # (N, 16, 3, 3), (N, 16, 3)
        # Each joint's transform maps a rest point x to G_R (x - J) + G_t; blend those per vertex.
        offset = G_t - (G_R @ joints[..., None])[..., 0]  # (N, 16, 3)
        A = torch.cat([G_R, offset[..., None]], dim=-1).reshape(n, NUM_KINEMATIC_JOINTS, 12)  # (N, 16, 12)
        T = (A.transpose(1, 2) @ weights.to(dtype)).view(n, 3, 4, v)  # (N, 3, 4, V)
        return G_t, (T[:, :, :3] * v_posed[:, None]).sum(2) + T[:, :, 3]  # (N, 3, V)

    def _forward_kinematics(self, R: torch.Tensor, joints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global rotations (N, 16, 3, 3) and positions (N, 16, 3) of the joints, one depth level at a time."""
        rel = torch.cat([joints[:, :1], joints[:, 1:] - joints[:, self.parents[1:]]], dim=1)  # (N, 16, 3)
        G_R, G_t = R[:, :1], joints[:, :1]  # depth-ordered so far
        for level, parent_pos in self._levels:
            PR, Pt = G_R[:, parent_pos], G_t[:, parent_pos]  # (N, L, 3, 3), (N, L, 3)
            G_R = torch.cat([G_R, PR @ R[:, level]], dim=1)
            G_t = torch.cat([G_t, (PR @ rel[:, level, :, None])[..., 0] + Pt], dim=1)
        return G_R[:, self._level_order_to_joint], G_t[:, self._level_order_to_joint]


def _openpose_keypoints(G_t: torch.Tensor, tips: torch.Tensor, transl: torch.Tensor | None) -> torch.Tensor:
    """The 21 keypoints (N, 21, 3) in OpenPose order from the 16 joint positions (N, 16, 3) and the five
    fingertip vertices, coordinate-major (N, 3, 5), moved by ``transl`` (..., 3) when given."""
    keypoints = torch.cat([G_t, tips.transpose(1, 2)], dim=1)[:, OPENPOSE_ORDER]  # (N, 21, 3)
    if transl is None:
        return keypoints
    return keypoints + transl.reshape(-1, 1, 3).to(keypoints.dtype)


# ---- Building ------------------------------------------------------------------------------------------

def _read_only(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for arr in params.values():
        arr.setflags(write=False)
    return params


@functools.lru_cache(maxsize=8)
def _official_params(path: str, mtime_ns: int) -> dict[str, np.ndarray]:
    # mtime_ns is part of the key so that a replaced file is read again. Logged here: once per file.
    logger.info("MANO: official model from %s", path)
    return _read_only(load_mano_pickle(path))


@functools.lru_cache(maxsize=2)
def _procedural_params(side: str) -> dict[str, np.ndarray]:
    logger.info("MANO: built-in procedural hand (no MANO files configured), %s hand", side)
    return _read_only(make_procedural_hand(side))


_LEFT_FIX_LOG = {
    "fixed": "x-component equalled the right model's (smplx issue 48), negated",
    "already fixed": "x-component already mirrors the right model's, used as stored",
    "off": "used as stored, ARCTIC's convention for labels and predictions",
    "unrecognised": "x-component matches neither the right model's nor its mirror, used as stored",
}


@functools.cache
def _log_left_shapedirs(path: str, case: str) -> None:
    # Cached: said once per file and case, however often the layers are built.
    level = logging.WARNING if case == "unrecognised" else logging.INFO
    logger.log(level, "MANO: %s: left-hand shapedirs %s (%s)", path, case, _LEFT_FIX_LOG[case])


def build_mano(cfg: ManoConfig, side: str, *, fix_left_shapedirs: bool = FIX_LEFT_SHAPEDIRS) -> MANOLayer:
    """The MANO layer for one hand: official files when configured, else the built-in procedural hand.

    The model folder is ``cfg.model_dir``, else ``$HAWOR_MANO_DIR``; with neither set the procedural hand
    is used. Loaded arrays are cached per file as stored (the shapedirs fix is applied to the layer's own
    copy), so building again is cheap, with either setting of ``fix_left_shapedirs``.

    Args:
        cfg: the ``mano`` config section.
        side: ``"left"`` or ``"right"``.
        fix_left_shapedirs: for official files, fix MANO_LEFT.pkl's shapedirs where it still needs it (see
            :class:`MANOLayer`; MANO_RIGHT.pkl in the same folder is read to decide). The default,
            :data:`FIX_LEFT_SHAPEDIRS`, uses the file as stored, ARCTIC's convention, for the labels and the
            network alike. No effect on the right hand or the procedural hand, which is built mirrored.

    Raises:
        ValueError: ``side`` is not "left" or "right".
        ManoFileError: the file is not a MANO pickle.
        MissingFileError: a folder is configured but has no MANO_LEFT.pkl / MANO_RIGHT.pkl (a left layer
            with ``fix_left_shapedirs`` needs both).
    """
    if side not in HANDS:
        raise ValueError(f"MANO side must be one of {list(HANDS)}, got {side!r}")
    model_dir, key = cfg.model_dir, "mano.model_dir"
    if not model_dir:
        model_dir, key = os.environ.get(MANO_DIR_ENV, ""), f"${MANO_DIR_ENV}"
    if not model_dir:
        return MANOLayer(_procedural_params(side), side, "procedural")
    folder = Path(model_dir).expanduser().resolve()

    def load(hand: str) -> dict[str, np.ndarray]:
        path = folder / MANO_FILENAMES[hand]
        if not path.is_file():
            raise MissingFileError(
                f"MANO file {path} not found ({key}={model_dir!r}). Download MANO_RIGHT.pkl and MANO_LEFT.pkl "
                f"from https://mano.is.tue.mpg.de into that folder, or set mano.model_dir='' and unset "
                f"{MANO_DIR_ENV} to use the built-in procedural hand.")
        return _official_params(str(path), path.stat().st_mtime_ns)

    params = load(side)
    right_shapedirs = load("right")["shapedirs"] if side == "left" and fix_left_shapedirs else None
    layer = MANOLayer(params, side, "official", fix_left_shapedirs=fix_left_shapedirs,
                      right_shapedirs=right_shapedirs)
    if layer.shapedirs_fix is not None:
        _log_left_shapedirs(str(folder / MANO_FILENAMES[side]), layer.shapedirs_fix)
    return layer
