"""Tests for hawor_tune.model on a tiny backbone (one ViT block on 32 px frames) and the procedural hand."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
import timm
import torch
from conftest import TINY_MODEL_OVERRIDES

from hawor_tune.checkpoint import export_model
from hawor_tune.config import ConfigError, ExperimentConfig, LossConfig, load_config
from hawor_tune.geometry import axis_angle_to_matrix
from hawor_tune.losses import compute_losses
from hawor_tune.mano import HANDS, MANOLayer
from hawor_tune.model import CROP_METRES, MIRROR_ROT6D, PARAM_DIM, HaWoR, HaWoROutput, build_model, run_model
from hawor_tune.procedural_hand import make_procedural_hand

S = 32  # side of the whole frames
C = 32  # side of the hand crops
G = 8  # cells per side of the optical flow
# Every frame free: the tests of one part each (infiller, symmetries) see it alone; the trajectories' polynomial
# smoothing has its own test.
TINY = {**TINY_MODEL_OVERRIDES, "data.img_size": S, "data.crop_size": C, "data.flow_grid": G, "mano.model_dir": "",
        "model.hand_trajectory_degree": 0, "model.camera_trajectory_degree": 0}
MIRROR_X = torch.tensor([-1.0, 1.0, 1.0])
# HaWoR's released infiller at test size.
HAWOR_INFILLER = {"model.infiller": "hawor", "model.infiller_hidden": 32, "model.infiller_layers": 1}


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


def _lively(model: HaWoR) -> HaWoR:
    """Give the hand head's last layer full-size weights and a random bias, so that its offsets from the mean
    are about 0.3, as after training: symmetries are then tested on predictions far from the mean hand, not
    on the tiny offsets of an untrained head."""
    last = model.hand_head[-1]
    with torch.no_grad():
        torch.nn.init.xavier_uniform_(last.weight)
        last.bias.copy_(torch.randn(last.bias.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    return model


@pytest.fixture(scope="module")
def eval_model() -> HaWoR:
    return _model().eval()


def _batch(B: int = 2, T: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A hand-made batch in the data module's layout: hands 0.3-0.6 m in front, random cameras.

    Frames are pinhole views with fx = S and the principal point at the centre; each hand's crop is the
    square box 1.3 times the extent of its projected joints, so its intrinsics are crop_K = A K with A the
    frame-to-crop map (scale a = C / side, box centre onto the crop centre).
    """
    gen = torch.Generator().manual_seed(seed)
    K = torch.tensor([[float(S), 0.0, S / 2], [0.0, float(S), S / 2], [0.0, 0.0, 1.0]])
    joints3d = (torch.rand(B, T, 2, 21, 3, generator=gen) - 0.5) * 0.15
    joints3d[..., 2] += torch.rand(B, T, 2, 1, generator=gen) * 0.3 + 0.3
    joints2d = joints3d[..., :2] / joints3d[..., 2:] * S + S / 2  # (B, T, 2, 21, 2), pinhole written out
    lo, hi = joints2d.amin(dim=-2), joints2d.amax(dim=-2)  # (B, T, 2, 2)
    a = C / (1.3 * (hi - lo).amax(dim=-1))  # (B, T, 2)
    shift = (C - 1) / 2 - a[..., None] * (lo + hi) / 2  # (B, T, 2, 2)
    A = torch.zeros(B, T, 2, 3, 3)
    A[..., 0, 0], A[..., 1, 1], A[..., :2, 2], A[..., 2, 2] = a, a, shift, 1.0
    hand_valid = torch.rand(B, T, 2, generator=gen) > 0.25
    hand_valid[:, 0] = True  # every clip and hand has a valid frame
    return {
        "crops": torch.randint(0, 256, (B, T, 2, 3, C, C), generator=gen, dtype=torch.uint8),
        "crop_K": A @ K,
        "crop_joints2d": a[..., None, None] * joints2d + shift[..., None, :],
        "images": torch.randint(0, 256, (B, T, 3, S, S), generator=gen, dtype=torch.uint8),
        "flow": torch.randn(B, T, 2, G, G, generator=gen),
        "K": K.expand(B, 3, 3).clone(),
        "dist": torch.zeros(B, 8),
        "joints3d": joints3d,
        "joints2d": joints2d,
        "joints_visible": torch.ones(B, T, 2, 21, dtype=torch.bool),
        "rotmats": axis_angle_to_matrix(torch.rand(B, T, 2, 16, 3, generator=gen) - 0.5),
        "betas": torch.randn(B, T, 2, 10, generator=gen),
        "hand_valid": hand_valid,
        "cam_R": axis_angle_to_matrix((torch.rand(B, T, 3, generator=gen) - 0.5) * 0.4),
        "cam_t": torch.rand(B, T, 3, generator=gen) * 0.2,
    }


