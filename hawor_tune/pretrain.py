"""A hand-pretrained start for every run: one per-frame pretraining of the hand branch, cached.

HaWoR fine-tunes a hand-pretrained backbone (HaMeR's, trained on single images of many hands) and never
trains from scratch. With no such weights on a laptop, :func:`ensure_pretrained` makes one: the same model
trained on single frames (wrist-relative 3D keypoints, 2D keypoints and MANO parameters; no temporal or
camera terms) by the training loop it is handed: :func:`hawor_tune.train.prepare_run` hands it
:func:`hawor_tune.train.fit` before a run, so this module never imports the trainer (no import circle). On
generated data those frames come from a generated single-image hand set (:func:`pretrain_data`). The result
is cached beside the prepared data under a key of everything it depends on (the data, the hand model, the
model architecture, the pretraining settings), built once under a file lock however many trials ask at the
same time, and re-used, never re-trained, while nothing changed. With ``model.pretrained_path`` set (e.g.
HaMeR's weights on the GPU profile) nothing is pretrained.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hawor_tune.atomic import build_once
from hawor_tune.config import DataConfig, ExperimentConfig, LossConfig, OptimConfig
from hawor_tune.data.cache import cache_root, spec_key
from hawor_tune.data.frames import PREPARED_VERSION
from hawor_tune.data.synthetic import GENERATOR_VERSION, MARKER
from hawor_tune.errors import HaworTuneError

log = logging.getLogger(__name__)

# Bump when what the pretraining does changes, so that old cached weights are not re-used.
PRETRAIN_VERSION = 3
# Per-frame hand terms only: a one-frame clip has no motion, and the searched loss weights must not change
# the shared start (or every trial would pretrain its own). The MANO rotation term's weight is
# pretrain.mano_params (see pretrain_loss).
PRETRAIN_LOSS = dataclasses.replace(LossConfig(), temporal=0.0, camera=0.0, hand_world=0.0, motion=0.0)
# One start shared by every run whatever its seed, as a released checkpoint is: run-to-run noise is then
# the fine-tuning's, which is what a search compares.
PRETRAIN_SEED = 0
# Data keys that only shape clips or batches, not what a single frame shows.
_CLIP_KEYS = ("seq_len", "stride", "eval_hop", "flow_grid", "batch_size", "num_workers", "train_on_val", "cache_dir")


class PretrainError(HaworTuneError, RuntimeError):
    """The pretraining of a run's start diverged: its settings (``pretrain.*``) cannot make the start."""


def pretrain_data(cfg: ExperimentConfig) -> DataConfig:
    """The single frames ``cfg``'s start is trained on.

    On generated data: a generated single-frame hand set of the same subjects (``motion: frames``, every
    frame's hand pose drawn on its own), ``pretrain.frames_sequences`` sequences per training subject, kept
    in the cache under a key of its settings; its validation split is one sequence of the validation
    subject. Within a video sequence the fingers barely change, so the training split's frames show few
    distinct hands (``benchmarks/bench_fingers.py``). On real ARCTIC, or with ``frames_sequences: 0``: the
    training split's frames.
    """
    p, d = cfg.pretrain, cfg.data
    data = dataclasses.replace(d, seq_len=1, stride=1, batch_size=p.batch_size, train_on_val=False)
    root = Path(d.root)
    generated = (root / MARKER).is_file() or (d.generate and not (root / "raw_seqs").is_dir())
    if not p.frames_sequences or not generated:
        return data
    synth = dataclasses.replace(d.synthetic, motion="frames", sequences_per_subject=p.frames_sequences,
                                frames_per_sequence=p.frames_per_sequence, extra_subjects=p.frames_subjects,
                                finger_speed=1.0)  # a frame's pose is drawn at a random time: speed changes nothing
    spec = {"synthetic": dataclasses.asdict(synth), "generator": GENERATOR_VERSION, "mano": dataclasses.asdict(cfg.mano)}
    cache = cache_root(d.cache_dir, d.root)
    return dataclasses.replace(data, root=str(cache / "pretrained" / f"frames-{spec_key(spec)}"), generate=True,
                               cache_dir=str(cache), synthetic=synth)


def pretrain_loss(cfg: ExperimentConfig) -> LossConfig:
    """The pretraining's loss weights: the per-frame hand terms at their defaults, the MANO rotations at
    ``pretrain.mano_params``. HaMeR's 1 : 50 of rotations to 3D keypoints leaves the hand's orientation
    underfitted on this short budget; a heavier rotation term learns it faster."""
    return dataclasses.replace(PRETRAIN_LOSS, mano_params=cfg.pretrain.mano_params)


