"""Built-in procedural hand: a MANO-compatible hand model generated in code, for when no MANO files exist.

:func:`make_procedural_hand` returns the same keys, dtypes and shape conventions as an official MANO pickle
read by :func:`hawor_tune.mano.load_mano_pickle` (16 joints in MANO's kinematic order, 10 betas, a 45-d
axis-angle pose space with ``hands_mean`` and ``hands_components``), plus ``tip_vertex_ids``; only the
vertex count differs. Everything is deterministic arithmetic, so two calls give identical arrays.

The mesh is a set of closed surfaces: an elliptical palm tube and one tapered tube per finger (capped at
the palm end, domed at the tip). Rest frame of the right hand, in metres: wrist at the origin, fingers
along -x, thumb on the +z side, palm facing -y. The left hand is its mirror image (x -> -x).

Every vertex is an affine function of a shape vector (palm length/width/thickness, 15 bone lengths,
10 radii) with fixed directions, so ``shapedirs`` (the vertex change per unit beta) is exact, and the
joint rings stay centred on their joints: ``J_regressor @ v_shaped`` gives the joints for any betas.
"""

from __future__ import annotations

import numpy as np

NUM_KINEMATIC_JOINTS = 16
NUM_BETAS = 10
POSE_DIM = 45

# MANO's kinematic tree: 0 wrist; 1-3 index; 4-6 middle; 7-9 pinky; 10-12 ring; 13-15 thumb.
PARENTS = (-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 0, 10, 11, 0, 13, 14)
# MANO stores the root's parent as uint32(-1).
_ROOT_PARENT = 4294967295

# Tip order follows the fingertip keypoints 16..20 of the 21-joint layout.
_FINGERS = ("thumb", "index", "middle", "ring", "pinky")
_CHAINS = {"thumb": (13, 14, 15), "index": (1, 2, 3), "middle": (4, 5, 6), "ring": (10, 11, 12),
           "pinky": (7, 8, 9)}

# Meaning of the first rows of hands_components; later rows only complete the orthonormal basis.
# Rows are orthonormalised in this order, so e.g. "index_flexion" is index flexion beyond the shared curl.
COMPONENT_NAMES = ("all_flexion", "thumb_opposition", "finger_spread", "thumb_flexion", "index_flexion",
                   "middle_flexion", "ring_flexion", "mcp_flexion", "thumb_abduction")

# Meaning of the 10 betas (one unit is a few millimetres, like one standard deviation of MANO's betas).
SHAPE_NAMES = ("overall_size", "finger_to_palm_length", "hand_width", "palm_length", "thumb_length",
               "index_vs_ring_length", "pinky_length", "middle_length", "finger_thickness", "palm_thickness")

# ---- Right-hand rest geometry (metres) -------------------------------------------------------------
_PALM_LENGTH = 0.093  # wrist to the middle knuckle along -x
_PALM_HALF_WIDTH = 0.041  # at the knuckles
_PALM_HALF_THICKNESS = 0.0125
_PALM_CENTRE_Z = -0.1  # knuckle-end centre of the palm, in half-widths (the palm is wider on the pinky side)
_WRIST_HALF_WIDTH = 0.73  # in knuckle half-widths
_WRIST_THICKNESS = 1.1  # in knuckle half-thicknesses

# Base joint (MCP; CMC for the thumb) of each finger.
_BASE = {"thumb": (-0.024, -0.008, 0.024), "index": (-0.090, 0.0, 0.025), "middle": (-0.093, 0.0, 0.004),
         "ring": (-0.087, 0.0, -0.016), "pinky": (-0.078, 0.0, -0.033)}
# Finger directions in the flat rest pose (normalised below); the fingers splay slightly.
_DIRECTION = {"thumb": (-0.55, -0.30, 0.78), "index": (-1.0, 0.0, 0.10), "middle": (-1.0, 0.0, 0.0),
              "ring": (-1.0, 0.0, -0.10), "pinky": (-1.0, 0.0, -0.22)}
# Bone lengths: base joint -> second joint -> third joint -> fingertip.
_LENGTHS = {"thumb": (0.044, 0.032, 0.030), "index": (0.040, 0.024, 0.022), "middle": (0.045, 0.028, 0.024),
            "ring": (0.042, 0.027, 0.023), "pinky": (0.033, 0.019, 0.020)}
