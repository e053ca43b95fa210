"""Tests for hawor_tune.mano and hawor_tune.procedural_hand.

The layer is checked against a numpy reference written here (one sample at a time, 4x4 homogeneous
transforms, the textbook SMPL/MANO recipe), and the official-pickle loader against a pickle written in the
official format (chumpy objects, a scipy csc J_regressor, latin1) by stand-in modules that are removed from
``sys.modules`` before loading.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAKE_MODULES, random_official_mano, write_official_mano_pickle

from hawor_tune import mano
from hawor_tune.config import ManoConfig
from hawor_tune.mano import (
    FINGERS,
    HANDS,
    NUM_JOINTS,
    OFFICIAL_TIP_VERTEX_IDS,
    OPENPOSE_ORDER,
    ManoFileError,
    MANOLayer,
    build_mano,
    load_mano_pickle,
)
from hawor_tune.procedural_hand import COMPONENT_NAMES, SHAPE_NAMES, make_procedural_hand

# MANO's kinematic joints per finger, base to last (0 is the wrist).
KINEMATIC = {"thumb": (13, 14, 15), "index": (1, 2, 3), "middle": (4, 5, 6), "ring": (10, 11, 12),
             "pinky": (7, 8, 9)}
TIP_ORDER = ("thumb", "index", "middle", "ring", "pinky")


@pytest.fixture(autouse=True)
def _no_mano_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(mano.MANO_DIR_ENV, raising=False)


# ---- Independent references ----------------------------------------------------------------------------

def _rodrigues(aa: np.ndarray) -> np.ndarray:
    """(..., 3) axis-angle -> (..., 3, 3), R = I + sin(t) K + (1 - cos(t)) K^2 with the unit axis."""
    out = np.empty((*aa.shape[:-1], 3, 3))
    for idx in np.ndindex(*aa.shape[:-1]):
        theta = np.linalg.norm(aa[idx])
        if theta < 1e-12:
            out[idx] = np.eye(3)
            continue
        x, y, z = aa[idx] / theta
        K = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
        out[idx] = np.eye(3) + np.sin(theta) * K + (1 - np.cos(theta)) * K @ K
    return out


def _openpose(joints16: np.ndarray, tips: np.ndarray) -> np.ndarray:
    """Wrist, then per finger (thumb, index, middle, ring, pinky) its three joints and its tip."""
    rows = [joints16[0]]
    for i, name in enumerate(TIP_ORDER):
        rows += [joints16[j] for j in KINEMATIC[name]] + [tips[i]]
    return np.stack(rows)


def _reference(params: dict, side: str, kind: str, rotmats: np.ndarray, betas: np.ndarray,
               transl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One hand in float64: vertices (V, 3) and OpenPose joints (21, 3)."""
    shapedirs = np.array(params["shapedirs"], dtype=np.float64)
    if kind == "official" and side == "left":
        shapedirs[:, 0, :] *= -1  # smplx issue 48; _model's left and right share shapedirs, so the fix applies
    v_shaped = params["v_template"] + shapedirs @ betas
    J = params["J_regressor"] @ v_shaped
    v_posed = v_shaped + params["posedirs"] @ (rotmats[1:] - np.eye(3)).ravel()
    parents = np.asarray(params["kintree_table"])[0]
    G = np.zeros((16, 4, 4))
    for j in range(16):
        local = np.eye(4)
        local[:3, :3] = rotmats[j]
        local[:3, 3] = J[j] - (J[parents[j]] if j > 0 else 0.0)
        G[j] = local if j == 0 else G[parents[j]] @ local
    A = G.copy()
    for j in range(16):
        A[j, :3, 3] -= G[j, :3, :3] @ J[j]
    verts = np.empty_like(v_posed)
    for i in range(len(v_posed)):
        T = np.tensordot(params["weights"][i], A, axes=1)
        verts[i] = T[:3, :3] @ v_posed[i] + T[:3, 3]
    tips = verts[np.asarray(params.get("tip_vertex_ids", OFFICIAL_TIP_VERTEX_IDS))]
    return verts + transl, _openpose(G[:, :3, 3], tips) + transl


