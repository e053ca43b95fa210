"""Tests for hawor_tune.model on a tiny backbone (one ViT block on 32 px frames) and the procedural hand."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL_OVERRIDES

from hawor_tune.config import ExperimentConfig, LossConfig, load_config
from hawor_tune.geometry import axis_angle_to_matrix
from hawor_tune.losses import compute_losses
from hawor_tune.mano import HANDS, MANOLayer
from hawor_tune.model import MEAN_ROOT_DEPTH, MEAN_ROOT_UV, PARAM_DIM, HaWoR, build_model
from hawor_tune.procedural_hand import make_procedural_hand

S = 32
TINY = {**TINY_MODEL_OVERRIDES, "data.img_size": S, "mano.model_dir": ""}


@pytest.fixture(scope="module", autouse=True)
def _procedural_hand() -> Iterator[None]:
    """Every model here uses the built-in procedural hand, whatever the environment says."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("HAWOR_MANO_DIR", raising=False)
        yield


def _config(**overrides: object) -> ExperimentConfig:
    return load_config(None, {**TINY, **overrides})


def _model(seed: int = 0, **overrides: object) -> HaWoR:
    torch.manual_seed(seed)
    return build_model(_config(**overrides))


@pytest.fixture(scope="module")
def eval_model() -> HaWoR:
    return _model().eval()


