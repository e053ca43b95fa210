"""HaWoR-style video hand regressor (the seed's simplified HaWoR, REFERENCE.md section 1).

The forward pass keeps the four stages apart:

1. features: a timm backbone gives one pooled feature per frame;
2. temporal: a transformer encoder mixes the frames of a clip;
3. heads: a left and a right hand head regress MANO parameters (16 x 6D rotations, 10 betas, a
   weak-perspective camera turned into a camera-frame wrist position) and a camera head regresses the
   pose of every frame's camera in the first frame's camera;
4. infiller: a bidirectional LSTM per hand rewrites the parameters of the frames in which the hand is
   not observed; observed frames keep the regressor's output.

The MANO layers (one per hand) turn the parameters into joints and vertices. Every regressed quantity is
an offset from a mean value, and the last layers start small, so an untrained model predicts the mean hand
about 0.4 m in front of the camera.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from hawor_tune.config import ExperimentConfig
from hawor_tune.geometry import axis_angle_to_matrix, matrix_to_rot6d, rot6d_to_matrix
from hawor_tune.mano import HANDS, MANOLayer, build_mano

log = logging.getLogger(__name__)

NUM_ROTATIONS = 16  # MANO: global orientation + 15 finger joints
NUM_BETAS = 10
ROT6D_DIM = NUM_ROTATIONS * 6
# Per hand and frame: 16 x 6D rotations, 10 betas, 3 for the root (weak-perspective camera in the
# regressor's output, camera-frame wrist position in metres in the infiller's input and output).
PARAM_DIM = ROT6D_DIM + NUM_BETAS + 3
# The learned temporal positions cover the longest clip the config allows (data.seq_len <= 256).
MAX_FRAMES = 256

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Mean global orientation: a hand lying palm-down, fingers pointing away, seen by a head camera pitched
# 45 degrees down: in camera coordinates (x right, y down, z forward) the fingers point along
# (0, -1, 1)/sqrt(2) and the palm faces (0, 1, 1)/sqrt(2).
MEAN_FINGER_DIRECTION = (0.0, -math.sqrt(0.5), math.sqrt(0.5))
MEAN_PALM_NORMAL = (0.0, math.sqrt(0.5), math.sqrt(0.5))
# Mean wrist position: ~0.4 m in front of the camera (arm's length seen from the head), in the lower half
# of the image, the left hand on the left. (u, v) are normalised image coordinates in [-1, 1].
MEAN_ROOT_DEPTH = 0.4
MEAN_ROOT_UV = ((-0.3, 0.3), (0.3, 0.3))  # (left, right)
# Gain of the last layer of every head: small, so training starts at the mean parameters, but not zero,
# so that the backbone and the temporal module receive gradient from the first step.
LAST_LAYER_GAIN = 0.01


@dataclass
class HaWoROutput:
    """Predictions for a batch of clips; hands are stacked in dim 2 (0 = left, 1 = right).

    Attributes:
        rot6d: (B, T, 2, 16, 6) MANO rotations in 6D (index 0 = global orientation in the camera frame).
        rotmats: (B, T, 2, 16, 3, 3) the same as matrices.
        betas: (B, T, 2, 10) MANO shape.
        root: (B, T, 2, 3) camera-frame wrist position in metres.
        joints: (B, T, 2, 21, 3) camera-frame joints in OpenPose order, metres.
        vertices: (B, T, 2, V, 3) camera-frame MANO vertices, metres.
        cam_R: (B, T, 3, 3) rotation of camera t into camera 0 (frame 0 = identity).
        cam_t: (B, T, 3) translation of camera t into camera 0 (frame 0 = zero), metres.
        observed: (B, T, 2) bool, the frames the infiller treated as observed.
    """

    rot6d: torch.Tensor
    rotmats: torch.Tensor
    betas: torch.Tensor
    root: torch.Tensor
    joints: torch.Tensor
    vertices: torch.Tensor
    cam_R: torch.Tensor
    cam_t: torch.Tensor
    observed: torch.Tensor


def _mean_global_orient(side: str) -> torch.Tensor:
    """(3, 3) rotation taking MANO's rest hand to MEAN_FINGER_DIRECTION / MEAN_PALM_NORMAL.

    MANO's rest frame has the fingers along -x for the right hand (+x for the left, its mirror image) and
    the palm facing -y.
    """
    fingers, palm = torch.tensor(MEAN_FINGER_DIRECTION), torch.tensor(MEAN_PALM_NORMAL)
    x_axis = -fingers if side == "right" else fingers  # where the rest frame's +x goes
    y_axis = -palm
    return torch.stack([x_axis, y_axis, torch.linalg.cross(x_axis, y_axis)], dim=-1)


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Two hidden layers; the last layer starts small (see LAST_LAYER_GAIN)."""
    mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                        nn.Linear(hidden, out_dim))
    nn.init.xavier_uniform_(mlp[-1].weight, gain=LAST_LAYER_GAIN)
    nn.init.zeros_(mlp[-1].bias)
    return mlp


