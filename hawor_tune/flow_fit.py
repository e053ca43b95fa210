"""The camera's flow head, fitted once on the training split and cached.

``HaWoR.flow_head`` is a fixed small MLP from the pooled optical flow between two consecutive frames
(hawor_tune.data.flow; the difference of the clip's flows from its first frame) to the later frame's pose in the
earlier one's camera; the model chains these steps into the clip's path. It is fitted once on the training
split's clips, not trained with the model, as
HaWoR is handed a ready-made SLAM rather than learning camera motion within its own training; a search's trials
are far too short to learn that map by gradient descent, which a dedicated fit on every training frame reaches
in seconds. Each clip is also fitted seen in a mirror (the room's left and right swapped), so that the fit
does not learn the few training rooms' layouts as a direction of motion. Every run with ``data.flow_grid`` > 0 starts with it, whatever
its other weights are (the CPU profile's pretrained start or HaMeR's backbone on the GPU profile); the fit is
cached beside the frame cache under a key of what it depends on, made once under a file lock, and re-used
while nothing changed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from hawor_tune.atomic import build_once
from hawor_tune.checkpoint import save_torch_file
from hawor_tune.config import ExperimentConfig
from hawor_tune.data.cache import cache_root, spec_key
from hawor_tune.data.frames import PREPARED_VERSION
from hawor_tune.data.synthetic import MARKER
from hawor_tune.errors import HaworTuneError
from hawor_tune.geometry import camera_steps, matrix_to_rot6d, relative_camera_pose
from hawor_tune.model import FLOW_HIDDEN, FlowHead

if TYPE_CHECKING:
    from hawor_tune.model import HaWoR

log = logging.getLogger(__name__)

# Clips of FIT_FRAMES frames starting every FIT_STRIDE frames of the training split (at most FIT_CLIPS,
# evenly spaced). The MLP: AdamW (FIT_LR, FIT_WEIGHT_DECAY) for FIT_EPOCHS over batches of FIT_BATCH frames,
# dropout FIT_DROPOUT after its first layer, outputs fitted in units of OUT_SCALE (centimetres and
# centiradians), seeded by FIT_SEED; chosen on the generated val split's camera translation error.
# Bump FIT_VERSION when the fit changes, so that old fits are not re-used.
FIT_VERSION = 3
FIT_FRAMES, FIT_STRIDE, FIT_CLIPS = 8, 1, 4000
FIT_EPOCHS, FIT_BATCH, FIT_LR, FIT_WEIGHT_DECAY, FIT_DROPOUT, FIT_SEED = 20, 512, 1e-3, 1e-2, 0.1, 0
OUT_SCALE = 0.01
# Data keys the fit does not depend on.
_IGNORED_KEYS = ("seq_len", "stride", "batch_size", "num_workers", "train_on_val", "cache_dir", "crop_jitter")
# x -> -x: a camera frame seen in a mirror.
_MIRROR = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))


class FlowFitError(HaworTuneError, ValueError):
    """A cached flow-head fit cannot be read, or does not fit the model's flow head."""


def _mirrored(flow: torch.Tensor, R: torch.Tensor, t: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, 2, G, G) flow, (N, 3, 3) rotations and (N, 3) translations of one camera in another -> the same
    frames seen in a mirror: cells flipped left to right with their x flow negated, M R M and M t."""
    flow = flow.flip(-1).clone()
    flow[:, 0] = -flow[:, 0]
    M = _MIRROR.to(R.dtype)
    return flow, M @ R @ M, t @ M


def _fit_mlp(X: torch.Tensor, Y: torch.Tensor, hidden: int) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """(N, D) standardised inputs, (N, K) targets -> the three layers of a GELU MLP fitted to them (the
    L2 error per sample, AdamW, dropout after the first layer), seeded by FIT_SEED."""
    with torch.random.fork_rng():
        torch.manual_seed(FIT_SEED)
        net = nn.Sequential(nn.Linear(X.shape[1], hidden), nn.GELU(), nn.Dropout(FIT_DROPOUT),
                            nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, Y.shape[1]))
        optimizer = torch.optim.AdamW(net.parameters(), lr=FIT_LR, weight_decay=FIT_WEIGHT_DECAY)
        for _ in range(FIT_EPOCHS):
            for batch in torch.randperm(len(X)).split(FIT_BATCH):
                loss = (net(X[batch]) - Y[batch]).norm(dim=1).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    return net[0], net[3], net[5]


def head_path(head: FlowHead, flow: torch.Tensor, *, chained: bool = True) -> torch.Tensor:
    """(T, 2, G, G) a clip's flow from its first frame -> (T-1, 3) float64 translations of frames 1.. in its
    first camera, as the head reads them: chained from frame-to-frame steps (:meth:`FlowHead.path`, the model's
    way), or, for a head fitted with ``chained=False``, read from each frame's flow from the first."""
    with torch.no_grad():
        if not chained:
            return head(flow[1:].flatten(1).float()).double()[:, 6:]
        return head.path(flow.float())[1].double()