def _random_pose(n: int, seed: int, scale: float = 0.6) -> np.ndarray:
    return _rodrigues(np.random.default_rng(seed).normal(0, scale, (n, 16, 3)))


def _layer_out(layer: MANOLayer, rotmats: np.ndarray, betas: np.ndarray, transl: np.ndarray | None = None):
    t = None if transl is None else torch.tensor(transl, dtype=torch.float32)
    with torch.no_grad():
        out = layer(torch.tensor(rotmats, dtype=torch.float32), torch.tensor(betas, dtype=torch.float32), t)
    return out.vertices.numpy(), out.joints.numpy()


def _model(kind: str, side: str) -> tuple[dict, MANOLayer]:
    if kind == "procedural":
        params = make_procedural_hand(side)
        return params, MANOLayer(params, side, kind)
    params = random_official_mano(seed=3)
    return params, MANOLayer(params, side, kind, right_shapedirs=params["shapedirs"])


# ---- Shapes and reference values ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["procedural", "official"])
def test_output_shapes_and_dtypes(kind: str) -> None:
    _, layer = _model(kind, "right")
    rot = torch.tensor(_random_pose(6, seed=0), dtype=torch.float32).reshape(2, 3, 16, 3, 3)
    out = layer(rot, torch.zeros(2, 3, 10), torch.zeros(2, 3, 3))
    assert out.vertices.shape == (2, 3, layer.num_vertices, 3) and out.joints.shape == (2, 3, NUM_JOINTS, 3)
    assert out.vertices.dtype == out.joints.dtype == torch.float32 and out.vertices.is_contiguous()
    assert layer.faces.dtype == torch.long and layer.faces.shape[1] == 3
    assert layer.hands_mean.shape == (45,) and layer.hands_components.shape == (45, 45)
    assert layer.state_dict() == {}  # MANO data stays out of model checkpoints


@pytest.mark.parametrize("side", HANDS)
@pytest.mark.parametrize("kind", ["procedural", "official"])
def test_zero_pose_gives_regressed_joints_and_tip_vertices(kind: str, side: str) -> None:
    params, layer = _model(kind, side)
    verts, joints = _layer_out(layer, np.tile(np.eye(3), (1, 16, 1, 1)), np.zeros((1, 10)))
    tip_ids = params.get("tip_vertex_ids", [744, 320, 443, 554, 671])
    expected = _openpose(params["J_regressor"] @ params["v_template"], params["v_template"][tip_ids])
    np.testing.assert_allclose(joints[0], expected, atol=1e-6)
    np.testing.assert_allclose(verts[0], params["v_template"], atol=1e-6)


