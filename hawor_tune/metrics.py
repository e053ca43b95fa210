"""Evaluation metrics for hand motion and camera trajectories, as the field computes them.

Pure functions: inputs are numpy arrays or torch tensors (any float dtype; torch tensors are detached and
moved to the CPU), everything is computed in float64, and results are numpy float64 arrays in the units of
the inputs (metres in, metres out; the caller scales to mm for reporting). Alignments use
:mod:`hawor_tune.geometry` so that training and evaluation share one Procrustes implementation.
"""

from __future__ import annotations

import numpy as np
import torch

from hawor_tune.geometry import matrix_to_axis_angle, similarity_procrustes, umeyama

ArrayLike = np.ndarray | torch.Tensor  # what every metric accepts


def _to_f64(name: str, x: ArrayLike, dims: tuple[str | int, ...], min_sizes: dict[int, int] | None = None
            ) -> np.ndarray:
    """Convert ``x`` to a float64 numpy array and check it has shape ``dims``.

    ``dims`` holds an int for a fixed size or a letter for a free one (used only in the message);
    ``min_sizes`` maps an axis to the smallest size it may have.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numeric numpy array or torch tensor, got {type(x).__name__}") from err
    expected = "(" + ", ".join(str(d) for d in dims) + ")"
    if arr.ndim != len(dims) or any(isinstance(d, int) and arr.shape[i] != d for i, d in enumerate(dims)):
        raise ValueError(f"{name} must have shape {expected}, got {arr.shape}")
    for axis, low in (min_sizes or {}).items():
        if arr.shape[axis] < low:
            raise ValueError(f"{name} must have shape {expected} with {dims[axis]} >= {low}, got {arr.shape}")
    return arr


def _pair(pred: ArrayLike, gt: ArrayLike, dims: tuple[str | int, ...], min_sizes: dict[int, int] | None = None,
          names: tuple[str, str] = ("pred", "gt")) -> tuple[np.ndarray, np.ndarray]:
    """Convert and check a prediction and its ground truth, which must have the same shape."""
    a = _to_f64(names[0], pred, dims, min_sizes)
    b = _to_f64(names[1], gt, dims, min_sizes)
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {a.shape} and {b.shape}")
    return a, b


def _root_relative(x: np.ndarray, root: int | None) -> np.ndarray:
    """(N, J, 3) joints minus joint ``root`` (no change for root=None)."""
    if root is None:
        return x
    if isinstance(root, bool) or not isinstance(root, (int, np.integer)) or not -x.shape[1] <= root < x.shape[1]:
        raise ValueError(f"root must be None or a joint index in [0, {x.shape[1]}), got {root!r}")
    return x - x[:, root : root + 1]


def _procrustes_f64(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Similarity-align X onto Y, (..., N, 3) each, through the torch implementation in geometry."""
    return similarity_procrustes(torch.from_numpy(X), torch.from_numpy(Y)).numpy()