@pytest.mark.parametrize("T", [1, 8])
@pytest.mark.parametrize("training", [False, True])
def test_output_shapes_and_values(eval_model: HaWoR, T: int, training: bool) -> None:
    B = 2
    batch = _batch(B, T)
    eval_model.train(training)
    try:
        with torch.no_grad():
            out = run_model(eval_model, batch)
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
        out = run_model(model, _batch(2, 3))
    torch.testing.assert_close(out.joints[..., 0, :], out.root)
    for i, layer in enumerate(shifted):
        ref = layer(out.rotmats[:, :, i].reshape(-1, 16, 3, 3), out.betas[:, :, i].reshape(-1, 10))
        offset = out.root[:, :, i].reshape(-1, 1, 3) - ref.joints[:, :1]
        torch.testing.assert_close(out.joints[:, :, i].reshape(-1, 21, 3), ref.joints + offset)
        torch.testing.assert_close(out.vertices[:, :, i].reshape(ref.vertices.shape), ref.vertices + offset)


def _pinhole(points: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """(..., 3) camera-frame points and (..., 3, 3) intrinsics -> (..., 2) pixels, written out."""
    x, y, z = points.unbind(-1)
    return torch.stack([K[..., 0, 0] * x / z + K[..., 0, 2], K[..., 1, 1] * y / z + K[..., 1, 2]], dim=-1)


def test_mean_parameters_put_a_crop_filling_wrist_at_the_crop_centre(eval_model: HaWoR) -> None:
    crop_K = _batch(2, 3)["crop_K"]  # (B, T, 2, 3, 3)
    root = eval_model.mean_params(crop_K)[..., -3:]  # (B, T, 2, 3)
    # Weak-perspective camera (0, 0, 0): scale 2 / CROP_METRES, so depth = fx * CROP_METRES / C, and the
    # wrist at the crop centre (pixel (C - 1) / 2 with pixel centres at integers), for both hands.
    torch.testing.assert_close(root[..., 2], crop_K[..., 0, 0] * CROP_METRES / C)
    torch.testing.assert_close(_pinhole(root, crop_K), torch.full_like(root[..., :2], (C - 1) / 2))


def test_untrained_model_predicts_the_mean_hand(eval_model: HaWoR) -> None:
    batch = _batch(2, 4)
    batch["hand_valid"][:] = True  # every frame regressed from its own crop (none infilled)
    with torch.no_grad():
        out = run_model(eval_model, batch)
    crop_K = batch["crop_K"]
    depth = out.root[..., 2]
    torch.testing.assert_close(depth, crop_K[..., 0, 0] * CROP_METRES / C, rtol=0.01, atol=0)
    uv = _pinhole(out.root, crop_K)  # (B, T, 2, 2) crop pixels
    torch.testing.assert_close(uv, torch.full_like(uv, (C - 1) / 2), atol=0.5, rtol=0)
    # Both hands' fingers point forward-down, (0, -1, 1) / sqrt(2), as seen along the ray through the
    # crop's centre: in the camera frame that direction is turned by the rotation taking the optical axis
    # onto the ray. The right rest hand's fingers lie along -x, the (mirrored) left one's along +x.
    rest_fingers = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])  # (left, right)
    fingers = (out.rotmats[..., 0, :, :] @ rest_fingers[:, :, None])[..., 0]  # (B, T, 2, 3)
    centre = torch.full_like(crop_K[..., :2, 2], (C - 1) / 2)
    ray = torch.cat([(centre - crop_K[..., :2, 2]) / crop_K[..., [0, 1], [0, 1]], torch.ones_like(centre[..., :1])], -1)
    ray = ray / ray.norm(dim=-1, keepdim=True)  # (B, T, 2, 3)
    # Rodrigues by hand: axis z x ray, angle between them.
    axis = torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0]).expand_as(ray), ray)
    angle = torch.atan2(axis.norm(dim=-1), ray[..., 2])
    turn = axis_angle_to_matrix(axis / axis.norm(dim=-1, keepdim=True).clamp(min=1e-12) * angle[..., None])
    expected = turn @ torch.tensor([0.0, -(0.5**0.5), 0.5**0.5])
    torch.testing.assert_close(fingers, expected, atol=0.01, rtol=0)
    assert (angle > 0.05).any()  # the crops are off-centre, so the check is not trivial


@pytest.mark.parametrize("infiller", ["lstm", "hawor"])
def test_gradients_reach_every_stage(infiller: str) -> None:
    model = _model(**{"model.infill_mask_prob": 0.5, **(HAWOR_INFILLER if infiller == "hawor" else {})}).train()
    torch.manual_seed(1)
    batch = _batch(2, 8)
    out = run_model(model, batch)
    hidden = batch["hand_valid"] & ~out.observed  # valid frames hidden from the infiller
    assert hidden.any(dim=(0, 1)).all(), "precondition: both hands have hidden valid frames"
    total, _ = compute_losses(out, batch, LossConfig(**{f.name: 1.0 for f in dataclasses.fields(LossConfig)}))
    total.backward()
    stages = {"backbone": model.backbone, "spatial head": model.spatial_head,
              "camera backbone": model.camera_backbone, "camera projection": model.camera_proj,
              "flow projection": model.flow_proj,
              "fusion": model.fusion, "hand temporal": model.hand_temporal, "camera temporal": model.camera_temporal,
              "hand head": model.hand_head, "camera head": model.camera_head,
              **({"left infiller": model.infillers[0], "right infiller": model.infillers[1]} if infiller == "lstm"
                 else {"HaWoR's infiller": model.infiller})}
    for name, module in stages.items():
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert any(float(g.abs().sum()) > 0 for g in grads), name


