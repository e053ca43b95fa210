"""Predictions of a split from hand boxes: one file per sequence, every image once, MANO parameters that rebuild
the joints, and cameras chained as the evaluation chains them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL_OVERRIDES, write_box_files
from torch import nn

from hawor_tune.mano import HANDS, build_mano
from hawor_tune.model import HaWoROutput, build_model
from hawor_tune.prediction import predict_from_boxes, split_boxes


@pytest.fixture(scope="module")
def box_folder(synthetic_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("boxes")
    return folder, write_box_files(synthetic_dataset, folder, "test")


def _load(path):
    with np.load(path) as f:
        return dict(f)


def test_predictions_hold_every_image_and_mano_parameters_that_rebuild_the_joints(synthetic_dataset, box_folder,
                                                                                  tmp_path):
    folder, written = box_folder
    cfg = synthetic_dataset.config(TINY_MODEL_OVERRIDES)
    torch.manual_seed(0)
    model = build_model(cfg)
    boxes = split_boxes(cfg, "test", folder)
    index = json.loads(predict_from_boxes(model, cfg, boxes, tmp_path / "pred").read_text())
    assert index["split"] == "test" and set(index["sequences"]) == set(written)
    for name, entry in written.items():
        p = _load(tmp_path / "pred" / index["sequences"][name])
        n = len(entry["image_index"])
        assert p["image_index"].tolist() == entry["image_index"] and (p["stream"] == 0).all()
        for hand in HANDS:
            assert p[f"{hand}_observed"].tolist() == [b is not None for b in entry[hand]]
            assert p[f"{hand}_joints"].shape == (n, 21, 3) and np.isfinite(p[f"{hand}_joints"]).all()
            # ARCTIC's mano.npy convention, through a MANO layer built on its own: pose relative to hands_mean,
            # trans added to the layer's output.
            layer = build_mano(cfg.mano, hand)
            with torch.no_grad():
                R = layer.pose_to_rotmats(torch.from_numpy(p[f"{hand}_rot"]), torch.from_numpy(p[f"{hand}_pose"]),
                                          relative_to_mean=True)
                joints = layer(R, torch.from_numpy(p[f"{hand}_shape"]), torch.from_numpy(p[f"{hand}_trans"])).joints
            np.testing.assert_allclose(joints.numpy(), p[f"{hand}_joints"], atol=2e-5)
        assert p["cam_R"].shape == (n, 3, 3) and p["cam_t"].shape == (n, 3)
        np.testing.assert_allclose(p["cam_R"][0], np.eye(3), atol=1e-6)  # the first camera is the reference
        np.testing.assert_allclose(p["cam_t"][0], 0.0, atol=1e-7)
        np.testing.assert_allclose(p["cam_R"] @ p["cam_R"].transpose(0, 2, 1), np.broadcast_to(np.eye(3), (n, 3, 3)),
                                   atol=1e-4)  # rotations, up to float32 rounding over the chain


class _SteadyCamera(nn.Module):
    """A stand-in model whose camera moves 1 cm along z per frame in every clip, and whose hands sit still."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, crops, crop_K, images, hand_valid, flow=None) -> HaWoROutput:
        B, T = crops.shape[:2]
        eye = torch.eye(3).expand(B, T, 3, 3)
        cam_t = torch.zeros(B, T, 3)
        cam_t[..., 2] = 0.01 * torch.arange(T)
        rotmats = torch.eye(3).expand(B, T, 2, 16, 3, 3)
        root = torch.tensor([0.0, 0.0, 0.4]).expand(B, T, 2, 3)
        return HaWoROutput(rot6d=torch.zeros(B, T, 2, 16, 6), rotmats=rotmats, betas=torch.zeros(B, T, 2, 10),
                           root=root, joints=root[..., None, :].expand(B, T, 2, 21, 3),
                           vertices=torch.zeros(B, T, 2, 1, 3), cam_R=eye, cam_t=cam_t, observed=hand_valid)