# Tube radius at the base joint and at the third joint.
_RADII = {"thumb": (0.0120, 0.0085), "index": (0.0092, 0.0072), "middle": (0.0095, 0.0075),
          "ring": (0.0090, 0.0070), "pinky": (0.0078, 0.0062)}

# ---- Mesh resolution -------------------------------------------------------------------------------
_PALM_RING = 20
_PALM_STATIONS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # fraction of the way from the wrist to the knuckles
_FINGER_RING = 12
# (bone, fraction along it, radius factor). Stations 1, 4 and 6 sit exactly on the three joints, so the
# mean of their ring is the joint; the first one lies inside the palm, the last two round off the tip.
_FINGER_STATIONS = ((0, -0.30, 1.0), (0, 0.0, 1.0), (0, 0.33, 1.0), (0, 0.67, 1.0), (1, 0.0, 1.0),
                    (1, 0.5, 1.0), (2, 0.0, 1.0), (2, 0.40, 1.0), (2, 0.70, 0.90), (2, 0.88, 0.60))
_JOINT_STATIONS = (1, 4, 6)
# Half-width of the skinning blend across a joint, in tube radii at that joint.
_BLEND_RADII = 0.6

# Relaxed hand (hands_mean): flexion per joint (base, middle, last) in radians, scaled per finger so that
# the ulnar fingers curl more, as in a resting hand.
_REST_CURL = (0.25, 0.35, 0.20)
_REST_CURL_SCALE = {"index": 0.8, "middle": 1.0, "ring": 1.15, "pinky": 1.3}