def test_a_shared_cnn_backbone_keeps_the_hand_crops_batch_norm_statistics() -> None:
    """The frames pass through the hand backbone too (no camera backbone); its batch-norm running statistics
    must be those of the crops alone, which is what evaluation normalises the crops with."""
    cnn = {"model.backbone": "resnet10t", "model.backbone_kwargs": {}, "model.camera_backbone": ""}
    model = _model(**cnn).train()
    reference = _model(**cnn).backbone.train()  # same seed: the same initial weights and statistics
    batch = _batch(2, 3)
    with torch.no_grad():
        run_model(model, batch)
        reference.forward_features(model._normalise(batch["crops"].flatten(0, 2)))
    stats = {k: v for k, v in model.backbone.state_dict().items() if "running" in k}
    assert stats, "precondition: the backbone has batch-norm statistics"
    for key, value in stats.items():
        torch.testing.assert_close(value, reference.state_dict()[key], msg=key)
    model.eval()
    frames = model.encode_frames(batch["images"], batch["flow"])  # the frames' features read the same way
    model.train()
    torch.testing.assert_close(model.encode_frames(batch["images"], batch["flow"]), frames)


def test_a_cnn_backbone_runs_channels_last_and_computes_what_the_plain_layout_does() -> None:
    """The model keeps its convolutions channels-last (faster on oneDNN and cuDNN); its outputs and gradients
    are those of the same weights in the plain contiguous layout, up to rounding."""
    cnn = {"model.backbone": "resnet10t", "model.backbone_kwargs": {}, "model.camera_backbone": "resnet10t"}
    model = _model(**cnn).train()
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert any(not w.is_contiguous() for w in convs)  # a 1x1 kernel is both; a 3x3 one is not
    plain = _model(**cnn).train().to(memory_format=torch.contiguous_format)  # same seed: the same weights
    assert all(m.weight.is_contiguous() for m in plain.modules() if isinstance(m, torch.nn.Conv2d))
    batch = _batch(2, 3)
    outs = []
    for m in (model, plain):
        torch.manual_seed(1)  # the same hidden frames for the infiller
        out = run_model(m, batch)
        compute_losses(out, batch, LossConfig())[0].backward()
        outs.append(out)
    for f in dataclasses.fields(HaWoROutput):
        torch.testing.assert_close(getattr(outs[0], f.name), getattr(outs[1], f.name), rtol=1e-4, atol=1e-5,
                                   msg=f.name)
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_infiller_only_overwrites_unobserved_frames() -> None:
    # Without fusion and temporal layers, what counts as observed only changes the infiller (with them, also
    # who attends to whom).
    model = _model(**{"model.hand_fusion": False, "model.temporal_layers": 0}).eval()
    batch = _batch(2, 8, seed=3)
    valid = batch["hand_valid"]
    assert (~valid).any()
    with torch.no_grad():
        out = run_model(model, batch)
        # All observed: the infiller's output is used nowhere, so this is the regressor alone.
        regressed = run_model(model, {**batch, "hand_valid": torch.ones_like(valid)})
    assert torch.equal(out.observed, valid)
    for name in ("rot6d", "betas", "root", "joints"):
        a, b = getattr(out, name), getattr(regressed, name)
        torch.testing.assert_close(a[valid], b[valid], msg=name)
        assert not torch.allclose(a[~valid], b[~valid]), name


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("degree", [1, 2])
def test_trajectories_are_polynomials_of_their_degree_in_the_clips_world(degree: int, bf16: bool) -> None:
    """Camera path and world wrists lie on polynomials of the configured degree over the clip: their
    (degree + 1)-th differences over time vanish, the camera's path starts at its first frame, and with the
    degrees at 0 they do not vanish. Under bf16 autocast too: the geometry stays float32 (bf16 would step a
    wrist 0.5 m away by about a millimetre)."""
    def world(degree: int) -> tuple[HaWoROutput, torch.Tensor]:
        model = _lively(_model(**{"model.hand_trajectory_degree": degree,
                                  "model.camera_trajectory_degree": degree})).eval()
        with torch.no_grad():  # a camera head that moves the camera by centimetres
            torch.nn.init.normal_(model.camera_head[-1].weight, std=0.1)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = run_model(model, _batch(2, 8, seed=4))
        assert out.cam_t.dtype == out.root.dtype == torch.float32
        wrists = (out.cam_R[:, :, None] @ out.root[..., None]).squeeze(-1) + out.cam_t[:, :, None]  # (B, T, 2, 3)
        return out, wrists

    out, wrists = world(degree)
    for name, x in (("camera", out.cam_t), ("wrists", wrists)):
        assert float(torch.diff(x, n=degree + 1, dim=1).abs().amax()) < 1e-4, name
    torch.testing.assert_close(out.cam_t[:, 0], torch.zeros_like(out.cam_t[:, 0]))
    free, free_wrists = world(0)
    assert float(torch.diff(free.cam_t, n=degree + 1, dim=1).abs().amax()) > 1e-3
    assert float(torch.diff(free_wrists, n=degree + 1, dim=1).abs().amax()) > 1e-3
    # Training supervises every frame's own prediction unless model.smooth_in_training says otherwise.
    for smooth_in_training, smooth in ((False, False), (True, True)):
        model = _model(**{"model.camera_trajectory_degree": degree, "model.smooth_in_training": smooth_in_training,
                          "model.infill_mask_prob": 0.0, "model.dropout": 0.0}).train()
        with torch.no_grad():
            torch.nn.init.normal_(model.camera_head[-1].weight, std=0.1)
            cam_t = run_model(model, _batch(2, 8, seed=4)).cam_t
        assert (float(torch.diff(cam_t, n=degree + 1, dim=1).abs().amax()) < 1e-4) == smooth, smooth_in_training


