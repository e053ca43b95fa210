"""Released weights into a freshly built model: hawor-tune files, HaMeR's checkpoint, timm state dicts.

HaMeR's checkpoint (geopavlakos/hamer, ``_DATA/hamer_ckpts/checkpoints/hamer.ckpt``) is a PyTorch Lightning
file whose ``hyper_parameters`` pickle a yacs ``CfgNode``: ``torch.load(weights_only=True)`` refuses it, and
``weights_only=False`` would import yacs and run whatever the pickle names. :func:`read_weights` reads such
files with a restricted unpickler instead: tensors and plain containers are rebuilt, every other class
becomes an inert placeholder, nothing is imported or called.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import pickle
import sys
import types
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hawor_tune.config import ConfigError
from hawor_tune.errors import MissingFileError
from hawor_tune.released_modules import HAWOR_INFILLER_KEY

log = logging.getLogger(__name__)

# The marker of a hawor-tune model or checkpoint file. hawor_tune.checkpoint writes it and imports it from
# here: this module sits below the model, and reading such a file as a start must not import back up.
CHECKPOINT_FORMAT = "hawor-tune-checkpoint"

# What a tensor file may name and get back for real: tensor rebuilding and plain containers.
_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
}


class Inert(dict):
    """Stands in for a class the restricted unpickler will not import (yacs' CfgNode, Lightning objects):
    it accepts any arguments and state and keeps them as data (a dict subclass, as CfgNode is)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _placeholder(module: str, name: str) -> type:
    return type(name, (Inert,), {"__module__": f"inert.{module}"})


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _placeholder(module, name)


# torch.load's pickle_module: its Unpickler (subclassed by torch for storages) resolves classes as above.
_restricted_pickle = types.SimpleNamespace(Unpickler=_RestrictedUnpickler, load=pickle.load,
                                           __name__="hawor_tune.pretrained._restricted_pickle")


def read_weights(path: str | os.PathLike, key: str = "model.pretrained_path") -> dict[str, Any]:
    """Read a torch weights file safely: ``weights_only`` first, the restricted unpickler for Lightning files.

    Raises:
        MissingFileError: no such file.
        ConfigError: not a torch weights file, or not a mapping.
    """
    if not Path(path).is_file():
        raise MissingFileError(f"config key '{key}': weights file {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a class weights_only does not know: a Lightning checkpoint's config
        try:
            state = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
        except Exception as e:
            raise _not_weights(key, path, e) from None
    except Exception as e:  # a zip/pickle error from a file that is not a torch weights file
        raise _not_weights(key, path, e) from None
    if not isinstance(state, dict):
        raise ConfigError(f"config key '{key}': {path} holds a {type(state).__name__}, not a mapping of tensors")
    return state


def _not_weights(key: str, path: str | os.PathLike, e: Exception) -> ConfigError:
    return ConfigError(f"config key '{key}': {path} is not a torch weights file "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})")


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file, computed once per (path, size, modification time) in a process."""
    st = os.stat(path)
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


# ----------------------------------------------------------------------------------------------------------
# Key maps
# ----------------------------------------------------------------------------------------------------------

def hamer_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map HaMeR's ``backbone.*`` (hamer/models/backbones/vit.py) onto timm's ``VisionTransformer`` keys.

    The block names are timm's already (``blocks.N.attn.qkv``, ``patch_embed.proj``); ``last_norm`` is timm's
    ``norm``; HaMeR's ``pos_embed`` has 1 + N positions and its forward adds ``pos_embed[:, 1:] +
    pos_embed[:, :1]`` to the patches (no class token), folded here into N positions.
    """
    out = {}
    for key, value in state.items():
        if not key.startswith("backbone."):
            continue
        key = key[len("backbone."):]
        if key.startswith("last_norm."):
            key = "norm." + key[len("last_norm."):]
        if key == "pos_embed":
            value = value[:, 1:] + value[:, :1]
        out[key] = value
    return out


def timm_to_hamer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`hamer_to_timm`: a timm ViT's keys as HaMeR's ``backbone.*`` (the extra position
    zero, so that HaMeR's forward adds nothing with it)."""
    out = {}
    for key, value in state.items():
        if key.startswith("norm."):
            key = "last_norm." + key[len("norm."):]
        if key == "pos_embed":
            value = torch.cat([value.new_zeros(1, 1, value.shape[-1]), value], dim=1)
        out["backbone." + key] = value
    return out


@dataclass
class LoadReport:
    """Which parts of a model a weights file filled (tensors per top-level module) and which start fresh;
    ``also`` names the part loaded from a second file (HaWoR's infiller.pt) and that file."""

    source: str
    kind: str
    loaded: dict[str, int] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)
    also: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "loaded": dict(self.loaded), "fresh": list(self.fresh),
                "also": dict(self.also)}

    def summary(self) -> str:
        parts = ", ".join(f"{k} ({n} tensors{f' from {self.also[k]}' if k in self.also else ''})"
                          for k, n in self.loaded.items()) or "nothing"
        return f"{self.kind} {self.source}: loaded {parts}; fresh: {', '.join(self.fresh) or 'none'}"


def _report(model: nn.Module, source: str, kind: str, keys: set[str]) -> LoadReport:
    report = LoadReport(source=source, kind=kind)
    for name, _ in model.named_children():
        n = sum(1 for k in keys if k.startswith(name + "."))
        if n:
            report.loaded[name] = n
        elif any(True for _ in getattr(model, name).parameters()):
            report.fresh.append(name)
    return report