class TemporalEncoder(nn.Module):
    """Per-frame features -> temporal_dim, plus a learned position per frame, then attention over time."""

    def __init__(self, *, in_dim: int, dim: int, layers: int, heads: int, dropout: float,
                 max_frames: int = MAX_FRAMES) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.pos_embed = nn.Parameter(torch.zeros(max_frames, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.encoder: nn.TransformerEncoder | None = None
        if layers > 0:
            layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=dropout,
                                               activation="gelu", batch_first=True, norm_first=True)
            # Nested tensors only help with padding masks, which clips never have.
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        # Pre-norm blocks leave the residual stream unnormalised; the heads read a normalised one.
        self.norm = nn.LayerNorm(dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, T, in_dim) -> (B, T, dim)."""
        T = feats.shape[1]
        if T > self.pos_embed.shape[0]:
            raise ValueError(f"clip of {T} frames is longer than the model's {self.pos_embed.shape[0]} "
                             "learned temporal positions")
        h = self.proj(feats) + self.pos_embed[:T]  # (B, T, D)
        if self.encoder is not None:
            h = self.encoder(h)
        return self.norm(h)


class MotionInfiller(nn.Module):
    """Bidirectional LSTM over one hand's parameter sequence; predicts every frame from its neighbours.

    Input per frame: the parameters centred on the mean, zeroed where not observed (so the infiller never
    reads a regression of a hand that is not there), and the observed flag.
    """

    def __init__(self, *, hidden: int, layers: int, param_dim: int = PARAM_DIM) -> None:
        super().__init__()
        self.lstm = nn.LSTM(param_dim + 1, hidden, num_layers=layers, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * hidden, param_dim)
        nn.init.xavier_uniform_(self.out.weight, gain=LAST_LAYER_GAIN)
        nn.init.zeros_(self.out.bias)

    def forward(self, centred: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """centred (B, T, P) parameters minus the mean, observed (B, T) bool -> (B, T, P) offsets from the mean."""
        x = torch.where(observed[..., None], centred, torch.zeros_like(centred))  # (B, T, P)
        x = torch.cat([x, observed[..., None].to(centred.dtype)], dim=-1)  # (B, T, P + 1)
        h, _ = self.lstm(x)  # (B, T, 2 * hidden)
        return self.out(h)


class HaWoR(nn.Module):
    """Backbone -> temporal transformer -> hand and camera heads -> LSTM infiller -> MANO.

    Build it from a config with :func:`build_model`; the constructor takes explicit arguments.

    Args:
        backbone: timm model returning one pooled (N, F) feature per image.
        feature_dim: F.
        img_size: S, the side of the square input images in pixels.
        mano_layers: one MANO layer per hand, in HANDS order (left, right).
        temporal_dim, temporal_layers, temporal_heads, dropout: temporal transformer.
        head_hidden: hidden width of the hand and camera heads.
        infiller_hidden, infiller_layers: LSTM infiller.
        infill_mask_prob: training-time rate at which valid hand frames are hidden from the infiller.
    """

    def __init__(self, *, backbone: nn.Module, feature_dim: int, img_size: int,
                 mano_layers: tuple[MANOLayer, MANOLayer], temporal_dim: int, temporal_layers: int,
                 temporal_heads: int, head_hidden: int, dropout: float, infiller_hidden: int,
                 infiller_layers: int, infill_mask_prob: float) -> None:
        super().__init__()
        if [layer.side for layer in mano_layers] != list(HANDS):
            raise ValueError(f"mano_layers must be sides {HANDS} in that order, got "
                             f"{[layer.side for layer in mano_layers]}")
        self.img_size = img_size
        self.infill_mask_prob = infill_mask_prob
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

        self.backbone = backbone
        self.temporal = TemporalEncoder(in_dim=feature_dim, dim=temporal_dim, layers=temporal_layers,
                                        heads=temporal_heads, dropout=dropout)
        self.hand_heads = nn.ModuleList(_mlp(temporal_dim, head_hidden, PARAM_DIM) for _ in HANDS)
        # Camera head reads frame t and frame 0: the pose of t relative to 0 (6D rotation + translation).
        self.camera_head = _mlp(2 * temporal_dim, head_hidden, 9)
        self.infillers = nn.ModuleList(MotionInfiller(hidden=infiller_hidden, layers=infiller_layers)
                                       for _ in HANDS)
        self.mano = nn.ModuleList(mano_layers)

        # Mean rotations per hand: the egocentric global orientation and MANO's mean finger pose (absolute
        # finger rotations = hands_mean when the relative pose is zero).
        mean_rot6d = []
        for layer in mano_layers:
            fingers = axis_angle_to_matrix(layer.hands_mean.detach().float().cpu().view(15, 3))  # (15, 3, 3)
            mats = torch.cat([_mean_global_orient(layer.side)[None], fingers], dim=0)  # (16, 3, 3)
            mean_rot6d.append(matrix_to_rot6d(mats))
        self.register_buffer("mean_rot6d", torch.stack(mean_rot6d), persistent=False)  # (2, 16, 6)
        # Mean weak-perspective camera per hand: (log-scale offset, u, v); log-scale 0 = MEAN_ROOT_DEPTH.
        mean_cam = torch.tensor([[0.0, u, v] for u, v in MEAN_ROOT_UV])
        self.register_buffer("mean_cam", mean_cam, persistent=False)  # (2, 3)
        self.register_buffer("mean_betas", torch.zeros(2, NUM_BETAS), persistent=False)  # (2, 10)

    # ----- stage 1: features -------------------------------------------------------------------------
    def encode_frames(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, 3, S, S) -> (B, T, F) pooled backbone features."""
        B, T = images.shape[:2]
        x = images.flatten(0, 1).to(self.pixel_mean.dtype) / 255.0  # (B*T, 3, S, S)
        x = (x - self.pixel_mean) / self.pixel_std
        return self.backbone(x).view(B, T, -1)

    # ----- stage 3: heads ----------------------------------------------------------------------------
    def weak_perspective_to_root(self, cam: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        """Weak-perspective camera (log-scale offset, u, v) -> camera-frame wrist position (metres).

        The scale is s = s0 * exp(offset) with s0 = 2 fx / (S * MEAN_ROOT_DEPTH), so that the depth
        tz = 2 fx / (S * s) (HaMeR's conversion with the whole image as the crop) is MEAN_ROOT_DEPTH at
        offset 0 whatever the focal length, and stays positive. (u, v) in [-1, 1] is the wrist's position
        in the image; x and y follow from the pixel, the depth and K.

        Args:
            cam: (B, T, 2, 3).
            K: (B, 3, 3) intrinsics in input pixels.

        Returns:
            (B, T, 2, 3).
        """
        S = self.img_size
        K = K[:, None, None]  # (B, 1, 1, 3, 3)
        fx, fy, cx, cy = K[..., 0, 0], K[..., 1, 1], K[..., 0, 2], K[..., 1, 2]  # (B, 1, 1)
        s = 2 * fx / (S * MEAN_ROOT_DEPTH) * torch.exp(cam[..., 0])  # (B, T, 2)
        tz = 2 * fx / (S * s)
        px = (cam[..., 1] + 1) * S / 2  # (B, T, 2) pixels
        py = (cam[..., 2] + 1) * S / 2
        return torch.stack([(px - cx) / fx * tz, (py - cy) / fy * tz, tz], dim=-1)

    def mean_params(self, K: torch.Tensor) -> torch.Tensor:
        """(B, 3, 3) -> (B, 1, 2, PARAM_DIM) mean parameter vector (rot6d, betas, root) per hand."""
        root = self.weak_perspective_to_root(self.mean_cam.expand(K.shape[0], 1, 2, 3), K)  # (B, 1, 2, 3)
        rest = torch.cat([self.mean_rot6d.flatten(1), self.mean_betas], dim=-1)  # (2, 106)
        return torch.cat([rest.expand(K.shape[0], 1, 2, -1), root], dim=-1)

    def regress_hands(self, h: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        """(B, T, D) temporal features -> (B, T, 2, PARAM_DIM) per-hand parameters (rot6d, betas, root)."""
        delta = torch.stack([head(h) for head in self.hand_heads], dim=2)  # (B, T, 2, P)
        rot6d = self.mean_rot6d.flatten(1) + delta[..., :ROT6D_DIM]  # (B, T, 2, 96)
        betas = self.mean_betas + delta[..., ROT6D_DIM:-3]  # (B, T, 2, 10)
        root = self.weak_perspective_to_root(self.mean_cam + delta[..., -3:], K)  # (B, T, 2, 3)
        return torch.cat([rot6d, betas, root], dim=-1)

    def regress_camera(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, D) -> cam_R (B, T, 3, 3), cam_t (B, T, 3): pose of camera t in camera 0."""
        B, T, _ = h.shape
        identity = torch.eye(3, dtype=h.dtype, device=h.device).expand(B, 1, 3, 3)
        zero = h.new_zeros(B, 1, 3)
        if T == 1:
            return identity, zero
        pair = torch.cat([h[:, 1:], h[:, :1].expand(-1, T - 1, -1)], dim=-1)  # (B, T-1, 2D)
        delta = self.camera_head(pair)  # (B, T-1, 9)
        rot6d = matrix_to_rot6d(identity) + delta[..., :6]  # (B, T-1, 6) offset from no rotation
        # Frame 0 is the reference: identity and zero by construction, not by learning.
        cam_R = torch.cat([identity, rot6d_to_matrix(rot6d)], dim=1)  # (B, T, 3, 3)
        cam_t = torch.cat([zero, delta[..., 6:]], dim=1)  # (B, T, 3)
        return cam_R, cam_t

    # ----- stage 4: infiller -------------------------------------------------------------------------
    def observed_mask(self, hand_valid: torch.Tensor) -> torch.Tensor:
        """(B, T, 2) bool -> (B, T, 2) bool frames treated as observed.

        In training mode a random subset of the valid frames is hidden at rate infill_mask_prob, so that
        the infiller is supervised on frames with ground truth; per clip and hand at least one valid frame
        stays observed.
        """
        if not self.training or self.infill_mask_prob == 0.0:
            return hand_valid
        scores = torch.rand(hand_valid.shape, device=hand_valid.device)  # (B, T, 2)
        observed = hand_valid & (scores >= self.infill_mask_prob)
        # Restore the valid frame with the highest score where everything valid was hidden.
        keep = torch.where(hand_valid, scores, torch.full_like(scores, -1.0)).argmax(dim=1, keepdim=True)
        keep = torch.zeros_like(hand_valid).scatter(1, keep, True) & hand_valid  # (B, T, 2)
        return observed | (keep & ~observed.any(dim=1, keepdim=True))

    def infill(self, params: torch.Tensor, mean: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """Replace the unobserved frames of each hand by the infiller's prediction.

        Args:
            params: (B, T, 2, P) regressed parameters.
            mean: (B, 1, 2, P) mean parameters.
            observed: (B, T, 2) bool.

        Returns:
            (B, T, 2, P): params where observed, infilled elsewhere.
        """
        filled = torch.stack([infiller(params[:, :, i] - mean[:, :, i], observed[:, :, i]) + mean[:, :, i]
                              for i, infiller in enumerate(self.infillers)], dim=2)  # (B, T, 2, P)
        return torch.where(observed[..., None], params, filled)

    # ----- MANO --------------------------------------------------------------------------------------
    def run_mano(self, rotmats: torch.Tensor, betas: torch.Tensor, root: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, 2, 16, 3, 3), (B, T, 2, 10), (B, T, 2, 3) -> joints (B, T, 2, 21, 3), vertices (B, T, 2, V, 3).

        The MANO wrist is moved onto the regressed root.
        """
        B, T = rotmats.shape[:2]
        joints, vertices = [], []
        for i, layer in enumerate(self.mano):
            out = layer(rotmats[:, :, i].flatten(0, 1), betas[:, :, i].flatten(0, 1))
            offset = root[:, :, i].flatten(0, 1)[:, None] - out.joints[:, :1]  # (B*T, 1, 3)
            joints.append((out.joints + offset).view(B, T, -1, 3))
            vertices.append((out.vertices + offset).view(B, T, -1, 3))
        return torch.stack(joints, dim=2), torch.stack(vertices, dim=2)

    def forward(self, images: torch.Tensor, K: torch.Tensor, hand_valid: torch.Tensor) -> HaWoROutput:
        """Predict hands and camera motion for a batch of clips.

        Args:
            images: uint8 (B, T, 3, S, S).
            K: (B, 3, 3) intrinsics in input pixels.
            hand_valid: bool (B, T, 2), hands (left, right) visible in each frame.

        Returns:
            HaWoROutput.
        """
        self._check_inputs(images, K, hand_valid)
        feats = self.encode_frames(images)  # (B, T, F)
        h = self.temporal(feats)  # (B, T, D)
        K = K.to(self.pixel_mean.dtype)  # full precision even under autocast
        params = self.regress_hands(h, K)  # (B, T, 2, P)
        cam_R, cam_t = self.regress_camera(h)
        observed = self.observed_mask(hand_valid)
        params = self.infill(params, self.mean_params(K), observed)

        B, T = params.shape[:2]
        # MANO in float32 even under autocast: bf16's 8-bit mantissa alone would move a wrist 0.4 m away
        # by ~1.5 mm.
        with torch.autocast(device_type=images.device.type, enabled=False):
            params = params.float()
            rot6d = params[..., :ROT6D_DIM].reshape(B, T, 2, NUM_ROTATIONS, 6)
            betas = params[..., ROT6D_DIM:-3]
            root = params[..., -3:]
            rotmats = rot6d_to_matrix(rot6d)  # (B, T, 2, 16, 3, 3)
            joints, vertices = self.run_mano(rotmats, betas, root)
            cam_R, cam_t = cam_R.float(), cam_t.float()
        return HaWoROutput(rot6d=rot6d, rotmats=rotmats, betas=betas, root=root, joints=joints,
                           vertices=vertices, cam_R=cam_R, cam_t=cam_t, observed=observed)

    def _check_inputs(self, images: torch.Tensor, K: torch.Tensor, hand_valid: torch.Tensor) -> None:
        S = self.img_size
        if images.dtype != torch.uint8 or images.dim() != 5 or tuple(images.shape[2:]) != (3, S, S):
            raise ValueError(f"images must be uint8 (B, T, 3, {S}, {S}), got {images.dtype} "
                             f"{tuple(images.shape)}")
        B, T = images.shape[:2]
        if tuple(K.shape) != (B, 3, 3):
            raise ValueError(f"K must be ({B}, 3, 3), got {tuple(K.shape)}")
        if hand_valid.dtype != torch.bool or tuple(hand_valid.shape) != (B, T, 2):
            raise ValueError(f"hand_valid must be bool ({B}, {T}, 2), got {hand_valid.dtype} "
                             f"{tuple(hand_valid.shape)}")


def _create_backbone(name: str, img_size: int, kwargs: dict) -> nn.Module:
    """timm model without classifier; passes img_size to models that take it (ViTs), not to CNNs."""
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, **{"img_size": img_size, **kwargs})
    except TypeError:
        if "img_size" in kwargs:
            raise
        # CNNs reject img_size; a TypeError from the user's kwargs shows up again here.
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"config key 'model.backbone': unknown timm model {name!r} "
                             "(see timm.list_models())") from None
        raise


def _load_backbone_weights(backbone: nn.Module, path: str) -> None:
    """Load a local state dict into the backbone (never downloads).

    Classifier weights are ignored; timm's own checkpoint filter of the model family (when it has one)
    adapts the file, e.g. resamples ViT position embeddings to another input size.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"config key 'model.pretrained_path': backbone weights file {path!r} "
                                "does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (mapping of tensors), got {type(state).__name__}")
    filter_fn = getattr(sys.modules[type(backbone).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None and len(inspect.signature(filter_fn).parameters) >= 2:
        state = filter_fn(state, backbone)
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit backbone {type(backbone).__name__}: {e}") from None
    if result.missing_keys:
        raise ValueError(f"{path}: weights do not fit the backbone, {len(result.missing_keys)} missing keys "
                         f"(first: {result.missing_keys[:3]})")
    if result.unexpected_keys:
        log.info("%s: ignored %d keys not in the backbone (e.g. the classifier): %s", path,
                 len(result.unexpected_keys), result.unexpected_keys[:3])
    log.info("loaded backbone weights from %s", path)


def build_model(cfg: ExperimentConfig) -> HaWoR:
    """Build the model described by ``cfg.model`` for ``cfg.data.img_size`` inputs and ``cfg.mano`` hands.

    Raises:
        ValueError: unknown backbone. (temporal_dim vs temporal_heads is checked when the config loads.)
        FileNotFoundError: model.pretrained_path names a file that does not exist.
    """
    m = cfg.model
    backbone = _create_backbone(m.backbone, cfg.data.img_size, dict(m.backbone_kwargs))
    if m.pretrained_path:
        _load_backbone_weights(backbone, m.pretrained_path)
    mano_layers = tuple(build_mano(cfg.mano, side) for side in HANDS)
    return HaWoR(backbone=backbone, feature_dim=backbone.num_features, img_size=cfg.data.img_size,
                 mano_layers=mano_layers, temporal_dim=m.temporal_dim, temporal_layers=m.temporal_layers,
                 temporal_heads=m.temporal_heads, head_hidden=m.head_hidden, dropout=m.dropout,
                 infiller_hidden=m.infiller_hidden, infiller_layers=m.infiller_layers,
                 infill_mask_prob=m.infill_mask_prob)