def _hand_params(out: HaWoROutput, hand: int) -> torch.Tensor:
    """(B, T, 109) one hand's regressed rot6d, betas and root."""
    return torch.cat([out.rot6d[:, :, hand].flatten(2), out.betas[:, :, hand], out.root[:, :, hand]], dim=-1)


@pytest.mark.parametrize("changed", [0, 1], ids=HANDS)
@pytest.mark.parametrize("fusion, changed_observed, sees_it", [
    (True, True, True),  # the hand tokens attend to each other
    (True, False, False),  # an unobserved hand is masked out as a key
    (False, True, False),  # without fusion the hands are independent
])
def test_a_hand_sees_the_other_hand_only_through_fusion(changed: int, fusion: bool, changed_observed: bool,
                                                         sees_it: bool) -> None:
    model = _lively(_model(**{"model.hand_fusion": fusion})).eval()
    batch = _batch(1, 4, seed=2)
    batch["hand_valid"][:] = True
    batch["hand_valid"][..., changed] = changed_observed
    crops = batch["crops"].clone()
    crops[:, :, changed] = 255 - crops[:, :, changed]  # another crop of the changed hand, in every frame
    with torch.no_grad():
        before = _hand_params(run_model(model, batch), 1 - changed)
        after = _hand_params(run_model(model, {**batch, "crops": crops}), 1 - changed)
    if sees_it:
        assert float((after - before).abs().amax()) > 1e-3
    else:
        torch.testing.assert_close(after, before)


def _mirror_crop_K(crop_K: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) intrinsics of the mirror image (u -> C - 1 - u) of a crop, for the mirrored scene
    (x -> -x): u' = C - 1 - (fx x / z + cx) = fx (-x) / z + (C - 1 - cx)."""
    out = crop_K.clone()
    out[..., 0, 2] = C - 1 - crop_K[..., 0, 2]
    return out


def test_mirrored_hands_give_mirrored_predictions() -> None:
    # Mirror the world (x -> -x): the left hand becomes a right hand and vice versa. The new right hand's
    # crop is the old mirrored left crop and the new left hand's mirrored crop is the old right crop, so the
    # crops only swap slots; each crop's intrinsics become those of its mirror image. Without fusion (whose
    # type embedding tells the hands apart) and with every frame observed (no per-hand infiller), the
    # prediction must be the mirror image: rotations D R D (a sign per 6D entry), the same betas, wrists,
    # joints and vertices with x negated (the procedural left hand is the exact mirror of the right one).
    model = _lively(_model(**{"model.hand_fusion": False})).eval()
    batch = _batch(2, 3, seed=4)
    batch["hand_valid"][:] = True
    mirrored = {**batch, "crops": batch["crops"].flip(2), "crop_K": _mirror_crop_K(batch["crop_K"].flip(2))}
    with torch.no_grad():
        out, mirror = run_model(model, batch), run_model(model, mirrored)
    swap = lambda x: x.flip(2)  # noqa: E731 - hands are dim 2
    torch.testing.assert_close(swap(mirror.rot6d), out.rot6d * torch.tensor(MIRROR_ROT6D))
    torch.testing.assert_close(swap(mirror.rotmats), torch.diag(MIRROR_X) @ out.rotmats @ torch.diag(MIRROR_X))
    torch.testing.assert_close(swap(mirror.betas), out.betas)
    torch.testing.assert_close(swap(mirror.root), out.root * MIRROR_X)
    torch.testing.assert_close(swap(mirror.joints), out.joints * MIRROR_X)
    torch.testing.assert_close(swap(mirror.vertices), out.vertices * MIRROR_X)
    mean_root = model.mean_params(batch["crop_K"])[..., -3:]
    assert float((out.root - mean_root).abs().amax()) > 0.05  # a prediction far from the mean hand


