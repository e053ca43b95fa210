"""Rotation conversions, camera projection and rigid/similarity alignment in torch.

Every function is batched over arbitrary leading dimensions, keeps the input dtype and is differentiable
(conversions stay finite at the zero rotation). Conventions (see the project spec):

- 6D rotations are the first two columns of R: ``rot6d = cat(R[..., :, 0], R[..., :, 1])``.
- Cameras are world-to-camera: ``x_cam = cam_R @ x_world + cam_t``.
- Lens distortion is OpenCV's rational model ``dist8 = (k1, k2, p1, p2, k3, k4, k5, k6)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Below this squared sine (|R - R^T| vee-norm^2 = 4 sin^2 theta) or squared angle the closed forms divide
# 0 by 0; the Taylor series used instead is exact to float64 precision there.
_SMALL_SQ = 1e-6


def _check_last_dims(name: str, x: torch.Tensor, tail: tuple[int, ...]) -> None:
    """Raise a ValueError naming ``name`` unless ``x`` ends in the dimensions ``tail``."""
    if x.dim() < len(tail) or tuple(x.shape[x.dim() - len(tail):]) != tail:
        expected = "(..., " + ", ".join(str(d) for d in tail) + ")"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}")


def _skew(v: torch.Tensor) -> torch.Tensor:
    """Cross-product matrix [v]_x of (..., 3) vectors -> (..., 3, 3)."""
    x, y, z = v.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*v.shape[:-1], 3, 3)


def axis_angle_to_matrix(aa: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula: axis-angle vectors (angle = norm) to rotation matrices.

    Args:
        aa: (..., 3) axis-angle vectors.

    Returns:
        (..., 3, 3) rotation matrices.
    """
    _check_last_dims("aa", aa, (3,))
    theta_sq = (aa * aa).sum(-1)  # (...)
    small = theta_sq < _SMALL_SQ
    # sqrt of a substituted 1 keeps the unused branch (and its gradient) finite at aa = 0.
    theta = torch.sqrt(torch.where(small, torch.ones_like(theta_sq), theta_sq))
    a = torch.where(small, 1.0 - theta_sq / 6.0, torch.sin(theta) / theta)  # sin(t)/t
    b = torch.where(small, 0.5 - theta_sq / 24.0, (1.0 - torch.cos(theta)) / (theta * theta))  # (1-cos t)/t^2
    k = _skew(aa)  # (..., 3, 3), unnormalised axis so that a and b absorb the angle
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device).expand_as(k)
    return eye + a[..., None, None] * k + b[..., None, None] * (k @ k)


