"""One HaWoR training run: the loop every entry point shares (CLI, Tune trainable, final retrain).

``fit(config)`` trains with AdamW + warm-up/cosine, validates after every epoch, writes a self-describing
checkpoint and calls ``on_epoch(metrics, checkpoint_dir)``. ``evaluate(model, split, config)`` is usable
on its own. Run ``python -m hawor_tune.train --config configs/tiny.yaml [key=value ...]``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from hawor_tune import metrics
from hawor_tune.config import ConfigError, ExperimentConfig, config_from_dict, load_config, save_config
from hawor_tune.geometry import relative_camera_pose
from hawor_tune.losses import compute_losses
from hawor_tune.mano import FINGERS, HANDS

log = logging.getLogger(__name__)

LOSS_TERMS = ("mano_params", "keypoint_3d", "keypoint_2d", "temporal", "camera", "hand_world")
# Every metric a trial reports once per epoch; a search space's `metric` must be one of these.
REPORTED_METRICS = (
    "val/mpjpe", "val/mpjpe_left", "val/mpjpe_right",
    "val/pa_mpjpe", "val/pa_mpjpe_left", "val/pa_mpjpe_right",
    "val/accel_error", "val/cam_trans_error", "val/cam_rot_error",
    "train/loss", *(f"train/{t}" for t in LOSS_TERMS),
    "lr", "epoch", "time/epoch_s",
)
CHECKPOINT_FORMAT = "hawor-tune-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.pt"

EpochHook = Callable[[dict[str, float], str], None]


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class FitResult:
    """What a training run ended with."""

    status: str                      # "completed" | "diverged"
    reason: str
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint_dir: str | None = None
    model: nn.Module | None = None

    @property
    def last(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


# ----------------------------------------------------------------------------------------------------------
# Devices, precision, seeding
# ----------------------------------------------------------------------------------------------------------

def select_device(name: str = "auto") -> torch.device:
    """cuda > mps > cpu for ``auto``; a forced device that is not available is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available (use auto or cpu)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("train.device is 'mps' but MPS is not available (use auto or cpu)")
    return torch.device(name)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for a precision setting: bf16 on CUDA for ``auto``, none (fp32) on CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x: Any) -> Any:
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------------------------------------
# Optimiser and schedule
# ----------------------------------------------------------------------------------------------------------

def build_optimizer(model: nn.Module, cfg: ExperimentConfig) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases, norms and embeddings (1-d parameters)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    o = cfg.optim
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr, betas=(o.beta1, o.beta2))


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ExperimentConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = steps_per_epoch * cfg.train.epochs
    warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=warmup, total_steps=total, min_ratio=cfg.optim.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------------------
# One epoch, evaluation
# ----------------------------------------------------------------------------------------------------------

def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _capped(loader: Iterable, max_batches: int) -> tuple[Iterable, int]:
    total = len(loader)  # type: ignore[arg-type]
    if max_batches and max_batches < total:
        from itertools import islice
        return islice(loader, max_batches), max_batches
    return loader, total


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, cfg: ExperimentConfig,
                    device: torch.device, *, epoch: int = 0, max_batches: int = 0,
                    anomaly: bool = False) -> dict[str, float]:
    """Train for one pass over ``loader``; returns mean loss terms.

    Raises:
        NonFiniteLoss: the loss became NaN or infinite (names the step and the offending terms).
    """
    model.train()
    amp = autocast_dtype(device, cfg.train.precision)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    sums: dict[str, float] = {}
    n = 0
    batches, total = _capped(loader, max_batches)
    bar = tqdm(batches, total=total, desc=f"epoch {epoch} train", leave=False, dynamic_ncols=True,
               disable=None, file=sys.stderr)
    with torch.autograd.set_detect_anomaly(anomaly):
        for step, batch in enumerate(bar):
            batch = _to_device(batch, device)
            with _autocast(device, amp):
                out = model(batch["images"], batch["K"], batch["hand_valid"])
            loss, terms = compute_losses(out, batch, cfg.loss)
            if not torch.isfinite(loss):
                bad = {k: v for k, v in terms.items() if not math.isfinite(v)}
                raise NonFiniteLoss(f"non-finite loss {loss.item()} at epoch {epoch} step {step} (terms {bad or terms})")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.optim.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            n += 1
            sums["loss"] = sums.get("loss", 0.0) + loss.item()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{sums['loss'] / n:.4f}")
    return {k: v / max(n, 1) for k, v in sums.items()}


