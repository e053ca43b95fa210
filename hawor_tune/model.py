"""HaWoR-style video hand regressor: per-hand crops, spatial tokens, hand fusion, time, MANO.

The forward pass keeps the stages apart:

1. features: a timm backbone reads each hand's crop (left hands arrive mirrored, so one right-hand network
   serves both, as in HaMeR and HaWoR); a spatial head lets a learned query attend to the backbone's
   spatial tokens (HaMeR's transformer decoder head, ``hamer/models/heads/mano_head.py``), giving one
   token per hand and frame. For the camera, a second, small backbone reads the whole frame at low
   resolution and an MLP reads the dense optical flow from the clip's first frame (hawor_tune.data.flow,
   standing in for HaWoR's flow-based SLAM): camera motion is in the background, not in the hand crops.
2. fusion: per frame, the left-hand, right-hand and camera tokens attend to each other; a hand that is not
   observed is masked out as a key, so it contributes nothing.
3. temporal: a transformer over time per hand (shared by both hands) and one for the camera.
4. heads: one hand head regresses MANO parameters in the (mirrored) crop's frame (16 x 6D rotations,
   10 betas, a weak-perspective camera turned into a camera-frame wrist through the crop's intrinsics);
   left-hand outputs are mirrored back. A camera head regresses each frame's camera in the first frame's,
   on top of the flow head's path: each frame's pose in the previous one, read from the flow, chained.
5. infiller: the frames in which a hand is not observed are filled in the clip's first camera (through the
   predicted camera motion): the interpolation between the observed frames plus a bidirectional LSTM's
   residual, or HaWoR's released transformer infiller (``model.infiller: hawor``). Observed frames keep the
   regressor's output; an unobserved frame informs no other frame.

The MANO layers (one per hand) turn the parameters into joints and vertices. Every regressed quantity is
an offset from a mean value and the last layers start small, so an untrained model predicts the mean hand
filling its crop.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hawor_tune.backbones import create_backbone, freeze_backbone, spatial_tokens, token_count
from hawor_tune.config import ExperimentConfig
from hawor_tune.geometry import (
    axis_angle_to_matrix,
    compose_steps,
    matrix_to_axis_angle,
    matrix_to_rot6d,
    rot6d_to_matrix,
)
from hawor_tune.mano import HANDS, MANOLayer, build_mano
from hawor_tune.pretrained import load_hawor_infiller, load_pretrained
from hawor_tune.released_modules import BOX_DIM, HaWoRInfiller, MANODecoderHead, TemporalAttention, box_code

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

# Mean global orientation of the canonical (right, or mirrored left) hand: palm-down, fingers pointing
# away, seen by a head camera pitched 45 degrees down: in camera coordinates (x right, y down, z forward)
# the fingers point along (0, -1, 1)/sqrt(2) and the palm faces (0, 1, 1)/sqrt(2).
MEAN_FINGER_DIRECTION = (0.0, -math.sqrt(0.5), math.sqrt(0.5))
MEAN_PALM_NORMAL = (0.0, math.sqrt(0.5), math.sqrt(0.5))
# Hidden width of the camera's fitted flow head (FlowHead).
FLOW_HIDDEN = 256

# Weak-perspective camera (HaMeR): a scale s means the crop spans 2 / s metres at the wrist's depth, so
# tz = 2 f / (C s) with f the crop's focal length in crop pixels and C its side. At the mean scale the
# crop spans CROP_METRES: a 1.3 x box around a hand about 0.19 m across.
CROP_METRES = 0.25
# Gain of the last layer of every head: small, so training starts at the mean parameters, but not zero,
# so that the backbone and the temporal module receive gradient from the first step.
LAST_LAYER_GAIN = 0.01
# Mirroring x -> -x maps a rotation R to D R D (D = diag(-1, 1, 1)); on the 6D representation (its first
# two columns) that is a sign per entry, and it commutes with the Gram-Schmidt of rot6d_to_matrix.
MIRROR_ROT6D = (1.0, -1.0, -1.0, -1.0, 1.0, 1.0)
# HaWoR's 6D (rotmat_to_rot6d in its lib/utils/geometry.py: R[..., :2] flattened) interleaves the first two
# columns row by row, (R00, R01, R10, R11, R20, R21); ours stacks them, (R00, R10, R20, R01, R11, R21).
HAWOR_FROM_OUR_ROT6D = (0, 3, 1, 4, 2, 5)
OUR_FROM_HAWOR_ROT6D = (0, 2, 4, 1, 3, 5)


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


def _mean_global_orient() -> torch.Tensor:
    """(3, 3) rotation taking MANO's right rest hand to MEAN_FINGER_DIRECTION / MEAN_PALM_NORMAL.

    MANO's right rest frame has the fingers along -x and the palm facing -y.
    """
    fingers, palm = torch.tensor(MEAN_FINGER_DIRECTION), torch.tensor(MEAN_PALM_NORMAL)
    x_axis, y_axis = -fingers, -palm  # where the rest frame's +x and +y go
    return torch.stack([x_axis, y_axis, torch.linalg.cross(x_axis, y_axis)], dim=-1)


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Two hidden layers; the last layer starts small (see LAST_LAYER_GAIN)."""
    mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                        nn.Linear(hidden, out_dim))
    nn.init.xavier_uniform_(mlp[-1].weight, gain=LAST_LAYER_GAIN)
    nn.init.zeros_(mlp[-1].bias)
    return mlp


@contextmanager
def frozen_batch_norm(module: nn.Module) -> Iterator[None]:
    """Within the block, ``module``'s batch-norm layers normalise with their running statistics and do not
    update them, whatever the mode (gradients still flow)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in norms:
        m.train(False)
    try:
        yield
    finally:
        for m in norms:
            m.train(True)


class SpatialHead(nn.Module):
    """A learned query cross-attends to a crop's spatial tokens (one transformer-decoder layer).

    Args:
        in_dim: F, channels of the backbone's tokens.
        dim: D, output width.
        num_tokens: L, tokens per crop (a learned position each).
        heads: attention heads.
        dropout: dropout in the decoder layer.
    """

    def __init__(self, *, in_dim: int, dim: int, num_tokens: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.pos_embed = nn.Parameter(torch.zeros(num_tokens, dim))
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.query, std=0.02)
        self.decoder = nn.TransformerDecoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=dropout,
                                                  activation="gelu", batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L, F) -> (N, D)."""
        memory = self.proj(tokens) + self.pos_embed  # (N, L, D)
        query = self.query.expand(tokens.shape[0], -1, -1)  # (N, 1, D)
        return self.norm(self.decoder(query, memory))[:, 0]