def pretrain_config(cfg: ExperimentConfig, out_dir: str | Path) -> ExperimentConfig:
    """The per-frame training run that makes ``cfg``'s start: same hand model and architecture, the frames
    of :func:`pretrain_data`."""
    p = cfg.pretrain
    pcfg = copy.deepcopy(cfg)
    pcfg.data = pretrain_data(cfg)
    # The run loads its infiller_path after this start: the start must not depend on it (nor does its key).
    # The start trains its backbone from scratch, whether or not the run then freezes it.
    pcfg.model = dataclasses.replace(cfg.model, pretrained_path="", infiller_path="", infill_mask_prob=0.0,
                                     freeze_backbone=False, trainable_blocks=0)
    pcfg.loss = pretrain_loss(cfg)
    # Not the run's (searched) optimiser settings; the whole model, backbone included, learns at pretrain.lr.
    pcfg.optim = OptimConfig(lr=p.lr, warmup_epochs=0.25, backbone_lr_scale=1.0)
    pcfg.train = dataclasses.replace(cfg.train, epochs=p.epochs, max_train_batches=p.max_train_batches,
                                     max_eval_batches=0, keep_checkpoints=1, out_dir=str(out_dir),
                                     seed=PRETRAIN_SEED, objective={}, constraints={})  # single frames: nothing to rank
    pcfg.pretrain = dataclasses.replace(p, epochs=0)
    return pcfg


def pretrain_key(cfg: ExperimentConfig) -> str:
    """Hash of everything the pretrained weights depend on; the precision as this machine resolves ``auto``."""
    from hawor_tune.runtime import resolved_precision  # torch: only where a key is needed

    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in _CLIP_KEYS}
    marker = Path(cfg.data.root) / MARKER
    spec = {"version": PRETRAIN_VERSION, "prepared": PREPARED_VERSION, "data": data,
            "mano": dataclasses.asdict(cfg.mano),
            "model": _model_key(cfg),
            "pretrain": dataclasses.asdict(cfg.pretrain), "loss": dataclasses.asdict(pretrain_loss(cfg)),
            "precision": resolved_precision(cfg.train.device, cfg.train.precision),
            "dataset": marker.read_text() if marker.is_file() else None}
    return spec_key(spec)


def _model_key(cfg: ExperimentConfig) -> dict[str, Any]:
    """The model settings a start depends on. The default infiller is left out, so that the starts cached
    before there was a choice keep their key."""
    skip = {"pretrained_path", "infiller_path", "infill_mask_prob", "hand_trajectory_degree",
            "camera_trajectory_degree", "smooth_in_training"}
    if cfg.model.infiller == "lstm":
        skip.add("infiller")
    # A run that freezes its backbone shares the start of one that does not (pretrain_config unfreezes it).
    return {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in skip} | {
        "freeze_backbone": False, "trainable_blocks": 0}


def pretrained_file(cfg: ExperimentConfig) -> Path:
    """Where ``cfg``'s pretrained weights are cached (beside the prepared data)."""
    return cache_root(cfg.data.cache_dir, cfg.data.root) / "pretrained" / f"hand-{pretrain_key(cfg)}.pt"


def makes_own_start(cfg: ExperimentConfig) -> bool:
    """Whether ``cfg`` starts from a pretraining of its own: it names no weights and does not disable it."""
    return not cfg.model.pretrained_path and cfg.pretrain.epochs != 0


def ensure_pretrained(cfg: ExperimentConfig, *, trainer: Callable[[ExperimentConfig], Any]) -> ExperimentConfig:
    """``cfg`` with ``model.pretrained_path`` pointing at its hand-pretrained start, made once if needed.

    Returns ``cfg`` itself when it names its own weights or disables pretraining (``pretrain.epochs: 0``).

    Args:
        cfg: the run's config.
        trainer: trains the pretraining's config (:func:`pretrain_config`, which needs no start of its own)
            and returns a :class:`hawor_tune.train.FitResult`: :func:`hawor_tune.train.fit`.

    Raises:
        PretrainError: the pretraining diverged (nothing is cached; the message names the settings to change).
    """
    if not makes_own_start(cfg):
        return cfg
    path = pretrained_file(cfg)
    build_once(path, lambda: path if path.is_file() else None, lambda: _pretrain(cfg, path, trainer))
    out = copy.deepcopy(cfg)
    out.model.pretrained_path = str(path)
    return out


def _pretrain(cfg: ExperimentConfig, path: Path, trainer: Callable[[ExperimentConfig], Any]) -> None:
    from hawor_tune.checkpoint import export_model  # torch: only to train

    run_dir = path.with_name(f".{path.stem}.run")
    shutil.rmtree(run_dir, ignore_errors=True)  # left by a killed pretraining
    pcfg = pretrain_config(cfg, run_dir)
    log.warning("pretraining the hand branch once on single frames of %s (%d epochs); cached at %s",
                pcfg.data.root, pcfg.train.epochs, path)
    result = trainer(pcfg)
    if result.status != "completed":
        shutil.rmtree(run_dir, ignore_errors=True)
        p = cfg.pretrain
        raise PretrainError(
            f"the hand-branch pretraining {result.status} after {result.epochs_run} of {p.epochs} epochs "
            f"({result.reason}); lower pretrain.lr ({p.lr:g}) or pretrain.mano_params ({p.mano_params:g}), or "
            f"start without it: pretrain.epochs=0, or model.pretrained_path=<your weights>")
    export_model(path, model=result.model, config=pcfg, epoch=result.epochs_run, history=result.history)
    shutil.rmtree(run_dir, ignore_errors=True)