def _joint_errors(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Euclidean distance per joint: (..., 3) x2 -> (...)."""
    return np.linalg.norm(pred - gt, axis=-1)


def mpjpe(pred: ArrayLike, gt: ArrayLike, root: int | None = 0) -> np.ndarray:
    """Mean per-joint position error after root alignment.

    Args:
        pred: (N, J, 3) predicted joints.
        gt: (N, J, 3) ground-truth joints.
        root: joint subtracted from both before comparing (0 = wrist); None compares positions as given.

    Returns:
        (N,) mean Euclidean joint error per sample.
    """
    p, g = _pair(pred, gt, ("N", "J", 3), {1: 1})
    return _joint_errors(_root_relative(p, root), _root_relative(g, root)).mean(-1)


def pa_mpjpe(pred: ArrayLike, gt: ArrayLike) -> np.ndarray:
    """Procrustes-aligned MPJPE: per sample, the best similarity transform of pred onto gt, then MPJPE.

    Args:
        pred: (N, J, 3) predicted joints, J >= 3.
        gt: (N, J, 3) ground-truth joints.

    Returns:
        (N,) mean Euclidean joint error per sample after alignment.
    """
    p, g = _pair(pred, gt, ("N", "J", 3), {1: 3})
    return _joint_errors(_procrustes_f64(p, g), g).mean(-1)


def per_joint_error(pred: ArrayLike, gt: ArrayLike, root: int | None = 0) -> np.ndarray:
    """Root-aligned error of each joint, averaged over samples.

    Args:
        pred: (N, J, 3) predicted joints.
        gt: (N, J, 3) ground-truth joints.
        root: as in :func:`mpjpe`.

    Returns:
        (J,) mean Euclidean error per joint.
    """
    p, g = _pair(pred, gt, ("N", "J", 3), {0: 1, 1: 1})
    return _joint_errors(_root_relative(p, root), _root_relative(g, root)).mean(0)


def accel_error(pred: ArrayLike, gt: ArrayLike, valid: ArrayLike | None = None) -> np.ndarray:
    """Acceleration error: |a_pred - a_gt| with a_t = x_{t-1} - 2 x_t + x_{t+1}, averaged over joints.

    Per frame, not per second squared: multiply by fps^2 for m/s^2. With ``valid``, a second difference
    counts only when all three of its frames are valid, as WHAM's ``compute_error_accel``
    (yohanshin/WHAM, ``lib/eval/eval_utils.py``) drops the triplets that touch an invisible frame.

    Args:
        pred: (T, J, 3) predicted joint trajectories, T >= 3.
        gt: (T, J, 3) ground-truth joint trajectories.
        valid: optional (T,) bool, the frames with ground truth to compare against.

    Returns:
        (T-2,) error for each interior frame; with ``valid``, (K,) for the K triplets of valid frames.
    """
    p, g = _pair(pred, gt, ("T", "J", 3), {0: 3})
    accel_p = p[:-2] - 2.0 * p[1:-1] + p[2:]  # (T-2, J, 3)
    accel_g = g[:-2] - 2.0 * g[1:-1] + g[2:]
    errors = _joint_errors(accel_p, accel_g).mean(-1)  # (T-2,)
    if valid is None:
        return errors
    v = np.asarray(valid, dtype=bool)
    if v.shape != (p.shape[0],):
        raise ValueError(f"valid must have shape (T,) = ({p.shape[0]},), got {v.shape}")
    return errors[v[:-2] & v[1:-1] & v[2:]]


def camera_translation_error(t_pred: ArrayLike, t_gt: ArrayLike) -> np.ndarray:
    """Euclidean distance between camera translations.

    Args:
        t_pred: (N, 3) predicted translations.
        t_gt: (N, 3) ground-truth translations.

    Returns:
        (N,) distances.
    """
    p, g = _pair(t_pred, t_gt, ("N", 3), names=("t_pred", "t_gt"))
    return _joint_errors(p, g)


def camera_accel_error(c_pred: ArrayLike, c_gt: ArrayLike) -> np.ndarray:
    """Acceleration error of a camera trajectory: :func:`accel_error` of its centre positions.

    Per frame, like the hands' acceleration error: in input units per frame^2 (metres in: multiply by 1000
    for mm/frame^2, and by fps^2 for per second squared).

    Args:
        c_pred: (T, 3) predicted camera centres, T >= 3.
        c_gt: (T, 3) ground-truth camera centres in the same frame.

    Returns:
        (T-2,) error for each interior frame.
    """
    p, g = _pair(c_pred, c_gt, ("T", 3), {0: 3}, names=("c_pred", "c_gt"))
    return accel_error(p[:, None], g[:, None])  # the camera as a one-joint trajectory


def camera_jerk(c: ArrayLike, fps: float = 30.0) -> np.ndarray:
    """Jerk magnitude of a camera trajectory: :func:`jerk` of its centre positions.

    Args:
        c: (T, 3) camera centres, T >= 4.
        fps: frame rate; the result is in input units per second cubed (metres in: m/s^3).

    Returns:
        (T-3,) jerk magnitude for each frame that has a third difference.
    """
    return jerk(_to_f64("c", c, ("T", 3), {0: 4})[:, None], fps=fps)


def camera_rotation_error(R_pred: ArrayLike, R_gt: ArrayLike) -> np.ndarray:
    """Geodesic angle of R_pred^T R_gt.

    Read from the axis-angle vector rather than arccos of the trace, which loses precision near 0 and pi.

    Args:
        R_pred: (N, 3, 3) predicted rotations.
        R_gt: (N, 3, 3) ground-truth rotations.

    Returns:
        (N,) angles in radians, in [0, pi].
    """
    p, g = _pair(R_pred, R_gt, ("N", 3, 3), names=("R_pred", "R_gt"))
    rel = np.swapaxes(p, -1, -2) @ g  # (N, 3, 3)
    return np.linalg.norm(matrix_to_axis_angle(torch.from_numpy(rel)).numpy(), axis=-1)


def _chunked_world_error(pred: ArrayLike, gt: ArrayLike, chunk: int, fit_frames: int | None,
                         per_frame: bool) -> np.ndarray:
    """Per-chunk (or per-frame) mean joint error after a similarity fit on the first ``fit_frames`` frames
    of each chunk (None: all of them)."""
    p, g = _pair(pred, gt, ("T", "J", 3), {0: 1, 1: 1})
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be a positive int (frames per chunk), got {chunk!r}")
    fit = slice(None) if fit_frames is None else slice(0, fit_frames)
    errors = []
    for start in range(0, p.shape[0], chunk):
        # The last chunk is shorter when T is not a multiple of chunk, as in WHAM's evaluation.
        cp, cg = p[start : start + chunk], g[start : start + chunk]  # (C, J, 3)
        n_fit = cp[fit].shape[0] * cp.shape[1]
        if n_fit < 3:
            raise ValueError(f"the alignment needs >= 3 points, chunk at frame {start} has {n_fit} "
                             f"(frames {cp[fit].shape[0]} x joints {cp.shape[1]})")
        src = torch.from_numpy(cp[fit].reshape(-1, 3))  # (F*J, 3) all joints of the fit frames
        dst = torch.from_numpy(cg[fit].reshape(-1, 3))
        s, R, t = umeyama(src, dst, with_scale=True)
        aligned = s.item() * cp @ R.numpy().T + t.numpy()  # (C, J, 3)
        frame_errors = _joint_errors(aligned, cg).mean(-1)  # (C,)
        errors.append(frame_errors if per_frame else frame_errors.mean(keepdims=True))
    return np.concatenate(errors).astype(np.float64)


def w_mpjpe(pred: ArrayLike, gt: ArrayLike, chunk: int = 100, *, per_frame: bool = False) -> np.ndarray:
    """World MPJPE: per chunk, similarity-align on the first two frames, then mean joint error.

    Drift after the first frames is not hidden by the alignment, so this measures global trajectory error.
    WHAM's evaluation (yohanshin/WHAM, ``lib/eval/evaluate_emdb.py`` with ``first_align_joints`` from
    ``lib/eval/eval_utils.py``, after SLAHMR) uses 100-frame chunks and pools the per-frame errors.

    Args:
        pred: (T, J, 3) predicted world-frame joints.
        gt: (T, J, 3) ground-truth world-frame joints.
        chunk: frames per chunk (the last chunk may be shorter).
        per_frame: return each frame's error instead of each chunk's mean.

    Returns:
        (ceil(T / chunk),) mean joint error per chunk, or (T,) per frame with ``per_frame``.
    """
    return _chunked_world_error(pred, gt, chunk, fit_frames=2, per_frame=per_frame)


def wa_mpjpe(pred: ArrayLike, gt: ArrayLike, chunk: int = 100, *, per_frame: bool = False) -> np.ndarray:
    """World-aligned MPJPE: per chunk, similarity-align on all frames of the chunk, then mean joint error.

    WHAM's ``global_align_joints`` (yohanshin/WHAM, ``lib/eval/eval_utils.py``) on 100-frame chunks.

    Args:
        pred: (T, J, 3) predicted world-frame joints.
        gt: (T, J, 3) ground-truth world-frame joints.
        chunk: frames per chunk (the last chunk may be shorter).
        per_frame: return each frame's error instead of each chunk's mean.

    Returns:
        (ceil(T / chunk),) mean joint error per chunk, or (T,) per frame with ``per_frame``.
    """
    return _chunked_world_error(pred, gt, chunk, fit_frames=None, per_frame=per_frame)


def jerk(x: ArrayLike, fps: float = 30.0) -> np.ndarray:
    """Jerk magnitude, a smoothness measure: norm of the third finite difference times fps^3.

    Args:
        x: (T, J, 3) joint trajectories, T >= 4.
        fps: frame rate; the result is in input units per second cubed.

    Returns:
        (T-3,) mean over joints of the jerk magnitude.
    """
    arr = _to_f64("x", x, ("T", "J", 3), {0: 4})
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.floating, np.integer)) or not fps > 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    third = arr[3:] - 3.0 * arr[2:-1] + 3.0 * arr[1:-2] - arr[:-3]  # (T-3, J, 3)
    return np.linalg.norm(third, axis=-1).mean(-1) * float(fps) ** 3


def rte(pred: ArrayLike, gt: ArrayLike) -> np.ndarray:
    """Root translation error as HaWoR reports it: the predicted trajectory rigidly aligned to the truth
    (rotation and translation, no scale, one fit over all frames), each frame's distance divided by the
    ground truth's whole path length, in percent.

    WHAM's ``compute_rte`` (yohanshin/WHAM, ``lib/eval/eval_utils.py``), which HaWoR's evaluation applies to
    the wrist (ThunderVVV/HaWoR, ``lib/eval_utils``) and multiplies by 100.

    Args:
        pred: (T, 3) predicted trajectory (e.g. world-frame wrists), T >= 2.
        gt: (T, 3) ground truth.

    Returns:
        (T,) per-frame error in percent of the path length (inf when the true path has zero length).
    """
    p, g = _pair(pred, gt, ("T", 3), {0: 2})
    _, R, t = umeyama(torch.from_numpy(p), torch.from_numpy(g), with_scale=False)
    aligned = p @ R.numpy().T + t.numpy()  # (T, 3)
    length = np.linalg.norm(np.diff(g, axis=0), axis=-1).sum()
    with np.errstate(divide="ignore"):
        return _joint_errors(aligned, g) / length * 100.0


def joint_angle_error(R_pred: ArrayLike, R_gt: ArrayLike) -> np.ndarray:
    """Geodesic angle between predicted and true joint rotations, per joint, in degrees.

    For the fingers, MANO's 15 local (parent-relative) joint rotations: articulation alone, untouched by the
    hand's global orientation, position or shape.

    Args:
        R_pred: (N, J, 3, 3) rotations.
        R_gt: (N, J, 3, 3).

    Returns:
        (N, J) angles in degrees.
    """
    p, g = _pair(R_pred, R_gt, ("N", "J", 3, 3), names=("R_pred", "R_gt"))
    rel = np.swapaxes(p, -1, -2) @ g  # (N, J, 3, 3)
    return np.degrees(np.linalg.norm(matrix_to_axis_angle(torch.from_numpy(rel)).numpy(), axis=-1))
