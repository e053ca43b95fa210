"""One HaWoR training run: the loop every entry point shares (CLI, Tune trainable, final retrain).

``prepare_run(config)`` makes or finds what a run starts from (the hand-pretrained start, the camera's
flow-head fit); ``fit(config)`` then trains from it with AdamW + warm-up/cosine, validates after every
epoch, writes a self-describing checkpoint (hawor_tune.checkpoint) and calls ``on_epoch(metrics,
checkpoint_dir)``; validation is hawor_tune.evaluation's ``evaluate``, usable on its own. Run ``python -m hawor_tune.train --config configs/tiny.yaml [key=value ...]``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import torch
import yaml
from torch import nn
from tqdm import tqdm

from hawor_tune.atomic import atomic_write_text
from hawor_tune.checkpoint import (
    load_checkpoint,
    load_model,
    load_model_state,
    needs_pretrained,
    prune_checkpoints,
    save_checkpoint,
)
from hawor_tune.cli import ArgumentParser, fail
from hawor_tune.config import ConfigError, ExperimentConfig, load_config, save_config
from hawor_tune.epoch_metrics import CONSTRAINT_PREFIX, OBJECTIVE, check_objective
from hawor_tune.errors import HaworTuneError
from hawor_tune.evaluation import cached_baseline, constraint_values, evaluate, objective
from hawor_tune.losses import compute_losses
from hawor_tune.model import run_model
from hawor_tune.pretrain import ensure_pretrained, makes_own_start
from hawor_tune.runtime import (
    autocast,
    autocast_dtype,
    capped,
    keep_freed_memory,
    seed_everything,
    select_device,
    set_rng_state,
    to_device,
)

log = logging.getLogger(__name__)

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
# Optimiser and schedule
# ----------------------------------------------------------------------------------------------------------

def build_optimizer(model: nn.Module, cfg: ExperimentConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with no weight decay on biases, norms and embeddings (1-d
    parameters), and the pretrained parts (the crop backbone, and the modules named in
    ``model.pretrained_parts``) at ``optim.backbone_lr_scale`` x the learning rate."""
    o = cfg.optim
    parts = {"backbone", *getattr(model, "pretrained_parts", ())}
    pretrained = {id(p) for name in parts if isinstance(getattr(model, name, None), nn.Module)
                   for p in getattr(model, name).parameters()}
    # Groups in a fixed order, the rest of the model's first: param_groups[0]["lr"] is the run's learning rate.
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {
        (part, decay): [] for part in (False, True) for decay in (True, False)}
    for p in model.parameters():
        if p.requires_grad:
            groups[(id(p) in pretrained, p.ndim >= 2)].append(p)
    # fused: one kernel for all tensors; on a CPU the per-tensor loop is a large share of a small model's step.
    return torch.optim.AdamW(
        [{"params": params, "weight_decay": o.weight_decay if decay else 0.0,
          "lr": o.lr * (o.backbone_lr_scale if part else 1.0)}
         for (part, decay), params in groups.items() if params],
        lr=o.lr, betas=(o.beta1, o.beta2), fused=True)


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
    batches, total = capped(loader, max_batches)
    bar = tqdm(batches, total=total, desc=f"epoch {epoch} train", leave=False, dynamic_ncols=True,
               disable=None, file=sys.stderr)
    with torch.autograd.set_detect_anomaly(anomaly):
        for step, batch in enumerate(bar):
            batch = to_device(batch, device)
            with autocast(device, amp):
                out = run_model(model, batch)
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

# ----------------------------------------------------------------------------------------------------------
# fit
# ----------------------------------------------------------------------------------------------------------

def _epoch_loader(base_loader: Any, cfg: ExperimentConfig, epoch: int) -> Any:
    """Re-seed the shuffling of the training loader from (seed, epoch) so a resumed run sees the same order."""
    gen = getattr(getattr(base_loader, "sampler", None), "generator", None)
    if gen is not None:
        gen.manual_seed(cfg.train.seed * 100_003 + epoch)
    return base_loader


