"""HaMeR's and HaWoR's hand modules, rebuilt with their released layers and state-dict names.

So that HaMeR's checkpoint (``mano_head.*``), HaWoR's (``st_module.*``, ``motion_module.*``, ``mano_head.*``)
and HaWoR's infiller (``infiller.pt``) load into them unchanged:

- :class:`MANODecoderHead`: HaMeR's ``MANOTransformerDecoderHead`` (geopavlakos/hamer
  ``hamer/models/heads/mano_head.py`` and ``hamer/models/components/pose_transformer.py``): one zero token,
  6 pre-norm layers of self-attention, cross-attention to the ViT's tokens and an MLP, then linear
  residuals on the mean pose (16 x 6D), betas and weak-perspective camera (s, tx, ty).
- :class:`TemporalAttention`: HaWoR's ``temporal_attention`` (ThunderVVV/HaWoR ``lib/models/modules.py``):
  linear in, sinusoidal positions, a post-norm transformer encoder over time, linear out, optionally
  residual; HaWoR's ``st_module`` runs it over each ViT token across the clip, its ``motion_module`` over
  the pose sequence.
- :class:`HaWoRInfiller`: HaWoR's motion infiller (ThunderVVV/HaWoR ``infiller/lib/model/network.py``,
  ``TransformerModel`` with its masked-attention stage): both hands' MANO parameters over a 120-frame window,
  every frame attending to the observed ones, then to all.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# HaWoR's CLIFF-style box code (``bbox_est`` in lib/models/hawor.py): the crop's centre relative to the
# principal point over the focal length, x 2.8, and its side b as (b - 0.24 f) / (0.06 f).
BOX_CENTRE_GAIN = 2.8
BOX_SIDE_MEAN, BOX_SIDE_SCALE = 0.24, 0.06
BOX_DIM = 3


def box_code(crop_K: torch.Tensor, crop_size: int) -> torch.Tensor:
    """(..., 3, 3) crop intrinsics -> (..., 3) HaWoR's code of where the crop lies in the undistorted image.

    A crop of side b image pixels cut at (x0, y0) from an image with focal f and principal point (px, py)
    has intrinsics fx' = f C / b and px' = (px - x0) C / b, so the crop centre's offset from the principal
    point over f is ((C - 1) / 2 - px') / fx' and b / f = C / fx'.
    """
    centre = (crop_size - 1) / 2
    fx, fy = crop_K[..., 0, 0], crop_K[..., 1, 1]
    dx = (centre - crop_K[..., 0, 2]) / fx
    dy = (centre - crop_K[..., 1, 2]) / fy
    side = crop_size / fx
    return torch.stack([dx * BOX_CENTRE_GAIN, dy * BOX_CENTRE_GAIN,
                        (side - BOX_SIDE_MEAN) / BOX_SIDE_SCALE], dim=-1)


# ----------------------------------------------------------------------------------------------------------
# HaMeR's MANO head
# ----------------------------------------------------------------------------------------------------------

class _PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.fn(self.norm(x), **kwargs)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*d) -> (B, H, N, d)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_heads(t, self.heads) for t in self.to_qkv(x).chunk(3, dim=-1))
        out = nn.functional.scaled_dot_product_attention(q, k, v)  # (B, H, N, d), scale d^-1/2 as HaMeR's
        return self.to_out(out.transpose(1, 2).flatten(2))


class _CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_kv = nn.Linear(context_dim, 2 * heads * dim_head, bias=False)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        k, v = (_heads(t, self.heads) for t in self.to_kv(context).chunk(2, dim=-1))
        q = _heads(self.to_q(x), self.heads)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim),
                                 nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _CrossAttnTransformer(nn.Module):
    def __init__(self, *, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, context_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleList([
            _PreNorm(dim, _Attention(dim, heads, dim_head)),
            _PreNorm(dim, _CrossAttention(dim, context_dim, heads, dim_head)),
            _PreNorm(dim, _FeedForward(dim, mlp_dim))]) for _ in range(depth))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for self_attn, cross_attn, ff in self.layers:
            x = self_attn(x) + x
            x = cross_attn(x, context=context) + x
            x = ff(x) + x
        return x


class _TokenDecoder(nn.Module):
    """HaMeR's ``TransformerDecoder`` with one token of width 1 (its input is always zero)."""

    def __init__(self, *, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, context_dim: int) -> None:
        super().__init__()
        self.to_token_embedding = nn.Linear(1, dim)
        self.pos_embedding = nn.Parameter(torch.randn(1, 1, dim))
        self.transformer = _CrossAttnTransformer(dim=dim, depth=depth, heads=heads, dim_head=dim_head,
                                                 mlp_dim=mlp_dim, context_dim=context_dim)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """(N, L, context_dim) -> (N, dim)."""
        token = context.new_zeros(context.shape[0], 1, 1)
        x = self.to_token_embedding(token) + self.pos_embedding
        return self.transformer(x, context)[:, 0]


class MANODecoderHead(nn.Module):
    """HaMeR's MANO head: the decoded token -> mean + residual pose (16 x 6D), betas (10), camera (s, tx, ty).

    The mean parameters are buffers (HaMeR's ``init_hand_pose``, ``init_betas``, ``init_cam``, from its
    ``mano_mean_params.npz``); a fresh head holds the mean given at construction and its output layers
    start small, so that it predicts that mean.

    Args:
        context_dim: width of the backbone's tokens.
        dim, depth, heads, dim_head: the decoder (HaMeR: 1024, 6, 8, 64); its MLP is ``dim`` wide, as HaMeR's.
        init_pose: (96,) mean rotations in 6D; init_cam: (3,) mean (s, tx, ty).
    """

    def __init__(self, *, context_dim: int, dim: int = 1024, depth: int = 6, heads: int = 8, dim_head: int = 64,
                 init_pose: torch.Tensor, init_cam: torch.Tensor, gain: float) -> None:
        super().__init__()
        self.transformer = _TokenDecoder(dim=dim, depth=depth, heads=heads, dim_head=dim_head, mlp_dim=dim,
                                         context_dim=context_dim)
        self.decpose = nn.Linear(dim, init_pose.numel())
        self.decshape = nn.Linear(dim, 10)
        self.deccam = nn.Linear(dim, 3)
        for layer in (self.decpose, self.decshape, self.deccam):
            nn.init.xavier_uniform_(layer.weight, gain=gain)
            nn.init.zeros_(layer.bias)
        self.register_buffer("init_hand_pose", init_pose.reshape(1, -1).clone())
        self.register_buffer("init_betas", torch.zeros(1, 10))
        self.register_buffer("init_cam", init_cam.reshape(1, 3).clone())

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, L, F) -> pose (N, 96), betas (N, 10), cam (N, 3)."""
        t = self.transformer(tokens)  # (N, dim)
        return (self.decpose(t) + self.init_hand_pose, self.decshape(t) + self.init_betas,
                self.deccam(t) + self.init_cam)


# ----------------------------------------------------------------------------------------------------------
# HaWoR's temporal attention
# ----------------------------------------------------------------------------------------------------------

class _PositionalEncoding(nn.Module):
    """Sinusoidal positions, sequence-first (max_len, 1, dim): sine on even channels, cosine on odd."""

    def __init__(self, dim: int, dropout: float, max_len: int) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        position = torch.arange(max_len, dtype=torch.float32)[:, None]
        div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        pe = torch.zeros(max_len, 1, dim)
        pe[:, 0, 0::2] = torch.sin(position * div)
        pe[:, 0, 1::2] = torch.cos(position * div)
        self.register_buffer("pe", pe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(T, N, dim) -> (T, N, dim)."""
        return self.dropout(x + self.pe[:x.shape[0]])


