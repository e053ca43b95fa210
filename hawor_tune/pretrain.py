"""A pretrained start for every run: one per-frame pretraining of the hand branch and a least-squares fit
of the camera's flow head, cached.

HaWoR fine-tunes a hand-pretrained backbone (HaMeR's) and never trains from scratch. With no such weights
on a laptop, :func:`ensure_pretrained` makes one: the same model trained on single frames of the training
split (wrist-relative 3D keypoints, 2D keypoints and MANO parameters; no temporal or camera terms) by the
project's one training loop, :func:`hawor_tune.train.fit`. The result is cached beside the frame cache
under a key of everything it depends on (the data, the hand model, the model architecture, the
pretraining settings), built once under a file lock however many trials ask at the same time,
and re-used, never re-trained, while nothing changed. With ``model.pretrained_path`` set (e.g. HaMeR's
weights on the GPU profile) nothing is pretrained.

The camera's flow head (``HaWoR.flow_head``, a linear map from a frame's optical flow to its pose in the
clip's first camera) is then fitted by ridge regression on training clips (:func:`fit_flow_head`), as HaWoR
is handed a ready-made SLAM rather than learning camera motion within its own training; a search's trials
are far too short to learn that map by gradient descent (measured: a flow MLP trained alone from scratch
needs thousands of steps to come near the least-squares fit). Both stages are cached: the hand stage's file
is kept, so a changed flow setting does not pretrain the hands again.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from filelock import FileLock

from hawor_tune.config import ExperimentConfig, LossConfig, OptimConfig
from hawor_tune.data.cache import cache_root
from hawor_tune.data.synthetic import MARKER
from hawor_tune.geometry import matrix_to_rot6d, relative_camera_pose

if TYPE_CHECKING:
    from hawor_tune.data.arctic import ArcticClips
    from hawor_tune.model import HaWoR

log = logging.getLogger(__name__)

# Bump when what the pretraining does changes, so that old cached weights are not re-used.
PRETRAIN_VERSION = 1
# Per-frame hand terms only: a one-frame clip has no motion, and the searched loss weights must not change
# the shared start (or every trial would pretrain its own).
PRETRAIN_LOSS = dataclasses.replace(LossConfig(), temporal=0.0, camera=0.0, hand_world=0.0)
# One start shared by every run whatever its seed, as a released checkpoint is: run-to-run noise is then
# the fine-tuning's, which is what a search compares.
PRETRAIN_SEED = 0
# The flow head's fit: clips of FLOW_FIT_FRAMES frames starting every FLOW_FIT_STRIDE frames of the training
# split (at most FLOW_FIT_CLIPS, evenly spaced), ridge FLOW_RIDGE on standardised flow (best of 1-1000 on
# the generated val split). Bump FLOW_FIT_VERSION when the fit changes.
FLOW_FIT_VERSION = 1
FLOW_FIT_FRAMES, FLOW_FIT_STRIDE, FLOW_FIT_CLIPS, FLOW_RIDGE = 8, 4, 2000, 100.0
# Data keys that only shape clips or batches, not what a single frame shows.
_CLIP_KEYS = ("seq_len", "stride", "flow_grid", "batch_size", "num_workers", "train_on_val", "cache_dir")


def pretrain_config(cfg: ExperimentConfig, out_dir: str | Path) -> ExperimentConfig:
    """The per-frame training run that makes ``cfg``'s start: same data, hand model and architecture."""
    p = cfg.pretrain
    pcfg = copy.deepcopy(cfg)
    pcfg.data = dataclasses.replace(cfg.data, seq_len=1, stride=1, batch_size=p.batch_size, train_on_val=False)
    pcfg.model = dataclasses.replace(cfg.model, pretrained_path="", infill_mask_prob=0.0)
    pcfg.loss = copy.deepcopy(PRETRAIN_LOSS)
    pcfg.optim = OptimConfig(lr=p.lr, warmup_epochs=0.25)  # not the run's (searched) optimiser settings
    pcfg.train = dataclasses.replace(cfg.train, epochs=p.epochs, max_train_batches=p.max_train_batches,
                                     max_eval_batches=0, keep_checkpoints=1, out_dir=str(out_dir),
                                     seed=PRETRAIN_SEED)
    pcfg.pretrain = dataclasses.replace(p, epochs=0)
    return pcfg


def pretrain_key(cfg: ExperimentConfig) -> str:
    """Hash of everything the pretrained weights depend on."""
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in _CLIP_KEYS}
    marker = Path(cfg.data.root) / MARKER
    spec = {"version": PRETRAIN_VERSION, "data": data, "mano": dataclasses.asdict(cfg.mano),
            "model": {k: v for k, v in dataclasses.asdict(cfg.model).items()
                      if k not in ("pretrained_path", "infill_mask_prob")},
            "pretrain": dataclasses.asdict(cfg.pretrain), "loss": dataclasses.asdict(PRETRAIN_LOSS),
            "precision": cfg.train.precision,
            "dataset": marker.read_text() if marker.is_file() else None}
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _hand_file(cfg: ExperimentConfig) -> Path:
    """Where the hand stage of ``cfg``'s start is cached (beside the frame cache)."""
    return cache_root(cfg.data.cache_dir, cfg.data.root) / "pretrained" / f"hand-{pretrain_key(cfg)}.pt"