def _load_backbone(backbone: nn.Module, state: dict, path: str) -> set[str]:
    """Load a state dict into the backbone; returns the keys loaded.

    Classifier weights are ignored; timm's own checkpoint filter of the model family (when it has one)
    adapts the file, e.g. resamples ViT position embeddings to another input size.
    """
    filter_fn = getattr(sys.modules[type(backbone).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None and len(inspect.signature(filter_fn).parameters) >= 2:
        state = filter_fn(state, backbone)
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ConfigError(f"{path}: weights do not fit backbone {type(backbone).__name__}: {e}") from None
    if result.missing_keys:
        raise ConfigError(f"{path}: weights do not fit the backbone, {len(result.missing_keys)} missing keys "
                          f"(first: {result.missing_keys[:3]})")
    if result.unexpected_keys:
        log.info("%s: ignored %d keys not in the backbone (e.g. the classifier): %s", path,
                 len(result.unexpected_keys), result.unexpected_keys[:3])
    return {f"backbone.{k}" for k in state if k not in result.unexpected_keys}


def _load_submodule(model: nn.Module, name: str, state: dict[str, torch.Tensor], path: str) -> set[str]:
    """Load ``name.*`` of a released file into the model's module of that name, every tensor or none."""
    module = getattr(model, name, None)
    sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
    if module is None or not sub:
        return set()
    own = module.state_dict()
    bad = [k for k in own if k not in sub or sub[k].shape != own[k].shape]
    if bad:
        k = bad[0]
        got = tuple(sub[k].shape) if k in sub else "missing"
        raise ConfigError(f"{path}: '{name}.*' does not fit this model's {name} ({len(bad)} of {len(own)} tensors "
                          f"differ, first {name}.{k}: file {got}, model {tuple(own[k].shape)}); build the model "
                          f"with the released shape or clear model.pretrained_path")
    module.load_state_dict({k: sub[k] for k in own})
    return {f"{name}.{k}" for k in own}


def load_pretrained(model: nn.Module, path: str, *, released_modules: tuple[str, ...] = ()) -> LoadReport:
    """Load ``model.pretrained_path`` into a freshly built model (never downloads) and say what it filled.

    Three kinds of file are understood:

    - a hawor-tune model or checkpoint: every tensor whose name and shape match is loaded;
    - a released Lightning checkpoint (HaMeR's ``state_dict`` with ``backbone.*`` and ``mano_head.*``):
      the ViT backbone through :func:`hamer_to_timm`, and each of ``released_modules`` (modules the model
      builds in the released shape under the released name, e.g. ``mano_head``) whole;
    - a plain backbone state dict (timm keys), optionally under ``state_dict`` or ``model``.
    """
    state = read_weights(path)
    if state.get("format") == CHECKPOINT_FORMAT:
        own = model.state_dict()
        fits = {k: v for k, v in state["model"].items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(fits, strict=False)
        if not any(k.startswith("backbone.") for k in fits):
            raise ConfigError(f"{path}: a hawor-tune model whose backbone does not fit this model's "
                              f"({model.backbone.__class__.__name__}); retrain it or clear model.pretrained_path")
        report = _report(model, path, "hawor-tune model", set(fits))
    else:
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
        if any(k.startswith("backbone.") for k in state):
            keys = _load_backbone(model.backbone, hamer_to_timm(state), path)
            for name in released_modules:
                keys |= _load_submodule(model, name, state, path)
            report = _report(model, path, "released checkpoint", keys)
        else:
            report = _report(model, path, "backbone weights", _load_backbone(model.backbone, state, path))
    log.info("%s", report.summary())
    return report


def load_hawor_infiller(model: nn.Module, path: str, report: LoadReport | None = None) -> LoadReport:
    """Load HaWoR's ``infiller.pt`` (``model.infiller_path``) into ``model.infiller``, every tensor or none, and
    add it to ``report`` (the pretrained file's), or report it alone.

    The file holds the infiller's state dict under ``transformer_encoder_state_dict`` (ThunderVVV/HaWoR,
    scripts/scripts_test_video/hawor_video.py, ``hawor_infiller``); it is read with :func:`read_weights`.

    Raises:
        MissingFileError: no such file.
        ConfigError: not a torch weights file, not HaWoR's infiller, or a tensor of another shape than the model's.
    """
    key = "model.infiller_path"
    state = read_weights(path, key)
    sub = state.get(HAWOR_INFILLER_KEY)
    if not isinstance(sub, dict):
        raise ConfigError(f"config key '{key}': {path} is not HaWoR's infiller.pt: it has no "
                          f"'{HAWOR_INFILLER_KEY}' (top-level keys: {sorted(map(str, state))[:5]})")
    own = model.infiller.state_dict()
    bad = [k for k in own if k not in sub or not isinstance(sub[k], torch.Tensor) or sub[k].shape != own[k].shape]
    extra = sorted(k for k in sub if k not in own)
    if bad or extra:
        k = bad[0] if bad else extra[0]
        got = tuple(sub[k].shape) if isinstance(sub.get(k), torch.Tensor) else "missing"
        want = tuple(own[k].shape) if k in own else "none"
        raise ConfigError(f"config key '{key}': {path} does not fit this model's HaWoR infiller ({len(bad)} of "
                          f"{len(own)} tensors differ, {len(extra)} unexpected; first infiller.{k}: file {got}, "
                          f"model {want}); HaWoR's released infiller is model.infiller_hidden 384, "
                          f"model.infiller_layers 8")
    model.infiller.load_state_dict({k: sub[k] for k in own})
    if report is None:
        report = _report(model, path, "HaWoR infiller", {f"infiller.{k}" for k in own})
    else:
        report.loaded["infiller"] = len(own)
        report.fresh = [name for name in report.fresh if name != "infiller"]
        report.also["infiller"] = path
    log.info("%s", report.summary())
    return report
