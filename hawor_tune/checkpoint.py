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
from hawor_tune.pretrained import CHECKPOINT_FORMAT, file_digest
from hawor_tune.runtime import rng_state

# 2: the camera's flow head maps the flow between consecutive frames to a step, chained (version 1's mapped the
# flow from the clip's first frame to a pose in it).
CHECKPOINT_VERSION = 2
CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointError(HaworTuneError, ValueError):
    """A checkpoint or model file is missing, is not ours, or is from a newer hawor-tune."""


def save_checkpoint(directory: str | os.PathLike, *, model: nn.Module, config: ExperimentConfig, epoch: int,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    history: list[dict[str, float]] | None = None) -> Path:
    """Write a self-describing checkpoint folder atomically (:func:`atomic_replace_dir`)."""
    state = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch, "config": config.to_dict(),
        **model_state(model, config),
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
             "config": config.to_dict(), **model_state(model, config), "optimizer": None, "scheduler": None,
             "history": history or []}
    return save_torch_file(path, state)


def save_torch_file(path: str | os.PathLike, state: Any) -> Path:
    """Write ``state`` with ``torch.save`` to the file ``path``, atomically (:func:`atomic_write`); a full
    disk raises :class:`~hawor_tune.atomic.DiskFullError` and leaves ``path`` as it was."""
    return atomic_write(path, lambda tmp: _save(state, tmp))


def frozen_keys(model: nn.Module) -> set[str]:
    """State-dict keys that training never changes: frozen parameters, and the buffers of modules whose
    parameters are all frozen (a frozen batch norm's running statistics)."""
    keys = {name for name, p in model.named_parameters() if not p.requires_grad}
    for prefix, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if params and not any(p.requires_grad for p in params):
            keys |= {f"{prefix}.{b}" if prefix else b for b, _ in module.named_buffers(recurse=False)
                     if b not in module._non_persistent_buffers_set}
    return keys


def model_state(model: nn.Module, config: ExperimentConfig) -> dict[str, Any]:
    """The model's part of a checkpoint: its state dict, less the frozen tensors when they come from
    ``model.pretrained_path`` (recorded by path and SHA-256, checked on load), and the parts that file filled."""
    state = model.state_dict()
    frozen = frozen_keys(model) & set(state)
    path = config.model.pretrained_path
    out: dict[str, Any] = {"pretrained_parts": list(getattr(model, "pretrained_parts", ())), "frozen": None}
    if frozen and path and Path(path).is_file():
        state = {k: v for k, v in state.items() if k not in frozen}
        out["frozen"] = {"path": path, "sha256": file_digest(path), "keys": sorted(frozen)}
    return {"model": state, **out}


def needs_pretrained(state: dict[str, Any]) -> bool:
    """Whether a checkpoint leaves frozen weights to its pretrained file (build the model with them)."""
    return bool(state.get("frozen"))


def load_model_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Load a checkpoint's weights into a model built from its config (with its pretrained weights where
    :func:`needs_pretrained`), and restore which parts were pretrained.

    Raises:
        CheckpointError: the pretrained file changed since the checkpoint was written, keys disagree, or a
            version-1 checkpoint holds a fitted flow head.
    """
    frozen = state.get("frozen")
    if frozen:
        path = frozen["path"]
        if not Path(path).is_file() or file_digest(path) != frozen["sha256"]:
            raise CheckpointError(f"the checkpoint's frozen weights come from {path}, which is missing or has "
                                  f"changed since (SHA-256 {frozen['sha256'][:12]}...); restore that file")
    flow_head = state["model"].get("flow_head.w3")
    if state.get("version", 0) < 2 and flow_head is not None and bool(flow_head.any()):
        raise CheckpointError(f"checkpoint version {state.get('version', 0)} was written before the camera's flow "
                              f"head read the flow between consecutive frames (version 2): its fitted head would "
                              f"misread this version's input; train the model again")
    result = model.load_state_dict(state["model"], strict=False)
    missing = set(result.missing_keys) - set(frozen["keys"] if frozen else ())
    if missing or result.unexpected_keys:
        raise CheckpointError(f"checkpoint does not fit the model: {len(missing)} missing keys "
                              f"{sorted(missing)[:3]}, {len(result.unexpected_keys)} unexpected "
                              f"{result.unexpected_keys[:3]}")
    model.pretrained_parts = tuple(state.get("pretrained_parts") or ())


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


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", *,
               config: ExperimentConfig | None = None) -> tuple[nn.Module, ExperimentConfig]:
    """Rebuild the model and its config from a checkpoint alone, or built from ``config`` (the checkpoint's
    with inference settings overridden, such as the trajectory degrees) with the checkpoint's weights."""
    from hawor_tune.model import build_model

    state = load_checkpoint(path)
    config = config or config_from_dict(state["config"])
    model = build_model(config, pretrained=needs_pretrained(state))
    load_model_state(model, state)
    return model.to(device), config


def prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    dirs = sorted(p for p in ckpt_root.glob("epoch_*") if p.is_dir())
    for old in dirs[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete epoch checkpoint under ``out_dir/checkpoints``, if any."""
    dirs = sorted(p for p in (Path(out_dir) / "checkpoints").glob("epoch_*") if (p / CHECKPOINT_FILE).is_file())
    return dirs[-1] if dirs else None
