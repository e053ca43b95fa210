"""Self-describing checkpoints: weights + resolved config + epoch + optimiser, scheduler and RNG state.

Writes are atomic (:mod:`hawor_tune.atomic`: a temporary file or folder, then a rename); loading needs nothing
else and uses ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hawor_tune.atomic import atomic_replace_dir, atomic_write
from hawor_tune.config import ExperimentConfig, config_from_dict, save_config
from hawor_tune.errors import HaworTuneError
from hawor_tune.runtime import rng_state

CHECKPOINT_FORMAT = "hawor-tune-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointError(HaworTuneError, ValueError):
    """A checkpoint or model file is missing, is not ours, or is from a newer hawor-tune."""


def save_checkpoint(directory: str | os.PathLike, *, model: nn.Module, config: ExperimentConfig, epoch: int,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    history: list[dict[str, float]] | None = None) -> Path:
    """Write a self-describing checkpoint folder atomically (:func:`atomic_replace_dir`)."""
    state = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch,
        "config": config.to_dict(), "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(), "history": history or [],
    }

    def write(folder: Path) -> None:
        _save(state, folder / CHECKPOINT_FILE)
        save_config(config, folder / "config.yaml")

    return atomic_replace_dir(directory, write)


def export_model(path: str | os.PathLike, *, model: nn.Module, config: ExperimentConfig, epoch: int,
                 history: list[dict[str, float]] | None = None) -> Path:
    """Write a single-file, self-describing model (weights + resolved config + history), atomically."""
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch,
             "config": config.to_dict(), "model": model.state_dict(), "optimizer": None, "scheduler": None,
             "history": history or []}
    return atomic_write(path, lambda tmp: _save(state, tmp))


def _save(state: dict[str, Any], path: Path) -> None:
    # Through a Python file: torch.save given a path reports a full disk as a bare RuntimeError from its zip
    # writer, given a file it raises the OSError (ENOSPC) that atomic_write turns into one line.
    with open(path, "wb") as f:
        torch.save(state, f)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                    mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint file or folder written by :func:`save_checkpoint` (``weights_only=True``).

    ``mmap`` maps the tensors instead of reading them (the same checks, without reading the weights: for
    telling whether a checkpoint can be loaded before loading it for real).

    Raises:
        CheckpointError: the file is missing, is not a hawor-tune checkpoint or is from a newer version.
    """
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"{path}: no checkpoint here (expected a {CHECKPOINT_FILE} file or a folder holding one)")
    try:
        state = torch.load(file, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # a zip/pickle error from a file that is not ours
        raise CheckpointError(f"{file}: not a hawor-tune checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{file}: not a hawor-tune checkpoint (no '{CHECKPOINT_FORMAT}' format marker)")
    if state.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{file}: checkpoint version {state['version']} is newer than this hawor-tune "
                              f"({CHECKPOINT_VERSION}); upgrade hawor-tune")
    return state


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, ExperimentConfig]:
    """Rebuild the model and its config from a checkpoint alone."""
    from hawor_tune.model import build_model

    state = load_checkpoint(path)
    config = config_from_dict(state["config"])
    model = build_model(config, pretrained=False)  # the checkpoint holds every weight
    model.load_state_dict(state["model"])
    return model.to(device), config


def prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    dirs = sorted(p for p in ckpt_root.glob("epoch_*") if p.is_dir())
    for old in dirs[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete epoch checkpoint under ``out_dir/checkpoints``, if any."""
    dirs = sorted(p for p in (Path(out_dir) / "checkpoints").glob("epoch_*") if (p / CHECKPOINT_FILE).is_file())
    return dirs[-1] if dirs else None
