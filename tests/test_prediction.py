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
