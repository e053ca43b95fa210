"""The camera's flow head, fitted once by least squares on the training split and cached.

``HaWoR.flow_head`` is a fixed linear map from a frame's pooled optical flow (hawor_tune.data.flow) to its
pose in the clip's first camera. It is fitted by ridge regression, not trained, as HaWoR is handed a
ready-made SLAM rather than learning camera motion within its own training; a search's trials are far too
short to learn that map by gradient descent, which the closed-form fit reaches at once. Every run with ``data.flow_grid`` > 0 starts with it, whatever its other weights are (the
CPU profile's pretrained start or HaMeR's backbone on the GPU profile); the fit is cached beside the frame
cache under a key of what it depends on, made once under a file lock, and re-used while nothing changed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hawor_tune.atomic import build_once
from hawor_tune.checkpoint import save_torch_file
from hawor_tune.config import ExperimentConfig
from hawor_tune.data.cache import cache_root, spec_key
from hawor_tune.data.frames import PREPARED_VERSION
from hawor_tune.data.synthetic import MARKER
from hawor_tune.errors import HaworTuneError
from hawor_tune.geometry import matrix_to_rot6d, relative_camera_pose

if TYPE_CHECKING:
    from hawor_tune.model import HaWoR

log = logging.getLogger(__name__)

# Clips of FIT_FRAMES frames starting every FIT_STRIDE frames of the training split (at most FIT_CLIPS,
# evenly spaced); ridge RIDGE on standardised flow (the best of 1, 10, 100, 1000 on the generated val split).
# Bump FIT_VERSION when the fit changes, so that old fits are not re-used.
FIT_VERSION = 1
FIT_FRAMES, FIT_STRIDE, FIT_CLIPS, RIDGE = 8, 4, 2000, 100.0
# Data keys the fit does not depend on.
_IGNORED_KEYS = ("seq_len", "stride", "batch_size", "num_workers", "train_on_val", "cache_dir", "crop_jitter")


class FlowFitError(HaworTuneError, ValueError):
    """A cached flow-head fit cannot be read, or does not fit the model's flow head."""


def fit_flow_head(clips: Sequence[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Ridge regression (RIDGE, on standardised flow) of each frame's pose in its clip's first camera (the
    camera head's offsets: 6D rotation minus the identity's, translation in metres) on the frame's flow, over
    up to FIT_CLIPS evenly spaced clips.

    Args:
        clips: items with ``flow`` (T, 2, G, G), ``cam_R`` (T, 3, 3) and ``cam_t`` (T, 3) world-to-camera
            poses, as :class:`hawor_tune.data.arctic.ArcticClips` gives them.

    Returns:
        ``weight`` (9, 2 G G) and ``bias`` (9,) for ``HaWoR.flow_head``; ``fit_mm`` and ``static_mm``, the
        mean camera translation error over the fitted frames (all but each clip's first) of the fit and of a
        static camera; ``frames``, how many frames were fitted.
    """
    picks = np.unique(np.linspace(0, len(clips) - 1, min(len(clips), FIT_CLIPS)).round().astype(int))
    flows, targets = [], []
    identity = matrix_to_rot6d(torch.eye(3, dtype=torch.float64))
    for i in picks:
        item = clips[int(i)]
        R, t = relative_camera_pose(item["cam_R"].double(), item["cam_t"].double())  # (T, 3, 3), (T, 3)
        flows.append(item["flow"][1:].flatten(1).double())  # (T-1, 2 G G)
        targets.append(torch.cat([matrix_to_rot6d(R[1:]) - identity, t[1:]], dim=-1))  # (T-1, 9)
    X, Y = torch.cat(flows), torch.cat(targets)
    mu, sd = X.mean(0), X.std(0).clamp_min(1e-6)
    A = torch.cat([(X - mu) / sd, torch.ones(len(X), 1, dtype=X.dtype)], dim=1)
    penalty = RIDGE * torch.eye(A.shape[1], dtype=X.dtype)
    penalty[-1, -1] = 0.0  # the intercept is not shrunk
    W = torch.linalg.solve(A.T @ A + penalty, A.T @ Y)  # (2 G G + 1, 9)
    fitted = A @ W
    return {"weight": (W[:-1] / sd[:, None]).T.float().contiguous(), "bias": (W[-1] - (mu / sd) @ W[:-1]).float(),
            "fit_mm": float((fitted[:, 6:] - Y[:, 6:]).norm(dim=1).mean() * 1000),
            "static_mm": float(Y[:, 6:].norm(dim=1).mean() * 1000), "frames": len(X)}


def flow_fit_key(cfg: ExperimentConfig) -> str:
    """Hash of everything the fit depends on: the data (its settings and the generated dataset's marker)."""
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in _IGNORED_KEYS}
    marker = Path(cfg.data.root) / MARKER
    spec = {"version": FIT_VERSION, "prepared": PREPARED_VERSION, "data": data,
            "dataset": marker.read_text() if marker.is_file() else None}
    return spec_key(spec)


def flow_fit_file(cfg: ExperimentConfig) -> Path:
    """Where ``cfg``'s flow-head fit is cached (beside the prepared data and the pretrained start)."""
    return cache_root(cfg.data.cache_dir, cfg.data.root) / "pretrained" / f"flow-{flow_fit_key(cfg)}.pt"


def ensure_flow_fit(cfg: ExperimentConfig) -> Path | None:
    """The cached flow-head fit of ``cfg``'s data, made once if needed; None when the model reads no flow."""
    if not cfg.data.flow_grid:
        return None
    from hawor_tune.data import build_dataset

    path = flow_fit_file(cfg)

    def build() -> None:
        fcfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, seq_len=FIT_FRAMES, stride=FIT_STRIDE, crop_jitter=0.0, train_on_val=False))
        clips = build_dataset(fcfg, "train")
        log.warning("fitting the camera's flow head once on %d training clips; cached at %s",
                    min(len(clips), FIT_CLIPS), path)
        fit = fit_flow_head(clips)
        log.warning("flow head fitted on %d frames: camera translation error %.1f mm on them, against "
                    "%.1f mm for a static camera", fit["frames"], fit["fit_mm"], fit["static_mm"])
        save_torch_file(path, fit)

    build_once(path, lambda: path if path.is_file() else None, build)
    return path


def load_flow_fit(model: HaWoR, path: str | Path) -> None:
    """Set ``model.flow_head`` to the fit cached at ``path``.

    Raises:
        FlowFitError: the file is not a fit, or its weights do not match the model's flow head (the message
            says which shapes, and that deleting the file fits it again).
    """
    head = model.flow_head
    if head is None:
        raise FlowFitError(f"the flow-head fit {path} is for a model that reads optical flow; this model has no "
                           f"flow head (data.flow_grid=0)")
    cells = head.weight.shape[1] // 2
    allowed = (f"weight {tuple(head.weight.shape)} for this model's data.flow_grid={round(cells ** 0.5)}; delete "
               f"{path} and it is fitted again")
    try:
        fit = torch.load(path, map_location="cpu", weights_only=True)
        weight, bias = fit["weight"], fit["bias"]
        shapes = tuple(weight.shape), tuple(bias.shape)
    except Exception as e:  # torch raises several types for a file that is not a fit
        first_line = (str(e).splitlines() or [""])[0][:120]
        raise FlowFitError(f"the flow-head fit {path} cannot be read ({type(e).__name__}: {first_line}); "
                           f"expected {allowed}") from None
    if shapes != (tuple(head.weight.shape), tuple(head.bias.shape)):
        raise FlowFitError(f"the flow-head fit {path} has weight {shapes[0]}, bias {shapes[1]}; expected {allowed}")
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