def matrix_to_axis_angle(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices to axis-angle vectors with angle in [0, pi].

    Near pi the antisymmetric part of R vanishes, so the axis is read from the symmetric part instead.

    Args:
        R: (..., 3, 3) rotation matrices.

    Returns:
        (..., 3) axis-angle vectors.
    """
    _check_last_dims("R", R, (3, 3))
    # v = 2 sin(theta) * axis
    v = torch.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    v_sq = (v * v).sum(-1)  # (...) = 4 sin^2 theta
    cos = ((R[..., 0, 0] + R[..., 1, 1] + R[..., 2, 2] - 1.0) * 0.5).clamp(-1.0, 1.0)
    small = v_sq < _SMALL_SQ
    # The clamp keeps sqrt's gradient finite at v = 0 (identity, or exactly pi); sin itself stays accurate
    # near pi, where the angle needs it.
    sin = 0.5 * torch.sqrt(v_sq.clamp_min(torch.finfo(R.dtype).tiny))
    theta = torch.atan2(sin, cos)  # (...) in [0, pi]

    # General branch: axis * theta = v * theta / (2 sin); Taylor theta/sin = 1 + theta^2/6 for small angles.
    sin_safe = torch.where(small, torch.ones_like(sin), sin)
    factor = torch.where(small, 0.5 + v_sq / 48.0, theta / (2.0 * sin_safe))
    aa_general = v * factor[..., None]

    # Near-pi branch: (R + R^T)/2 = cos I + (1 - cos) n n^T. The column of n n^T with the largest
    # diagonal entry (>= 1/3) gives n up to sign; the sign comes from v.
    near_pi = cos < -0.5
    one_minus_cos = torch.where(near_pi, 1.0 - cos, torch.ones_like(cos))
    eye = torch.eye(3, dtype=R.dtype, device=R.device)
    nnt = (0.5 * (R + R.transpose(-1, -2)) - cos[..., None, None] * eye) / one_minus_cos[..., None, None]
    k = nnt.diagonal(dim1=-2, dim2=-1).argmax(-1)  # (...)
    col = torch.gather(nnt, -1, k[..., None, None].expand(*k.shape, 3, 1)).squeeze(-1)  # (..., 3)
    diag_k = torch.gather(nnt.diagonal(dim1=-2, dim2=-1), -1, k[..., None]).clamp_min(1e-12)  # (..., 1)
    n = col / torch.sqrt(diag_k)
    sign = torch.where((n * v).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(R.dtype)
    aa_pi = n * sign * theta[..., None]

    return torch.where(near_pi[..., None], aa_pi, aa_general)


def rot6d_to_matrix(x: torch.Tensor) -> torch.Tensor:
    """6D representation to rotation matrices by Gram-Schmidt on the two stored columns.

    Args:
        x: (..., 6) = cat(first column, second column), not necessarily orthonormal.

    Returns:
        (..., 3, 3) rotation matrices with columns b1, b2, b1 x b2.
    """
    _check_last_dims("x", x, (6,))
    a1, a2 = x[..., :3], x[..., 3:]
    b1 = F.normalize(a1, dim=-1)
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


def matrix_to_rot6d(R: torch.Tensor) -> torch.Tensor:
    """Rotation matrices to the 6D representation (first two columns).

    Args:
        R: (..., 3, 3) rotation matrices.

    Returns:
        (..., 6) = cat(R[..., :, 0], R[..., :, 1]).
    """
    _check_last_dims("R", R, (3, 3))
    return torch.cat([R[..., :, 0], R[..., :, 1]], dim=-1)


def project_points(points: torch.Tensor, K: torch.Tensor, dist: torch.Tensor | None = None) -> torch.Tensor:
    """Project camera-frame points to pixels, as ``cv2.projectPoints`` with rvec = tvec = 0.

    Points at depth 0 give inf, as the pinhole model implies; callers keep points in front of the camera.
    The full K is applied, so a nonzero skew K[0, 1] is honoured (OpenCV assumes it is 0).

    Args:
        points: (..., N, 3) points in the camera frame.
        K: (..., 3, 3) intrinsics, broadcast against the leading dims of ``points``.
        dist: (..., 8) OpenCV rational distortion (k1, k2, p1, p2, k3, k4, k5, k6), or None for none.

    Returns:
        (..., N, 2) pixel coordinates.
    """
    _check_last_dims("points", points, (3,))
    _check_last_dims("K", K, (3, 3))
    xy = points[..., :2] / points[..., 2:3]  # (..., N, 2) normalised image coordinates
    if dist is not None:
        _check_last_dims("dist", dist, (8,))
        k1, k2, p1, p2, k3, k4, k5, k6 = (d[..., None] for d in dist.unbind(-1))  # each (..., 1)
        x, y = xy.unbind(-1)  # (..., N)
        r2 = x * x + y * y
        r4 = r2 * r2
        r6 = r4 * r2
        radial = (1 + k1 * r2 + k2 * r4 + k3 * r6) / (1 + k4 * r2 + k5 * r4 + k6 * r6)
        xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
        yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
        xy = torch.stack([xd, yd], dim=-1)
    K = K[..., None, :, :]  # (..., 1, 3, 3) to broadcast over N
    u = K[..., 0, 0] * xy[..., 0] + K[..., 0, 1] * xy[..., 1] + K[..., 0, 2]
    v = K[..., 1, 1] * xy[..., 1] + K[..., 1, 2]
    return torch.stack([u, v], dim=-1)


def relative_camera_pose(cam_R: torch.Tensor, cam_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pose of each frame's camera in the first frame's camera coordinates.

    With world-to-camera poses (R_t, t_t), X_0 = R_rel_t X_t + t_rel_t where R_rel_t = R_0 R_t^T and
    t_rel_t = t_0 - R_rel_t t_t; frame 0 maps to the identity.

    Args:
        cam_R: (..., T, 3, 3) world-to-camera rotations.
        cam_t: (..., T, 3) world-to-camera translations.

    Returns:
        R_rel (..., T, 3, 3) and t_rel (..., T, 3).
    """
    _check_last_dims("cam_R", cam_R, (3, 3))
    _check_last_dims("cam_t", cam_t, (3,))
    if cam_R.dim() < 3 or cam_R.shape[:-2] != cam_t.shape[:-1]:
        raise ValueError(f"cam_R (..., T, 3, 3) and cam_t (..., T, 3) must share leading dims, "
                         f"got {tuple(cam_R.shape)} and {tuple(cam_t.shape)}")
    R_rel = cam_R[..., :1, :, :] @ cam_R.transpose(-1, -2)  # (..., T, 3, 3)
    t_rel = cam_t[..., :1, :] - (R_rel @ cam_t[..., None]).squeeze(-1)  # (..., T, 3)
    return R_rel, t_rel


def camera_steps(cam_R: torch.Tensor, cam_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pose of each frame's camera in the previous frame's camera coordinates (X_{t-1} = R_t X_t + t_t).

    Args:
        cam_R: (..., T, 3, 3) world-to-camera rotations, T >= 2.
        cam_t: (..., T, 3) world-to-camera translations.

    Returns:
        R_step (..., T-1, 3, 3) and t_step (..., T-1, 3), one per frame after the first;
        :func:`compose_steps` chains them back into :func:`relative_camera_pose`'s poses.
    """
    _check_last_dims("cam_R", cam_R, (3, 3))
    _check_last_dims("cam_t", cam_t, (3,))
    if cam_R.dim() < 3 or cam_R.shape[:-2] != cam_t.shape[:-1] or cam_R.shape[-3] < 2:
        raise ValueError(f"cam_R (..., T, 3, 3) and cam_t (..., T, 3) must share leading dims with T >= 2, "
                         f"got {tuple(cam_R.shape)} and {tuple(cam_t.shape)}")
    R_step = cam_R[..., :-1, :, :] @ cam_R[..., 1:, :, :].transpose(-1, -2)
    t_step = cam_t[..., :-1, :] - (R_step @ cam_t[..., 1:, :, None]).squeeze(-1)
    return R_step, t_step


def compose_steps(R_step: torch.Tensor, t_step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Chain frame-to-frame poses (:func:`camera_steps`) into each frame's pose in the first frame's camera.

    Args:
        R_step: (..., N, 3, 3) rotation of frame i+1's camera into frame i's.
        t_step: (..., N, 3) its translation.

    Returns:
        R (..., N, 3, 3) and t (..., N, 3): frames 1..N in frame 0's camera (X_0 = R X_i + t).
    """
    _check_last_dims("R_step", R_step, (3, 3))
    _check_last_dims("t_step", t_step, (3,))
    R, t = R_step[..., 0, :, :], t_step[..., 0, :]
    rotations, translations = [R], [t]
    for i in range(1, R_step.shape[-3]):
        R, t = R @ R_step[..., i, :, :], (R @ t_step[..., i, :, None]).squeeze(-1) + t
        rotations.append(R)
        translations.append(t)
    return torch.stack(rotations, dim=-3), torch.stack(translations, dim=-2)


def umeyama(src: torch.Tensor, dst: torch.Tensor, with_scale: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares similarity (or rigid) transform with dst ~ s R src + t (Umeyama 1991).

    The rotation is a proper rotation (det +1): a reflection in the SVD solution is flipped on the axis of the
    smallest singular value. Gradients through the SVD are undefined for degenerate point sets.

    Args:
        src: (..., N, 3) source points, N >= 3 for a unique rotation.
        dst: (..., N, 3) target points.
        with_scale: fit the scale s; when False, s = 1 (rigid alignment).

    Returns:
        s (...,), R (..., 3, 3), t (..., 3).
    """
    _check_last_dims("src", src, (3,))
    _check_last_dims("dst", dst, (3,))
    if src.shape != dst.shape or src.dim() < 2:
        raise ValueError(f"src and dst must both have shape (..., N, 3), got {tuple(src.shape)} "
                         f"and {tuple(dst.shape)}")
    mu_src = src.mean(-2, keepdim=True)  # (..., 1, 3)
    mu_dst = dst.mean(-2, keepdim=True)
    xs, xd = src - mu_src, dst - mu_dst  # (..., N, 3)
    cov = xd.transpose(-1, -2) @ xs / src.shape[-2]  # (..., 3, 3)
    U, S, Vh = torch.linalg.svd(cov)
    det = torch.linalg.det(U) * torch.linalg.det(Vh)  # (...)
    d = torch.ones_like(S)  # (..., 3)
    d = torch.cat([d[..., :2], torch.where(det < 0, -1.0, 1.0).to(S.dtype)[..., None]], dim=-1)
    R = U @ (d[..., :, None] * Vh)  # (..., 3, 3)
    if with_scale:
        var_src = (xs * xs).sum(-1).mean(-1)  # (...)
        s = (S * d).sum(-1) / var_src.clamp_min(torch.finfo(src.dtype).tiny)
    else:
        s = torch.ones_like(S[..., 0])
    t = mu_dst.squeeze(-2) - s[..., None] * (R @ mu_src.squeeze(-2)[..., None]).squeeze(-1)
    return s, R, t


def similarity_procrustes(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Align X onto Y by the least-squares scale, proper rotation and translation.

    Args:
        X: (..., N, 3) points to align.
        Y: (..., N, 3) target points.

    Returns:
        (..., N, 3) = s R X + t.
    """
    s, R, t = umeyama(X, Y, with_scale=True)
    return s[..., None, None] * X @ R.transpose(-1, -2) + t[..., None, :]