def _batch(B: int = 2, T: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A hand-made batch in the data module's layout: hands 0.3-0.6 m in front, random cameras."""
    gen = torch.Generator().manual_seed(seed)
    K = torch.tensor([[float(S), 0.0, S / 2], [0.0, float(S), S / 2], [0.0, 0.0, 1.0]]).expand(B, 3, 3)
    joints3d = (torch.rand(B, T, 2, 21, 3, generator=gen) - 0.5) * 0.15
    joints3d[..., 2] += torch.rand(B, T, 2, 1, generator=gen) * 0.3 + 0.3
    # Pinhole projection written out (dist is zero here).
    joints2d = joints3d[..., :2] / joints3d[..., 2:] * S + S / 2
    hand_valid = torch.rand(B, T, 2, generator=gen) > 0.25
    hand_valid[:, 0] = True  # every clip and hand has a valid frame
    return {
        "images": torch.randint(0, 256, (B, T, 3, S, S), generator=gen, dtype=torch.uint8),
        "K": K.clone(),
        "dist": torch.zeros(B, 8),
        "joints3d": joints3d,
        "joints2d": joints2d,
        "rotmats": axis_angle_to_matrix(torch.rand(B, T, 2, 16, 3, generator=gen) - 0.5),
        "betas": torch.randn(B, T, 2, 10, generator=gen),
        "hand_valid": hand_valid,
        "cam_R": axis_angle_to_matrix((torch.rand(B, T, 3, generator=gen) - 0.5) * 0.4),
        "cam_t": torch.rand(B, T, 3, generator=gen) * 0.2,
    }


def _forward(model: HaWoR, batch: dict[str, torch.Tensor]):
    return model(batch["images"], batch["K"], batch["hand_valid"])


@pytest.mark.parametrize("T", [1, 8])
@pytest.mark.parametrize("training", [False, True])
def test_output_shapes_and_values(eval_model: HaWoR, T: int, training: bool) -> None:
    B = 2
    batch = _batch(B, T)
    eval_model.train(training)
    try:
        with torch.no_grad():
            out = _forward(eval_model, batch)
    finally:
        eval_model.eval()
    V = eval_model.mano[0].num_vertices
    expected = {"rot6d": (B, T, 2, 16, 6), "rotmats": (B, T, 2, 16, 3, 3), "betas": (B, T, 2, 10),
                "root": (B, T, 2, 3), "joints": (B, T, 2, 21, 3), "vertices": (B, T, 2, V, 3),
                "cam_R": (B, T, 3, 3), "cam_t": (B, T, 3), "observed": (B, T, 2)}
    for f in dataclasses.fields(out):
        value = getattr(out, f.name)
        assert tuple(value.shape) == expected[f.name], f.name
        if f.name == "observed":
            assert value.dtype == torch.bool
        else:
            assert value.dtype == torch.float32 and torch.isfinite(value).all(), f.name
    # Frame 0 is the reference camera; rotations are proper.
    torch.testing.assert_close(out.cam_R[:, 0], torch.eye(3).expand(B, 3, 3))
    torch.testing.assert_close(out.cam_t[:, 0], torch.zeros(B, 3))
    torch.testing.assert_close(torch.linalg.det(out.rotmats), torch.ones(B, T, 2, 16), atol=1e-5, rtol=0)


def test_joints_are_the_mano_hand_moved_onto_the_root() -> None:
    # Official MANO's wrist is not at the origin (the procedural hand's is): shift the template so that
    # "MANO joints - MANO wrist + root" differs from "MANO joints + root".
    model = _model().eval()
    shifted = []
    for side in HANDS:
        params = make_procedural_hand(side)
        params["v_template"] = params["v_template"] + np.array([0.09, 0.01, -0.02])
        shifted.append(MANOLayer(params, side, "procedural"))
    model.mano = torch.nn.ModuleList(shifted)
    with torch.no_grad():
        out = _forward(model, _batch(2, 3))
    torch.testing.assert_close(out.joints[..., 0, :], out.root)
    for i, layer in enumerate(shifted):
        ref = layer(out.rotmats[:, :, i].reshape(-1, 16, 3, 3), out.betas[:, :, i].reshape(-1, 10))
        offset = out.root[:, :, i].reshape(-1, 1, 3) - ref.joints[:, :1]
        torch.testing.assert_close(out.joints[:, :, i].reshape(-1, 21, 3), ref.joints + offset)
        torch.testing.assert_close(out.vertices[:, :, i].reshape(ref.vertices.shape), ref.vertices + offset)


def test_untrained_model_predicts_the_mean_hand(eval_model: HaWoR) -> None:
    batch = _batch(2, 4)
    with torch.no_grad():
        out = _forward(eval_model, batch)
    depth = out.root[..., 2]
    assert torch.allclose(depth, torch.full_like(depth, MEAN_ROOT_DEPTH), atol=0.03)
    # The wrist projects near its mean image position; K here is fx = S, cx = S / 2.
    uv = out.root[..., :2] / out.root[..., 2:] * S + S / 2  # (B, T, 2, 2) pixels
    mean_px = (torch.tensor(MEAN_ROOT_UV) + 1) * S / 2  # (2, 2)
    assert torch.allclose(uv, mean_px.expand_as(uv), atol=0.1 * S)


def test_gradients_reach_every_stage() -> None:
    model = _model(**{"model.infill_mask_prob": 0.5}).train()
    torch.manual_seed(1)
    batch = _batch(2, 8)
    out = _forward(model, batch)
    hidden = batch["hand_valid"] & ~out.observed  # valid frames hidden from the infiller
    assert hidden.any(dim=(0, 1)).all(), "precondition: both hands have hidden valid frames"
    total, _ = compute_losses(out, batch, LossConfig(**{f.name: 1.0 for f in dataclasses.fields(LossConfig)}))
    total.backward()
    stages = {"backbone": model.backbone, "temporal": model.temporal, "left head": model.hand_heads[0],
              "right head": model.hand_heads[1], "camera head": model.camera_head,
              "left infiller": model.infillers[0], "right infiller": model.infillers[1]}
    for name, module in stages.items():
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert any(float(g.abs().sum()) > 0 for g in grads), name


def test_infiller_only_overwrites_unobserved_frames(eval_model: HaWoR) -> None:
    batch = _batch(2, 8, seed=3)
    valid = batch["hand_valid"]
    assert (~valid).any()
    with torch.no_grad():
        out = _forward(eval_model, batch)
        # All observed: the infiller's output is used nowhere, so this is the regressor alone.
        regressed = eval_model(batch["images"], batch["K"], torch.ones_like(valid))
    assert torch.equal(out.observed, valid)
    for name in ("rot6d", "betas", "root", "joints"):
        a, b = getattr(out, name), getattr(regressed, name)
        torch.testing.assert_close(a[valid], b[valid], msg=name)
        assert not torch.allclose(a[~valid], b[~valid]), name


def test_infiller_never_reads_unobserved_regressions(eval_model: HaWoR) -> None:
    B, T = 2, 6
    gen = torch.Generator().manual_seed(0)
    params = torch.randn(B, T, 2, PARAM_DIM, generator=gen)
    mean = torch.randn(B, 1, 2, PARAM_DIM, generator=gen)
    observed = torch.rand(B, T, 2, generator=gen) > 0.5
    # Whatever the regressor says where the hand is not observed must not change the infilled frames.
    garbage = torch.where(observed[..., None], params, torch.randn(B, T, 2, PARAM_DIM, generator=gen) * 10)
    with torch.no_grad():
        torch.testing.assert_close(eval_model.infill(params, mean, observed), eval_model.infill(garbage, mean, observed))


def test_training_hides_valid_frames_but_keeps_one_per_hand() -> None:
    model = _model(**{"model.infill_mask_prob": 0.3}).train()
    torch.manual_seed(0)
    valid = torch.ones(500, 8, 2, dtype=torch.bool)
    valid[:100, 1:] = False  # clips whose only valid frame is frame 0
    valid[100:150] = False  # clips without any valid frame
    observed = model.observed_mask(valid)
    assert not (observed & ~valid).any()  # never observes an invalid frame
    assert torch.equal(observed.any(dim=1), valid.any(dim=1))  # one kept wherever one was valid
    hidden_rate = float((valid & ~observed)[150:].float().mean())
    assert hidden_rate == pytest.approx(0.3, abs=0.02)
    assert torch.equal(model.eval().observed_mask(valid), valid)
    assert torch.equal(_model(**{"model.infill_mask_prob": 0.0}).train().observed_mask(valid), valid)


def test_pretrained_backbone_weights_are_loaded(tmp_path) -> None:
    source = _model(seed=1)
    path = tmp_path / "backbone.pt"
    torch.save(source.backbone.state_dict(), path)
    loaded = _model(seed=2, **{"model.pretrained_path": str(path)})
    for (name, a), (_, b) in zip(source.backbone.state_dict().items(), loaded.backbone.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_pretrained_weights_adapt_to_another_input_size(tmp_path) -> None:
    source = _model(seed=1)
    path = tmp_path / "backbone.pt"
    torch.save({"state_dict": source.backbone.state_dict()}, path)
    loaded = _model(seed=2, **{"model.pretrained_path": str(path), "data.img_size": 48})
    # Same blocks; the position embedding is resampled from a 2x2 to a 3x3 patch grid.
    torch.testing.assert_close(loaded.backbone.blocks[0].attn.qkv.weight, source.backbone.blocks[0].attn.qkv.weight)
    assert loaded.backbone.pos_embed.shape[1] == 1 + 9


def test_missing_pretrained_file_is_named(tmp_path) -> None:
    missing = tmp_path / "nope" / "vit.pt"
    with pytest.raises(FileNotFoundError, match="nope/vit.pt"):
        _model(**{"model.pretrained_path": str(missing)})


def test_cnn_backbone_without_img_size() -> None:
    model = _model(**{"model.backbone": "test_resnet", "model.backbone_kwargs": {}}).eval()
    with torch.no_grad():
        out = _forward(model, _batch(1, 2))
    assert out.joints.shape == (1, 2, 2, 21, 3)


@pytest.mark.parametrize("overrides, match", [
    ({"model.backbone": "no_such_net"}, "model.backbone"),
    ({"model.temporal_dim": 30, "model.temporal_heads": 4}, "model.temporal_dim"),
])
def test_bad_config_is_named(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _model(**overrides)


def test_bad_inputs_are_rejected(eval_model: HaWoR) -> None:
    batch = _batch(1, 2)
    with pytest.raises(ValueError, match="uint8"):
        eval_model(batch["images"].float(), batch["K"], batch["hand_valid"])
    with pytest.raises(ValueError, match="hand_valid"):
        eval_model(batch["images"], batch["K"], batch["hand_valid"].float())
    with pytest.raises(ValueError, match="K"):
        eval_model(batch["images"], batch["K"][:, :2], batch["hand_valid"])