def fit_flow_head(clips: Sequence[dict[str, torch.Tensor]], hidden: int = FLOW_HIDDEN, *,
                  chained: bool = True) -> dict[str, Any]:
    """Fit the flow head's MLP to each frame's pose in the previous frame's camera (the camera head's offsets:
    6D rotation minus the identity's, translation in metres) from the flow between the two, over up to
    FIT_CLIPS evenly spaced clips and their mirror images.

    Args:
        clips: items with ``flow`` (T, 2, G, G) from each clip's first frame, ``cam_R`` (T, 3, 3) and ``cam_t``
            (T, 3) world-to-camera poses, as :class:`hawor_tune.data.arctic.ArcticClips` gives them.
        hidden: the MLP's hidden width (``FlowHead``'s).
        chained: False fits each frame's pose in the first camera from its flow from the first frame instead
            (what the head did before it was chained; ``benchmarks/bench_flow.py`` compares the two).

    Returns:
        ``state``, the buffers of a ``FlowHead`` (the input's standardisation and the output's scale folded
        into its first and last layers); ``fit_mm`` and ``static_mm``, the mean camera translation error in
        each clip's first camera over the fitted clips' frames after the first (not mirrored), of the head's
        path (:func:`head_path`) and of a static camera; ``frames``, how many frames were fitted.
    """
    picks = np.unique(np.linspace(0, len(clips) - 1, min(len(clips), FIT_CLIPS)).round().astype(int))
    flows, rotations, translations, paths = [], [], [], []
    for i in picks:
        item = clips[int(i)]
        flow, cam_R, cam_t = item["flow"].double(), item["cam_R"].double(), item["cam_t"].double()
        paths.append((flow, relative_camera_pose(cam_R, cam_t)[1][1:]))  # the clip's flow, its true path
        if chained:  # from the previous frame: (T-1, 2, G, G), (T-1, 3, 3), (T-1, 3)
            flows.append(flow[1:] - flow[:-1])
            R, t = camera_steps(cam_R, cam_t)
        else:
            flows.append(flow[1:])
            R, t = (x[1:] for x in relative_camera_pose(cam_R, cam_t))
        rotations.append(R)
        translations.append(t)
    flow, R, t = torch.cat(flows), torch.cat(rotations), torch.cat(translations)
    identity = matrix_to_rot6d(torch.eye(3, dtype=torch.float64))

    def targets(R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([matrix_to_rot6d(R) - identity, t], dim=-1)  # (N, 9)

    m_flow, m_R, m_t = _mirrored(flow, R, t)
    X = torch.cat([flow, m_flow]).flatten(1).float()  # (2N, 2 G G)
    Y = (torch.cat([targets(R, t), targets(m_R, m_t)]) / OUT_SCALE).float()  # (2N, 9)
    mu, sd = X.mean(0), X.std(0).clamp_min(1e-6)
    # Rotation and translation are fitted apart (each on half the hidden units: the translation, the harder,
    # loses to the rotation in a shared fit), then packed into one MLP with block-diagonal weights.
    layers = [_fit_mlp((X - mu) / sd, Y[:, part], hidden // 2) for part in (slice(0, 6), slice(6, 9))]
    with torch.no_grad():
        w1 = torch.cat([first.weight for first, _, _ in layers])
        state = {"w1": w1 / sd, "b1": torch.cat([first.bias for first, _, _ in layers]) - w1 @ (mu / sd),
                 "w2": torch.block_diag(*(middle.weight for _, middle, _ in layers)),
                 "b2": torch.cat([middle.bias for _, middle, _ in layers]),
                 "w3": torch.block_diag(*(last.weight for _, _, last in layers)) * OUT_SCALE,
                 "b3": torch.cat([last.bias for _, _, last in layers]) * OUT_SCALE}
    state = {k: v.detach().float().contiguous() for k, v in state.items()}
    head = FlowHead(X.shape[1], Y.shape[1], hidden)
    head.load_state_dict(state)
    errors = [(head_path(head, flow, chained=chained) - truth).norm(dim=1) for flow, truth in paths]
    static = [truth.norm(dim=1) for _, truth in paths]
    return {"state": state, "fit_mm": float(torch.cat(errors).mean() * 1000),
            "static_mm": float(torch.cat(static).mean() * 1000), "frames": len(t)}


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
            says which tensor and shapes, and that deleting the file fits it again).
    """
    head = model.flow_head
    if head is None:
        raise FlowFitError(f"the flow-head fit {path} is for a model that reads optical flow; this model has no "
                           f"flow head (data.flow_grid=0)")
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    remedy = (f"for this model's data.flow_grid={round((expected['w1'][1] // 2) ** 0.5)}; delete {path} and it is "
              f"fitted again")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["state"]
        shapes = {k: tuple(state[k].shape) for k in expected}
    except Exception as e:  # torch raises several types for a file that is not a fit
        first_line = (str(e).splitlines() or [""])[0][:120]
        raise FlowFitError(f"the flow-head fit {path} cannot be read ({type(e).__name__}: {first_line}); "
                           f"expected w1 {expected['w1']} {remedy}") from None
    wrong = next((k for k in expected if shapes[k] != expected[k]), None)
    if wrong is not None:
        raise FlowFitError(f"the flow-head fit {path} has {wrong} {shapes[wrong]}; expected {wrong} "
                           f"{expected[wrong]} {remedy}")
    with torch.no_grad():
        for k, v in head.state_dict().items():
            v.copy_(state[k])