def test_infiller_never_reads_unobserved_regressions(eval_model: HaWoR) -> None:
    B, T = 2, 6
    gen = torch.Generator().manual_seed(0)
    params = torch.randn(B, T, 2, PARAM_DIM, generator=gen)
    observed = torch.rand(B, T, 2, generator=gen) > 0.5
    cam_R = axis_angle_to_matrix(torch.randn(B, T, 3, generator=gen) * 0.1)
    cam_t = torch.randn(B, T, 3, generator=gen) * 0.05
    # Whatever the regressor says where the hand is not observed must not change the infilled frames.
    garbage = torch.where(observed[..., None], params, torch.randn(B, T, 2, PARAM_DIM, generator=gen) * 10)
    with torch.no_grad():
        torch.testing.assert_close(eval_model.infill(params, observed, cam_R, cam_t),
                                   eval_model.infill(garbage, observed, cam_R, cam_t))


@pytest.mark.parametrize("hand_path", ["query", "hawor"])
def test_an_unobserved_frame_informs_no_other_frame(hand_path: str) -> None:
    # Its crop and its box (the crop's intrinsics) may change at will: no output of any frame moves, as its
    # own parameters come from the observed frames and the camera alone.
    extra = {} if hand_path == "query" else {"model.hand_path": "hawor", "model.decoder_dim": 32,
                                             "model.decoder_layers": 1, "model.motion_hidden": 16,
                                             "model.motion_layers": 1}
    model = _model(**extra).eval()
    batch = _batch(2, 6, seed=5)
    batch["hand_valid"][:] = True
    batch["hand_valid"][:, 2:4, 1] = False
    crops, crop_K = batch["crops"].clone(), batch["crop_K"].clone()
    crops[:, 2:4, 1] = 255 - crops[:, 2:4, 1]
    crop_K[:, 2:4, 1, :2, 2] += 7.0
    with torch.no_grad():
        a = run_model(model, batch)
        b = run_model(model, {**batch, "crops": crops, "crop_K": crop_K})
    for name in ("rot6d", "betas", "root", "joints", "cam_R", "cam_t"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), msg=name)


def _silent_infillers(model: HaWoR) -> HaWoR:
    """The infillers' residuals zeroed: what is left is the interpolation in the first camera."""
    with torch.no_grad():
        for infiller in model.infillers:
            infiller.out.weight.zero_()
    return model


def test_a_still_hand_stays_still_in_the_world_while_the_head_moves(eval_model: HaWoR) -> None:
    model = _silent_infillers(_model()).eval()
    T = 5
    gen = torch.Generator().manual_seed(2)
    cam_R = axis_angle_to_matrix(torch.randn(1, T, 3, generator=gen) * 0.2)  # camera t -> camera 0
    cam_t = torch.randn(1, T, 3, generator=gen) * 0.05
    cam_R[:, 0], cam_t[:, 0] = torch.eye(3), 0.0
    wrist_world = torch.tensor([0.1, -0.05, 0.45])  # a still wrist, in camera 0
    orient_world = axis_angle_to_matrix(torch.tensor([0.3, -0.2, 0.1]))
    params = torch.randn(1, T, 2, PARAM_DIM, generator=gen)
    for t in range(T):  # as camera t sees it
        params[0, t, :, -3:] = cam_R[0, t].T @ (wrist_world - cam_t[0, t])
        params[0, t, :, :6] = torch.cat([(cam_R[0, t].T @ orient_world)[:, 0], (cam_R[0, t].T @ orient_world)[:, 1]])
    params[..., 6:-3] = params[:, :1, :, 6:-3]  # fingers and shape held too
    observed = torch.ones(1, T, 2, dtype=torch.bool)
    observed[0, 1:4] = False
    with torch.no_grad():
        filled = model.infill(params, observed, cam_R, cam_t)
    torch.testing.assert_close(filled, params, atol=1e-5, rtol=0)


def test_an_unobserved_frame_is_interpolated_between_its_observed_neighbours(eval_model: HaWoR) -> None:
    model = _silent_infillers(_model()).eval()
    T = 6
    params = torch.zeros(1, T, 2, PARAM_DIM)
    params[..., :6] = torch.tensor([1.0, 0, 0, 0, 1.0, 0])  # identity orientation
    params[0, :, :, -3] = torch.arange(T, dtype=torch.float32)[:, None] * 0.03  # x grows 3 cm a frame
    observed = torch.ones(1, T, 2, dtype=torch.bool)
    observed[0, 1:3, 0] = False  # between observed frames: linear
    observed[0, 4:, 1] = False  # after the last observed frame: held
    eye, zero = torch.eye(3).expand(1, T, 3, 3), torch.zeros(1, T, 3)
    with torch.no_grad():
        filled = model.infill(params + 0.0, observed, eye, zero)
    torch.testing.assert_close(filled[0, :, 0, -3], params[0, :, 0, -3])
    torch.testing.assert_close(filled[0, :, 1, -3], torch.tensor([0.0, 0.03, 0.06, 0.09, 0.09, 0.09]))


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
    loaded = _model(seed=2, **{"model.pretrained_path": str(path), "data.crop_size": 48})
    # Same blocks; the position embedding is resampled from a 2x2 to a 3x3 patch grid.
    torch.testing.assert_close(loaded.backbone.blocks[0].attn.qkv.weight, source.backbone.blocks[0].attn.qkv.weight)
    assert loaded.backbone.pos_embed.shape[1] == 1 + 9