@dataclass
class Predictions:
    """Per-clip predictions and ground truth gathered over a split (numpy, metres)."""

    pred_joints: np.ndarray   # (C, T, 2, 21, 3) camera frame
    gt_joints: np.ndarray     # (C, T, 2, 21, 3)
    valid: np.ndarray         # (C, T, 2) bool
    pred_cam_R: np.ndarray    # (C, T, 3, 3) camera t in camera-0 coordinates
    pred_cam_t: np.ndarray    # (C, T, 3)
    gt_cam_R: np.ndarray      # (C, T, 3, 3)
    gt_cam_t: np.ndarray      # (C, T, 3)
    world_to_cam_R: np.ndarray  # (C, T, 3, 3) ground-truth absolute camera (for trajectories)
    world_to_cam_t: np.ndarray  # (C, T, 3)
    seq_index: np.ndarray     # (C,)
    frame_index: np.ndarray   # (C, T)


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: torch.device, *, precision: str = "auto",
            max_batches: int = 0, desc: str = "eval") -> Predictions:
    """Run the model over a loader and gather predictions with their ground truth."""
    model.eval()
    amp = autocast_dtype(device, precision)
    keep: dict[str, list[np.ndarray]] = {k: [] for k in Predictions.__dataclass_fields__}
    batches, total = _capped(loader, max_batches)
    for batch in tqdm(batches, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None,
                      file=sys.stderr):
        batch = _to_device(batch, device)
        with _autocast(device, amp):
            out = model(batch["images"], batch["K"], batch["hand_valid"])
        gt_R, gt_t = relative_camera_pose(batch["cam_R"].double(), batch["cam_t"].double())
        items = {
            "pred_joints": out.joints, "gt_joints": batch["joints3d"], "valid": batch["hand_valid"],
            "pred_cam_R": out.cam_R, "pred_cam_t": out.cam_t, "gt_cam_R": gt_R, "gt_cam_t": gt_t,
            "world_to_cam_R": batch["cam_R"], "world_to_cam_t": batch["cam_t"],
            "seq_index": batch["seq_index"], "frame_index": batch["frame_index"],
        }
        for k, v in items.items():
            v = v.detach().cpu()
            keep[k].append(v.numpy() if v.dtype == torch.bool or not v.is_floating_point()
                           else v.double().numpy())
    if not keep["valid"]:
        raise ValueError("evaluation loader yielded no batches")
    return Predictions(**{k: np.concatenate(v) for k, v in keep.items()})


def compute_metrics(p: Predictions, *, fps: float = 30.0) -> dict[str, float]:
    """Every evaluation metric from gathered predictions (mm, mm/frame^2, degrees).

    Hand metrics use the frames where the hand is valid; acceleration, jerk and world metrics use clips in
    which the hand is valid in every frame. World metrics place both hands in the clip's first camera
    frame with the predicted (resp. ground-truth) camera motion, one chunk per clip.
    """
    out: dict[str, float] = {}
    mm = 1000.0
    pooled: dict[str, list[np.ndarray]] = {"mpjpe": [], "pa_mpjpe": [], "accel_error": [],
                                          "w_mpjpe": [], "wa_mpjpe": [], "jerk": [], "jerk_gt": []}
    per_joint = []
    for h, hand in enumerate(HANDS):
        valid = p.valid[:, :, h]                                 # (C, T)
        pred = p.pred_joints[:, :, h][valid]                     # (N, 21, 3)
        gt = p.gt_joints[:, :, h][valid]
        if len(pred) == 0:
            for name in ("mpjpe", "pa_mpjpe"):
                out[f"{name}_{hand}"] = float("nan")
            continue
        e = metrics.mpjpe(pred, gt) * mm
        pa = metrics.pa_mpjpe(pred, gt) * mm
        per_joint.append(metrics.per_joint_error(pred, gt) * mm * len(pred))
        out[f"mpjpe_{hand}"], out[f"pa_mpjpe_{hand}"] = float(e.mean()), float(pa.mean())
        pooled["mpjpe"].append(e)
        pooled["pa_mpjpe"].append(pa)
        full = valid.all(axis=1)                                 # clips with this hand in every frame
        for c in np.flatnonzero(full):
            pj, gj = p.pred_joints[c, :, h], p.gt_joints[c, :, h]          # (T, 21, 3)
            if len(pj) >= 3:
                rel_p, rel_g = pj - pj[:, :1], gj - gj[:, :1]
                pooled["accel_error"].append(metrics.accel_error(rel_p, rel_g) * mm)
            world_p = np.einsum("tij,tkj->tki", p.pred_cam_R[c], pj) + p.pred_cam_t[c][:, None]
            world_g = np.einsum("tij,tkj->tki", p.gt_cam_R[c], gj) + p.gt_cam_t[c][:, None]
            if len(pj) >= 2:
                pooled["w_mpjpe"].append(metrics.w_mpjpe(world_p, world_g, chunk=len(pj)) * mm)
                pooled["wa_mpjpe"].append(metrics.wa_mpjpe(world_p, world_g, chunk=len(pj)) * mm)
            if len(pj) >= 4:
                pooled["jerk"].append(metrics.jerk(world_p, fps=fps))
                pooled["jerk_gt"].append(metrics.jerk(world_g, fps=fps))
    for name, values in pooled.items():
        out[name] = float(np.concatenate(values).mean()) if values else float("nan")
    total_valid = int(p.valid.sum())
    if per_joint and total_valid:
        joint_err = np.sum(per_joint, axis=0) / total_valid      # (21,) pooled over both hands
        for j, v in enumerate(joint_err):
            out[f"joint_{j:02d}"] = float(v)
        for finger, idx in FINGERS.items():
            out[f"finger_{finger}"] = float(joint_err[list(idx)].mean())
    # Camera: frames after the first of each clip (frame 0 is the identity by construction).
    C, T = p.valid.shape[:2]
    if T > 1:
        te = metrics.camera_translation_error(p.pred_cam_t[:, 1:].reshape(-1, 3), p.gt_cam_t[:, 1:].reshape(-1, 3))
        re = metrics.camera_rotation_error(p.pred_cam_R[:, 1:].reshape(-1, 3, 3), p.gt_cam_R[:, 1:].reshape(-1, 3, 3))
        out["cam_trans_error"], out["cam_rot_error"] = float(te.mean() * mm), float(np.degrees(re.mean()))
    else:
        out["cam_trans_error"] = out["cam_rot_error"] = float("nan")
    out["valid_hand_frames"] = float(total_valid)
    return out