def prepare_run(config: ExperimentConfig) -> ExperimentConfig:
    """``config`` with what its run starts from made or found, each cached: the hand-pretrained start
    (``model.pretrained_path`` set to it; :func:`hawor_tune.pretrain.ensure_pretrained`, trained by
    :func:`fit`) and the camera's flow-head fit (:func:`hawor_tune.flow_fit.ensure_flow_fit`). Call it before
    :func:`fit` on a run that does not resume.

    Raises:
        PretrainError: the pretraining diverged.
    """
    from hawor_tune.flow_fit import ensure_flow_fit

    cfg = ensure_pretrained(config, trainer=fit)
    if cfg.data.seq_len > 1:  # one frame has no flow: fit() loads no flow fit then
        ensure_flow_fit(cfg)
    return cfg


def fit(config: ExperimentConfig, on_epoch: EpochHook | None = None,
        resume_from: str | os.PathLike | None = None, *, anomaly: bool = False,
        epochs: int | None = None) -> FitResult:
    """Train a HaWoR model end to end.

    Args:
        config: the resolved experiment config, prepared by :func:`prepare_run` unless resuming.
        on_epoch: called after every epoch with the epoch's metrics and the checkpoint folder written
            for it (the Tune trainable reports both).
        resume_from: a checkpoint file or folder to continue from (weights, optimiser, scheduler, RNG).
        anomaly: enable autograd anomaly detection (the CLI's --debug).
        epochs: stop after this many epochs in total (default: train.epochs; the schedule still spans
            train.epochs so that a shortened run follows the same learning-rate curve).

    Returns:
        A :class:`FitResult`; ``status`` is ``diverged`` with the reason when the loss became non-finite.

    Raises:
        ConfigError: ``config`` makes its own pretrained start and was not prepared (:func:`prepare_run`).
    """
    from hawor_tune.data import build_dataloader
    from hawor_tune.flow_fit import ensure_flow_fit, load_flow_fit
    from hawor_tune.model import build_model

    cfg = config
    if resume_from is None and makes_own_start(cfg):
        raise ConfigError("fit() was given no pretrained start (model.pretrained_path is empty and pretrain.epochs "
                          f"is {cfg.pretrain.epochs}): call hawor_tune.train.prepare_run(config) first")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
        # OpenCV's own pool (the loader's crops and resizes) to the same count: by default it runs one thread
        # per CPU of the machine, so a 1-CPU trial's crops also ran on the core of the trial beside it.
        cv2.setNumThreads(cfg.train.threads)
    # Adam's second moments decay into denormal floats, which x86 CPUs process ~100x slower.
    torch.set_flush_denormal(True)
    keep_freed_memory()
    device = select_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    out_dir = Path(cfg.train.out_dir)
    ckpt_root = out_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")

    train_loader = build_dataloader(cfg, "train", shuffle=True, seed=cfg.train.seed)
    val_loader = build_dataloader(cfg, "val", shuffle=False)
    baseline = None
    if cfg.train.objective or cfg.train.constraints:
        check_objective(cfg.train.objective)
        check_objective(cfg.train.constraints, "train.constraints")
        baseline = cached_baseline(cfg, "val")
    state = load_checkpoint(resume_from, map_location=device) if resume_from is not None else None
    model = build_model(cfg, pretrained=state is None or needs_pretrained(state))
    if state is None and model.flow_head is not None and cfg.data.seq_len > 1:  # one frame has no flow
        load_flow_fit(model, ensure_flow_fit(cfg))  # the camera's flow head: fitted by prepare_run, cached
    if model.pretrained_report is not None and state is None:  # beside config.yaml: what the weights file filled
        atomic_write_text(out_dir / "pretrained.yaml", yaml.safe_dump(model.pretrained_report.to_dict(), sort_keys=False))
    model = model.to(device)
    if state is not None:
        load_model_state(model, state)  # before the optimiser: its groups follow the pretrained parts
    optimizer = build_optimizer(model, cfg)
    steps = len(train_loader) if not cfg.train.max_train_batches else min(len(train_loader), cfg.train.max_train_batches)
    scheduler = build_scheduler(optimizer, cfg, steps)

    start_epoch, history = 1, []
    if state is not None:
        if state.get("optimizer"):
            optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
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
        if cfg.train.objective:
            record[OBJECTIVE] = objective(val, baseline, cfg.train.objective)
        if cfg.train.constraints:
            record.update({CONSTRAINT_PREFIX + m: v
                           for m, v in constraint_values(val, baseline, cfg.train.constraints).items()})
        history.append(record)
        checkpoint_dir = str(save_checkpoint(ckpt_root / f"epoch_{epoch:04d}", model=model, config=cfg,
                                             epoch=epoch, optimizer=optimizer, scheduler=scheduler,
                                             history=history))
        prune_checkpoints(ckpt_root, cfg.train.keep_checkpoints)
        # One-frame clips (the pretraining's) have no camera motion to score: their camera errors are NaN.
        cam = (f"{val['cam_trans_error']:.1f} mm / {val['cam_rot_error']:.2f} deg"
               if math.isfinite(val["cam_trans_error"]) else "n/a")
        print(f"epoch {epoch:3d}/{cfg.train.epochs}  loss {losses['loss']:.4f}  "
              f"val MPJPE {val['mpjpe']:.1f} mm (L {val['mpjpe_left']:.1f} / R {val['mpjpe_right']:.1f})  "
              f"PA-MPJPE {val['pa_mpjpe']:.1f} mm  W-MPJPE {val['w_mpjpe']:.1f} mm  accel {val['accel_error']:.1f} m/s^2  "
              f"cam {cam}  " + (f"objective {record[OBJECTIVE]:.3f}  " if OBJECTIVE in record else "") +
              f"lr {record['lr']:.2e}  {record['time/epoch_s']:.1f} s", flush=True)
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
    parser = ArgumentParser(prog="python -m hawor_tune.train", description=__doc__.splitlines()[0])
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
        return _run(args)
    except HaworTuneError as e:
        return fail(e)