class TemporalAttention(nn.Module):
    """HaWoR's ``temporal_attention``: (N, T, in_dim) -> (N, T, out_dim), attention over T.

    With ``residual`` the output is ``x[..., :out_dim] + h`` (the module refines its input), else ``h``.
    The last layer starts small, so a fresh residual module passes its input through.
    """

    def __init__(self, *, in_dim: int, out_dim: int, hidden: int, layers: int, residual: bool, gain: float,
                 heads: int = 4, ff_dim: int = 1024, dropout: float = 0.1, max_len: int = 100) -> None:
        super().__init__()
        self.residual, self.out_dim, self.max_len = residual, out_dim, max_len
        self.l1 = nn.Linear(in_dim, hidden)
        self.l2 = nn.Linear(hidden, out_dim)
        nn.init.xavier_uniform_(self.l2.weight, gain=gain)
        nn.init.zeros_(self.l2.bias)
        self.pos_embedding = _PositionalEncoding(hidden, dropout, max_len)
        layer = nn.TransformerEncoderLayer(d_model=hidden, nhead=heads, dim_feedforward=ff_dim, dropout=dropout,
                                           activation="gelu")
        self.trans = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor, ignore: torch.Tensor | None = None) -> torch.Tensor:
        """(N, T, in_dim), optional (N, T) bool frames no other frame may attend to -> (N, T, out_dim)."""
        if x.shape[1] > self.max_len:
            raise ValueError(f"clip of {x.shape[1]} frames is longer than HaWoR's temporal module's "
                             f"{self.max_len} positions")
        x = x.transpose(0, 1)  # (T, N, in_dim)
        h = self.l2(self.trans(self.pos_embedding(self.l1(x)), src_key_padding_mask=ignore))  # (T, N, out_dim)
        out = x[..., :self.out_dim] + h if self.residual else h
        return out.transpose(0, 1)


# ----------------------------------------------------------------------------------------------------------
# HaWoR's motion infiller
# ----------------------------------------------------------------------------------------------------------