def evaluate(model: nn.Module, split: str | Iterable, config: ExperimentConfig, *,
             device: torch.device | None = None, max_batches: int = 0,
             return_predictions: bool = False) -> dict[str, float] | tuple[dict[str, float], Predictions]:
    """Evaluate ``model`` on a split name ('val', 'test', 'train') or on a ready loader.

    Returns:
        Metrics keyed without a split prefix (``mpjpe``, ``pa_mpjpe_left``, ...); with
        ``return_predictions`` also the gathered :class:`Predictions`.
    """
    from hawor_tune.data import build_dataloader

    device = device or next(model.parameters()).device
    loader = build_dataloader(config, split, shuffle=False) if isinstance(split, str) else split
    preds = predict(model, loader, device, precision=config.train.precision, max_batches=max_batches,
                    desc=f"eval {split if isinstance(split, str) else ''}".strip())
    result = compute_metrics(preds, fps=30.0 / config.data.frame_step)
    return (result, preds) if return_predictions else result


def mean_pose_baseline(config: ExperimentConfig, split: str = "val") -> dict[str, float]:
    """MPJPE/PA-MPJPE (mm) of predicting the training set's mean root-relative hand pose for every frame."""
    from hawor_tune.data import build_dataloader

    def gather(name: str) -> tuple[np.ndarray, np.ndarray]:
        joints, valid = [], []
        for batch in build_dataloader(config, name, shuffle=False):
            joints.append(batch["joints3d"].double().numpy())
            valid.append(batch["hand_valid"].numpy())
        return np.concatenate(joints), np.concatenate(valid)

    train_j, train_v = gather("train")
    eval_j, eval_v = gather(split)
    out: dict[str, float] = {}
    errors, pa_errors = [], []
    for h, hand in enumerate(HANDS):
        rel = train_j[:, :, h][train_v[:, :, h]]
        mean = (rel - rel[:, :1]).mean(axis=0)                   # (21, 3)
        gt = eval_j[:, :, h][eval_v[:, :, h]]
        pred = np.broadcast_to(mean, gt.shape)
        e, pa = metrics.mpjpe(pred, gt) * 1000, metrics.pa_mpjpe(pred, gt) * 1000
        out[f"mpjpe_{hand}"], out[f"pa_mpjpe_{hand}"] = float(e.mean()), float(pa.mean())
        errors.append(e)
        pa_errors.append(pa)
    out["mpjpe"] = float(np.concatenate(errors).mean())
    out["pa_mpjpe"] = float(np.concatenate(pa_errors).mean())
    return out


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------

