"""Released checkpoints: HaMeR's and HaWoR's Lightning files load safely into the GPU profile's modules."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    GPU_PROFILE_SMALL,
    GPU_PROFILE_VIT,
    hamer_state,
    hawor_infiller_state,
    write_hawor_infiller,
    write_lightning_checkpoint,
)

from hawor_tune.config import ConfigError, load_config
from hawor_tune.errors import MissingFileError
from hawor_tune.model import build_model
from hawor_tune.pretrained import read_weights

CROP = 32


def _config(ckpt: Path | str, **overrides):
    return load_config("configs/arctic.yaml", {**GPU_PROFILE_SMALL, "mano.model_dir": "", "data.crop_size": CROP,
                                               "model.pretrained_path": str(ckpt), **overrides})


def _hamer_state(seed: int = 0) -> dict:
    v = GPU_PROFILE_VIT
    return hamer_state(crop_size=CROP, depth=v["depth"], embed_dim=v["embed_dim"], num_heads=v["num_heads"],
                       patch_size=v["patch_size"], decoder_dim=v["decoder_dim"], decoder_depth=v["decoder_depth"],
                       seed=seed)


def _reference_vit(s: dict, x: torch.Tensor, *, depth: int, heads: int, patch: int) -> torch.Tensor:
    """HaMeR's ViT forward written from its layer definitions (hamer/models/backbones/vit.py): the crop's
    middle 3/4 columns, a patch conv padded by 2, pos_embed[:, 1:] + pos_embed[:, :1], pre-norm blocks
    (LayerNorm eps 1e-6, exact GELU), last_norm."""
    C = x.shape[-1]
    x = x[..., C // 8: C - C // 8]
    x = F.conv2d(x, s["backbone.patch_embed.proj.weight"], s["backbone.patch_embed.proj.bias"], stride=patch, padding=2)
    x = x.flatten(2).transpose(1, 2)  # (N, L, E)
    pos = s["backbone.pos_embed"]
    x = x + pos[:, 1:] + pos[:, :1]
    N, L, E = x.shape

    def ln(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(t, (E,), s[name + ".weight"], s[name + ".bias"], eps=1e-6)

    for i in range(depth):
        b = f"backbone.blocks.{i}."
        qkv = F.linear(ln(x, b + "norm1"), s[b + "attn.qkv.weight"], s[b + "attn.qkv.bias"])
        q, k, v = qkv.reshape(N, L, 3, heads, E // heads).permute(2, 0, 3, 1, 4)
        attn = ((q * (E // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(N, L, E), s[b + "attn.proj.weight"], s[b + "attn.proj.bias"])
        h = F.gelu(F.linear(ln(x, b + "norm2"), s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"]))
        x = x + F.linear(h, s[b + "mlp.fc2.weight"], s[b + "mlp.fc2.bias"])
    return ln(x, "backbone.last_norm")


def _reference_head(s: dict, ctx: torch.Tensor, depth: int) -> tuple[torch.Tensor, ...]:
    """HaMeR's MANOTransformerDecoderHead written from hamer/models/components/pose_transformer.py: a zero
    token, pre-norm self-attention, cross-attention and MLP (8 heads of 64), residuals on init_*."""
    p = "mano_head.transformer."
    N = ctx.shape[0]
    x = F.linear(torch.zeros(N, 1, 1), s[p + "to_token_embedding.weight"], s[p + "to_token_embedding.bias"])
    x = x + s[p + "pos_embedding"]
    D = x.shape[-1]

    def ln(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(t, (D,), s[name + ".norm.weight"], s[name + ".norm.bias"])

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.reshape(N, -1, 8, 64).transpose(1, 2) for t in (q, k, v))
        out = ((q @ k.transpose(-1, -2)) * 64 ** -0.5).softmax(-1) @ v
        return out.transpose(1, 2).reshape(N, -1, 512)

    for i in range(depth):
        layer = f"{p}transformer.layers.{i}."
        q, k, v = F.linear(ln(x, layer + "0"), s[layer + "0.fn.to_qkv.weight"]).chunk(3, dim=-1)
        x = x + F.linear(attend(q, k, v), s[layer + "0.fn.to_out.0.weight"], s[layer + "0.fn.to_out.0.bias"])
        k, v = F.linear(ctx, s[layer + "1.fn.to_kv.weight"]).chunk(2, dim=-1)
        q = F.linear(ln(x, layer + "1"), s[layer + "1.fn.to_q.weight"])
        x = x + F.linear(attend(q, k, v), s[layer + "1.fn.to_out.0.weight"], s[layer + "1.fn.to_out.0.bias"])
        h = F.gelu(F.linear(ln(x, layer + "2"), s[layer + "2.fn.net.0.weight"], s[layer + "2.fn.net.0.bias"]))
        x = x + F.linear(h, s[layer + "2.fn.net.3.weight"], s[layer + "2.fn.net.3.bias"])
    t = x[:, 0]
    h = "mano_head."
    return (F.linear(t, s[h + "decpose.weight"], s[h + "decpose.bias"]) + s[h + "init_hand_pose"],
            F.linear(t, s[h + "decshape.weight"], s[h + "decshape.bias"]) + s[h + "init_betas"],
            F.linear(t, s[h + "deccam.weight"], s[h + "deccam.bias"]) + s[h + "init_cam"])


def test_a_hamer_checkpoint_loads_without_yacs_and_its_backbone_and_head_compute_what_hamer_computes(tmp_path):
    state = _hamer_state()
    ckpt = write_lightning_checkpoint(tmp_path / "hamer.ckpt", state)
    with pytest.raises(pickle.UnpicklingError):  # what the plain safe load says of a Lightning file
        torch.load(ckpt, weights_only=True)
    model = build_model(_config(ckpt)).eval()
    assert model.pretrained_parts == ("backbone", "mano_head")

    x = torch.randn(3, 3, CROP, CROP)
    with torch.no_grad():
        tokens = model.backbone.forward_features(x)
        ref = _reference_vit(state, x, depth=2, heads=2, patch=8)
        assert tokens.shape == (3, 4 * 3, 32)  # HaMeR's grid: (C / patch) x (3C / 4 / patch)
        torch.testing.assert_close(tokens, ref, atol=1e-5, rtol=0)
        for ours, theirs in zip(model.mano_head(ref), _reference_head(state, ref, depth=1)):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # HaWoR's modules that HaMeR's file lacks start fresh: the space-time module passes the tokens through.
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_a_hawor_checkpoint_fills_every_released_module_and_says_so(tmp_path, caplog):
    donor = build_model(_config("", **{"model.require_pretrained": False}))
    for p in donor.parameters():
        p.data.normal_()
    state = {**_hamer_state(), **{k: v for k, v in donor.state_dict().items()
                                   if k.split(".")[0] in ("st_module", "motion_module", "mano_head")}}
    ckpt = write_lightning_checkpoint(tmp_path / "hawor.ckpt", state)
    with caplog.at_level("INFO", logger="hawor_tune.pretrained"):
        model = build_model(_config(ckpt, **{"model.motion_residual": False}))
    assert model.pretrained_parts == ("backbone", "st_module", "mano_head", "motion_module")
    for name in ("st_module", "motion_module", "mano_head"):
        for k, v in getattr(model, name).state_dict().items():
            assert torch.equal(v, donor.state_dict()[f"{name}.{k}"]), f"{name}.{k}"
    said = caplog.text
    assert "loaded backbone" in said and "motion_module" in said and "fresh: camera_backbone" in said


def test_a_released_module_of_another_shape_is_refused_with_the_first_tensor_named(tmp_path):
    ckpt = write_lightning_checkpoint(tmp_path / "hamer.ckpt", _hamer_state())
    with pytest.raises(ConfigError, match=r"'mano_head\.\*' does not fit .*mano_head\.transformer"):
        build_model(_config(ckpt, **{"model.decoder_dim": 48}))


def _infiller_config(ckpt: Path, infiller: Path | str, **overrides):
    return _config(ckpt, **{"model.infiller": "hawor", "model.infiller_hidden": 32, "model.infiller_layers": 2,
                            "model.infiller_path": str(infiller), **overrides})


def test_hawors_infiller_file_loads_beside_the_checkpoint_and_says_so(tmp_path, caplog):
    ckpt = write_lightning_checkpoint(tmp_path / "hawor.ckpt", _hamer_state())
    state = hawor_infiller_state(dim=32, layers=2)
    infiller = write_hawor_infiller(tmp_path / "infiller.pt", state)
    with caplog.at_level("INFO", logger="hawor_tune.pretrained"):
        model = build_model(_infiller_config(ckpt, infiller))
    for k, v in model.infiller.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert model.pretrained_parts == ("backbone", "mano_head", "infiller")  # trained at backbone_lr_scale
    said = model.pretrained_report.to_dict()
    assert said["loaded"]["infiller"] == len(state) and "infiller" not in said["fresh"]
    assert said["also"] == {"infiller": str(infiller)}
    assert f"infiller ({len(state)} tensors from {infiller})" in caplog.text

    fresh = build_model(_infiller_config(ckpt, "")).pretrained_report.to_dict()
    assert "infiller" in fresh["fresh"] and fresh["also"] == {}


@pytest.mark.parametrize("content, error, match", [
    (None, MissingFileError, "does not exist"),
    ({"state_dict": {"x": torch.ones(1)}}, ConfigError, "not HaWoR's infiller.pt: it has no 'transformer_encoder_state_dict'"),
    ("wider", ConfigError, r"does not fit this model's HaWoR infiller .*first infiller.pos_embedding.pe: file \(120, 1, 64\), "
                           r"model \(120, 1, 32\).*384"),
    ("extra", ConfigError, r"1 unexpected; first infiller.extra.weight"),
])
def test_a_file_that_is_not_this_infiller_is_refused_naming_the_key_and_the_tensor(tmp_path, content, error, match):
    ckpt = write_lightning_checkpoint(tmp_path / "hamer.ckpt", _hamer_state())
    path = tmp_path / "infiller.pt"
    if content == "wider":
        write_hawor_infiller(path, hawor_infiller_state(dim=64, layers=2))
    elif content == "extra":
        write_hawor_infiller(path, {**hawor_infiller_state(dim=32, layers=2), "extra.weight": torch.ones(2)})
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(error, match=match) as e:
        build_model(_infiller_config(ckpt, path))
    assert "model.infiller_path" in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_the_restricted_unpickler_never_runs_what_a_file_names(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"backbone.x": torch.ones(2)}, "hyper_parameters": Payload()}, path)
    state = read_weights(path)
    assert not marker.exists()
    assert torch.equal(state["state_dict"]["backbone.x"], torch.ones(2))


@pytest.mark.parametrize("content, match", [(None, "does not exist"), (b"not a torch file", "not a torch weights file"),
                                            ([1, 2], "not a mapping")])
def test_a_file_that_is_not_weights_gets_one_line_naming_the_key(tmp_path, content, match):
    path = tmp_path / "w.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises((ConfigError, MissingFileError), match=match) as e:
        read_weights(path)
    assert "model.pretrained_path" in str(e.value) and "\n" not in str(e.value)


def test_timm_to_hamer_is_the_inverse_of_hamer_to_timm():
    from hawor_tune.pretrained import hamer_to_timm, timm_to_hamer

    state = {k: v for k, v in _hamer_state().items() if k.startswith("backbone.")}
    timm = hamer_to_timm(state)
    again = timm_to_hamer(timm)
    assert set(again) == set(state)
    for k, v in hamer_to_timm(again).items():
        assert torch.equal(v, timm[k]), k