@pytest.mark.parametrize("side", HANDS)
@pytest.mark.parametrize("kind", ["procedural", "official"])
def test_forward_matches_numpy_reference(kind: str, side: str) -> None:
    params, layer = _model(kind, side)
    rng = np.random.default_rng(1)
    rotmats, betas, transl = _random_pose(2, seed=2), rng.normal(0, 1.5, (2, 10)), rng.normal(0, 0.3, (2, 3))
    verts, joints = _layer_out(layer, rotmats, betas, transl)
    for i in range(2):
        ref_v, ref_j = _reference(params, side, kind, rotmats[i], betas[i], transl[i])
        np.testing.assert_allclose(verts[i], ref_v, atol=2e-6)
        np.testing.assert_allclose(joints[i], ref_j, atol=2e-6)
    # Labels are posed with joints() alone: forward()'s joints, in any leading dims. To the last bit on some
    # CPUs; on others (seen on an AVX-512 EPYC) the matrix products' blocking follows their shapes and moves a
    # coordinate by an ulp or two.
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)[None]  # noqa: E731  leading dims (1, 2)
    with torch.no_grad():
        for t in (None, as_t(transl)):
            alone = layer.joints(as_t(rotmats), as_t(betas), t)
            assert alone.shape == (1, 2, NUM_JOINTS, 3)
            torch.testing.assert_close(alone, layer(as_t(rotmats), as_t(betas), t).joints, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("side, digest", [("left", "3f03fedcb0882960"), ("right", "71680f32e170a162")])
def test_the_built_in_hand_is_the_one_the_data_was_made_with(side: str, digest: str) -> None:
    # Generated datasets, prepared shards and pretrained starts are keyed by the generator's version and the
    # MANO kind, not by this code: the built-in hand's arrays must stay the same (this digest of them, floats
    # to 1e-9) unless synthetic.GENERATOR_VERSION moves with them. Rounded because the last bits of its
    # dot products follow the CPU's BLAS kernel (the digest is the same under every OPENBLAS_CORETYPE tried,
    # Core2 to SapphireRapids); + 0.0 turns a rounded -0.0 into 0.0.
    h = hashlib.sha256()
    for key, value in sorted(make_procedural_hand(side).items()):
        a = np.ascontiguousarray(value)
        if a.dtype.kind == "f":
            a = np.round(a, 9) + 0.0
        for part in (key.encode(), str(a.dtype).encode(), str(a.shape).encode(), a.tobytes()):
            h.update(part)
    assert h.hexdigest()[:16] == digest


def test_openpose_constants_agree_with_finger_layout() -> None:
    joints16, tips = np.arange(16.0)[:, None], np.arange(16.0, 21.0)[:, None]
    assert OPENPOSE_ORDER == _openpose(joints16, tips)[:, 0].astype(int).tolist()
    assert FINGERS == {name: list(range(1 + 4 * i, 5 + 4 * i)) for i, name in enumerate(TIP_ORDER)}


# ---- Official pickle loading ---------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [0, 2])
def test_official_pickle_loads_without_chumpy_or_scipy(tmp_path: Path, protocol: int) -> None:
    params = random_official_mano(seed=5)
    path = tmp_path / "MANO_RIGHT.pkl"
    write_official_mano_pickle(path, params, protocol)
    assert not any(name in sys.modules for name in FAKE_MODULES)
    assert importlib.util.find_spec("chumpy") is None and importlib.util.find_spec("scipy") is None

    loaded = load_mano_pickle(path)
    assert sorted(loaded) == sorted(params)
    for key, value in params.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    rotmats, betas = _random_pose(3, seed=6), np.random.default_rng(7).normal(size=(3, 10))
    np.testing.assert_array_equal(_layer_out(MANOLayer(loaded, "right", "official"), rotmats, betas)[1],
                                  _layer_out(MANOLayer(params, "right", "official"), rotmats, betas)[1])


def _write_official_pair(folder: Path, left_x: str) -> dict[str, dict[str, np.ndarray]]:
    """MANO_RIGHT.pkl and MANO_LEFT.pkl whose left shapedirs x-component is ``left_x``: ``"right"`` (as in
    the official files), ``"-right"`` (fixed already) or ``"other"`` (neither); returns what was written."""
    params = {side: random_official_mano(seed=i) for i, side in enumerate(HANDS)}
    right_x = params["right"]["shapedirs"][:, 0]  # (V, B)
    if left_x != "other":
        params["left"]["shapedirs"][:, 0] = right_x if left_x == "right" else -right_x
    for side in HANDS:
        write_official_mano_pickle(folder / mano.MANO_FILENAMES[side], params[side])
    return params


@pytest.mark.parametrize(("stored", "fix", "case", "used"), [
    ("right", True, "fixed", "-right"),  # the official files: negated once
    ("-right", True, "already fixed", "-right"),  # fixed by hand already: not negated twice
    ("other", True, "unrecognised", "other"),
    ("right", False, "off", "right"),  # option off (ARCTIC's labels): used as stored
    ("-right", False, "off", "-right"),
])
def test_build_mano_left_shapedirs_fix(tmp_path: Path, caplog: pytest.LogCaptureFixture, stored: str, fix: bool,
                                       case: str, used: str) -> None:
    caplog.set_level(logging.INFO, logger="hawor_tune.mano")
    mano._log_left_shapedirs.cache_clear()
    params = _write_official_pair(tmp_path, stored)
    cfg = ManoConfig(model_dir=str(tmp_path))
    left, right = (build_mano(cfg, side, fix_left_shapedirs=fix) for side in HANDS)
    assert left.kind == right.kind == "official" and left.tip_vertex_ids == OFFICIAL_TIP_VERTEX_IDS
    assert (left.shapedirs_fix, right.shapedirs_fix) == (case, None)
    right_x = params["right"]["shapedirs"][:, 0]  # (V, B)
    shapedirs = params["left"]["shapedirs"].copy()  # (V, 3, B)
    shapedirs[:, 0] = {"right": right_x, "-right": -right_x, "other": shapedirs[:, 0]}[used]
    np.testing.assert_allclose(left.shapedirs.numpy(), shapedirs, atol=1e-7)
    np.testing.assert_allclose(right.shapedirs.numpy(), params["right"]["shapedirs"], atol=1e-7)
    # The forward pass uses them: at the zero pose, betas move vertices by shapedirs @ betas.
    zero_pose, betas = np.tile(np.eye(3), (1, 16, 1, 1)), np.random.default_rng(0).normal(size=(1, 10))
    (v0, j0), (v1, j1) = (_layer_out(left, zero_pose, b) for b in (np.zeros((1, 10)), betas))
    dv = shapedirs @ betas[0]  # (V, 3)
    np.testing.assert_allclose(v1[0] - v0[0], dv, atol=1e-6)
    np.testing.assert_allclose(j1[0] - j0[0], _openpose(params["left"]["J_regressor"] @ dv,
                                                        dv[OFFICIAL_TIP_VERTEX_IDS]), atol=1e-6)

    # The cache holds the files as stored: the other setting, built in between, does not leak into this one.
    build_mano(cfg, "left", fix_left_shapedirs=not fix)
    again = build_mano(cfg, "left", fix_left_shapedirs=fix)
    assert again.shapedirs_fix == case
    torch.testing.assert_close(again.shapedirs, left.shapedirs)
    assert caplog.text.count(f"left-hand shapedirs {case} (") == 1  # said once per file and case
    record = next(r for r in caplog.records if f"shapedirs {case} (" in r.getMessage())
    assert record.levelno == (logging.WARNING if case == "unrecognised" else logging.INFO)


@pytest.mark.parametrize("fix", [True, False])
def test_build_mano_left_fix_needs_the_right_file(tmp_path: Path, fix: bool) -> None:
    write_official_mano_pickle(tmp_path / "MANO_LEFT.pkl", random_official_mano(seed=0))
    cfg = ManoConfig(model_dir=str(tmp_path))
    if not fix:
        assert build_mano(cfg, "left", fix_left_shapedirs=False).shapedirs_fix == "off"
        return
    with pytest.raises(FileNotFoundError, match="MANO_RIGHT.pkl not found"):
        build_mano(cfg, "left", fix_left_shapedirs=True)


@pytest.mark.parametrize("fix", [True, False])
def test_left_shapedirs_fix_leaves_the_procedural_hand_alone(fix: bool) -> None:
    layer = build_mano(ManoConfig(), "left", fix_left_shapedirs=fix)
    assert layer.kind == "procedural" and layer.shapedirs_fix is None
    np.testing.assert_allclose(layer.shapedirs.numpy(), make_procedural_hand("left")["shapedirs"], atol=1e-7)


def _pickle_calling_os_system(path: Path) -> None:
    path.write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")


@pytest.mark.parametrize(("writer", "message"), [
    (lambda p: p.write_bytes(b"not a pickle at all"), "not a readable MANO pickle"),
    (lambda p: p.write_bytes(pickle.dumps({"v_template": np.zeros((4, 3))}, protocol=2)), "missing MANO keys"),
    (lambda p: p.write_bytes(pickle.dumps([1, 2], protocol=2)), "holding a dict"),
    (_pickle_calling_os_system, "refusing to load os.system"),
])
def test_loader_rejects_bad_files_naming_them(tmp_path: Path, writer, message: str) -> None:
    path = tmp_path / "MANO_RIGHT.pkl"
    writer(path)
    with pytest.raises(ManoFileError, match=message) as info:
        load_mano_pickle(path)
    _assert_one_line_naming_the_file_and_the_fix(info.value, path)


def _assert_one_line_naming_the_file_and_the_fix(error: Exception, path: Path) -> None:
    text = str(error)
    assert text.startswith(f"{path}: ") and "\n" not in text
    assert text.endswith("use the official MANO_RIGHT.pkl / MANO_LEFT.pkl from https://mano.is.tue.mpg.de (in "
                         "mano.model_dir or $HAWOR_MANO_DIR), or set neither for the built-in procedural hand")
    assert isinstance(error, ValueError)  # what callers caught before


def test_loader_rejects_a_truncated_official_file(tmp_path: Path) -> None:
    path = tmp_path / "MANO_RIGHT.pkl"
    write_official_mano_pickle(path, random_official_mano(seed=0))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a download cut short
    with pytest.raises(ManoFileError, match="not a readable MANO pickle") as info:
        load_mano_pickle(path)
    _assert_one_line_naming_the_file_and_the_fix(info.value, path)


def test_loader_rejects_inconsistent_shapes(tmp_path: Path) -> None:
    params = random_official_mano(seed=0)
    params["weights"] = params["weights"][:, :15]
    path = tmp_path / "MANO_LEFT.pkl"
    write_official_mano_pickle(path, params)
    with pytest.raises(ManoFileError, match=r"'weights' has shape \(778, 15\), expected \(778, 16\)") as info:
        load_mano_pickle(path)
    _assert_one_line_naming_the_file_and_the_fix(info.value, path)


# ---- build_mano --------------------------------------------------------------------------------------

@pytest.mark.parametrize("via", ["config", "env"])
def test_build_mano_missing_files_names_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, via: str) -> None:
    missing = tmp_path / "no_such_dir"
    if via == "env":
        monkeypatch.setenv(mano.MANO_DIR_ENV, str(missing))
    cfg = ManoConfig(model_dir=str(missing) if via == "config" else "")
    with pytest.raises(FileNotFoundError) as info:
        build_mano(cfg, "left")
    text = str(info.value)
    assert str(missing / "MANO_LEFT.pkl") in text and "procedural" in text
    assert ("mano.model_dir" if via == "config" else mano.MANO_DIR_ENV) in text