# HaWoR's infiller.pt: TransformerModel(seq_len=120, input_dim=218, d_model=384, nhead=8, d_hid=2048, nlayers=8,
# dropout=0.05, out_dim=218, masked_attention_stage=True) under the file's 'transformer_encoder_state_dict'
# (ThunderVVV/HaWoR, scripts/scripts_test_video/hawor_video.py, hawor_infiller).
HAWOR_INFILLER_KEY = "transformer_encoder_state_dict"
HAWOR_INFILLER_WINDOW = 120
HAWOR_INFILLER_HAND_DIM = 3 + 10 + 16 * 6  # MANO transl, betas, global orientation and 15 fingers in 6D
HAWOR_INFILLER_DIM = 2 * HAWOR_INFILLER_HAND_DIM  # left hand, then right


class _MaskedAttention(nn.Module):
    """HaWoR's ``MultiHeadedAttention`` (pre-norm, no biases). As released, the scores are scaled by
    1/sqrt(d_model), not 1/sqrt(d_head), and the residual adds the attention to the NORMALISED input."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.scale = heads, 1 / math.sqrt(dim)
        self.q_linear = nn.Linear(dim, dim, bias=False)
        self.k_linear = nn.Linear(dim, dim, bias=False)
        self.v_linear = nn.Linear(dim, dim, bias=False)
        self.out_linear = nn.Linear(dim, dim, bias=False)
        self.droput_layer = nn.Dropout(dropout)  # sic: the released name
        self.atten_dropout_layer = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, ignore: torch.Tensor) -> torch.Tensor:
        """(B, T, dim), (B, 1, T, T) bool True where a query may not read a key -> (B, T, dim)."""
        x = self.layer_norm(x)
        q, k, v = (_heads(f(x), self.heads) for f in (self.q_linear, self.k_linear, self.v_linear))  # (B, H, T, d)
        score = (q @ k.transpose(-1, -2) * self.scale).masked_fill(ignore, float("-inf"))  # (B, H, T, T)
        out = self.atten_dropout_layer(score.softmax(-1)) @ v  # (B, H, T, d)
        return x + self.droput_layer(self.out_linear(out.transpose(1, 2).flatten(2)))


class _PositionwiseFeedForward(nn.Module):
    """HaWoR's ``FeedForward``, pre-norm: x + W2 relu(W1 LN(x))."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(dim)
        self.network = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                     nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.network(self.layer_norm(x))


class HaWoRInfiller(nn.Module):
    """HaWoR's motion infiller, ``TransformerModel`` with ``masked_attention_stage=True`` (ThunderVVV/HaWoR
    ``infiller/lib/model/network.py``): (B, T, in_dim) two-hand windows and their observed frames ->
    (B, T, out_dim), T <= window.

    The observed flag is appended to every frame; linear in, sinusoidal positions; ``layers`` pre-norm blocks
    in which every frame attends to the observed frames only, a final norm; then a post-norm GELU transformer
    encoder over all frames (its ``src_mask`` is never applied upstream) and a linear out. The defaults are
    the released ones. A window with no observed frame, which HaWoR never runs (its scores would all be
    -inf, a NaN), attends to every frame instead.
    """

    def __init__(self, *, window: int = HAWOR_INFILLER_WINDOW, in_dim: int = HAWOR_INFILLER_DIM, dim: int = 384,
                 heads: int = 8, ff_dim: int = 2048, layers: int = 8, dropout: float = 0.05,
                 out_dim: int = HAWOR_INFILLER_DIM) -> None:
        super().__init__()
        self.window = window
        self.pos_embedding = _PositionalEncoding(dim, 0.1, window)
        self.input_layer = nn.Linear(in_dim + 1, dim)
        self.att_layers = nn.ModuleList(_MaskedAttention(dim, heads, dropout) for _ in range(layers))
        self.pff_layers = nn.ModuleList(_PositionwiseFeedForward(dim, ff_dim, dropout) for _ in range(layers))
        self.layer_norm = nn.LayerNorm(dim)
        layer = nn.TransformerEncoderLayer(dim, heads, ff_dim, dropout, activation="gelu")
        self.transformer_encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.decoder = nn.Linear(dim, out_dim)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)  # HaWoR's init_weights
        nn.init.zeros_(self.decoder.bias)

    def forward(self, x: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """(B, T, in_dim), (B, T) bool -> (B, T, out_dim)."""
        if x.shape[1] > self.window:
            raise ValueError(f"a window of {x.shape[1]} frames is longer than HaWoR's infiller's {self.window}")
        flag = observed[..., None].to(x.dtype)  # (B, T, 1)
        h = self.pos_embedding(self.input_layer(torch.cat([x, flag], dim=-1)).transpose(0, 1)).transpose(0, 1)
        ignore = ~observed & observed.any(dim=1, keepdim=True)  # (B, T) keys no frame reads
        ignore = ignore[:, None, None, :].expand(-1, 1, x.shape[1], -1)  # (B, 1, T, T)
        for attend, feed_forward in zip(self.att_layers, self.pff_layers):
            h = feed_forward(attend(h, ignore))  # (B, T, dim)
        h = self.transformer_encoder(self.layer_norm(h).transpose(0, 1))  # (T, B, dim)
        return self.decoder(h).transpose(0, 1)