class HandFusion(nn.Module):
    """Per frame, the left-hand, right-hand and camera tokens attend to each other (one pre-norm block).

    A hand that is not observed is masked out as a key: it contributes nothing to the other tokens.
    """

    def __init__(self, *, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.type_embed = nn.Parameter(torch.zeros(3, dim))  # left, right, camera
        nn.init.trunc_normal_(self.type_embed, std=0.02)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, tokens: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """tokens (N, 3, D) [left, right, camera], observed (N, 2) bool -> (N, 3, D)."""
        x = tokens + self.type_embed
        ignore = torch.cat([~observed, observed.new_zeros(observed.shape[0], 1)], dim=1)  # (N, 3), camera always seen
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=ignore, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


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

    def forward(self, feats: torch.Tensor, ignore: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, in_dim), optional (B, T) bool frames no other frame may attend to -> (B, T, dim)."""
        T = feats.shape[1]
        if T > self.pos_embed.shape[0]:
            raise ValueError(f"clip of {T} frames is longer than the model's {self.pos_embed.shape[0]} "
                             "learned temporal positions")
        h = self.proj(feats) + self.pos_embed[:T]  # (B, T, D)
        if self.encoder is not None:
            h = self.encoder(h, src_key_padding_mask=ignore)
        return self.norm(h)


class MotionInfiller(nn.Module):
    """Bidirectional LSTM over one hand's parameter sequence; predicts every frame from its neighbours.

    Input per frame: the parameters in the clip's first camera centred on their observed mean, zeroed where
    not observed (so the infiller never reads a regression of a hand that is not there), and the observed
    flag. Output: a residual on the interpolation between observed frames (:meth:`HaWoR.infill`).
    """

    def __init__(self, *, hidden: int, layers: int, param_dim: int = PARAM_DIM) -> None:
        super().__init__()
        self.lstm = nn.LSTM(param_dim + 1, hidden, num_layers=layers, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * hidden, param_dim)
        nn.init.xavier_uniform_(self.out.weight, gain=LAST_LAYER_GAIN)
        nn.init.zeros_(self.out.bias)

    def forward(self, centred: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """centred (B, T, P) parameters minus their observed mean, observed (B, T) bool -> (B, T, P) residuals."""
        x = torch.where(observed[..., None], centred, torch.zeros_like(centred))  # (B, T, P)
        x = torch.cat([x, observed[..., None].to(centred.dtype)], dim=-1)  # (B, T, P + 1)
        h, _ = self.lstm(x)  # (B, T, 2 * hidden)
        return self.out(h)


def _rotate_params(params: torch.Tensor, R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(B, T, 2, P) hand parameters, (B, T, 3, 3) rotations, (B, T, 3) translations -> the parameters with the
    wrist mapped by x -> R x + t and the global orientation by O -> R O (fingers and betas unchanged)."""
    orient = params[..., :6].unflatten(-1, (2, 3))  # (B, T, 2, 2, 3): the 6D's two columns
    orient = (R[:, :, None, None] @ orient[..., None]).squeeze(-1).flatten(-2)  # (B, T, 2, 6)
    root = (R[:, :, None] @ params[..., -3:, None]).squeeze(-1) + t[:, :, None]  # (B, T, 2, 3)
    return torch.cat([orient, params[..., 6:-3], root], dim=-1)


def _to_first_camera(params: torch.Tensor, cam_R: torch.Tensor, cam_t: torch.Tensor) -> torch.Tensor:
    """Camera-frame hand parameters -> the clip's first camera (X_0 = R X_t + t)."""
    return _rotate_params(params, cam_R, cam_t)


def _from_first_camera(params: torch.Tensor, cam_R: torch.Tensor, cam_t: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_to_first_camera` (X_t = R^T (X_0 - t))."""
    Rt = cam_R.transpose(-1, -2)
    return _rotate_params(params, Rt, -(Rt @ cam_t[..., None]).squeeze(-1))


def _observed_neighbours(observed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, H) bool -> the nearest observed frames at or before and at or after each frame (the one that
    exists at the clip's ends), (B, T, H) long each, and how far each frame lies between them, (B, T, H) in
    [0, 1]."""
    T = observed.shape[1]
    idx = torch.arange(T, device=observed.device)[None, :, None].expand_as(observed)  # (B, T, H)
    prev = torch.where(observed, idx, torch.full_like(idx, -1)).cummax(dim=1).values  # (B, T, H)
    nxt = torch.where(observed, idx, torch.full_like(idx, T)).flip(1).cummin(dim=1).values.flip(1)
    has_prev, has_next = prev >= 0, nxt < T
    prev = torch.where(has_prev, prev, nxt).clamp(0, T - 1)
    nxt = torch.where(has_next, nxt, prev).clamp(0, T - 1)
    span = (nxt - prev).clamp_min(1)
    return prev, nxt, (idx - prev).clamp_min(0) / span


def _take(x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """(B, T, H, ...) values at (B, T, H) frame indices."""
    return torch.gather(x, 1, i.view(*i.shape, *(1,) * (x.dim() - 3)).expand_as(x))


def interpolate_observed(x: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """(B, T, H, P) values, (B, T, H) bool -> each frame linearly interpolated between the nearest observed
    frames before and after it (the nearest one alone at the clip's ends; observed frames unchanged; x where
    a hand is observed nowhere)."""
    prev, nxt, w = _observed_neighbours(observed)
    w = w.to(x.dtype)[..., None]  # (B, T, H, 1)
    return torch.where(observed.any(dim=1, keepdim=True)[..., None], (1 - w) * _take(x, prev) + w * _take(x, nxt), x)


def slerp_observed(R: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """(B, T, H, J, 3, 3) rotations, (B, T, H) bool -> each frame's rotations along the shortest arc between
    the nearest observed frames before and after it (as :func:`interpolate_observed` places them)."""
    prev, nxt, w = _observed_neighbours(observed)
    start, end = _take(R, prev), _take(R, nxt)  # (B, T, H, J, 3, 3)
    step = matrix_to_axis_angle(start.transpose(-1, -2) @ end) * w.to(R.dtype)[..., None, None]  # (B, T, H, J, 3)
    return torch.where(observed.any(dim=1, keepdim=True)[..., None, None, None],
                       start @ axis_angle_to_matrix(step), R)


def polynomial_projection(T: int, degree: int, *, through_origin: bool = False,
                          device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """(T, T) least-squares projection of a T-frame sequence onto polynomials in time of at most ``degree``
    (``through_origin``: no constant term, so frame 0 stays 0), or None where it would change nothing
    (degree 0: off, or as many coefficients as frames)."""
    terms = degree if through_origin else degree + 1
    if degree <= 0 or terms >= (T - 1 if through_origin else T):
        return None
    return _projection_matrix(T, degree, through_origin).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=32)
def _projection_matrix(T: int, degree: int, through_origin: bool) -> torch.Tensor:
    """The float64 CPU matrix of :func:`polynomial_projection`, computed once per clip length and degree (every
    evaluation forward asks for it)."""
    t = torch.linspace(0.0, 1.0, T, dtype=torch.float64)[:, None]  # (T, 1)
    basis = t ** torch.arange(1 if through_origin else 0, degree + 1, dtype=torch.float64)  # (T, terms)
    return basis @ torch.linalg.pinv(basis)


def _smooth_over_time(x: torch.Tensor, projection: torch.Tensor | None) -> torch.Tensor:
    """(B, T, ...) -> each trajectory over T projected by a (T, T) matrix (unchanged when None)."""
    if projection is None:
        return x
    return torch.einsum("st,bt...->bs...", projection.to(x.dtype), x)


class FlowHead(nn.Module):
    """A fixed two-hidden-layer MLP from the pooled optical flow between frames t-1 and t straight to camera
    t's pose in camera t-1 (6D rotation offset from no turn, and translation); the model chains these steps and
    adds the path to the camera head's output.

    It is fitted once on the training split, not trained with the model (``hawor_tune.flow_fit``), as HaWoR
    is handed a ready-made SLAM: its weights are buffers (saved and loaded with the model, left alone by the
    optimiser). Non-linear, so that it can discount the cells where hands and objects move rather than the
    room. Zero, as built: a static camera.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int = FLOW_HIDDEN) -> None:
        super().__init__()
        for name, shape in (("w1", (hidden, in_dim)), ("b1", (hidden,)), ("w2", (hidden, hidden)),
                            ("b2", (hidden,)), ("w3", (out_dim, hidden)), ("b3", (out_dim,))):
            self.register_buffer(name, torch.zeros(shape))

    def forward(self, flow: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim)."""
        h = F.gelu(F.linear(flow, self.w1, self.b1))
        return F.linear(F.gelu(F.linear(h, self.w2, self.b2)), self.w3, self.b3)

    def path(self, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., T, 2, G, G) a clip's flow from its first frame -> R (..., T-1, 3, 3) and t (..., T-1, 3), frames
        1.. in the first camera: each frame's step from the previous one, read from the flow between the two
        (the difference of their flows from the first frame), chained (a visual odometry)."""
        step = self((flow[..., 1:, :, :, :] - flow[..., :-1, :, :, :]).flatten(-3))  # (..., T-1, 9)
        no_turn = matrix_to_rot6d(torch.eye(3, dtype=step.dtype, device=step.device))
        return compose_steps(rot6d_to_matrix(no_turn + step[..., :6]), step[..., 6:])


class HaWoR(nn.Module):
    """Crop backbone -> spatial head -> hand fusion -> temporal transformers -> heads -> infiller -> MANO.

    Build it from a config with :func:`build_model`; the constructor takes explicit arguments.

    Args:
        backbone: timm model with ``forward_features`` (spatial tokens of one hand crop).
        feature_dim: F, channels of its tokens.
        num_tokens: L, tokens per crop.
        crop_size: C, side of the square hand crops in pixels.
        camera_backbone: timm model returning one pooled feature per whole frame, or None to let the
            hand backbone read the frame too (its spatial tokens averaged).
        camera_feature_dim: the width of that feature.
        img_size: S, side of the whole-frame input.
        flow_grid: G, cells per side of the optical-flow input (0: the camera reads the frames only).
        mano_layers: one MANO layer per hand, in HANDS order (left, right).
        hand_fusion: let the hands and the camera attend to each other per frame.
        temporal_dim, temporal_layers, temporal_heads, dropout: token width and temporal transformers.
        head_hidden: hidden width of the hand and camera heads.
        infiller: ``lstm``, this project's LSTM per hand, or ``hawor``, HaWoR's released infiller
            (:class:`hawor_tune.released_modules.HaWoRInfiller`).
        infiller_hidden, infiller_layers: the infiller's width and layers (HaWoR's: d_model and layers).
        infill_mask_prob: training-time rate at which valid hand frames are hidden from the infiller.
        hand_trajectory_degree, camera_trajectory_degree: each clip's hand trajectories in its world and camera path
            are projected onto polynomials in time of this degree (0: every frame free); while training only
            with ``smooth_in_training`` (else the losses supervise every frame's own prediction).
        finger_path: (query path) a per-frame linear readout from all of a crop's spatial tokens to its finger
            rotations, added to the head's.
    """

    def __init__(self, *, backbone: nn.Module, feature_dim: int, num_tokens: int, crop_size: int,
                 camera_backbone: nn.Module | None, camera_feature_dim: int, img_size: int, flow_grid: int,
                 mano_layers: tuple[MANOLayer, MANOLayer], hand_fusion: bool, temporal_dim: int,
                 temporal_layers: int, temporal_heads: int, head_hidden: int, dropout: float,
                 infiller_hidden: int, infiller_layers: int, infill_mask_prob: float,
                 hand_path: str = "query", decoder_dim: int = 1024, decoder_layers: int = 6,
                 motion_hidden: int = 384, motion_layers: int = 6, motion_residual: bool = True,
                 hand_trajectory_degree: int = 0, camera_trajectory_degree: int = 0, smooth_in_training: bool = False,
                 finger_path: bool = False, infiller: str = "lstm") -> None:
        super().__init__()
        if [layer.side for layer in mano_layers] != list(HANDS):
            raise ValueError(f"mano_layers must be sides {HANDS} in that order, got "
                             f"{[layer.side for layer in mano_layers]}")
        self.crop_size, self.img_size, self.flow_grid = crop_size, img_size, flow_grid
        self.infill_mask_prob = infill_mask_prob
        self.hand_trajectory_degree, self.camera_trajectory_degree = hand_trajectory_degree, camera_trajectory_degree
        self.smooth_in_training = smooth_in_training
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("mirror_rot6d", torch.tensor(MIRROR_ROT6D).repeat(NUM_ROTATIONS), persistent=False)
        # Mirroring a weak-perspective camera (log-scale, u, v) negates u.
        self.register_buffer("mirror_cam", torch.tensor([1.0, -1.0, 1.0]), persistent=False)

        D = temporal_dim
        self.backbone = backbone
        self.hand_path = hand_path
        if hand_path == "query":
            self.spatial_head = SpatialHead(in_dim=feature_dim, dim=D, num_tokens=num_tokens, heads=temporal_heads,
                                            dropout=dropout)
            # Where the crop lies in the image (HaWoR's box code); zero at first, so a start made without it
            # predicts what it did.
            self.box_proj = nn.Linear(BOX_DIM, D)
            nn.init.zeros_(self.box_proj.weight)
            nn.init.zeros_(self.box_proj.bias)
        self.finger_head: nn.Linear | None = None
        self.camera_backbone = camera_backbone
        self.camera_proj = nn.Sequential(nn.Linear(camera_feature_dim, D), nn.LayerNorm(D))
        # No LayerNorm on the flow's token: its size is the motion's size.
        self.flow_proj = (nn.Sequential(nn.Flatten(), nn.Linear(2 * flow_grid**2, head_hidden), nn.GELU(),
                                        nn.Linear(head_hidden, D)) if flow_grid else None)
        self.flow_head = FlowHead(2 * flow_grid**2, 9) if flow_grid else None
        temporal = dict(in_dim=D, dim=D, layers=temporal_layers, heads=temporal_heads, dropout=dropout)
        if hand_path == "query":
            self.fusion = HandFusion(dim=D, heads=temporal_heads, dropout=dropout) if hand_fusion else None
            self.hand_temporal = TemporalEncoder(**temporal)  # shared by both hands (left ones are mirrored)
            self.hand_head = _mlp(D, head_hidden, PARAM_DIM)
            # The fingers' own path: every spatial token, per frame, straight to the 15 finger rotations, past
            # the pooled token and the temporal transformer (which keep the hand's placement, not its fingers).
            # Zero at first, so a start made without it predicts what it did.
            self.finger_head = nn.Linear(num_tokens * feature_dim, ROT6D_DIM - 6) if finger_path else None
            if self.finger_head is not None:
                nn.init.zeros_(self.finger_head.weight)
                nn.init.zeros_(self.finger_head.bias)
        else:
            self.fusion = None
        self.camera_temporal = TemporalEncoder(**temporal)
        # Camera head reads frame t and frame 0: the pose of t relative to 0 (6D rotation + translation).
        self.camera_head = _mlp(2 * D, head_hidden, 9)
        self.infillers: nn.ModuleList | None = None
        self.infiller: HaWoRInfiller | None = None
        if infiller == "lstm":
            self.infillers = nn.ModuleList(MotionInfiller(hidden=infiller_hidden, layers=infiller_layers)
                                           for _ in HANDS)
        elif infiller == "hawor":  # under the name HaWoR's infiller.pt is loaded into (hawor_tune.pretrained)
            self.infiller = HaWoRInfiller(dim=infiller_hidden, layers=infiller_layers)
        else:
            raise ValueError(f"infiller must be 'lstm' or 'hawor', got {infiller!r}")
        self.mano = nn.ModuleList(mano_layers)

        # Mean rotations of the canonical (right) hand: the egocentric global orientation and MANO's mean
        # finger pose (absolute finger rotations = hands_mean when the relative pose is zero).
        right = mano_layers[HANDS.index("right")]
        fingers = axis_angle_to_matrix(right.hands_mean.detach().float().cpu().view(15, 3))  # (15, 3, 3)
        mats = torch.cat([_mean_global_orient()[None], fingers], dim=0)  # (16, 3, 3)
        self.register_buffer("mean_rot6d", matrix_to_rot6d(mats).flatten(), persistent=False)  # (96,)
        self.register_buffer("mean_betas", torch.zeros(NUM_BETAS), persistent=False)  # (10,)

        if hand_path == "hawor":
            # HaWoR's hand modules under their released names (hawor_tune.released_modules): the space-time
            # module over each token across the clip, HaMeR's decoder head, the motion module over the poses.
            self.st_module = TemporalAttention(in_dim=feature_dim + BOX_DIM, out_dim=feature_dim, hidden=D,
                                               layers=temporal_layers, residual=True, gain=LAST_LAYER_GAIN)
            self.mano_head = MANODecoderHead(context_dim=feature_dim, dim=decoder_dim, depth=decoder_layers,
                                             init_pose=self.mean_rot6d, init_cam=self._mean_weak_cam(right),
                                             gain=LAST_LAYER_GAIN)
            self.motion_module = TemporalAttention(in_dim=ROT6D_DIM + BOX_DIM, out_dim=ROT6D_DIM,
                                                   hidden=motion_hidden, layers=motion_layers,
                                                   residual=motion_residual, gain=LAST_LAYER_GAIN)
        elif hand_path != "query":
            raise ValueError(f"hand_path must be 'query' or 'hawor', got {hand_path!r}")

    @staticmethod
    def _mean_weak_cam(right: MANOLayer) -> torch.Tensor:
        """(3,) the (s, tx, ty) of a hand filling its crop (CROP_METRES across) with its wrist at the centre."""
        wrist = right._joint_template[0].detach().float().cpu()  # (3,) rest wrist of the mean shape
        return torch.tensor([2.0 / CROP_METRES, -wrist[0].item(), -wrist[1].item()])

    def train(self, mode: bool = True) -> HaWoR:
        """A wholly frozen backbone stays in evaluation mode (its dropout and batch norm as pretrained)."""
        super().train(mode)
        if mode and not any(p.requires_grad for p in self.backbone.parameters()):
            self.backbone.eval()
        return self

    # ----- stage 1: features -------------------------------------------------------------------------
    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> ImageNet-normalised float."""
        return (images.to(self.pixel_mean.dtype) / 255.0 - self.pixel_mean) / self.pixel_std

    def encode_hands(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 (B, T, 2, 3, C, C) -> (B, T, 2, D) one token per hand crop, and (B, T, 2, 90) the finger path's
        rotation offsets (None without it)."""
        B, T = crops.shape[:2]
        tokens = spatial_tokens(self.backbone, self._normalise(crops.flatten(0, 2)))  # (B*T*2, L, F)
        fingers = None if self.finger_head is None else self.finger_head(tokens.flatten(1)).view(B, T, 2, -1)
        return self.spatial_head(tokens).view(B, T, 2, -1), fingers

    def box(self, crop_K: torch.Tensor) -> torch.Tensor:
        """(B, T, 2, 3, 3) -> (B, T, 2, 3) HaWoR's box code of each crop as the network sees it (the left
        hand's mirrored: its horizontal offset negated)."""
        code = box_code(crop_K, self.crop_size)
        sign = code.new_tensor([[-1.0, 1.0, 1.0] if h == "left" else [1.0, 1.0, 1.0] for h in HANDS])  # (2, 3)
        return code * sign

    def regress_hands_hawor(self, crops: torch.Tensor, box: torch.Tensor, ignore: torch.Tensor) -> torch.Tensor:
        """HaWoR's hand path: uint8 (B, T, 2, 3, C, C) crops, (B, T, 2, 3) box codes and (B, T, 2) frames to
        ignore -> (B, T, 2, P) offsets from the mean in the (mirrored) crop's frame, as the query path's hand
        head gives them. An ignored frame is attended to by no other frame of its hand."""
        B, T = crops.shape[:2]
        tokens = spatial_tokens(self.backbone, self._normalise(crops.flatten(0, 2)))  # (B*T*2, L, F)
        L, F_ = tokens.shape[1:]
        x = tokens.view(B, T, 2, L, F_).permute(0, 2, 3, 1, 4)  # (B, 2, L, T, F)
        boxes = box.permute(0, 2, 1, 3)[:, :, None].expand(-1, -1, L, -1, -1)  # (B, 2, L, T, 3)
        per_hand = ignore.transpose(1, 2)  # (B, 2, T)
        x = self.st_module(torch.cat([x, boxes.to(x.dtype)], dim=-1).flatten(0, 2),
                           ignore=per_hand[:, :, None].expand(-1, -1, L, -1).flatten(0, 2))  # (B*2*L, T, F)
        x = x.view(B, 2, L, T, F_).permute(0, 3, 1, 2, 4).flatten(0, 2)  # (B*T*2, L, F)
        pose, betas, cam = (t.view(B, T, 2, -1) for t in self.mano_head(x))  # (B, T, 2, 96 / 10 / 3)
        motion_in = torch.cat([pose, box.to(pose.dtype)], dim=-1).transpose(1, 2).flatten(0, 1)  # (B*2, T, 99)
        pose = self.motion_module(motion_in, ignore=per_hand.flatten(0, 1)).view(B, 2, T, -1).transpose(1, 2)  # (B, T, 2, 96)
        return self._weak_cam_to_offsets(pose.float(), betas.float(), cam.float())

    def _weak_cam_to_offsets(self, pose: torch.Tensor, betas: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
        """HaMeR's outputs -> (B, T, 2, P) offsets from the mean (rot6d, betas, (log-scale, u, v)).

        HaMeR's camera (s, tx, ty) translates the MANO hand, whose wrist rests at J0(betas), and projects it
        with a focal of 5000 over a 256 px crop: the wrist lands at s (J0 + t) / 2 of the crop side from its
        centre and its depth is 2 f / (C s), so u = s (J0_x + tx), v = s (J0_y + ty) and the log-scale
        offset is log(s CROP_METRES / 2) (see weak_perspective_to_root).
        """
        right = self.mano[HANDS.index("right")]
        wrist = right._joint_template[0] + right._joint_shapedirs[0] @ betas[..., None]  # (B, T, 2, 3, 1)
        s = cam[..., 0].clamp_min(1e-2)  # a flipped scale would put the hand behind the camera
        u = s * (wrist[..., 0, 0] + cam[..., 1])
        v = s * (wrist[..., 1, 0] + cam[..., 2])
        weak = torch.stack([torch.log(s * CROP_METRES / 2), u, v], dim=-1)  # (B, T, 2, 3)
        return torch.cat([pose - self.mean_rot6d, betas - self.mean_betas, weak], dim=-1)

    def encode_frames(self, images: torch.Tensor, flow: torch.Tensor | None) -> torch.Tensor:
        """uint8 (B, T, 3, S, S) frames and (B, T, 2, G, G) flow from frame 0 -> (B, T, D) one camera token
        per frame: the sum of the frame's and the flow's."""
        B, T = images.shape[:2]
        x = self._normalise(images.flatten(0, 1))  # (B*T, 3, S, S)
        if self.camera_backbone is not None:
            feats = self.camera_backbone(x)
        else:
            # The shared backbone's batch-norm statistics stay the hand crops' own: frames updating them
            # too left evaluation normalising crops with a crop-frame mix that training never used.
            with frozen_batch_norm(self.backbone):
                feats = spatial_tokens(self.backbone, x).mean(1)
        tokens = self.camera_proj(feats)  # (B*T, D)
        if self.flow_proj is not None:
            tokens = tokens + self.flow_proj(flow.flatten(0, 1).to(tokens.dtype))
        return tokens.view(B, T, -1)

    # ----- stage 4: heads ----------------------------------------------------------------------------
    def weak_perspective_to_root(self, cam: torch.Tensor, crop_K: torch.Tensor) -> torch.Tensor:
        """Weak-perspective camera (log-scale offset, u, v) in a crop -> camera-frame wrist (metres).

        The scale is s = (2 / CROP_METRES) * exp(offset): the depth tz = 2 f / (C s) (HaMeR's conversion,
        f the crop's focal length in crop pixels, so the box size tells the distance) is
        f * CROP_METRES / C at offset 0. (u, v) in [-1, 1] is the wrist's position in the crop; x and y
        follow from that pixel, the depth and the crop's intrinsics.

        Args:
            cam: (B, T, 2, 3) in the unmirrored crop.
            crop_K: (B, T, 2, 3, 3) intrinsics of each (unmirrored) crop.

        Returns:
            (B, T, 2, 3).
        """
        C = self.crop_size
        fx, fy, cx, cy = crop_K[..., 0, 0], crop_K[..., 1, 1], crop_K[..., 0, 2], crop_K[..., 1, 2]
        tz = fx * CROP_METRES / C * torch.exp(-cam[..., 0])  # (B, T, 2)
        px = (cam[..., 1] + 1) * C / 2 - 0.5  # pixel centres at integers
        py = (cam[..., 2] + 1) * C / 2 - 0.5
        return torch.stack([(px - cx) / fx * tz, (py - cy) / fy * tz, tz], dim=-1)

    def _to_hand_frame(self, canonical: torch.Tensor, crop_K: torch.Tensor) -> torch.Tensor:
        """(B, T, 2, P) offsets regressed in the (mirrored for the left hand) crop -> per-hand parameters
        (rot6d, betas, root in metres) in the camera frame, the left hand mirrored back."""
        rot6d = self.mean_rot6d + canonical[..., :ROT6D_DIM]  # (B, T, 2, 96)
        betas = self.mean_betas + canonical[..., ROT6D_DIM:-3]  # (B, T, 2, 10)
        cam = canonical[..., -3:]  # (B, T, 2, 3), mean (0, 0, 0): crop-filling hand at the crop centre
        left = HANDS.index("left")
        rot6d = torch.stack([rot6d[:, :, h] * self.mirror_rot6d if h == left else rot6d[:, :, h]
                             for h in range(2)], dim=2)
        cam = torch.stack([cam[:, :, h] * self.mirror_cam if h == left else cam[:, :, h] for h in range(2)], dim=2)
        # The global orientation is regressed as seen along the crop's central ray: the same crop shows the
        # same hand pose whether it was cut from the image's centre or its edge, where the camera sees it
        # from a direction up to half the field of view away. Rotate it into the camera's frame.
        ray = self.crop_ray_rotation(crop_K)  # (B, T, 2, 3, 3)
        orient = (ray[..., None, :, :] @ rot6d[..., :6].unflatten(-1, (2, 3))[..., None]).squeeze(-1).flatten(-2)  # (B, T, 2, 6)
        rot6d = torch.cat([orient, rot6d[..., 6:]], dim=-1)
        return torch.cat([rot6d, betas, self.weak_perspective_to_root(cam, crop_K)], dim=-1)

    def crop_ray_rotation(self, crop_K: torch.Tensor) -> torch.Tensor:
        """(..., 3, 3) crop intrinsics -> (..., 3, 3) the smallest rotation taking the optical axis onto the
        ray through the crop's centre pixel (Rodrigues: R = I + [v]x + [v]x^2 / (1 + c), v = z x d, c = z . d)."""
        centre = (self.crop_size - 1) / 2
        d = torch.stack([(centre - crop_K[..., 0, 2]) / crop_K[..., 0, 0],
                         (centre - crop_K[..., 1, 2]) / crop_K[..., 1, 1], torch.ones_like(crop_K[..., 0, 0])], dim=-1)
        d = d / d.norm(dim=-1, keepdim=True)  # (..., 3)
        zero = torch.zeros_like(d[..., 0])
        # v = (0, 0, 1) x d = (-d_y, d_x, 0)
        vx = torch.stack([torch.stack([zero, zero, d[..., 0]], -1), torch.stack([zero, zero, d[..., 1]], -1),
                          torch.stack([-d[..., 0], -d[..., 1], zero], -1)], dim=-2)  # (..., 3, 3) = [v]x
        eye = torch.eye(3, dtype=d.dtype, device=d.device)
        return eye + vx + vx @ vx / (1 + d[..., 2])[..., None, None]

    def mean_params(self, crop_K: torch.Tensor) -> torch.Tensor:
        """(B, T, 2, 3, 3) -> (B, T, 2, PARAM_DIM) the mean parameters of every hand-frame."""
        return self._to_hand_frame(crop_K.new_zeros(*crop_K.shape[:3], PARAM_DIM), crop_K)

    def regress_camera(self, h: torch.Tensor, flow: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, D) tokens and (B, T, 2, G, G) flow -> cam_R (B, T, 3, 3), cam_t (B, T, 3): pose of camera t
        in camera 0."""
        B, T, _ = h.shape
        identity = torch.eye(3, dtype=h.dtype, device=h.device).expand(B, 1, 3, 3)
        zero = h.new_zeros(B, 1, 3)
        if T == 1:
            return identity, zero
        pair = torch.cat([h[:, 1:], h[:, :1].expand(-1, T - 1, -1)], dim=-1)  # (B, T-1, 2D)
        delta = self.camera_head(pair)  # (B, T-1, 9)
        if self.flow_head is not None:
            R, t = self.flow_head.path(flow.to(delta.dtype))  # (B, T-1, 3, 3), (B, T-1, 3)
            delta = delta + torch.cat([matrix_to_rot6d(R) - matrix_to_rot6d(identity[0, 0]), t], dim=-1)
        # A smooth path: the offsets from frame 0 projected onto polynomials through the origin.
        projection = polynomial_projection(T, self._degree(self.camera_trajectory_degree), through_origin=True,
                                           device=h.device)
        delta = _smooth_over_time(delta, None if projection is None else projection[1:, 1:])
        rot6d = matrix_to_rot6d(identity) + delta[..., :6]  # (B, T-1, 6) offset from no rotation
        # Frame 0 is the reference: identity and zero by construction, not by learning.
        cam_R = torch.cat([identity, rot6d_to_matrix(rot6d)], dim=1)  # (B, T, 3, 3)
        cam_t = torch.cat([zero, delta[..., 6:]], dim=1)  # (B, T, 3)
        return cam_R, cam_t

    # ----- stage 5: infiller -------------------------------------------------------------------------
    def _degree(self, degree: int) -> int:
        """A trajectory degree as it applies now: 0 (every frame free) while training, unless
        ``smooth_in_training``."""
        return degree if self.smooth_in_training or not self.training else 0

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

    def infill(self, params: torch.Tensor, observed: torch.Tensor, cam_R: torch.Tensor,
               cam_t: torch.Tensor) -> torch.Tensor:
        """Replace the unobserved frames of each hand, filled in the clip's first camera (the clip's world):
        there a still hand stays still while the head turns, as in HaWoR's world-frame infiller.

        Each hand's parameters (wrist, global orientation, fingers, betas) go to the first camera through the
        predicted camera poses; an unobserved frame starts from the interpolation between the nearest
        observed frames (held at the clip's ends), and the LSTM infiller adds a residual read from the observed
        frames, or HaWoR's infiller predicts it (:meth:`_infill_hawor`). The result goes back to the frame's
        own camera. Nothing of an unobserved frame (its crop,
        its box) enters: an infilled hand is placed by its neighbours and the camera alone. With
        ``hand_trajectory_degree`` set, every frame's parameters in the first camera are then projected onto
        polynomials in time of that degree.

        Args:
            params: (B, T, 2, P) regressed parameters (rot6d, betas, camera-frame wrist in metres).
            observed: (B, T, 2) bool.
            cam_R: (B, T, 3, 3), cam_t: (B, T, 3) pose of camera t in camera 0.

        Returns:
            (B, T, 2, P): params where observed, infilled elsewhere; a hand observed nowhere in the clip keeps
            its regressed parameters.
        """
        world = _to_first_camera(params, cam_R, cam_t)  # (B, T, 2, P)
        if self.infiller is not None:
            filled = self._infill_hawor(world, observed)
        else:
            anchor = interpolate_observed(world, observed)  # (B, T, 2, P)
            weight = observed[..., None].to(world.dtype)  # (B, T, 2, 1)
            ref = (world * weight).sum(1, keepdim=True) / weight.sum(1, keepdim=True).clamp_min(1.0)  # (B, 1, 2, P)
            residual = torch.stack([infiller(world[:, :, i] - ref[:, :, i], observed[:, :, i])
                                    for i, infiller in enumerate(self.infillers)], dim=2)  # (B, T, 2, P)
            filled = anchor + residual
        keep = observed | ~observed.any(dim=1, keepdim=True)  # (B, T, 2)
        projection = polynomial_projection(params.shape[1], self._degree(self.hand_trajectory_degree),
                                           device=params.device)
        if projection is None:
            return torch.where(keep[..., None], params, _from_first_camera(filled, cam_R, cam_t))
        # Smooth motion where the world is: every frame's hand, observed or filled, on one polynomial path.
        world = torch.where(keep[..., None], world, filled)
        return _from_first_camera(_smooth_over_time(world, projection), cam_R, cam_t)

    def _rest_wrists(self, betas: torch.Tensor) -> torch.Tensor:
        """(..., 2, 10) betas -> (..., 2, 3) each hand's MANO wrist J0(betas) at zero translation."""
        return torch.stack([layer._joint_template[0].to(betas.dtype)
                            + (layer._joint_shapedirs[0].to(betas.dtype) @ betas[..., i, :, None]).squeeze(-1)
                            for i, layer in enumerate(self.mano)], dim=-2)

    def _infill_hawor(self, world: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """(B, T, 2, P) parameters in the clip's first camera, (B, T, 2) observed -> (B, T, 2, P) HaWoR's
        infiller's prediction of every frame, in windows of its length.

        As ``hawor_infiller`` (scripts/scripts_test_video/hawor_video.py) and ``filling_preprocess`` /
        ``filling_postprocess`` (lib/eval_utils/filling_utils.py) of ThunderVVV/HaWoR do: per hand, the window's
        frames in the canonical frame of its first frame (there its global orientation is the identity and its
        MANO translation zero), unobserved frames interpolated (translation and betas linearly, rotations along
        the shortest arc), each hand as MANO translation (wrist - J0(betas)), betas, global orientation and 15
        fingers in HaWoR's 6D, left then right; a frame counts as observed when both hands are; a short
        window is padded with its last frame, counted as observed. A hand observed nowhere in the clip enters
        as HaWoR's unfilled zeros (identity rotations): its regressions are never read.
        """
        B, T = world.shape[:2]
        window = self.infiller.window
        to_hawor = world.new_tensor(HAWOR_FROM_OUR_ROT6D, dtype=torch.long)
        to_ours = world.new_tensor(OUR_FROM_HAWOR_ROT6D, dtype=torch.long)
        rot = slerp_observed(rot6d_to_matrix(world[..., :ROT6D_DIM].unflatten(-1, (NUM_ROTATIONS, 6))),
                              observed)  # (B, T, 2, 16, 3, 3)
        lerped = interpolate_observed(world[..., ROT6D_DIM:], observed)  # (B, T, 2, 13): betas, wrist
        seen = observed.any(dim=1, keepdim=True)[..., None]  # (B, 1, 2, 1)
        unfilled = torch.cat([world.new_zeros(3 + NUM_BETAS),
                              world.new_tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0]).repeat(NUM_ROTATIONS)])  # (109,)
        out = []
        for start in range(0, T, window):
            end = min(start + window, T)
            R, betas, wrist = rot[:, start:end], lerped[:, start:end, :, :NUM_BETAS], lerped[:, start:end, :, NUM_BETAS:]
            R0, wrist0 = R[:, :1, :, 0], wrist[:, :1]  # (B, 1, 2, 3, 3), (B, 1, 2, 3)
            rest = self._rest_wrists(betas)  # (B, t, 2, 3)
            rest0 = rest[:, :1]
            canon_R = torch.cat([R0.transpose(-1, -2)[:, :, :, None] @ R[..., :1, :, :], R[..., 1:, :, :]], dim=-3)
            trans = (R0.transpose(-1, -2) @ (wrist - wrist0)[..., None]).squeeze(-1) + rest0 - rest
            hand = torch.cat([trans, betas, matrix_to_rot6d(canon_R)[..., to_hawor].flatten(-2)], dim=-1)  # (B, t, 2, 109)
            hand = torch.where(seen, hand, unfilled)
            x, both = hand.flatten(-2), observed[:, start:end].all(dim=-1)  # (B, t, 218), (B, t)
            pad = window - (end - start)
            x = torch.cat([x, x[:, -1:].expand(-1, pad, -1)], dim=1)  # (B, window, 218)
            both = torch.cat([both, both.new_ones(B, pad)], dim=1)
            y = self.infiller(x, both)[:, :end - start].unflatten(-1, (2, -1))  # (B, t, 2, 109)
            y_trans, y_betas, y_rot = y[..., :3], y[..., 3:3 + NUM_BETAS], y[..., 3 + NUM_BETAS:]
            y_rot = y_rot.unflatten(-1, (NUM_ROTATIONS, 6))[..., to_ours]  # (B, t, 2, 16, 6), ours
            orient = (R0[:, :, :, None] @ y_rot[..., 0, :].unflatten(-1, (2, 3))[..., None]).squeeze(-1)  # (B, t, 2, 2, 3)
            y_wrist = (R0 @ (y_trans + self._rest_wrists(y_betas) - rest0)[..., None]).squeeze(-1) + wrist0
            out.append(torch.cat([orient.flatten(-2), y_rot[..., 1:, :].flatten(-2), y_betas, y_wrist], dim=-1))
        return torch.cat(out, dim=1)

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

    def forward(self, crops: torch.Tensor, crop_K: torch.Tensor, images: torch.Tensor,
                hand_valid: torch.Tensor, flow: torch.Tensor | None = None) -> HaWoROutput:
        """Predict hands and camera motion for a batch of clips.

        Args:
            crops: uint8 (B, T, 2, 3, C, C) hand crops (left mirrored), as the data module gives them.
            crop_K: (B, T, 2, 3, 3) intrinsics of each unmirrored crop.
            images: uint8 (B, T, 3, S, S) whole frames.
            hand_valid: bool (B, T, 2), hands (left, right) visible in each frame.
            flow: (B, T, 2, G, G) optical flow from each clip's first frame (hawor_tune.data.flow); required
                when the model was built with flow_grid G > 0, ignored otherwise.

        Returns:
            HaWoROutput.
        """
        self._check_inputs(crops, crop_K, images, hand_valid, flow)
        B, T = crops.shape[:2]
        observed = self.observed_mask(hand_valid)
        crop_K = crop_K.to(self.pixel_mean.dtype)  # full precision even under autocast
        box = self.box(crop_K)  # (B, T, 2, 3)
        camera = self.encode_frames(images, flow)  # (B, T, D)
        # A frame treated as unobserved informs no other frame (its crop may show nothing, or be hidden for
        # the infiller); a hand observed nowhere in the clip is left unmasked, as attention needs a key.
        ignore = ~observed & observed.any(dim=1, keepdim=True)  # (B, T, 2)
        if self.hand_path == "hawor":
            canonical = self.regress_hands_hawor(crops, box, ignore)  # (B, T, 2, P)
        else:
            hands, fingers = self.encode_hands(crops)
            hands = hands + self.box_proj(box)  # (B, T, 2, D)
            if self.fusion is not None:
                tokens = self.fusion(torch.cat([hands, camera[:, :, None]], dim=2).flatten(0, 1),
                                     observed.flatten(0, 1)).view(B, T, 3, -1)
                hands, camera = tokens[:, :, :2], tokens[:, :, 2]
            h = self.hand_temporal(hands.transpose(1, 2).flatten(0, 1), ignore=ignore.transpose(1, 2).flatten(0, 1)
                                   ).view(B, 2, T, -1).transpose(1, 2)  # (B, T, 2, D)
            canonical = self.hand_head(h)
            if fingers is not None:
                canonical = torch.cat([canonical[..., :6], canonical[..., 6:ROT6D_DIM] + fingers.to(canonical.dtype),
                                       canonical[..., ROT6D_DIM:]], dim=-1)
        camera = self.camera_temporal(camera)  # (B, T, D)

        # Geometry in float32 even under autocast, from the heads on: bf16's 8-bit mantissa steps a wrist
        # 0.4 m away (and a camera path) by ~1.5 mm from frame to frame, which the acceleration metrics and the
        # motion losses read as shaking.
        with torch.autocast(device_type=crops.device.type, enabled=False):
            params = self._to_hand_frame(canonical.float(), crop_K)  # (B, T, 2, P)
            cam_R, cam_t = self.regress_camera(camera.float(), flow)
            params = self.infill(params, observed, cam_R.detach(), cam_t.detach())
            rot6d = params[..., :ROT6D_DIM].reshape(B, T, 2, NUM_ROTATIONS, 6)
            betas = params[..., ROT6D_DIM:-3]
            root = params[..., -3:]
            rotmats = rot6d_to_matrix(rot6d)  # (B, T, 2, 16, 3, 3)
            joints, vertices = self.run_mano(rotmats, betas, root)
        return HaWoROutput(rot6d=rot6d, rotmats=rotmats, betas=betas, root=root, joints=joints,
                           vertices=vertices, cam_R=cam_R, cam_t=cam_t, observed=observed)

    def _check_inputs(self, crops: torch.Tensor, crop_K: torch.Tensor, images: torch.Tensor,
                      hand_valid: torch.Tensor, flow: torch.Tensor | None) -> None:
        C, S = self.crop_size, self.img_size
        if crops.dtype != torch.uint8 or crops.dim() != 6 or tuple(crops.shape[2:]) != (2, 3, C, C):
            raise ValueError(f"crops must be uint8 (B, T, 2, 3, {C}, {C}), got {crops.dtype} {tuple(crops.shape)}")
        B, T = crops.shape[:2]
        if images.dtype != torch.uint8 or tuple(images.shape) != (B, T, 3, S, S):
            raise ValueError(f"images must be uint8 ({B}, {T}, 3, {S}, {S}), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if tuple(crop_K.shape) != (B, T, 2, 3, 3):
            raise ValueError(f"crop_K must be ({B}, {T}, 2, 3, 3), got {tuple(crop_K.shape)}")
        if hand_valid.dtype != torch.bool or tuple(hand_valid.shape) != (B, T, 2):
            raise ValueError(f"hand_valid must be bool ({B}, {T}, 2), got {hand_valid.dtype} "
                             f"{tuple(hand_valid.shape)}")
        G = self.flow_grid
        if G and (flow is None or not flow.is_floating_point() or tuple(flow.shape) != (B, T, 2, G, G)):
            got = "none" if flow is None else f"{flow.dtype} {tuple(flow.shape)}"
            raise ValueError(f"flow must be float ({B}, {T}, 2, {G}, {G}) (data.flow_grid = {G}), got {got}")


MODEL_INPUTS = ("crops", "crop_K", "images", "hand_valid")


def run_model(model: nn.Module, batch: dict[str, torch.Tensor]) -> HaWoROutput:
    """The model's forward pass on a data batch (the one place that knows which batch keys it reads)."""
    return model(*(batch[k] for k in MODEL_INPUTS), flow=batch.get("flow"))


# The modules HaWoR's hand path builds in the released shapes, under the released names: loaded whole from
# HaMeR's checkpoint (mano_head) or HaWoR's (all three) when the file holds them.
RELEASED_MODULES = ("st_module", "mano_head", "motion_module")


def build_model(cfg: ExperimentConfig, *, pretrained: bool = True, device: str | torch.device | None = None) -> HaWoR:
    """Build the model described by ``cfg.model`` for ``cfg.data``'s crops and frames and ``cfg.mano``'s hands.

    Args:
        cfg: experiment config.
        pretrained: load ``model.pretrained_path`` and ``model.infiller_path`` when they are set (a checkpoint
            being restored does not need them). The parts it filled are recorded in ``model.pretrained_parts``, and what it loaded
            and left fresh in ``model.pretrained_report`` (a :class:`hawor_tune.pretrained.LoadReport`).
        device: where to build the network (``"meta"`` builds a full-size model without allocating it;
            the MANO layers are computed on the CPU and moved there).

    Raises:
        ConfigError: unknown backbone, weights that do not fit it or the HaWoR infiller, or blocks to train that it
            lacks.
        MissingFileError: model.pretrained_path or model.infiller_path names a file that does not exist.
    """
    m, d = cfg.model, cfg.data
    mano_layers = tuple(build_mano(cfg.mano, side) for side in HANDS)
    with torch.device(device or "cpu"):  # the large parts; the rest is built on the CPU and moved
        backbone = create_backbone(m.backbone, d.crop_size, dict(m.backbone_kwargs))
        camera_backbone = (create_backbone(m.camera_backbone, d.img_size, dict(m.backbone_kwargs)
                                           if m.camera_backbone == m.backbone else {}) if m.camera_backbone else None)
        num_tokens = token_count(backbone, d.crop_size)
    model = HaWoR(backbone=backbone, feature_dim=backbone.num_features, num_tokens=num_tokens, crop_size=d.crop_size,
                  camera_backbone=camera_backbone, camera_feature_dim=(camera_backbone or backbone).num_features,
                  img_size=d.img_size, flow_grid=d.flow_grid, mano_layers=mano_layers, hand_fusion=m.hand_fusion,
                  temporal_dim=m.temporal_dim, temporal_layers=m.temporal_layers, temporal_heads=m.temporal_heads,
                  head_hidden=m.head_hidden, dropout=m.dropout, infiller_hidden=m.infiller_hidden,
                  infiller_layers=m.infiller_layers, infill_mask_prob=m.infill_mask_prob, hand_path=m.hand_path,
                  decoder_dim=m.decoder_dim, decoder_layers=m.decoder_layers, motion_hidden=m.motion_hidden,
                  motion_layers=m.motion_layers, motion_residual=m.motion_residual,
                  hand_trajectory_degree=m.hand_trajectory_degree, camera_trajectory_degree=m.camera_trajectory_degree,
                  smooth_in_training=m.smooth_in_training, finger_path=m.finger_path, infiller=m.infiller)
    if device is not None:
        model.to(device)
    model.pretrained_parts, model.pretrained_report = (), None
    if pretrained and m.pretrained_path:
        report = load_pretrained(model, m.pretrained_path,
                                 released_modules=RELEASED_MODULES if m.hand_path == "hawor" else ())
        model.pretrained_parts, model.pretrained_report = tuple(report.loaded), report
    if pretrained and m.infiller_path:  # after the start, which may hold an infiller of its own
        report = load_hawor_infiller(model, m.infiller_path, model.pretrained_report)
        model.pretrained_parts, model.pretrained_report = tuple(report.loaded), report
    if m.freeze_backbone:
        freeze_backbone(backbone, m.trainable_blocks)
    if m.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    # Convolution weights channels-last, so their outputs are too: oneDNN (CPU) and cuDNN then convolve and
    # pool without reordering every activation to and from their blocked layouts (same results up to rounding).
    return model.to(memory_format=torch.channels_last)