# Shape vector layout: [palm length, palm half-width, palm half-thickness, lengths (5 x 3), radii (5 x 2)].
_P_LENGTH, _P_WIDTH, _P_THICK = 0, 1, 2
_P_BONES = 3
_P_RADII = _P_BONES + 3 * len(_FINGERS)
_P_SIZE = _P_RADII + 2 * len(_FINGERS)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _perpendicular(v: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Unit component of ``v`` perpendicular to the unit vector ``d``."""
    return _unit(v - np.dot(v, d) * d)


def _nominal_shape() -> np.ndarray:
    p = np.zeros(_P_SIZE)
    p[[_P_LENGTH, _P_WIDTH, _P_THICK]] = _PALM_LENGTH, _PALM_HALF_WIDTH, _PALM_HALF_THICKNESS
    for i, name in enumerate(_FINGERS):
        p[_P_BONES + 3 * i:_P_BONES + 3 * i + 3] = _LENGTHS[name]
        p[_P_RADII + 2 * i:_P_RADII + 2 * i + 2] = _RADII[name]
    return p


def _shape_deltas(p0: np.ndarray) -> np.ndarray:
    """(10, P) change of the shape vector per unit beta, as relative changes of nominal values."""
    rel = np.zeros((NUM_BETAS, _P_SIZE))

    def bones(name: str) -> slice:
        i = _FINGERS.index(name)
        return slice(_P_BONES + 3 * i, _P_BONES + 3 * i + 3)

    def radii(name: str) -> slice:
        i = _FINGERS.index(name)
        return slice(_P_RADII + 2 * i, _P_RADII + 2 * i + 2)

    all_bones, all_radii = slice(_P_BONES, _P_RADII), slice(_P_RADII, _P_SIZE)
    rel[0, :] = 0.04  # uniform scale
    rel[1, all_bones], rel[1, _P_LENGTH] = 0.04, -0.02
    rel[2, _P_WIDTH], rel[2, all_radii] = 0.05, 0.03
    rel[3, _P_LENGTH] = 0.04
    rel[4, bones("thumb")] = 0.06
    rel[5, bones("index")], rel[5, bones("ring")] = 0.04, -0.04
    rel[6, bones("pinky")] = 0.06
    rel[7, bones("middle")] = 0.05
    rel[8, all_radii] = 0.06
    rel[9, _P_THICK], rel[9, radii("thumb")] = 0.08, 0.03
    return rel * p0


def _palm_knuckle_x(cos_theta: np.ndarray) -> np.ndarray:
    """Knuckle-end x of the palm ring, in palm lengths, following the MCP line across the palm."""
    names = ("pinky", "ring", "middle", "index")  # increasing z
    knot_c = np.array([_BASE[n][2] / _PALM_HALF_WIDTH - _PALM_CENTRE_Z for n in names])
    knot_x = np.array([_BASE[n][0] / _PALM_LENGTH for n in names])
    return np.interp(cos_theta, knot_c, knot_x)


def _finger_frames() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per finger: direction d and ring axes u1, u2 with u1 x u2 = d (outward-facing triangle winding)."""
    frames = {}
    for name in _FINGERS:
        d = _unit(np.array(_DIRECTION[name]))
        u1 = _perpendicular(np.array([0.0, 0.0, 1.0]) if name != "thumb" else np.array([0.0, 1.0, 0.0]), d)
        frames[name] = (d, u1, np.cross(d, u1))
    return frames


def _vertices(p: np.ndarray) -> np.ndarray:
    """(V, 3) right-hand rest vertices for the shape vector ``p``; affine in ``p``."""
    length, width, thick = p[_P_LENGTH], p[_P_WIDTH], p[_P_THICK]
    parts = []

    theta = 2.0 * np.pi * np.arange(_PALM_RING) / _PALM_RING
    knuckle_x = length * _palm_knuckle_x(np.cos(theta))  # (R,)
    for u in _PALM_STATIONS:
        half_width = width * (_WRIST_HALF_WIDTH + (1.0 - _WRIST_HALF_WIDTH) * u)
        half_thick = thick * (_WRIST_THICKNESS + (1.0 - _WRIST_THICKNESS) * u)
        centre_z = width * _PALM_CENTRE_Z * u
        # The palm runs along -x: ring axes z and y, with z x y = -x.
        parts.append(np.stack([u * knuckle_x, half_thick * np.sin(theta),
                               centre_z + half_width * np.cos(theta)], axis=-1))
    parts.append(np.zeros((1, 3)))  # wrist cap centre
    parts.append(np.array([[knuckle_x.mean(), 0.0, width * _PALM_CENTRE_Z]]))  # knuckle cap centre

    phi = 2.0 * np.pi * np.arange(_FINGER_RING) / _FINGER_RING
    frames = _finger_frames()
    for i, name in enumerate(_FINGERS):
        d, u1, u2 = frames[name]
        bones = p[_P_BONES + 3 * i:_P_BONES + 3 * i + 3]
        r_base, r_last = p[_P_RADII + 2 * i:_P_RADII + 2 * i + 2]
        base = np.array(_BASE[name]) * np.array([length / _PALM_LENGTH, thick / _PALM_HALF_THICKNESS,
                                                  width / _PALM_HALF_WIDTH])
        offsets = np.cos(phi)[:, None] * u1 + np.sin(phi)[:, None] * u2  # (R, 3)
        for bone, frac, factor in _FINGER_STATIONS:
            s = bones[:bone].sum() + frac * bones[bone]
            g = min(max((bone + frac) / 2.0, 0.0), 1.0)
            radius = factor * ((1.0 - g) * r_base + g * r_last)
            parts.append(base + s * d + radius * offsets)
        start = bones[0] * _FINGER_STATIONS[0][1]
        parts.append((base + start * d)[None])  # palm-end cap centre
        parts.append((base + bones.sum() * d)[None])  # fingertip (the tip keypoint)
    return np.concatenate(parts, axis=0)


def _tube_faces(first: int, rings: int, ring: int, start_cap: int, end_cap: int) -> list[tuple[int, int, int]]:
    """Triangles of a tube of ``rings`` rings of ``ring`` vertices from index ``first``, closed by fans."""
    faces = []
    for k in range(rings - 1):
        for j in range(ring):
            a, b = first + k * ring + j, first + k * ring + (j + 1) % ring
            c, e = b + ring, a + ring
            faces += [(a, b, c), (a, c, e)]
    last = first + (rings - 1) * ring
    for j in range(ring):
        jn = (j + 1) % ring
        faces += [(first + jn, first + j, start_cap), (last + j, last + jn, end_cap)]
    return faces


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _topology() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Faces (F, 3), skinning weights (V, 16), J_regressor (16, V) and tip ids (5,), in thumb..pinky order."""
    n_palm = len(_PALM_STATIONS) * _PALM_RING + 2
    n_finger = len(_FINGER_STATIONS) * _FINGER_RING + 2
    num_v = n_palm + len(_FINGERS) * n_finger
    weights = np.zeros((num_v, NUM_KINEMATIC_JOINTS))
    regressor = np.zeros((NUM_KINEMATIC_JOINTS, num_v))

    wrist_cap, knuckle_cap = n_palm - 2, n_palm - 1
    faces = _tube_faces(0, len(_PALM_STATIONS), _PALM_RING, wrist_cap, knuckle_cap)
    weights[:n_palm, 0] = 1.0
    regressor[0, :_PALM_RING] = 1.0 / _PALM_RING

    tips = []
    for i, name in enumerate(_FINGERS):
        first = n_palm + i * n_finger
        stations = len(_FINGER_STATIONS) * _FINGER_RING
        faces += _tube_faces(first, len(_FINGER_STATIONS), _FINGER_RING, first + stations, first + stations + 1)
        tips.append(first + stations + 1)

        bones = np.array(_LENGTHS[name])
        joint_s = np.concatenate([[0.0], np.cumsum(bones)[:2]])  # arc length of the three joints
        joint_r = np.array([_RADII[name][0], 0.5 * sum(_RADII[name]), _RADII[name][1]])
        ring_s = [bones[:b].sum() + f * bones[b] for b, f, _ in _FINGER_STATIONS]
        groups = [(slice(first + k * _FINGER_RING, first + (k + 1) * _FINGER_RING), s) for k, s in enumerate(ring_s)]
        groups += [(slice(first + stations, first + stations + 1), ring_s[0]),  # palm-end cap centre
                   (slice(first + stations + 1, first + stations + 2), bones.sum())]  # fingertip
        chain = [0, *_CHAINS[name]]
        half = _BLEND_RADII * joint_r
        for rows, s in groups:
            # past[j]: how far the skin at arc length s has moved beyond joint j (0 before, 1 after, smooth
            # within half a blend width); each bone takes the part past its joint and not past the next.
            past = _smoothstep((s - joint_s + half) / (2.0 * half))  # (3,)
            weights[rows, chain] = np.concatenate([[1.0], past]) - np.concatenate([past, [0.0]])  # (4,)
        for joint, station in zip(_CHAINS[name], _JOINT_STATIONS):
            start = first + station * _FINGER_RING
            regressor[joint, start:start + _FINGER_RING] = 1.0 / _FINGER_RING
    return np.array(faces, dtype=np.int64), weights, regressor, np.array(tips, dtype=np.int64)


def _pose_space() -> tuple[np.ndarray, np.ndarray]:
    """Right-hand hands_mean (45,) and orthonormal hands_components (45, 45) in MANO's axis-angle layout."""
    frames = _finger_frames()
    palm_side = np.array([0.0, -1.0, 0.0])
    # Rotating a direction d about an axis a moves it towards a x d; for a = d x p with p perpendicular to
    # d, a x d = p, so positive angles move the bone towards p (the palm side for flexion).
    bend = {n: _unit(np.cross(frames[n][0], _perpendicular(palm_side, frames[n][0])))
            for n in _FINGERS if n != "thumb"}
    d_thumb = frames["thumb"][0]
    bend["thumb"] = _unit(np.cross(d_thumb, _perpendicular(np.array([0.0, -0.7, -0.7]), d_thumb)))
    oppose = _unit(np.cross(d_thumb, _perpendicular(np.array([0.0, -1.0, -0.5]), d_thumb)))
    abduct = _unit(np.cross(d_thumb, _perpendicular(np.array([0.3, 0.0, 1.0]), d_thumb)))
    spread_axis = np.array([0.0, 1.0, 0.0])  # about the palm normal: +1 moves a finger towards +z

    def pose(**per_joint: np.ndarray) -> np.ndarray:
        out = np.zeros((NUM_KINEMATIC_JOINTS, 3))
        for key, value in per_joint.items():
            out[int(key[1:])] = value
        return out[1:].reshape(POSE_DIM)

    def flex(name: str, w: tuple[float, float, float]) -> dict[str, np.ndarray]:
        return {f"j{j}": wj * bend[name] for j, wj in zip(_CHAINS[name], w)}

    fingers = ("index", "middle", "ring", "pinky")
    all_flex = {}
    for name in fingers:
        all_flex.update(flex(name, (1.0, 1.0, 1.0)))
    all_flex.update(flex("thumb", (0.3, 0.7, 0.7)))
    spread = {"j1": 1.0 * spread_axis, "j10": -0.6 * spread_axis, "j7": -1.0 * spread_axis}
    mcp = {f"j{_CHAINS[n][0]}": bend[n] for n in fingers}
    rows = [pose(**all_flex),
            pose(j13=oppose, j14=0.4 * bend["thumb"], j15=0.2 * bend["thumb"]),
            pose(**spread),
            pose(**flex("thumb", (0.3, 1.0, 1.0))),
            pose(**flex("index", (1.0, 1.0, 1.0))),
            pose(**flex("middle", (1.0, 1.0, 1.0))),
            pose(**flex("ring", (1.0, 1.0, 1.0))),
            pose(**mcp),
            pose(j13=abduct)]
    assert len(rows) == len(COMPONENT_NAMES)
    basis = _complete_basis(rows)

    mean = {}
    for name in fingers:
        mean.update(flex(name, tuple(_REST_CURL_SCALE[name] * c for c in _REST_CURL)))
    mean.update(j13=0.25 * oppose, j14=0.2 * bend["thumb"], j15=0.15 * bend["thumb"])
    return pose(**mean), basis


def _complete_basis(rows: list[np.ndarray]) -> np.ndarray:
    """Gram-Schmidt ``rows`` in order, then add the coordinate axes that are least in their span."""
    basis: list[np.ndarray] = []

    def residual(v: np.ndarray) -> np.ndarray:
        for b in basis:
            v = v - np.dot(v, b) * b
        return v

    for r in rows:
        v = residual(r)
        basis.append(v / np.linalg.norm(v))
    # Each axis's residual, kept and reduced by each new basis vector in turn: the same operations in the
    # same order as residual(e) from scratch (so the same bits), 45 dot products per step instead of 45 x its
    # basis size. The hand model is built in every process that uses it.
    res = [residual(e) for e in np.eye(POSE_DIM)]
    while len(basis) < POSE_DIM:
        # Largest residual first (ties to the lowest index) keeps the completion well conditioned and fixed.
        # Rounded before they are compared: the dot products' last bits follow the CPU's BLAS kernel, and
        # unrounded norms broke exact ties differently on different CPUs (other completion vectors).
        norms = [np.linalg.norm(v) for v in res]
        best = int(np.argmax(np.round(norms, 9)))
        basis.append(res[best] / norms[best])
        res = [v - np.dot(v, basis[-1]) * basis[-1] for v in res]
    return np.stack(basis)


def _mirror_pose(pose: np.ndarray) -> np.ndarray:
    """Axis-angle vectors of the mirror image (x -> -x): M R M with M = diag(-1, 1, 1) maps (x, y, z) to
    (x, -y, -z)."""
    shape = pose.shape
    out = pose.reshape(*shape[:-1], -1, 3) * np.array([1.0, -1.0, -1.0])
    return out.reshape(shape)


def make_procedural_hand(side: str) -> dict[str, np.ndarray]:
    """Generate the built-in hand model for one side.

    Args:
        side: ``"left"`` or ``"right"``.

    Returns:
        Dict with ``v_template`` (V, 3), ``shapedirs`` (V, 3, 10), ``posedirs`` (V, 3, 135) (zeros: no
        pose-corrective blend shapes), ``J_regressor`` (16, V), ``weights`` (V, 16), ``kintree_table``
        (2, 16), ``f`` (F, 3), ``hands_components`` (45, 45), ``hands_mean`` (45,) and ``tip_vertex_ids``
        (5,) (thumb, index, middle, ring, pinky). Floats are float64, indices int64.

    Raises:
        ValueError: ``side`` is not "left" or "right".
    """
    if side not in ("left", "right"):
        raise ValueError(f"procedural hand side must be 'left' or 'right', got {side!r}")
    p0 = _nominal_shape()
    v_template = _vertices(p0)
    shapedirs = np.stack([_vertices(p0 + delta) - v_template for delta in _shape_deltas(p0)], axis=-1)
    faces, weights, regressor, tips = _topology()
    hands_mean, components = _pose_space()
    kintree = np.array([[_ROOT_PARENT, *PARENTS[1:]], list(range(NUM_KINEMATIC_JOINTS))], dtype=np.int64)
    if side == "left":
        flip = np.array([-1.0, 1.0, 1.0])
        v_template = v_template * flip
        shapedirs = shapedirs * flip[:, None]
        faces = faces[:, [0, 2, 1]]  # a mirror turns the surface inside out unless the winding flips
        hands_mean, components = _mirror_pose(hands_mean), _mirror_pose(components)
    return {
        "v_template": v_template,
        "shapedirs": shapedirs,
        "posedirs": np.zeros((v_template.shape[0], 3, 9 * (NUM_KINEMATIC_JOINTS - 1))),
        "J_regressor": regressor,
        "weights": weights,
        "kintree_table": kintree,
        "f": faces,
        "hands_components": components,
        "hands_mean": hands_mean,
        "tip_vertex_ids": tips,
    }