def _run(args: argparse.Namespace) -> int:
    if args.resume or args.eval_only:
        ckpt = args.resume or args.eval_only
        state = load_checkpoint(ckpt)
        cfg = load_config(state["config"], args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    if args.eval_only:
        from hawor_tune.data import ensure_dataset, split_is_labelled

        # Built from the config with the overrides, so that inference settings (trajectory degrees) apply.
        model, _ = load_model(ckpt, select_device(cfg.train.device), config=cfg)
        for split in ("val", "test"):
            if not split_is_labelled(ensure_dataset(cfg), split, splits_file=cfg.data.splits or None):
                print(f"{split}: no labels (ARCTIC keeps protocol p2's test labels for its leaderboard): not scored")
                continue
            m = evaluate(model, split, cfg)
            print(f"{split}: MPJPE {m['mpjpe']:.1f} mm, PA-MPJPE {m['pa_mpjpe']:.1f} mm, "
                  f"accel {m['accel_error']:.2f} m/s^2, cam {m['cam_trans_error']:.1f} mm / {m['cam_rot_error']:.2f} deg")
        return 0
    if args.test_only:
        _test_only(cfg)
        return 0
    if not args.resume:  # a checkpoint's config names its start already
        cfg = prepare_run(cfg)
    result = fit(cfg, resume_from=args.resume, anomaly=args.debug)
    if result.status != "completed":
        print(f"run {result.status}: {result.reason}", file=sys.stderr)
        return 1
    from hawor_tune.results import best_trial, summarize_trials

    # The run as a one-trial search, so that its best epoch follows the search's rule (non-finite values
    # skipped, a tie to the earlier epoch).
    (run,) = summarize_trials([{**r, "trial_id": "run"} for r in result.history], {"run": {"status": "TERMINATED"}},
                              metric="val/mpjpe", mode="min", max_epochs=cfg.train.epochs, param_paths=())
    best = best_trial([run], "val/mpjpe", "min")
    where = f"{best['best/val/mpjpe']:.1f} mm at epoch {best['best_epoch']}" if best else "n/a (no finite value)"
    print(f"done: best val MPJPE {where}; checkpoint {result.checkpoint_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
