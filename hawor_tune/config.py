"""Typed experiment configuration: dataclasses per concern, YAML loading, dotted overrides, validation.

One function, :func:`load_config`, turns a YAML file (which may name a ``base:`` file to merge over) plus
dotted overrides (``optim.lr=3e-4``) into an :class:`ExperimentConfig`. Every problem raises
:class:`ConfigError` naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hawor_tune.errors import HaworTuneError


class ConfigError(HaworTuneError, ValueError):
    """A configuration value or key is invalid; the message names the key, the value and what is allowed."""


def _spec(default: Any, *, low: float | None = None, high: float | None = None,
          choices: Iterable[Any] | None = None, doc: str = "") -> Any:
    """A dataclass field with validation metadata (inclusive numeric bounds or a choice list)."""
    meta = {"low": low, "high": high, "choices": tuple(choices) if choices is not None else None, "doc": doc}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class SyntheticConfig:
    """Size of the generated stand-in dataset (written in ARCTIC's on-disk layout)."""

    subjects: int = _spec(8, low=3, high=10, doc="subjects s01..sNN; the last 2 x held_out are val and test")
    held_out: int = _spec(1, low=1, high=4, doc="subjects in each of val and test: the last 2 x held_out, "
                          "alternately val and test (10 subjects, 2: val s07 and s09, test s08 and s10)")
    sequences_per_subject: int = _spec(20, low=1, high=50, doc="sequences recorded per subject")
    frames_per_sequence: int = _spec(50, low=40, high=5000, doc="annotated frames, before ARCTIC's 10+10 skip")
    image_width: int = _spec(224, low=32, high=2800, doc="width of the generated frames, pixels")
    image_height: int = _spec(224, low=32, high=2000, doc="height of the generated frames, pixels")
    seed: int = _spec(0, low=0, doc="seed of the generator: the same seed, the same dataset")
    motion: str = _spec("video", choices=("video", "frames"),
                        doc="video: smooth motion; frames: every frame's hand pose drawn on its own (a single-image "
                            "hand set, for the one-time pretraining; its held-out subjects get one sequence each)")
    extra_subjects: int = _spec(0, low=0, high=500, doc="more training subjects after sNN, new people (a single-image "
                                "hand set's many hands); val and test stay as they are")
    finger_speed: float = _spec(1.0, low=0.1, high=10.0, doc="video: multiplies the fingers' frequencies (0.2-1 Hz): "
                                "more distinct finger poses per sequence, each frame's pose drawn as before")


@dataclass
class DataConfig:
    """Where the clips come from and how each frame becomes the model's inputs.

    Each frame is prepared once (``python -m hawor_tune.data.prepare``, or on first use): each hand gets a square
    ``crop_size`` crop around its 2D keypoints cut from the original image (HaMeR's and HaWoR's input, left
    hands mirrored), stored with a margin for the training jitter; the whole frame is letterboxed to
    ``img_size`` for the camera branch, which also reads the dense optical flow from each clip's first frame,
    summed from flows between frames 1, 2, 4 and 8 apart, computed on the frames letterboxed to ``frame_size``
    and pooled onto ``flow_grid`` cells per side.
    """

    root: str = _spec("data/arctic_synthetic", doc="ARCTIC 'arctic_data/data' folder (real or generated)")
    generate: bool = _spec(True, doc="generate the synthetic dataset at root when it is missing")
    seq_len: int = _spec(8, low=1, high=256, doc="frames per clip")
    stride: int = _spec(4, low=1, high=256, doc="frames between the starts of consecutive training clips")
    eval_hop: int = _spec(1, low=0, high=255, doc="frames between the starts of val/test (and prediction) clips, "
                          "below seq_len; 0: half a clip. Smaller hops blend more clips' predictions of each "
                          "frame (smoother world motion) at the cost of more clips to run")
    frame_step: int = _spec(1, low=1, high=30, doc="temporal subsampling of the 30 fps sequences")
    frame_size: int = _spec(224, low=32, high=4096, doc="side of the letterboxed frame the optical flow (and the 2D labels) are computed in; crops come from the original image")
    crop_size: int = _spec(48, low=16, high=1024, doc="side of each hand's square crop (the backbone's input)")
    crop_scale: float = _spec(1.3, low=1.0, high=4.0, doc="crop side over the extent of the hand's visible 2D keypoints")
    crop_jitter: float = _spec(0.1, low=0.0, high=0.5, doc="training only: random crop shift (fraction of the side) and scale (1 +- this)")
    img_size: int = _spec(32, low=16, high=1024, doc="side of the whole-frame input of the camera branch")
    flow_grid: int = _spec(16, low=0, high=64, doc="cells per side of the optical flow (clip's first frame to each frame) the camera branch reads; 0 = frames only")
    batch_size: int = _spec(4, low=1, high=4096, doc="clips per batch")
    num_workers: int = _spec(0, low=0, high=64, doc="data-loader worker processes; 0 loads in the training process")
    cache_dir: str = _spec("", doc="folder of the prepared form (and the pretrained start); '' puts it in <root>/../cache")
    min_visible_joints: int = _spec(8, low=1, high=21, doc="valid_rule visible_joints: valid when the wrist and this many joints are in view")
    valid_rule: str = _spec("auto", choices=("auto", "arctic", "visible_joints"),
                            doc="hand validity: arctic = ARCTIC's (wrist + 3 joints inside the distorted image, "
                                "and its is_valid: the object's projected centre in the image), "
                                "visible_joints = wrist + min_visible_joints in view; auto = arctic on real "
                                "ARCTIC data, visible_joints on generated data")
    train_on_val: bool = _spec(False, doc="fold the validation sequences into the training split (final retrain)")
    splits: str = _spec("", doc="a splits file in splits_json/protocol_p2.json's format to use instead (a labelled "
                        "subject held out as test, when test has no labels); '' = <root>/splits_json/protocol_p2.json")
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ManoConfig:
    """The MANO hand model: the official files, or the built-in procedural hand when none are given."""

    model_dir: str = _spec("", doc="folder with MANO_RIGHT.pkl and MANO_LEFT.pkl; '' -> $HAWOR_MANO_DIR -> built-in hand")


@dataclass
class ModelConfig:
    """Crop backbone -> spatial head -> hand fusion -> temporal transformer -> heads -> infiller."""

    backbone: str = _spec("resnet10t", doc="timm model reading each hand crop, or hamer_vit_h: HaMeR's ViT-H/16 "
                          "(the ViTPose layout, reading the crop's middle 3/4 columns: 256x192 of a 256 px crop)")
    backbone_kwargs: dict = _spec({}, doc="extra keyword arguments for timm.create_model")
    camera_backbone: str = _spec("", doc="timm model reading the whole low-resolution frame; '' shares the hand backbone")
    pretrained_path: str = _spec("", doc="local weights: a hawor-tune model file, a timm backbone state dict "
                                 "or a HaMeR checkpoint; never downloaded")
    require_pretrained: bool = _spec(False, doc="refuse to start without model.pretrained_path (a profile that "
                                     "must fine-tune released weights, never train from scratch)")
    freeze_backbone: bool = _spec(False, doc="train nothing of the crop backbone but its last trainable_blocks "
                                  "blocks (HaWoR freezes HaMeR's ViT); a frozen part is not written into checkpoints")
    trainable_blocks: int = _spec(0, low=0, high=256, doc="with freeze_backbone: the last N transformer blocks "
                                  "(and the final norm) still train")
    grad_checkpointing: bool = _spec(False, doc="recompute the backbone's blocks in the backward pass instead of "
                                     "keeping their activations (timm's set_grad_checkpointing)")
    hand_path: str = _spec("query", choices=("query", "hawor"),
                           doc="query: a learned query reads each crop's tokens, then hand fusion, a temporal "
                           "transformer and an MLP head; hawor: HaWoR's modules in their released shapes (a "
                           "space-time module over every token across the clip, HaMeR's decoder head, a motion "
                           "module over the poses), so HaMeR's and HaWoR's checkpoints load into them")
    decoder_dim: int = _spec(1024, low=8, high=8192, doc="hand_path hawor: width of HaMeR's decoder head")
    decoder_layers: int = _spec(6, low=1, high=24, doc="hand_path hawor: layers of HaMeR's decoder head")
    motion_hidden: int = _spec(384, low=8, high=4096, doc="hand_path hawor: width of HaWoR's motion module")
    motion_layers: int = _spec(6, low=1, high=24, doc="hand_path hawor: layers of HaWoR's motion module")
    motion_residual: bool = _spec(True, doc="hand_path hawor: the motion module refines the head's poses (a fresh "
                                  "one passes them through); false replaces them, as HaWoR's released module does")
    hand_fusion: bool = _spec(True, doc="per frame, the two hands and the camera attend to each other")
    temporal_dim: int = _spec(128, low=8, high=4096, doc="width of the hand and camera tokens in the fusion and "
                              "temporal transformers")
    temporal_layers: int = _spec(2, low=0, high=24, doc="layers of each temporal transformer")
    temporal_heads: int = _spec(4, low=1, high=64, doc="attention heads; temporal_dim must be divisible by it")
    head_hidden: int = _spec(256, low=8, high=8192, doc="hidden width of the hand and camera heads")
    dropout: float = _spec(0.1, low=0.0, high=0.9, doc="dropout in the fusion and temporal transformers")
    infiller: str = _spec("lstm", choices=("lstm", "hawor"),
                          doc="what fills each hand's unobserved frames in the clip's first camera: lstm, this "
                          "project's bidirectional LSTM per hand (a residual on the interpolation); hawor, HaWoR's "
                          "released transformer infiller over both hands in 120-frame windows, in its own layout, "
                          "so that its infiller.pt loads into it")
    infiller_path: str = _spec("", doc="infiller hawor: HaWoR's infiller.pt to load into it (after "
                               "model.pretrained_path); '' starts it fresh; never downloaded")
    infiller_hidden: int = _spec(128, low=8, high=4096, doc="width of the infiller: the LSTM's hidden width, or "
                                 "HaWoR's d_model (released: 384, 8 heads)")
    infiller_layers: int = _spec(1, low=1, high=8, doc="layers of the infiller (HaWoR's released: 8)")
    infill_mask_prob: float = _spec(0.15, low=0.0, high=0.9, doc="training-time rate of hiding observed hand frames")
    hand_trajectory_degree: int = _spec(1, low=0, high=16, doc="each clip's hands in its world (the first camera), "
                                  "observed or infilled, projected onto polynomials in time of this degree, so "
                                  "that they move smoothly where the world is still; 0: every frame free")
    smooth_in_training: bool = _spec(False, doc="apply the trajectory projections while training too (the losses then "
                                     "see only the smoothed trajectories); false: training supervises every frame's "
                                     "own prediction and the projections apply at evaluation and inference")
    finger_path: bool = _spec(True, doc="query path: a per-frame linear readout from all of a crop's spatial tokens "
                              "to its 15 finger rotations, added to the head's (past the pooled token and the "
                              "temporal transformer)")
    camera_trajectory_degree: int = _spec(1, low=0, high=16, doc="each clip's camera path, projected onto polynomials "
                                    "in time of this degree through its first frame; 0: every frame free")


@dataclass
class PretrainConfig:
    """One-time per-frame pretraining of the hand branch, cached beside the data (HaWoR fine-tunes a
    hand-pretrained backbone; with no such weights on a laptop, this makes one). Used when
    model.pretrained_path is empty and epochs > 0."""

    epochs: int = _spec(16, low=0, high=1000, doc="epochs of the one-time pretraining (more give a better start, "
                        "once per cache); 0 disables it")
    batch_size: int = _spec(32, low=1, high=4096, doc="single frames per batch")
    max_train_batches: int = _spec(112, low=0, doc="random batches per epoch (of 180 in the CPU profile's "
                                   "single-frame set; 112 is its whole training split); 0 = all")
    lr: float = _spec(1e-3, low=1e-8, high=1.0, doc="learning rate of the pretraining (not optim.lr)")
    mano_params: float = _spec(0.5, low=0.0, doc="weight of the MANO rotation term in the pretraining (the other "
                               "hand terms keep loss.*'s defaults); heavier than loss.mano_params, as a short "
                               "pretraining otherwise underfits the hand's orientation")
    frames_sequences: int = _spec(12, low=0, high=50, doc="on generated data, train on a generated single-frame hand "
                                  "set (every frame's pose drawn on its own) with this many sequences per training "
                                  "subject instead of the training split's video frames; 0 = the training split")
    frames_per_sequence: int = _spec(100, low=40, high=5000, doc="annotated frames per sequence of that set, "
                                     "before ARCTIC's 10+10 skip")
    frames_subjects: int = _spec(0, low=0, high=500, doc="new training subjects (hand shapes, skins, lenses) that "
                                 "set adds to the dataset's, as single-image sets hold many more people than a video set")


@dataclass
class LossConfig:
    """Weights of the loss terms, the MANO-parameter term with one weight for its rotations and one for
    its betas (as HaMeR weighs them); a weight of 0 skips the term. The hand terms keep HaMeR's ratios
    (geopavlakos/hamer, ``LOSS_WEIGHTS`` in ``hamer/configs_hydra``): rotations to 3D
    keypoints 1 : 50, betas at half the rotations' weight, all summed per hand-frame."""

    mano_params: float = _spec(0.02, low=0.0, doc="MANO rotations (global orientation and fingers)")
    betas: float = _spec(0.01, low=0.0, doc="MANO shape coefficients")
    keypoint_3d: float = _spec(1.0, low=0.0, doc="wrist-relative 3D joints (L1)")
    hand_frame: float = _spec(0.0, low=0.0, doc="wrist-relative 3D joints in the hand's own frame, its global "
                              "orientation taken out (L1): the fingers' articulation alone")
    keypoint_2d: float = _spec(0.1, low=0.0, doc="joints projected into each hand's crop (L1)")
    temporal: float = _spec(0.5, low=0.0, doc="frame-to-frame velocities of the wrist-relative joints (L1)")
    camera: float = _spec(0.5, low=0.0, doc="each frame's camera pose relative to the clip's first")
    hand_world: float = _spec(0.2, low=0.0, doc="wrists in the clip's first camera (L1)")
    motion: float = _spec(0.5, low=0.0, doc="velocity and acceleration errors of the wrists (camera frame and the "
                          "clip's world) and of the camera's path: smooth motion where the truth is smooth")


@dataclass
class OptimConfig:
    """AdamW, its learning rate warmed up linearly, then decayed on a cosine to ``min_lr_ratio`` x lr, per step."""

    lr: float = _spec(3e-4, low=1e-8, high=1.0, doc="fine-tuning the hand-pretrained start (pretrain.lr trains it)")
    backbone_lr_scale: float = _spec(0.1, low=0.0, high=1.0, doc="learning rate of the pretrained parts (the crop "
                                     "backbone, and the modules a released checkpoint filled) as a fraction of lr: "
                                     "they are fine-tuned more gently than the parts that start fresh (HaWoR: 0.1); "
                                     "a backbone fine-tuned at the full rate forgets fingers it read in its start")
    weight_decay: float = _spec(1e-4, low=0.0, high=1.0, doc="AdamW weight decay, on weight matrices only (not on "
                                "biases, norms or embeddings)")
    warmup_epochs: float = _spec(0.5, low=0.0, high=1000.0, doc="linear warm-up of the learning rate, in epochs; "
                                 "a cosine decay follows")
    min_lr_ratio: float = _spec(0.05, low=0.0, high=1.0, doc="cosine floor as a fraction of lr")
    grad_clip: float = _spec(1.0, low=0.0, doc="max gradient norm; 0 disables clipping")
    beta1: float = _spec(0.9, low=0.0, high=0.9999, doc="AdamW's decay of the gradient's running mean")
    beta2: float = _spec(0.999, low=0.0, high=0.99999, doc="AdamW's decay of the squared gradient's running mean")


@dataclass
class TrainConfig:
    """One training run: its length, seed, device and precision, and where it writes."""

    epochs: int = _spec(6, low=1, high=100000, doc="epochs of a run; the learning-rate schedule spans them")
    seed: int = _spec(0, low=0, doc="seed of the initial weights, the batch order and the augmentation")
    device: str = _spec("auto", choices=("auto", "cpu", "cuda", "mps"), doc="auto: cuda, else mps, else cpu")
    precision: str = _spec("auto", choices=("auto", "fp32", "bf16", "fp16"),
                           doc="auto: bf16 autocast on CUDA and on CPUs with bf16 in hardware "
                           "(AVX512-BF16, AMX), fp32 elsewhere")
    threads: int = _spec(0, low=0, high=1024, doc="torch CPU threads; 0 keeps torch's default")
    out_dir: str = _spec("runs/default", doc="checkpoints and logs of a single run")
    max_train_batches: int = _spec(60, low=0, doc="random batches per epoch (of 180 on the CPU profile); 0 = the whole split")
    max_eval_batches: int = _spec(0, low=0, doc="cap per evaluation; 0 = the whole split")
    keep_checkpoints: int = _spec(2, low=1, high=1000, doc="epoch checkpoints kept in out_dir")
    objective: dict = _spec({}, doc="weights of validation metrics (e.g. {mpjpe: 1, w_mpjpe: 1, accel_error: 0.5}), "
                            "each divided by the mean-pose baseline's value on the validation split and summed: "
                            "reported every epoch as val/objective (lower is better); {} reports none")
    constraints: dict = _spec({}, doc="upper bounds on validation metrics as fractions of the mean-pose "
                              "baseline's (e.g. {accel_error: 1.0}: no shakier than a static hand), reported every "
                              "epoch as constraint/<metric> = value / baseline - bound (<= 0: met); a search's TPE "
                              "samples where they hold and its best trial is one that meets them")


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    mano: ManoConfig = field(default_factory=ManoConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Paths a user gives relative to where they run a command; made absolute at load time so that Ray
# workers, whose working directory is their trial folder, read the same files.
_PATH_KEYS = ("data.root", "data.cache_dir", "mano.model_dir", "model.pretrained_path", "model.infiller_path",
              "train.out_dir")


def field_info(dotted: str) -> tuple[Any, dataclasses.Field]:
    """The declared type and the dataclass field of a dotted key such as ``optim.lr``.

    Raises:
        ConfigError: the key does not name a leaf of the experiment config.
    """
    cls: Any = ExperimentConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            prefix = ".".join(parts[:i])
            allowed = ", ".join(sorted(fields))
            where = f" under '{prefix}'" if prefix else ""
            raise ConfigError(f"unknown config key '{dotted}': '{part}' is not a field{where} (allowed: {allowed})")
        f = fields[part]
        ftype = _resolved_types(cls)[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(ftype):
                raise ConfigError(f"config key '{dotted}' is a section, not a value; name one of its fields")
            return ftype, f
        if not dataclasses.is_dataclass(ftype):
            raise ConfigError(f"unknown config key '{dotted}': '{'.'.join(parts[: i + 1])}' is a value, not a section")
        cls = ftype
    raise ConfigError(f"empty config key '{dotted}'")


def _resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, ftype: Any, f: dataclasses.Field) -> Any:
    """Check (and gently convert) one leaf value against its declared type and bounds."""
    origin = typing.get_origin(ftype)
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"internal: union type for '{key}' is not supported")
    if ftype is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    elif ftype is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    elif ftype is float:
        if isinstance(value, str):  # YAML reads '3e-4' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"config key '{key}' must be finite, got {value!r}")
    elif ftype is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    elif ftype is dict:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
    meta = f.metadata
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"config key '{key}' must be one of {list(meta['choices'])}, got {value!r}")
    low, high = meta.get("low"), meta.get("high")
    if low is not None and value < low:
        raise ConfigError(f"config key '{key}' must be >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"config key '{key}' must be <= {high}, got {value!r}")
    return value


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = _resolved_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (allowed under "
                          f"'{prefix.rstrip('.') or '<root>'}': {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        key = prefix + name
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], data[name] or {}, key + ".")
        else:
            kwargs[name] = _coerce(key, data[name], hints[name], f)
    obj = cls(**kwargs)
    # Defaults are validated too, so a bad default cannot hide.
    for name, f in fields.items():
        if not dataclasses.is_dataclass(hints[name]):
            _coerce(prefix + name, getattr(obj, name), hints[name], f)
    return obj