def test_a_hawor_tune_model_loads_every_tensor_that_fits(tmp_path) -> None:
    # The source's heads (and the flow MLP, as wide as them) are narrower: their hidden layers do not fit and
    # keep the fresh initialisation.
    narrow = {"model.head_hidden": 16}
    source = _model(seed=1, **narrow)
    path = export_model(tmp_path / "model.pt", model=source, config=_config(**narrow), epoch=3)
    fresh = _model(seed=2).state_dict()
    loaded = _model(seed=2, **{"model.pretrained_path": str(path)}).state_dict()
    src = source.state_dict()
    assert loaded.keys() == src.keys()
    misfits = {name for name, value in loaded.items() if src[name].shape != value.shape}
    assert misfits and all(name.startswith(("hand_head.", "camera_head.", "flow_proj.")) for name in misfits)
    for name, value in loaded.items():
        assert torch.equal(value, fresh[name] if name in misfits else src[name]), name


def test_a_hawor_tune_model_with_another_backbone_is_refused(tmp_path) -> None:
    other = {"model.backbone": "test_resnet", "model.backbone_kwargs": {}}
    path = export_model(tmp_path / "model.pt", model=_model(**other), config=_config(**other), epoch=1)
    with pytest.raises(ValueError, match="backbone does not fit"):
        _model(**{"model.pretrained_path": str(path)})


# A HaMeR-style ViT (ViTPose): no class token, a token-wise final norm (timm's ``norm``, HaMeR's
# ``last_norm``), spatial tokens averaged only by the heads.
HAMER_VIT = {"depth": 1, "patch_size": 16, "class_token": False, "global_pool": "avg", "fc_norm": False}