@pytest.mark.parametrize("frame_step", [1, 2])
def test_cameras_are_chained_over_each_stream_of_the_sequence(synthetic_dataset, box_folder, tmp_path, frame_step):
    # Clips of 4 frames, chained: the junction between two clips repeats the last step (the evaluation's rule),
    # so a steady 1 cm per frame carries on across clips and through the last, end-aligned one.
    folder, written = box_folder
    cfg = synthetic_dataset.config({"data.frame_step": frame_step})
    index = json.loads(predict_from_boxes(_SteadyCamera(), cfg, split_boxes(cfg, "test", folder),
                                          tmp_path / "pred").read_text())
    for name in written:
        p = _load(tmp_path / "pred" / index["sequences"][name])
        rows = np.arange(len(p["image_index"]))
        np.testing.assert_array_equal(p["stream"], rows % frame_step)
        position = rows // frame_step  # within its stream
        np.testing.assert_allclose(p["cam_t"][:, 2], 0.01 * position, atol=1e-6)
        np.testing.assert_allclose(p["cam_t"][:, :2], 0.0, atol=1e-7)
        np.testing.assert_allclose(p["left_joints"], np.broadcast_to([0.0, 0.0, 0.4], p["left_joints"].shape), atol=1e-7)


class _BlindClipsGoAstray(_SteadyCamera):
    """The steady camera, with each hand still in the camera (0.4 m ahead) in a clip that observes it somewhere,
    and far off (9 m, turned) in a clip that observes it nowhere, as a clip with nothing to fill from may be."""

    def forward(self, crops, crop_K, images, hand_valid, flow=None) -> HaWoROutput:
        out = super().forward(crops, crop_K, images, hand_valid, flow)
        sees = hand_valid.any(dim=1)[:, None, :, None].expand(*hand_valid.shape, 3)  # (B, T, 2, 3)
        root = torch.where(sees, out.root, torch.full_like(out.root, 9.0))
        turned = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).expand_as(out.rotmats)
        rotmats = torch.where(sees[..., :1, None, None], out.rotmats, turned)
        return HaWoROutput(rot6d=out.rot6d, rotmats=rotmats, betas=out.betas, root=root,
                           joints=root[..., None, :].expand(*root.shape[:3], 21, 3), vertices=out.vertices,
                           cam_R=out.cam_R, cam_t=out.cam_t, observed=hand_valid)


def test_a_hand_lost_for_longer_than_a_clip_is_bridged_in_the_world(synthetic_dataset, box_folder, tmp_path):
    # The left hand's boxes are removed over 9 images of one sequence, more than two 4-frame clips: the
    # images no clip around them sees it in are bridged between the nearest ones that are, in the first
    # camera, instead of read from a clip that observes the hand nowhere.
    folder, written = box_folder
    gap = tmp_path / "boxes"
    name = sorted(written)[0]
    for other, entry in written.items():
        entry = json.loads(json.dumps(entry))
        if other == name:
            assert all(b is not None for b in entry["left"])
            entry["left"][5:14] = [None] * 9
            mine = entry
        (gap / f"{other}.json").parent.mkdir(parents=True, exist_ok=True)
        (gap / f"{other}.json").write_text(json.dumps(entry))
    cfg = synthetic_dataset.config({"data.eval_hop": 1})
    index = json.loads(predict_from_boxes(_BlindClipsGoAstray(), cfg, split_boxes(cfg, "test", gap),
                                          tmp_path / "pred").read_text())
    p = _load(tmp_path / "pred" / index["sequences"][name])
    T, n = cfg.data.seq_len, len(mine["left"])
    for hand in HANDS:
        observed = np.array([b is not None for b in mine[hand]])
        # Whether some clip (every T consecutive images) holding image i observes the hand somewhere.
        sees = [any(observed[s:s + T].any() for s in range(max(0, i - T + 1), min(i, n - T) + 1)) for i in range(n)]
        np.testing.assert_array_equal(p[f"{hand}_bridged"], ~np.array(sees))
        np.testing.assert_array_equal(p[f"{hand}_observed"], observed)
        # In the world (the first camera), image i's wrist is 0.4 + 0.01 i m ahead where a clip sees the hand;
        # bridged ones lie on the line between the nearest such images (held at the nearest one at the ends).
        i = np.arange(n)
        world = np.interp(i, i[sees], 0.4 + 0.01 * i[sees])
        np.testing.assert_allclose(p[f"{hand}_joints"][:, 0, 2], world - 0.01 * i, atol=1e-6)
        np.testing.assert_allclose(p[f"{hand}_joints"][:, 0, :2], 0.0, atol=1e-6)
        np.testing.assert_allclose(p[f"{hand}_rot"], 0.0, atol=1e-6)
    assert p["left_bridged"][8:11].all() and p["left_bridged"].sum() == 3