def save_checkpoint(directory: str | os.PathLike, *, model: nn.Module, config: ExperimentConfig, epoch: int,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    history: list[dict[str, float]] | None = None) -> Path:
    """Write a self-describing checkpoint folder atomically (temporary folder, then rename)."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch,
        "config": config.to_dict(), "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": _rng_state(), "history": history or [],
    }
    torch.save(state, tmp / CHECKPOINT_FILE)
    save_config(config, tmp / "config.yaml")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def export_model(path: str | os.PathLike, *, model: nn.Module, config: ExperimentConfig, epoch: int,
                 history: list[dict[str, float]] | None = None) -> Path:
    """Write a single-file, self-describing model (weights + resolved config + history), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch,
                "config": config.to_dict(), "model": model.state_dict(), "optimizer": None, "scheduler": None,
                "history": history or []}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint file or folder written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        ValueError: the file is missing or is not a hawor-tune checkpoint.
    """
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{path}: no checkpoint here (expected a {CHECKPOINT_FILE} file or a folder holding one)")
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:  # a zip/pickle error from a file that is not ours
        raise ValueError(f"{file}: not a hawor-tune checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{file}: not a hawor-tune checkpoint (no '{CHECKPOINT_FORMAT}' format marker)")
    if state.get("version", 0) > CHECKPOINT_VERSION:
        raise ValueError(f"{file}: checkpoint version {state['version']} is newer than this hawor-tune "
                         f"({CHECKPOINT_VERSION}); upgrade hawor-tune")
    return state


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, ExperimentConfig]:
    """Rebuild the model and its config from a checkpoint alone."""
    from hawor_tune.model import build_model

    state = load_checkpoint(path)
    config = config_from_dict(state["config"])
    model = build_model(config)
    model.load_state_dict(state["model"])
    return model.to(device), config


def _prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    dirs = sorted(p for p in ckpt_root.glob("epoch_*") if p.is_dir())
    for old in dirs[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete epoch checkpoint under ``out_dir/checkpoints``, if any."""
    dirs = sorted(p for p in (Path(out_dir) / "checkpoints").glob("epoch_*") if (p / CHECKPOINT_FILE).is_file())
    return dirs[-1] if dirs else None


# ----------------------------------------------------------------------------------------------------------
# fit
# ----------------------------------------------------------------------------------------------------------

def _epoch_loader(base_loader: Any, cfg: ExperimentConfig, epoch: int) -> Any:
    """Re-seed the shuffling of the training loader from (seed, epoch) so a resumed run sees the same order."""
    gen = getattr(getattr(base_loader, "sampler", None), "generator", None)
    if gen is not None:
        gen.manual_seed(cfg.train.seed * 100_003 + epoch)
    return base_loader


def fit(config: ExperimentConfig, on_epoch: EpochHook | None = None,
        resume_from: str | os.PathLike | None = None, *, anomaly: bool = False,
        epochs: int | None = None) -> FitResult:
    """Train a HaWoR model end to end.

    Args:
        config: the resolved experiment config.
        on_epoch: called after every epoch with the epoch's metrics and the checkpoint folder written
            for it (the Tune trainable reports both).
        resume_from: a checkpoint file or folder to continue from (weights, optimiser, scheduler, RNG).
        anomaly: enable autograd anomaly detection (the CLI's --debug).
        epochs: stop after this many epochs in total (default: train.epochs; the schedule still spans
            train.epochs so that a shortened run follows the same learning-rate curve).

    Returns:
        A :class:`FitResult`; ``status`` is ``diverged`` with the reason when the loss became non-finite.
    """
    from hawor_tune.data import build_dataloader
    from hawor_tune.model import build_model

    cfg = config
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = select_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    out_dir = Path(cfg.train.out_dir)
    ckpt_root = out_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")

    train_loader = build_dataloader(cfg, "train", shuffle=True, seed=cfg.train.seed)
    val_loader = build_dataloader(cfg, "val", shuffle=False)
    model = build_model(cfg).to(device)
    optimizer = build_optimizer(model, cfg)
    steps = len(train_loader) if not cfg.train.max_train_batches else min(len(train_loader), cfg.train.max_train_batches)
    scheduler = build_scheduler(optimizer, cfg, steps)

    start_epoch, history = 1, []
    if resume_from is not None:
        state = load_checkpoint(resume_from, map_location=device)
        model.load_state_dict(state["model"])
        if state.get("optimizer"):
            optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start_epoch, history = int(state["epoch"]) + 1, list(state.get("history", []))
        log.info("resumed from %s at epoch %d", resume_from, start_epoch)

    last_epoch = min(cfg.train.epochs, epochs or cfg.train.epochs)
    checkpoint_dir: str | None = None
    log.info("training on %s for epochs %d..%d (%d steps/epoch), out_dir %s",
             device, start_epoch, last_epoch, steps, out_dir)
    for epoch in range(start_epoch, last_epoch + 1):
        t0 = time.perf_counter()
        try:
            losses = train_one_epoch(model, _epoch_loader(train_loader, cfg, epoch), optimizer, scheduler, cfg,
                                     device, epoch=epoch, max_batches=cfg.train.max_train_batches, anomaly=anomaly)
        except NonFiniteLoss as e:
            log.error("stopping: %s", e)
            return FitResult("diverged", str(e), epoch - 1, history, checkpoint_dir, model)
        val = evaluate(model, val_loader, cfg, device=device, max_batches=cfg.train.max_eval_batches)
        record = {"epoch": float(epoch), "lr": optimizer.param_groups[0]["lr"],
                  "time/epoch_s": time.perf_counter() - t0}
        record.update({f"train/{k}": v for k, v in losses.items()})
        record.update({f"val/{k}": v for k, v in val.items()})
        history.append(record)
        checkpoint_dir = str(save_checkpoint(ckpt_root / f"epoch_{epoch:04d}", model=model, config=cfg,
                                             epoch=epoch, optimizer=optimizer, scheduler=scheduler,
                                             history=history))
        _prune_checkpoints(ckpt_root, cfg.train.keep_checkpoints)
        print(f"epoch {epoch:3d}/{cfg.train.epochs}  loss {losses['loss']:.4f}  "
              f"val MPJPE {val['mpjpe']:.1f} mm (L {val['mpjpe_left']:.1f} / R {val['mpjpe_right']:.1f})  "
              f"PA-MPJPE {val['pa_mpjpe']:.1f} mm  cam {val['cam_trans_error']:.1f} mm / "
              f"{val['cam_rot_error']:.2f} deg  lr {record['lr']:.2e}  {record['time/epoch_s']:.1f} s", flush=True)
        if on_epoch is not None:
            on_epoch(record, checkpoint_dir)
    return FitResult("completed", f"trained {last_epoch} epochs", len(history), history, checkpoint_dir, model)


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------