def _hamer_checkpoint(path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A HaMeR-structured checkpoint around a random timm ViT without class token.

    Returns the timm ViT's state dict (the weights that must arrive) and HaMeR's (1, 1 + N, D) position
    embedding, whose first entry HaMeR adds to every patch's.
    """
    torch.manual_seed(7)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=C, **HAMER_VIT)
    weights = {k: v.clone() for k, v in vit.state_dict().items()}
    hamer_pos = torch.randn(1, 1 + weights["pos_embed"].shape[1], weights["pos_embed"].shape[2])
    state = {"backbone." + k.replace("norm.", "last_norm.") if k.startswith("norm.") else "backbone." + k: v
             for k, v in weights.items() if k != "pos_embed"}
    state["backbone.pos_embed"] = hamer_pos
    state["mano_head.decpose.weight"] = torch.randn(96, 1024)  # HaMeR's head: not ours, ignored
    torch.save({"state_dict": state, "epoch": 10}, path)
    return weights, hamer_pos


def test_hamer_checkpoint_without_a_token_norm_is_refused(tmp_path) -> None:
    # Without fc_norm: false timm normalises only the pooled token, so HaMeR's last_norm has no home.
    path = tmp_path / "hamer.ckpt"
    _hamer_checkpoint(path)
    with pytest.raises(ValueError, match="fc_norm"):
        _model(**{"model.pretrained_path": str(path),
                  "model.backbone_kwargs": {k: v for k, v in HAMER_VIT.items() if k != "fc_norm"}})


@pytest.mark.parametrize("backbone_kwargs", [HAMER_VIT])
def test_hamer_checkpoint_loads_into_a_timm_vit(tmp_path, backbone_kwargs: dict) -> None:
    path = tmp_path / "hamer.ckpt"
    weights, hamer_pos = _hamer_checkpoint(path)
    model = _model(**{"model.pretrained_path": str(path), "model.backbone_kwargs": backbone_kwargs})
    loaded = model.backbone.state_dict()
    assert loaded.keys() == weights.keys()
    for name, value in weights.items():
        if name != "pos_embed":
            assert torch.equal(loaded[name], value), name
    # HaMeR adds position 0 to every patch position: x + pos[:, 1:] + pos[:, :1].
    torch.testing.assert_close(loaded["pos_embed"], hamer_pos[:, 1:] + hamer_pos[:, :1], rtol=0, atol=0)


def test_a_pretrained_file_that_is_not_torch_weights_is_named(tmp_path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not weights")
    with pytest.raises(ConfigError, match=r"model.pretrained_path.*notes.txt.*not a torch weights file"):
        _model(**{"model.pretrained_path": str(path)})


def test_missing_pretrained_file_is_named(tmp_path) -> None:
    missing = tmp_path / "nope" / "vit.pt"
    with pytest.raises(FileNotFoundError, match="nope/vit.pt"):
        _model(**{"model.pretrained_path": str(missing)})


def test_cnn_backbone_without_img_size() -> None:
    model = _model(**{"model.backbone": "test_resnet", "model.backbone_kwargs": {}}).eval()
    with torch.no_grad():
        out = run_model(model, _batch(1, 2))
    assert out.joints.shape == (1, 2, 2, 21, 3)


@pytest.mark.parametrize("overrides, match", [
    ({"model.backbone": "no_such_net"}, "model.backbone"),
    ({"model.temporal_dim": 30, "model.temporal_heads": 4}, "model.temporal_dim"),
])
def test_bad_config_is_named(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _model(**overrides)


@pytest.mark.parametrize("key, corrupt", [
    ("crops", lambda x: x.float()),
    ("crops", lambda x: x[..., : C // 2, : C // 2]),  # another crop size
    ("crops", lambda x: x[:, :, :1]),  # one hand
    ("images", lambda x: x.float()),
    ("images", lambda x: x[:, :1]),  # fewer frames than the crops
    ("images", lambda x: x[..., : S // 2]),
    ("crop_K", lambda x: x[:, :, 0]),  # one K per frame instead of per hand
    ("crop_K", lambda x: x[:, 0]),  # one K per clip
    ("hand_valid", lambda x: x.float()),
    ("hand_valid", lambda x: x[..., :1]),
    ("flow", lambda x: x[..., : G // 2, : G // 2]),  # another grid
    ("flow", lambda x: x[:, :1]),  # fewer frames than the crops
    ("flow", lambda x: x.to(torch.uint8)),
    ("flow", lambda x: None),  # the model was built to read it
])
def test_bad_inputs_are_rejected_naming_the_argument(eval_model: HaWoR, key: str, corrupt) -> None:
    batch = _batch(1, 2)
    with pytest.raises(ValueError, match=f"^{key} must be"):
        run_model(eval_model, {**batch, key: corrupt(batch[key])})


def test_camera_reads_the_flow(eval_model: HaWoR) -> None:
    batch = _batch(1, 4)
    with torch.no_grad():
        still = run_model(eval_model, {**batch, "flow": torch.zeros_like(batch["flow"])})
        moving = run_model(eval_model, batch)
    assert not torch.allclose(still.cam_t[:, 1:], moving.cam_t[:, 1:])
    torch.testing.assert_close(still.cam_t[:, 0], moving.cam_t[:, 0])  # frame 0 is the reference either way


def test_camera_without_flow_reads_the_frames_only() -> None:
    model = _model(**{"data.flow_grid": 0}).eval()
    assert model.flow_proj is None
    batch = _batch(1, 4)
    del batch["flow"]
    with torch.no_grad():
        out = run_model(model, batch)
    assert torch.isfinite(out.cam_t).all()


def test_the_flow_head_is_fitted_not_trained(eval_model: HaWoR) -> None:
    # Its weights are buffers: saved with the model, invisible to the optimiser; zero as built (a static camera).
    assert not any(name.startswith("flow_head.") for name, _ in eval_model.named_parameters())
    assert {f"flow_head.{k}" for k in ("w1", "b1", "w2", "b2", "w3", "b3")} <= set(eval_model.state_dict())
    assert float(eval_model.flow_head.w3.abs().sum()) == float(eval_model.flow_head.b3.abs().sum()) == 0.0


def test_the_finger_path_starts_silent_and_moves_only_the_fingers() -> None:
    with_path, without = _model(**{"model.finger_path": True}).eval(), _model(**{"model.finger_path": False}).eval()
    without.load_state_dict(with_path.state_dict(), strict=False)  # the same weights but the finger head's
    batch = _batch(1, 3, seed=5)
    with torch.no_grad():
        a, b = run_model(with_path, batch), run_model(without, batch)
        torch.testing.assert_close(a.joints, b.joints)  # zero at first: the start predicts what it did
        torch.nn.init.normal_(with_path.finger_head.weight, std=0.01)
        c = run_model(with_path, batch)
    seen = batch["hand_valid"]  # (the infiller reads every parameter of the observed frames)
    torch.testing.assert_close(c.rot6d[seen][:, 0], a.rot6d[seen][:, 0])  # the global orientation is the head's
    torch.testing.assert_close(c.root[seen], a.root[seen])
    assert float((c.rot6d[..., 1:, :] - a.rot6d[..., 1:, :]).abs().amax()) > 1e-3  # the fingers moved



def _rotation_params(B: int, T: int, seed: int) -> torch.Tensor:
    """(B, T, 2, P) parameters with proper rotations, as the regressor's become in MANO."""
    gen = torch.Generator().manual_seed(seed)
    R = axis_angle_to_matrix(torch.randn(B, T, 2, 16, 3, generator=gen) * 0.5)
    rot6d = torch.cat([R[..., :, 0], R[..., :, 1]], dim=-1).flatten(-2)  # ours: the two columns stacked
    wrist = torch.randn(B, T, 2, 3, generator=gen) * 0.1 + torch.tensor([0.0, 0.0, 0.5])
    return torch.cat([rot6d, torch.randn(B, T, 2, 10, generator=gen), wrist], dim=-1)


def test_the_hawor_infiller_reads_hawors_layout_in_the_canonical_frame() -> None:
    """What HaWoR's filling_preprocess (ThunderVVV/HaWoR lib/eval_utils/filling_utils.py) feeds its network,
    written out: per hand the window's first frame's orientation and MANO translation taken out, the MANO
    translation wrist - J0(betas), betas, HaWoR's 6D (rotmat_to_rot6d: R[:, :2] flattened) of the global
    orientation and the fingers, left then right, padded to 120 frames with the last, observed where both
    hands are."""
    model = _model(**HAWOR_INFILLER).eval()
    B, T = 2, 7
    params = _rotation_params(B, T, seed=1)
    observed = torch.ones(B, T, 2, dtype=torch.bool)
    observed[0, 2, 0] = observed[1, 5, 1] = False
    seen = {}
    model.infiller.register_forward_hook(lambda m, args, out: seen.update(x=args[0], observed=args[1]))
    eye, zero = torch.eye(3).expand(B, T, 3, 3), torch.zeros(B, T, 3)
    with torch.no_grad():
        model.infill(params, observed, eye, zero)
    x, both = seen["x"], seen["observed"]
    assert x.shape == (B, 120, 218) and torch.equal(both[:, :T], observed.all(-1)) and both[:, T:].all()
    torch.testing.assert_close(x[:, T:], x[:, T - 1:T].expand(-1, 120 - T, -1))

    R = params[..., :96].unflatten(-1, (16, 2, 3)).transpose(-1, -2)  # (B, T, 2, 16, 3, 2) the two columns
    R = torch.cat([R, torch.linalg.cross(R[..., 0], R[..., 1])[..., None]], dim=-1)  # (B, T, 2, 16, 3, 3)
    betas, wrist = params[..., 96:106], params[..., 106:]
    def rest_wrist(h: int, beta: torch.Tensor) -> torch.Tensor:  # MANO's wrist J0(betas), flat and unmoved
        return model.mano[h](torch.eye(3).expand(1, 16, 3, 3), beta[None]).joints[0, 0]

    for b, t, h in ((0, 0, 0), (0, 4, 0), (1, 3, 1), (1, 6, 0)):
        assert observed[b, t, h]
        R0 = R[b, 0, h, 0]
        trans = R0.T @ (wrist[b, t, h] - wrist[b, 0, h]) + rest_wrist(h, betas[b, 0, h]) - rest_wrist(h, betas[b, t, h])
        rots = torch.cat([(R0.T @ R[b, t, h, 0])[None], R[b, t, h, 1:]])  # (16, 3, 3)
        expected = torch.cat([trans, betas[b, t, h], rots[:, :, :2].reshape(96)])
        torch.testing.assert_close(x[b, t, 109 * h:109 * (h + 1)], expected, atol=1e-5, rtol=0)


def test_the_hawor_infiller_replaces_only_unobserved_frames_and_inverts_its_layout() -> None:
    model = _model(**HAWOR_INFILLER).eval()
    B, T = 2, 6
    gen = torch.Generator().manual_seed(3)
    params = _rotation_params(B, T, seed=2)
    observed = torch.rand(B, T, 2, generator=gen) > 0.4
    observed[:, 0] = True
    cam_R = axis_angle_to_matrix(torch.randn(B, T, 3, generator=gen) * 0.2)
    cam_t = torch.randn(B, T, 3, generator=gen) * 0.05
    garbage = torch.where(observed[..., None], params, torch.randn(B, T, 2, PARAM_DIM, generator=gen) * 10)
    with torch.no_grad():
        filled = model.infill(params, observed, cam_R, cam_t)
        assert torch.equal(filled[observed], params[observed])
        assert not torch.allclose(filled[~observed], params[~observed])
        torch.testing.assert_close(model.infill(garbage, observed, cam_R, cam_t), filled)  # never read

    # A network that returns its input gives back the interpolation HaWoR feeds it: a hand still in the
    # world while the head moves stays still, so canonical -> world inverts world -> canonical.
    model.infiller.forward = lambda x, observed: x
    still = params[:, :1].expand(B, T, 2, PARAM_DIM).clone()  # in camera 0
    Rt = cam_R.transpose(-1, -2)[:, :, None]  # (B, T, 1, 3, 3) camera 0 -> camera t
    still[..., -3:] = (Rt @ (still[..., -3:] - cam_t[:, :, None])[..., None]).squeeze(-1)
    still[..., :6] = (Rt[:, :, :, None] @ still[..., :6].unflatten(-1, (2, 3))[..., None]).squeeze(-1).flatten(-2)
    with torch.no_grad():
        torch.testing.assert_close(model.infill(still, observed, cam_R, cam_t), still, atol=1e-5, rtol=0)


def test_the_hand_trajectory_projection_follows_the_hawor_infiller() -> None:
    model = _model(**{**HAWOR_INFILLER, "model.hand_trajectory_degree": 1}).eval()
    B, T = 1, 8
    params = _rotation_params(B, T, seed=4)
    observed = torch.ones(B, T, 2, dtype=torch.bool)
    observed[0, 3:5, 1] = False
    eye, zero = torch.eye(3).expand(B, T, 3, 3), torch.zeros(B, T, 3)
    with torch.no_grad():
        filled = model.infill(params, observed, eye, zero)
    assert float(torch.diff(filled[..., -3:], n=2, dim=1).abs().amax()) < 1e-5  # wrists on lines
    assert float(torch.diff(params[..., -3:], n=2, dim=1).abs().amax()) > 1e-2
