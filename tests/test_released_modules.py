"""HaWoR's infiller rebuilt: its released names and shapes, and the forward HaWoR's layers compute."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import hawor_infiller_shapes, hawor_infiller_state

from hawor_tune.released_modules import HaWoRInfiller

DIM, LAYERS, FF, HEADS = 32, 2, 64, 8


def _reference_infiller(s: dict, x: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """HaWoR's ``TransformerModel.forward`` with ``masked_attention_stage`` written from its layer definitions
    (ThunderVVV/HaWoR infiller/lib/model/network.py), sequence-first as there: (T, B, 218) -> (T, B, 218).

    The observed flag appended; input_layer and ``pe``; per layer ``MultiHeadedAttention`` (pre-norm, scores
    over sqrt(d_model), keys of unobserved frames masked, the residual on the normalised input) and
    ``FeedForward`` (pre-norm ReLU MLP); a LayerNorm; torch's post-norm GELU encoder layers unmasked; decoder."""
    T, B, _ = x.shape
    D = s["input_layer.weight"].shape[0]
    d = D // HEADS

    def ln(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(t, (D,), s[name + ".weight"], s[name + ".bias"])

    def heads(t: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, H, T, d)
        return t.reshape(B, T, HEADS, d).transpose(1, 2)

    data_mask = observed.T[..., None].float()  # (T, B, 1)
    h = F.linear(torch.cat([x, data_mask], dim=-1), s["input_layer.weight"], s["input_layer.bias"])
    h = (h + s["pos_embedding.pe"][:T]).permute(1, 0, 2)  # (B, T, D)
    mask = (~observed)[:, None, None, :]  # (B, 1, 1, T): True where a key is not observed
    for i in range(LAYERS):
        a, f = f"att_layers.{i}.", f"pff_layers.{i}."
        n = ln(h, a + "layer_norm")
        q, k, v = (heads(n @ s[a + f"{w}_linear.weight"].T) for w in "qkv")
        score = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(mask, float("-inf")).softmax(-1)
        h = n + (score @ v).transpose(1, 2).reshape(B, T, D) @ s[a + "out_linear.weight"].T
        inner = F.relu(F.linear(ln(h, f + "layer_norm"), s[f + "network.0.weight"], s[f + "network.0.bias"]))
        h = h + F.linear(inner, s[f + "network.3.weight"], s[f + "network.3.bias"])
    h = ln(h, "layer_norm")  # (B, T, D)
    for i in range(LAYERS):
        e = f"transformer_encoder.layers.{i}."
        q, k, v = F.linear(h, s[e + "self_attn.in_proj_weight"], s[e + "self_attn.in_proj_bias"]).chunk(3, dim=-1)
        att = ((heads(q) @ heads(k).transpose(-1, -2)) / math.sqrt(d)).softmax(-1) @ heads(v)
        att = F.linear(att.transpose(1, 2).reshape(B, T, D), s[e + "self_attn.out_proj.weight"], s[e + "self_attn.out_proj.bias"])
        h = ln(h + att, e + "norm1")
        ff = F.linear(F.gelu(F.linear(h, s[e + "linear1.weight"], s[e + "linear1.bias"])), s[e + "linear2.weight"],
                      s[e + "linear2.bias"])
        h = ln(h + ff, e + "norm2")
    return F.linear(h, s["decoder.weight"], s["decoder.bias"]).permute(1, 0, 2)


def test_the_infiller_has_hawors_released_names_and_shapes_at_full_size():
    with torch.device("meta"):
        infiller = HaWoRInfiller()
    assert {k: tuple(v.shape) for k, v in infiller.state_dict().items()} == hawor_infiller_shapes()
    assert infiller.window == 120


def test_the_infiller_computes_what_hawors_layers_compute():
    state = hawor_infiller_state(dim=DIM, layers=LAYERS, ff_dim=FF)
    infiller = HaWoRInfiller(dim=DIM, layers=LAYERS, ff_dim=FF)
    infiller.load_state_dict(state)  # strict: every released name, nothing else
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 120, 218, generator=g)
    observed = torch.rand(3, 120, generator=g) > 0.4
    with torch.no_grad():
        ours = infiller.eval()(x, observed)
        theirs = _reference_infiller(state, x.transpose(0, 1), observed).transpose(0, 1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # The unobserved frames' own values still reach every frame through the unmasked encoder, so that they
    # need to be what HaWoR feeds there (the interpolation, hawor_tune.model), never a regression.
    changed = x.clone()
    changed[~observed] += 1.0
    with torch.no_grad():
        assert not torch.allclose(infiller(changed, observed)[observed], ours[observed])


def test_a_window_without_an_observed_frame_stays_finite():
    infiller = HaWoRInfiller(dim=DIM, layers=LAYERS, ff_dim=FF).eval()
    with torch.no_grad():
        out = infiller(torch.randn(2, 10, 218), torch.zeros(2, 10, dtype=torch.bool))
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="121 frames is longer than HaWoR's infiller's 120"):
        infiller(torch.randn(1, 121, 218), torch.ones(1, 121, dtype=torch.bool))