def test_build_mano_logs_source_and_caches_arrays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hawor_tune.mano")
    mano._procedural_params.cache_clear()  # the model in use is logged once per process, when first built
    layer = build_mano(ManoConfig(), "right")
    build_mano(ManoConfig(), "right")
    assert layer.kind == "procedural"
    assert caplog.text.count("MANO: built-in procedural hand (no MANO files configured), right hand") == 1

    write_official_mano_pickle(tmp_path / "MANO_RIGHT.pkl", random_official_mano(seed=1))
    calls = []
    real = mano.load_mano_pickle
    monkeypatch.setattr(mano, "load_mano_pickle", lambda p: calls.append(p) or real(p))
    monkeypatch.setenv(mano.MANO_DIR_ENV, str(tmp_path))
    first, second = build_mano(ManoConfig(), "right"), build_mano(ManoConfig(), "right")
    assert len(calls) == 1 and first.kind == "official"
    assert caplog.text.count(f"MANO: official model from {tmp_path.resolve() / 'MANO_RIGHT.pkl'}") == 1
    torch.testing.assert_close(first.v_template, second.v_template)
    first.v_template.add_(1.0)  # a layer owns its tensors: the cache is not affected
    assert not torch.equal(build_mano(ManoConfig(), "right").v_template, first.v_template)