def _is_section(dotted: str) -> bool:
    """Whether a dotted key names a config section (a dataclass), as opposed to a value."""
    cls: Any = ExperimentConfig
    for part in dotted.split("."):
        hints = _resolved_types(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            return False
        cls = hints[part]
    return dataclasses.is_dataclass(cls)


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Merge ``over`` into ``base`` section by section; a value (even a mapping value) is replaced whole."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) and _is_section(prefix + str(k)):
            out[k] = _deep_merge(dict(out[k]), v, f"{prefix}{k}.")
        else:
            out[k] = v
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config YAML, resolving its ``base:`` file (relative to it) recursively."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: 'base' files form a cycle: {' -> '.join(map(str, chain + (path,)))}")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a file path, got {base!r}")
    return _deep_merge(_read_yaml(path.parent / base, chain + (path,)), data)


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``key=value`` and parse the value as YAML (so ``8`` is an int and ``[4, 8]`` a list)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value, e.g. optim.lr=3e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree['a']['b'] = value`` for ``key='a.b'`` after checking the key exists in the schema."""
    field_info(key)
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{key}': '{part}' is not a section")
    node[parts[-1]] = value


def load_config(path: str | os.PathLike | Mapping[str, Any] | None = None,
                overrides: Iterable[str] | Mapping[str, Any] = (),
                *, base_dir: str | os.PathLike | None = None) -> ExperimentConfig:
    """Load YAML (merged over its ``base:`` file), apply dotted overrides, validate, resolve paths.

    Args:
        path: YAML config file, or an already-parsed config mapping (e.g. a checkpoint's
            ``config``); None starts from the dataclass defaults.
        overrides: ``["optim.lr=3e-4", ...]`` strings, or a ``{"optim.lr": 3e-4}`` mapping.
        base_dir: folder that relative paths in the config are resolved against (default: the
            current working directory).

    Raises:
        ConfigError: unknown key, wrong type or out-of-range value (the message names which).
    """
    if path is None:
        tree: dict[str, Any] = {}
    elif isinstance(path, Mapping):
        tree = copy.deepcopy(dict(path))
    else:
        tree = _read_yaml(Path(path))
    items = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
    for key, value in items:
        set_dotted(tree, key, value)
    cfg = _build(ExperimentConfig, tree)
    check_consistency(cfg)
    return resolve_paths(cfg, base_dir)


def check_consistency(cfg: ExperimentConfig) -> None:
    """Checks that involve more than one key."""
    weights = dataclasses.asdict(cfg.loss)
    if not any(w > 0 for w in weights.values()):
        raise ConfigError(f"loss weights are all 0 ({weights}): at least one of loss.* must be > 0")
    synth = cfg.data.synthetic
    if synth.subjects <= 2 * synth.held_out:
        raise ConfigError(f"config key 'data.synthetic.held_out' is {synth.held_out} but data.synthetic.subjects is "
                          f"{synth.subjects}: val and test take 2 x held_out subjects and training needs one more "
                          f"(held_out <= {(synth.subjects - 1) // 2})")
    if cfg.data.eval_hop >= cfg.data.seq_len > 1:
        raise ConfigError(f"config key 'data.eval_hop' is {cfg.data.eval_hop} but data.seq_len is {cfg.data.seq_len}: "
                          "each evaluation clip must start on a frame the one before it placed (0 < eval_hop < seq_len), "
                          "or 0 for half a clip")
    if cfg.model.require_pretrained and not cfg.model.pretrained_path:
        raise ConfigError("config key 'model.pretrained_path' is empty but model.require_pretrained is true: "
                          "set it to the backbone weights this profile fine-tunes (e.g. HaMeR's checkpoint)")
    for name, weight in cfg.train.objective.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0 or weight == float("inf"):
            raise ConfigError(f"config key 'train.objective.{name}' must be a finite weight >= 0, got {weight!r}")
    for name, bound in cfg.train.constraints.items():
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0 < bound < float("inf"):
            raise ConfigError(f"config key 'train.constraints.{name}' must be a finite fraction of the baseline > 0, "
                              f"got {bound!r}")
    if cfg.model.trainable_blocks and not cfg.model.freeze_backbone:
        raise ConfigError(f"config key 'model.trainable_blocks' is {cfg.model.trainable_blocks} but "
                          "model.freeze_backbone is false: it names the blocks a frozen backbone keeps training")
    if cfg.model.temporal_dim % cfg.model.temporal_heads:
        raise ConfigError(f"model.temporal_dim ({cfg.model.temporal_dim}) must be divisible by "
                          f"model.temporal_heads ({cfg.model.temporal_heads})")
    if cfg.model.infiller_path and cfg.model.infiller != "hawor":
        raise ConfigError(f"config key 'model.infiller_path' is {cfg.model.infiller_path!r} but model.infiller is "
                          f"{cfg.model.infiller!r}: the file is HaWoR's infiller.pt, set model.infiller: hawor")
    if cfg.model.infiller == "hawor" and cfg.model.infiller_hidden % 8:
        raise ConfigError(f"config key 'model.infiller_hidden' is {cfg.model.infiller_hidden} but HaWoR's infiller "
                          "has 8 heads: it must be divisible by 8 (released: 384)")


def resolve_paths(cfg: ExperimentConfig, base_dir: str | os.PathLike | None = None) -> ExperimentConfig:
    """Make every non-empty path key absolute (relative to ``base_dir`` or the working directory)."""
    root = Path(base_dir) if base_dir is not None else Path.cwd()
    for key in _PATH_KEYS:
        section, name = key.split(".")
        sub = getattr(cfg, section)
        value = getattr(sub, name)
        if value:
            p = Path(os.path.expanduser(value))
            setattr(sub, name, str(p if p.is_absolute() else (root / p).resolve()))
    return cfg


def config_from_dict(data: Mapping[str, Any]) -> ExperimentConfig:
    """Rebuild a config from :meth:`ExperimentConfig.to_dict` output (as stored in checkpoints)."""
    cfg = _build(ExperimentConfig, data)
    check_consistency(cfg)
    return cfg


def save_config(cfg: ExperimentConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (hawor_tune.atomic)."""
    from hawor_tune.atomic import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