def _test_only(cfg: ExperimentConfig) -> None:
    """One batch forward and backward plus one short evaluation: validates the whole pipeline in seconds."""
    from hawor_tune.data import build_dataloader
    from hawor_tune.model import build_model

    device = select_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    model = build_model(cfg).to(device)
    optimizer = build_optimizer(model, cfg)
    t0 = time.perf_counter()
    losses = train_one_epoch(model, build_dataloader(cfg, "train", shuffle=True, seed=cfg.train.seed),
                             optimizer, None, cfg, device, max_batches=1)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if cfg.data.seq_len == 1:  # a one-frame clip has no camera motion to learn
        missing = [n for n in missing if not n.startswith("camera_head")]
    if missing:
        raise RuntimeError(f"no gradient reached {len(missing)} parameters, e.g. {missing[:3]}")
    val = evaluate(model, "val", cfg, device=device, max_batches=1)
    print(f"test-only OK in {time.perf_counter() - t0:.1f} s: loss {losses['loss']:.4f}, "
          f"val MPJPE {val['mpjpe']:.1f} mm on one batch, device {device}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hawor_tune.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml", help="experiment YAML (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", metavar="CKPT", help="continue a run from a checkpoint file or folder")
    mode.add_argument("--eval-only", metavar="CKPT", help="evaluate a checkpoint on val and test")
    mode.add_argument("--test-only", action="store_true", help="one train step + one eval batch, then exit")
    parser.add_argument("--debug", action="store_true", help="autograd anomaly detection, verbose logging")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.resume or args.eval_only:
            ckpt = args.resume or args.eval_only
            state = load_checkpoint(ckpt)
            cfg = load_config(state["config"], args.overrides)
        else:
            cfg = load_config(args.config, args.overrides)
        if args.eval_only:
            model, _ = load_model(ckpt, select_device(cfg.train.device))
            for split in ("val", "test"):
                m = evaluate(model, split, cfg)
                print(f"{split}: MPJPE {m['mpjpe']:.1f} mm, PA-MPJPE {m['pa_mpjpe']:.1f} mm, "
                      f"accel {m['accel_error']:.2f}, cam {m['cam_trans_error']:.1f} mm / {m['cam_rot_error']:.2f} deg")
            return 0
        if args.test_only:
            _test_only(cfg)
            return 0
        result = fit(cfg, resume_from=args.resume, anomaly=args.debug)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.status != "completed":
        print(f"run {result.status}: {result.reason}", file=sys.stderr)
        return 1
    best = min(result.history, key=lambda r: r["val/mpjpe"])
    print(f"done: best val MPJPE {best['val/mpjpe']:.1f} mm at epoch {int(best['epoch'])}; "
          f"checkpoint {result.checkpoint_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