def pretrained_file(cfg: ExperimentConfig) -> Path:
    """Where ``cfg``'s pretrained start is cached: the hand stage, plus the flow head's fit when the model
    reads flow (``data.flow_grid`` > 0)."""
    hand = _hand_file(cfg)
    G = cfg.data.flow_grid
    return hand.with_name(f"{hand.stem}-flow{G}v{FLOW_FIT_VERSION}.pt") if G else hand


def ensure_pretrained(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with ``model.pretrained_path`` pointing at its hand-pretrained start, made once if needed.

    Returns ``cfg`` itself when it names its own weights or disables pretraining (``pretrain.epochs: 0``).
    """
    if cfg.model.pretrained_path or cfg.pretrain.epochs == 0:
        return cfg
    from hawor_tune.checkpoint import export_model
    from hawor_tune.train import fit

    hand, path = _hand_file(cfg), pretrained_file(cfg)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(hand) + ".lock"):
            if not hand.is_file():  # another process may have made it while we waited
                run_dir = hand.with_name(f".{hand.stem}.run")
                shutil.rmtree(run_dir, ignore_errors=True)  # left by a killed pretraining
                pcfg = pretrain_config(cfg, run_dir)
                log.warning("pretraining the hand branch once on single frames (%d epochs); cached at %s",
                            pcfg.train.epochs, hand)
                result = fit(pcfg)
                if result.status != "completed":
                    raise RuntimeError(f"pretraining {result.status}: {result.reason}")
                export_model(hand, model=result.model, config=pcfg, epoch=result.epochs_run,
                             history=result.history)
                shutil.rmtree(run_dir, ignore_errors=True)
            if not path.is_file():
                _add_flow_head(cfg, hand, path)
    out = copy.deepcopy(cfg)
    out.model.pretrained_path = str(path)
    return out


def _add_flow_head(cfg: ExperimentConfig, hand: Path, path: Path) -> None:
    """Write ``path``: the hand stage ``hand`` with the flow head fitted on ``cfg``'s training split."""
    from hawor_tune.checkpoint import export_model, load_checkpoint
    from hawor_tune.data import build_dataset
    from hawor_tune.model import build_model

    fcfg = copy.deepcopy(cfg)
    fcfg.model.pretrained_path = str(hand)
    fcfg.data = dataclasses.replace(cfg.data, seq_len=FLOW_FIT_FRAMES, stride=FLOW_FIT_STRIDE, crop_jitter=0.0,
                                    train_on_val=False)
    model = build_model(fcfg)
    clips = build_dataset(fcfg, "train")
    log.warning("fitting the camera's flow head once on %d training clips; cached at %s",
                min(len(clips), FLOW_FIT_CLIPS), path)
    error = fit_flow_head(model, clips)
    log.warning("flow head fitted: training-clip camera error %.1f mm against %.1f mm for a static camera",
                error["fit_mm"], error["static_mm"])
    state = load_checkpoint(hand)
    export_model(path, model=model, config=pretrain_config(cfg, hand.parent), epoch=state["epoch"],
                 history=state["history"])


def fit_flow_head(model: HaWoR, clips: ArcticClips) -> dict[str, float]:
    """Fit ``model.flow_head`` by ridge regression (FLOW_RIDGE, on standardised flow) of each frame's pose
    in its clip's first camera (the camera head's offsets: 6D rotation minus the identity's, translation in
    metres) on the frame's optical flow, over up to FLOW_FIT_CLIPS evenly spaced clips of ``clips``.

    Returns:
        ``fit_mm`` and ``static_mm``: the mean camera translation error over the fitted frames of the fit
        and of a static camera (frames after each clip's first).
    """
    picks = np.unique(np.linspace(0, len(clips) - 1, min(len(clips), FLOW_FIT_CLIPS)).round().astype(int))
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
    penalty = FLOW_RIDGE * torch.eye(A.shape[1], dtype=X.dtype)
    penalty[-1, -1] = 0.0  # the intercept is not shrunk
    W = torch.linalg.solve(A.T @ A + penalty, A.T @ Y)  # (2 G G + 1, 9)
    head = model.flow_head
    with torch.no_grad():
        head.weight.copy_((W[:-1] / sd[:, None]).T)
        head.bias.copy_(W[-1] - (mu / sd) @ W[:-1])
    fitted = A @ W
    return {"fit_mm": float((fitted[:, 6:] - Y[:, 6:]).norm(dim=1).mean() * 1000),
            "static_mm": float(Y[:, 6:].norm(dim=1).mean() * 1000)}