def test_invalid_side_and_kind_are_rejected() -> None:
    with pytest.raises(ValueError, match="'middle'"):
        build_mano(ManoConfig(), "middle")
    with pytest.raises(ValueError, match="kind must be one of"):
        MANOLayer(make_procedural_hand("right"), "right", "smplx")
    params = random_official_mano(seed=0)
    with pytest.raises(ValueError, match="pass right_shapedirs .* or fix_left_shapedirs=False"):
        MANOLayer(params, "left", "official")
    with pytest.raises(ValueError, match=r"right_shapedirs has shape \(778, 3, 9\), expected \(778, 3, 10\)"):
        MANOLayer(params, "left", "official", right_shapedirs=params["shapedirs"][..., :9])


# ---- Pose conventions, shape, gradients, rigid motion --------------------------------------------------

def test_pose_to_rotmats_relative_to_mean_adds_hands_mean() -> None:
    layer = build_mano(ManoConfig(), "left")
    rng = np.random.default_rng(4)
    go, hp = rng.normal(0, 0.5, (3, 3)), rng.normal(0, 0.3, (3, 45))
    mean = layer.hands_mean.double().numpy()
    rel = layer.pose_to_rotmats(torch.tensor(go), torch.tensor(hp), relative_to_mean=True)
    absolute = layer.pose_to_rotmats(torch.tensor(go), torch.tensor(hp), relative_to_mean=False)
    expected = _rodrigues(np.concatenate([go[:, None], (hp + mean).reshape(3, 15, 3)], axis=1))
    np.testing.assert_allclose(rel.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(absolute.numpy(), _rodrigues(np.concatenate([go[:, None], hp.reshape(3, 15, 3)], 1)),
                               atol=1e-6)
    assert np.abs(mean).max() > 0.1  # the mean hand is curled, so the two conventions differ


def _bone_lengths(joints: np.ndarray) -> dict[str, np.ndarray]:
    return {name: np.linalg.norm(np.diff(joints[[0, *ids]], axis=0), axis=-1) for name, ids in FINGERS.items()}


@pytest.mark.parametrize(("beta", "changed"), [
    ("overall_size", set(TIP_ORDER)),
    ("thumb_length", {"thumb"}),
    ("pinky_length", {"pinky"}),
    ("middle_length", {"middle"}),
    ("palm_length", set(TIP_ORDER) - {"thumb"}),
])
def test_betas_change_bone_lengths(beta: str, changed: set[str]) -> None:
    layer = build_mano(ManoConfig(), "right")
    betas = np.zeros((2, 10))
    betas[1, SHAPE_NAMES.index(beta)] = 2.0
    _, joints = _layer_out(layer, np.tile(np.eye(3), (2, 16, 1, 1)), betas)
    before, after = _bone_lengths(joints[0]), _bone_lengths(joints[1])
    for name in TIP_ORDER:
        grown = after[name] - before[name]
        if name in changed:
            assert grown.max() > 1e-3, (name, grown)  # > 1 mm for two units
        else:
            np.testing.assert_allclose(grown[1:], 0.0, atol=1e-6)  # bones past the base joint unchanged


@pytest.mark.parametrize("kind", ["procedural", "official"])
def test_gradients_reach_rotmats_and_betas(kind: str) -> None:
    _, layer = _model(kind, "right")
    layer = layer.double()
    rot = torch.tensor(_random_pose(1, seed=8), requires_grad=True)
    betas = torch.randn(1, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)

    def run(r: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = layer(r, b)
        return out.vertices, out.joints

    assert torch.autograd.gradcheck(run, (rot, betas), fast_mode=True)
    verts, joints = run(rot, betas)
    (verts.sum() + joints.sum()).backward()
    assert rot.grad.abs().sum() > 0 and betas.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["procedural", "official"])
def test_global_rotation_rotates_everything_about_the_root(kind: str) -> None:
    _, layer = _model(kind, "left")
    rotmats, betas = _random_pose(1, seed=9), np.random.default_rng(2).normal(size=(1, 10))
    turned = rotmats.copy()
    R_g = _rodrigues(np.array([0.4, -1.1, 2.0]))
    turned[0, 0] = R_g @ rotmats[0, 0]
    v0, j0 = _layer_out(layer, rotmats, betas)
    v1, j1 = _layer_out(layer, turned, betas)
    root = j0[0, 0]
    np.testing.assert_allclose(j1[0, 0], root, atol=1e-6)
    np.testing.assert_allclose(j1[0] - root, (j0[0] - root) @ R_g.T, atol=2e-6)
    np.testing.assert_allclose(v1[0] - root, (v0[0] - root) @ R_g.T, atol=2e-6)


def test_forward_rejects_mismatched_shapes() -> None:
    layer = build_mano(ManoConfig(), "right")
    with pytest.raises(ValueError, match=r"betas \(\.\.\., 10\)"):
        layer(torch.eye(3).expand(2, 16, 3, 3), torch.zeros(3, 10))
    with pytest.raises(ValueError, match="transl"):
        layer(torch.eye(3).expand(2, 16, 3, 3), torch.zeros(2, 10), torch.zeros(2, 2))


# ---- The procedural hand -------------------------------------------------------------------------------

@pytest.mark.parametrize("side", HANDS)
def test_procedural_hand_is_deterministic(side: str) -> None:
    a, b = make_procedural_hand(side), make_procedural_hand(side)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("side", HANDS)
def test_procedural_mesh_is_closed_outward_and_skinned(side: str) -> None:
    hand = make_procedural_hand(side)
    v, f = hand["v_template"], hand["f"]
    assert 300 <= len(v) <= 1000 and hand["posedirs"].shape == (len(v), 3, 135)
    edges = [(int(a), int(b)) for tri in f for a, b in zip(tri, np.roll(tri, -1))]
    assert len(set(edges)) == len(edges) and set(edges) == {(b, a) for a, b in edges}  # closed, oriented
    signed_volume = np.einsum("ij,ij->i", v[f[:, 0]], np.cross(v[f[:, 1]], v[f[:, 2]])).sum() / 6.0
    assert 1e-4 < signed_volume < 1e-3  # outward normals; an adult hand is ~0.4 litres
    np.testing.assert_allclose(hand["weights"].sum(1), 1.0)
    assert hand["weights"].min() >= 0
    assert ((hand["weights"] > 0.01) & (hand["weights"] < 0.99)).any(1).sum() > 50  # blended near joints
    np.testing.assert_allclose(hand["J_regressor"].sum(1), 1.0)


@pytest.mark.parametrize("side", HANDS)
def test_procedural_proportions_are_an_adult_hand(side: str) -> None:
    hand = make_procedural_hand(side)
    layer = MANOLayer(hand, side, "procedural")
    _, joints = _layer_out(layer, np.tile(np.eye(3), (1, 16, 1, 1)), np.zeros((1, 10)))
    palm = np.linalg.norm(joints[0, 9] - joints[0, 0])
    assert 0.08 < palm < 0.10
    for name in ("index", "middle", "ring", "pinky"):
        length = _bone_lengths(joints[0])[name][1:].sum()
        assert 0.07 < length < 0.10, (name, length)
    fingers_along = -1.0 if side == "right" else 1.0  # MANO-like frame: right fingers along -x, left along +x
    assert (fingers_along * hand["v_template"][:, 0] > 0).mean() > 0.9


def test_procedural_left_hand_is_the_mirror_image_of_the_right() -> None:
    right, left = (build_mano(ManoConfig(), side) for side in ("right", "left"))
    M = np.diag([-1.0, 1.0, 1.0])
    rotmats, betas = _random_pose(2, seed=10), np.random.default_rng(3).normal(size=(2, 10))
    v_r, j_r = _layer_out(right, rotmats, betas)
    v_l, j_l = _layer_out(left, M @ rotmats @ M, betas)
    np.testing.assert_allclose(v_l, v_r @ M, atol=1e-6)
    np.testing.assert_allclose(j_l, j_r @ M, atol=1e-6)
    # hands_mean and the pose basis are mirrored too: relative poses of (x, -y, -z) give mirrored hands.
    pose = np.random.default_rng(5).normal(0, 0.3, (1, 45))
    flip = np.tile([1.0, -1.0, -1.0], 15)
    rot_r = right.pose_to_rotmats(torch.zeros(1, 3), torch.tensor(pose, dtype=torch.float32), True)
    rot_l = left.pose_to_rotmats(torch.zeros(1, 3), torch.tensor(pose * flip, dtype=torch.float32), True)
    np.testing.assert_allclose(M @ rot_r.numpy() @ M, rot_l.numpy(), atol=1e-6)
    np.testing.assert_allclose(left.hands_components.numpy(), right.hands_components.numpy() * flip, atol=1e-7)


@pytest.mark.parametrize("side", HANDS)
def test_procedural_pose_basis_is_orthonormal_and_flexion_curls_towards_the_palm(side: str) -> None:
    layer = build_mano(ManoConfig(), side)
    C = layer.hands_components.double().numpy()
    np.testing.assert_allclose(C @ C.T, np.eye(45), atol=1e-6)
    assert COMPONENT_NAMES[0] == "all_flexion"
    zero = torch.zeros(1, 3)
    _, rest = _layer_out(layer, layer.pose_to_rotmats(zero, torch.zeros(1, 45), False).numpy(), np.zeros((1, 10)))
    flexed_rot = layer.pose_to_rotmats(zero, 1.5 * layer.hands_components[:1], False).numpy()
    _, flexed = _layer_out(layer, flexed_rot, np.zeros((1, 10)))
    rest, flexed = rest[0], flexed[0]
    # Right-hand rule: (index knuckle - wrist) x (pinky knuckle - wrist) points out of a right palm.
    normal = np.cross(rest[5] - rest[0], rest[17] - rest[0]) * (1.0 if side == "right" else -1.0)
    normal /= np.linalg.norm(normal)
    for name in ("index", "middle", "ring", "pinky"):
        tip = FINGERS[name][-1]
        assert (flexed[tip] - rest[tip]) @ normal > 0.02, name  # more than 2 cm towards the palm side
    assert (flexed[FINGERS["thumb"][-1]] - rest[FINGERS["thumb"][-1]]) @ normal > 0.0
    # The mean hand is a slight curl the same way.
    mean_rot = layer.pose_to_rotmats(zero, torch.zeros(1, 45), True).numpy()
    _, relaxed = _layer_out(layer, mean_rot, np.zeros((1, 10)))
    assert all((relaxed[0, FINGERS[n][-1]] - rest[FINGERS[n][-1]]) @ normal > 0.005 for n in ("index", "ring"))


def test_procedural_joints_stay_regressed_from_shaped_vertices() -> None:
    hand = make_procedural_hand("right")
    layer = MANOLayer(hand, "right", "procedural")
    betas = np.random.default_rng(6).normal(0, 2.0, (3, 10))
    verts, joints = _layer_out(layer, np.tile(np.eye(3), (3, 16, 1, 1)), betas)
    for i in range(3):
        expected = _openpose(hand["J_regressor"] @ verts[i], verts[i][hand["tip_vertex_ids"]])
        np.testing.assert_allclose(joints[i], expected, atol=1e-6)


def test_the_network_and_the_labels_share_one_left_hand_convention(tmp_path: Path) -> None:
    # ARCTIC fitted its labels, and its networks predict, with the left model as stored (no shapedirs fix): the
    # network's left layer must be that one too, or its betas and keypoint terms pull towards different shapes.
    from conftest import TINY_MODEL_OVERRIDES

    from hawor_tune.config import load_config
    from hawor_tune.model import build_model

    params = _write_official_pair(tmp_path, "right")  # the official files: the left x-component is the right's
    cfg = load_config(None, {**TINY_MODEL_OVERRIDES, "mano.model_dir": str(tmp_path)})
    network = build_model(cfg).mano
    labels = [build_mano(cfg.mano, side) for side in HANDS]  # what hawor_tune.data builds its labels with
    assert mano.FIX_LEFT_SHAPEDIRS is False
    for net, lab, side in zip(network, labels, HANDS):
        assert net.side == lab.side == side
        torch.testing.assert_close(net.shapedirs, lab.shapedirs, rtol=0, atol=0)
        np.testing.assert_allclose(net.shapedirs.numpy(), params[side]["shapedirs"], atol=1e-7)  # as stored
    assert network[0].shapedirs_fix == "off"
