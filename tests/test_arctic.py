"""The ARCTIC reader recovers the generator's ground truth, builds the right clips and names bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import run_concurrently

import hawor_tune.data as data
from hawor_tune.data import (
    DatasetError,
    build_dataset,
    ensure_dataset,
    load_sequence,
    load_sequences,
    read_split,
)
from hawor_tune.data.flow import clip_flow
from hawor_tune.data.frames import JPEG_QUALITY
from hawor_tune.mano import HANDS, build_mano

# conftest's dataset: 64x48 frames letterboxed to 64 (scale 1, 8 rows of padding on top), 32 px hand crops,
# the whole frame resized to 32 px (scale 1/2) and its optical flow pooled onto 4 x 4 cells.
FRAME_SIZE, PAD_Y, CROP, IMG, FLOW = 64, 8.0, 32, 32, 4
SCALE = IMG / FRAME_SIZE
FRAMES, SKIP = 40, 10
CROP_SCALE = 1.3  # data.crop_scale's default: box side over the visible keypoints' extent


def _frame_uv(uv: np.ndarray) -> np.ndarray:
    """Original pixels -> letterboxed frame pixels (scale 1: only the padding moves them)."""
    return uv + np.array([0.0, PAD_Y])


def _image_uv(uv: np.ndarray) -> np.ndarray:
    """Original pixels -> pixels of the whole-frame input (cv2.resize's pixel-centre convention)."""
    return SCALE * (_frame_uv(uv) + 0.5) - 0.5


def _frame_K(K: np.ndarray) -> np.ndarray:
    """Intrinsics of the original image -> of the letterboxed frame."""
    return K + np.array([[0.0, 0.0, 0.0], [0.0, 0.0, PAD_Y], [0.0, 0.0, 0.0]])


def _items(ds):
    return [ds[i] for i in range(len(ds))]


def _letterboxed_frame(path: Path) -> np.ndarray:
    """(64, 64, 3) RGB: a 64x48 JPEG between 8 black rows above and below, written out by hand."""
    frame = np.zeros((FRAME_SIZE, FRAME_SIZE, 3), np.uint8)
    frame[int(PAD_Y):int(PAD_Y) + 48] = cv2.imread(str(path))[..., ::-1]
    return frame


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_labels_match_the_generators_ground_truth(synthetic_dataset, split):
    ds = build_dataset(synthetic_dataset.config(), split)
    assert len(ds) > 0
    for item in _items(ds):
        truth = synthetic_dataset.truth[ds.sequences[int(item["seq_index"])]]
        f = item["frame_index"].numpy()
        np.testing.assert_allclose(item["joints3d"].numpy(), truth["joints_cam"][f], atol=1e-5, rtol=0)
        # rtol: labels come from float32 files, and joints far out of view sit where the lens magnifies errors.
        np.testing.assert_allclose(item["joints2d"].numpy(), _image_uv(truth["joints2d"][f]), atol=1e-3, rtol=1e-5)
        np.testing.assert_allclose(item["rotmats"][:, :, 0].numpy(), truth["global_orient_cam"][f], atol=1e-5)
        np.testing.assert_allclose(item["betas"].numpy(), np.broadcast_to(truth["betas"], (len(f), 2, 10)), atol=1e-6)
        np.testing.assert_allclose(item["cam_R"].numpy(), truth["cam_R"][f], atol=1e-6)
        np.testing.assert_allclose(item["cam_t"].numpy(), truth["cam_t"][f], atol=1e-5)
        K = _frame_K(truth["K"])
        expected_K = [[SCALE * K[0, 0], 0, SCALE * (K[0, 2] + 0.5) - 0.5],
                      [0, SCALE * K[1, 1], SCALE * (K[1, 2] + 0.5) - 0.5], [0, 0, 1]]
        np.testing.assert_allclose(item["K"].numpy(), expected_K, atol=1e-4)
        np.testing.assert_allclose(item["dist"].numpy(), truth["dist"], atol=1e-7)
        # Finger rotations are proper rotations (what the MANO layer was given).
        R = item["rotmats"].double().numpy()
        np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-5)


def test_a_split_posed_at_once_equals_its_sequences_one_at_a_time(synthetic_dataset):
    # A dataset poses each hand once for all its sequences: each sequence's labels, cut from the middle of
    # that batch, must be those it gets alone. To the last float32 bit on some CPUs; on others (seen on an
    # AVX-512 EPYC) the matrix products' blocking follows the batch size and moves a coordinate by one ulp.
    cfg = synthetic_dataset.config()
    mano = [build_mano(cfg.mano, side, fix_left_shapedirs=False) for side in HANDS]
    names = [n for split in ("train", "val", "test") for n in read_split(synthetic_dataset.root, split)]
    kwargs = {"mano": mano, "frame_size": FRAME_SIZE, "frame_step": 2}
    together = load_sequences(synthetic_dataset.root, names, **kwargs)
    assert [lab.name for lab in together] == names
    for lab in together:
        alone = load_sequence(synthetic_dataset.root, lab.name, **kwargs)
        for key in ("frame_index", "joints3d", "joints2d", "rotmats", "betas", "hand_valid", "joints_visible",
                    "cam_R", "cam_t", "K", "dist"):
            np.testing.assert_allclose(getattr(lab, key), getattr(alone, key), rtol=1e-6, atol=0,
                                       err_msg=f"{lab.name} {key}")


def test_batch_has_the_spec_dtypes_and_shapes(synthetic_dataset):
    cfg = synthetic_dataset.config()
    batch = next(iter(data.build_dataloader(cfg, "val", shuffle=False)))
    B, T, S, C = 2, 4, IMG, CROP
    expected = {"crops": ((B, T, 2, 3, C, C), "torch.uint8"), "crop_K": ((B, T, 2, 3, 3), "torch.float32"),
                "crop_joints2d": ((B, T, 2, 21, 2), "torch.float32"),
                "joints_visible": ((B, T, 2, 21), "torch.bool"), "scored": ((B, T), "torch.bool"),
                "images": ((B, T, 3, S, S), "torch.uint8"), "K": ((B, 3, 3), "torch.float32"),
                "flow": ((B, T, 2, FLOW, FLOW), "torch.float32"), "dist": ((B, 8), "torch.float32"), "joints3d": ((B, T, 2, 21, 3), "torch.float32"),
                "joints2d": ((B, T, 2, 21, 2), "torch.float32"), "rotmats": ((B, T, 2, 16, 3, 3), "torch.float32"),
                "betas": ((B, T, 2, 10), "torch.float32"), "hand_valid": ((B, T, 2), "torch.bool"),
                "cam_R": ((B, T, 3, 3), "torch.float32"), "cam_t": ((B, T, 3), "torch.float32"),
                "seq_index": ((B,), "torch.int64"), "frame_index": ((B, T), "torch.int64")}
    assert {k: (tuple(v.shape), str(v.dtype)) for k, v in batch.items()} == expected


def _window(root: Path, name: str) -> set[int]:
    """ARCTIC's kept annotation indices of a sequence, worked out by hand: image indices 10 .. 29 of the 40,
    each minus its subject's ioi_offset."""
    ioi = json.loads((root / "meta" / "misc.json").read_text())[name.split("/")[0]]["ioi_offset"]
    return {i - ioi for i in range(SKIP, FRAMES - SKIP) if i - ioi >= 0}


def test_frames_follow_ioi_offset_and_skip_the_ends(synthetic_dataset):
    cfg = synthetic_dataset.config()
    misc = json.loads((synthetic_dataset.root / "meta" / "misc.json").read_text())
    ds = build_dataset(cfg, "val", cached=False)
    frames = np.concatenate([it["frame_index"].numpy() for it in _items(ds)])
    ioi = misc[ds.sequences[0].split("/")[0]]["ioi_offset"]
    assert ioi > 0  # the generator's offsets are 1-3, so the window is not the annotation indices 10 .. 29
    # ARCTIC's window is on image indices: annotations 10 - ioi .. 29 - ioi.
    assert set(frames.tolist()) == _window(synthetic_dataset.root, ds.sequences[0])
    assert frames.min() == SKIP - ioi and frames.max() == FRAMES - SKIP - 1 - ioi
    item = ds[1]
    sid, seq = ds.sequences[int(item["seq_index"])].split("/")
    frames = []
    for t, f in enumerate(item["frame_index"].tolist()):
        # Image index = annotation index + ioi_offset; the whole-frame input is the image letterboxed to IMG
        # (here the letterboxed frame halved), stored as JPEG.
        frames.append(_letterboxed_frame(synthetic_dataset.root / "images" / sid / seq / "0" / f"{f + misc[sid]['ioi_offset']:05d}.jpg"))
        expected = _jpeg(cv2.resize(frames[-1], (IMG, IMG), interpolation=cv2.INTER_AREA))
        np.testing.assert_array_equal(item["images"][t].permute(1, 2, 0).numpy(), expected)
    # The flow comes from the same full-size frames, summed from pair flows, in units of the frame's focal length
    # (stored as float16).
    focal = float(item["K"][0, 0]) / SCALE
    np.testing.assert_allclose(item["flow"].numpy(), clip_flow(frames, focal, FLOW), rtol=2e-3, atol=2e-3)


def _jpeg(rgb: np.ndarray) -> np.ndarray:
    """An RGB image after the prepared form's JPEG round trip."""
    _, data = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    return cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1]


@pytest.mark.parametrize("frame_step", [1, 2])
def test_prepared_flows_equal_the_flows_of_the_frames_and_serve_every_clip_length(synthetic_dataset, frame_step):
    cfg = synthetic_dataset.config({"data.frame_step": frame_step})
    prepared = build_dataset(cfg, "train")
    direct = build_dataset(cfg, "train", cached=False)
    for i in (0, len(prepared) - 1):
        np.testing.assert_array_equal(prepared[i]["flow"].numpy(), direct[i]["flow"].numpy())
    assert prepared[0]["flow"][0].abs().sum() == 0 and prepared[0]["flow"][1:].abs().sum() > 0  # frame 0: reference
    # Another clip length and frame step read the same shards, not prepared again: a clip's flow is the sum
    # of the pair flows of its frames and of those between them.
    tars = sorted(prepared.source.folder.rglob("*.tar"))
    before = [p.stat().st_mtime_ns for p in tars]
    longer = build_dataset(synthetic_dataset.config({"data.seq_len": 8, "data.frame_step": frame_step}), "train")
    assert longer.source.folder == prepared.source.folder
    assert [p.stat().st_mtime_ns for p in tars] == before
    short, long_ = prepared[0], longer[0]  # both start at the first frame of the first sequence
    np.testing.assert_allclose(long_["flow"][:4].numpy(), short["flow"].numpy(), rtol=1e-6, atol=1e-6)


# ---- Hand crops -------------------------------------------------------------------------------------------

def _box_map(uv: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """(3, 3) frame-to-crop map of one hand's unjittered box, by the documented rule: a square around the
    visible keypoints (frame pixels) CROP_SCALE times their larger extent (at least 8 px), the whole frame
    when fewer than two joints are visible; its centre goes to the crop centre (C - 1) / 2."""
    if visible.sum() < 2:
        centre, side = np.full(2, (FRAME_SIZE - 1) / 2), float(FRAME_SIZE)
    else:
        lo, hi = uv[visible].min(axis=0), uv[visible].max(axis=0)
        centre, side = (lo + hi) / 2, max(CROP_SCALE * float((hi - lo).max()), 8.0)
    a = CROP / side
    return np.array([[a, 0.0, (CROP - 1) / 2 - a * centre[0]], [0.0, a, (CROP - 1) / 2 - a * centre[1]],
                     [0.0, 0.0, 1.0]])


def _crop_maps(item: dict, truth: dict) -> np.ndarray:
    """(T, 2, 3, 3) unjittered frame-to-crop maps of a clip, from the generator's 2D keypoints."""
    uv = _frame_uv(truth["joints2d"][item["frame_index"].numpy()])  # (T, 2, 21, 2)
    visible = item["joints_visible"].numpy()
    return np.stack([[_box_map(uv[t, h], visible[t, h]) for h in range(2)] for t in range(len(uv))])


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_crop_keypoints_are_the_lens_projection_with_the_crop_intrinsics(synthetic_dataset, split):
    ds = build_dataset(synthetic_dataset.config(), split)
    for item in _items(ds):
        truth = synthetic_dataset.truth[ds.sequences[int(item["seq_index"])]]
        joints = truth["joints_cam"][item["frame_index"].numpy()]  # (T, 2, 21, 3)
        crop_K = item["crop_K"].double().numpy()
        for t, h in np.ndindex(joints.shape[:2]):
            uv, _ = cv2.projectPoints(joints[t, h], np.zeros(3), np.zeros(3), crop_K[t, h], truth["dist"])
            np.testing.assert_allclose(item["crop_joints2d"][t, h].numpy(), uv[:, 0], atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("split", ["val", "test"])
def test_evaluation_crops_are_boxes_around_the_visible_keypoints(synthetic_dataset, split):
    ds = build_dataset(synthetic_dataset.config(), split)
    for item in _items(ds):
        truth = synthetic_dataset.truth[ds.sequences[int(item["seq_index"])]]
        A = _crop_maps(item, truth)  # (T, 2, 3, 3)
        uv = _frame_uv(truth["joints2d"][item["frame_index"].numpy()])  # (T, 2, 21, 2)
        # The crop's camera is the frame's with the crop map applied after the intrinsics (the unmirrored
        # crop, also for the left hand), and its keypoints are the generator's mapped through the crop.
        np.testing.assert_allclose(item["crop_K"].numpy(), A @ _frame_K(truth["K"]), rtol=1e-5, atol=1e-3)
        expected = np.einsum("thij,thkj->thki", A[..., :2, :2], uv) + A[..., None, :2, 2]
        np.testing.assert_allclose(item["crop_joints2d"].numpy(), expected, atol=1e-3)


def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample (H, W, 3) ``image`` at float pixel positions (pixel centres at integers), black outside."""
    padded = np.pad(image.astype(np.float64), ((1, 1), (1, 1), (0, 0)))  # a black border
    h, w = image.shape[:2]
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]

    def at(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        return padded[np.clip(yy + 1, 0, h + 1).astype(int), np.clip(xx + 1, 0, w + 1).astype(int)]

    return ((1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x0 + 1))
            + fy * ((1 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1)))


def test_crop_pixels_are_the_frames_pixels_under_the_crop_map(synthetic_dataset):
    ds = build_dataset(synthetic_dataset.config(), "val")
    misc = json.loads((synthetic_dataset.root / "meta" / "misc.json").read_text())
    item = ds[1]
    name = ds.sequences[int(item["seq_index"])]
    sid, seq = name.split("/")
    A = _crop_maps(item, synthetic_dataset.truth[name])
    v, u = np.mgrid[0:CROP, 0:CROP].astype(np.float64)  # crop pixel grid
    for t, f in enumerate(item["frame_index"].tolist()):
        frame = _letterboxed_frame(synthetic_dataset.root / "images" / sid / seq / "0"
                                   / f"{f + misc[sid]['ioi_offset']:05d}.jpg")
        for h in range(2):
            a, (tx, ty) = A[t, h, 0, 0], A[t, h, :2, 2]
            crop = item["crops"][t, h].permute(1, 2, 0).numpy().astype(np.float64)
            if HANDS[h] == "left":
                crop = crop[:, ::-1]  # left crops arrive mirrored: u -> C - 1 - u
            error = [np.abs(crop - _bilinear(frame, (u - tx) / a + dx / a, (v - ty) / a)).mean() for dx in (0, 1)]
            # Up to the stored JPEG's loss (a few levels on these tiny, noisy frames) ...
            assert error[0] < 6.0, f"frame {t}, {HANDS[h]} hand: mean error {error[0]:.1f}"
            # ... and in place: one frame pixel off is far worse.
            assert error[1] > 1.8 * error[0], f"frame {t}, {HANDS[h]} hand: errors {error}"


@pytest.mark.parametrize("split", ["val", "test"])
def test_every_frame_is_scored_once_whatever_the_clip_length(synthetic_dataset, split):
    scored = {}
    # 20 frames per sequence: 6 leaves an end-aligned clip overlapping the one before; hop 1 scores one frame a clip.
    for seq_len, hop in ((4, 0), (6, 0), (6, 1)):
        ds = build_dataset(synthetic_dataset.config({"data.seq_len": seq_len, "data.eval_hop": hop}), split)
        frames = [(ds.sequences[int(item["seq_index"])], f)
                  for item in _items(ds)
                  for f, counts in zip(item["frame_index"].tolist(), item["scored"].tolist(), strict=True) if counts]
        assert len(frames) == len(set(frames)), (seq_len, hop)
        scored[seq_len, hop] = set(frames)
    every_frame = {(name, f) for name in ds.sequences for f in _window(synthetic_dataset.root, name)}
    assert scored[4, 0] == scored[6, 0] == scored[6, 1] == every_frame


@pytest.mark.parametrize("seq_len, hop, expected_hop", [(4, 0, 2), (5, 0, 2), (6, 0, 3), (6, 1, 1), (6, 4, 4)])
def test_each_evaluation_clip_starts_on_a_frame_an_earlier_clip_placed(synthetic_dataset, seq_len, hop, expected_hop):
    ds = build_dataset(synthetic_dataset.config({"data.seq_len": seq_len, "data.eval_hop": hop}), "val")
    seen: dict[int, set[int]] = {}
    starts: dict[int, list[int]] = {}
    for item in _items(ds):
        frames = item["frame_index"].tolist()
        covered = seen.setdefault(int(item["seq_index"]), set())
        assert not covered or frames[0] in covered, (seq_len, frames)  # no junction guessed
        scored = item["scored"].tolist()
        assert scored == sorted(scored)  # the scored frames are the clip's last ones
        covered.update(frames)
        starts.setdefault(int(item["seq_index"]), []).append(frames[0])
    for firsts in starts.values():  # every eval_hop frames (half a clip for 0), the end-aligned last clip apart
        assert set(np.diff(firsts[:-1]).tolist()) <= {expected_hop}, firsts
        assert 0 < firsts[-1] - firsts[-2] <= expected_hop, firsts


def test_training_crops_are_jittered_and_evaluation_crops_are_not(synthetic_dataset):
    cfg = synthetic_dataset.config()
    jitter = cfg.data.crop_jitter
    assert jitter > 0
    train = build_dataset(cfg, "train")
    torch.manual_seed(0)
    draws = [train[3] for _ in range(20)]
    assert not torch.equal(draws[0]["crop_K"], draws[1]["crop_K"])
    assert not torch.equal(draws[0]["crops"], draws[1]["crops"])
    torch.manual_seed(0)
    assert torch.equal(train[3]["crops"], draws[0]["crops"])  # drawn from torch's seeded RNG
    # Each box stays within the jitter of the unjittered one: centre shift up to jitter x side on each axis,
    # side scaled by 1 +- jitter.
    truth = synthetic_dataset.truth[train.sequences[int(draws[0]["seq_index"])]]
    A0 = _crop_maps(draws[0], truth)  # (T, 2, 3, 3)
    K_inv = np.linalg.inv(_frame_K(truth["K"]))
    side0 = CROP / A0[..., 0, 0]  # (T, 2)
    centre0 = ((CROP - 1) / 2 - A0[..., :2, 2]) / A0[..., :1, 0]  # (T, 2, 2)
    for item in draws:
        A = item["crop_K"].double().numpy() @ K_inv
        side = CROP / A[..., 0, 0]
        centre = ((CROP - 1) / 2 - A[..., :2, 2]) / A[..., :1, 0]
        assert np.all(np.abs(side / side0 - 1) <= jitter + 1e-4)
        assert np.all(np.abs(centre - centre0) <= jitter * side0[..., None] + 1e-3)

    val = build_dataset(cfg, "val")
    first, again = val[1], val[1]
    assert torch.equal(first["crops"], again["crops"]) and torch.equal(first["crop_K"], again["crop_K"])


@pytest.mark.parametrize("seq_len,stride,frame_step,eval_hop,expected", [
    # Evaluation clips hop half a clip (eval_hop 0): 20 frames of 4 start at 0, 2, ..., 16; of 8 at 0, 4, 8, 12.
    (4, 2, 1, 0, {"train": 2 * 9, "val": 9, "test": 9}),  # 20 frames: starts 0, 2, ..., 16 / 0, 2, ..., 16
    (8, 3, 1, 0, {"train": 2 * 5, "val": 4, "test": 4}),  # starts 0, 3, ..., 12 / 0, 4, 8, 12
    (4, 3, 2, 0, {"train": 2 * 3, "val": 4, "test": 4}),  # 10 frames 10, 12, ..., 28: 0, 3, 6 / 0, 2, 4, 6
    (4, 2, 1, 1, {"train": 2 * 9, "val": 17, "test": 17}),  # every frame a start: 0, 1, ..., 16
])
def test_clip_counts_and_frame_steps(synthetic_dataset, seq_len, stride, frame_step, eval_hop, expected):
    cfg = synthetic_dataset.config({"data.seq_len": seq_len, "data.stride": stride, "data.frame_step": frame_step,
                                    "data.eval_hop": eval_hop})
    for split, count in expected.items():
        ds = build_dataset(cfg, split, cached=False)
        assert len(ds) == count, split
        for item in _items(ds):
            assert np.all(np.diff(item["frame_index"].numpy()) == frame_step)


@pytest.mark.parametrize("min_visible", [8, 21])
def test_hand_valid_matches_the_projection_of_the_ground_truth(synthetic_dataset, min_visible):
    cfg = synthetic_dataset.config({"data.min_visible_joints": min_visible})
    flags = []
    for split in ("train", "val", "test"):
        ds = build_dataset(cfg, split)
        for item in _items(ds):
            truth = synthetic_dataset.truth[ds.sequences[int(item["seq_index"])]]
            f = item["frame_index"].numpy()
            uv, z = truth["joints2d"][f], truth["joints_cam"][f][..., 2]  # (T, 2, 21, 2), (T, 2, 21)
            # In front of the camera and inside the 64x48 image (pixel centres at integers).
            inside = ((z > 0.05) & (uv[..., 0] >= -0.5) & (uv[..., 0] <= 63.5) & (uv[..., 1] >= -0.5)
                      & (uv[..., 1] <= 47.5))
            expected = inside[..., 0] & (inside.sum(-1) >= min_visible)
            np.testing.assert_array_equal(item["hand_valid"].numpy(), expected)
            flags.append(expected)
    flags = np.concatenate(flags)
    assert flags.any() and not flags.all()  # hands leave the view in some sequences


def test_an_ioi_offset_beyond_the_skip_drops_image_indices_before_the_first_annotation(synthetic_dataset, tmp_path):
    root = _copy(synthetic_dataset.root, tmp_path)
    sid, seq = _val_sequence(root)
    path = root / "meta" / "misc.json"
    misc = json.loads(path.read_text())
    misc[sid]["ioi_offset"] = 12  # image indices 10, 11 would be annotations -2, -1
    path.write_text(json.dumps(misc))
    ds = build_dataset(synthetic_dataset.config({"data.root": str(root)}), "val", cached=False)
    frames = {f for item in _items(ds) for f in item["frame_index"].tolist()}
    assert frames == set(range(0, FRAMES - SKIP - 12))  # images 12 .. 29


def _arctic_rule(joints_cam: np.ndarray, truth: dict) -> np.ndarray:
    """ARCTIC's validity worked out independently: cv2's lens projection into the 64x48 image, a joint inside
    when 1 <= u <= 64 and 1 <= v <= 48 (ARCTIC's box [1, 1, W, H]), valid when the wrist and >= 3 joints are."""
    shape = joints_cam.shape[:-2]
    uv, _ = cv2.projectPoints(joints_cam.reshape(-1, 3).astype(np.float64), np.zeros(3), np.zeros(3), truth["K"],
                              truth["dist"])
    uv = uv.reshape(*shape, 21, 2)
    inside = (uv[..., 0] >= 1) & (uv[..., 0] <= 64) & (uv[..., 1] >= 1) & (uv[..., 1] <= 48)
    return inside[..., 0] & (inside.sum(-1) >= 3)


# An object template in ARCTIC's format (mesh.obj in mm, parts.json): lopsided, so that the articulation moves
# the mean of its projected vertices; parts 0 turn with the articulation (ARCTIC's code).
_TEMPLATE_MM = np.array([[0, 0, 0], [60, 0, 0], [0, 40, 0], [0, 0, 30], [80, 50, 10], [-20, 70, 40]], dtype=float)
_TEMPLATE_PARTS = [1, 0, 1, 0, 0, 1]


def _rodrigues(aa: np.ndarray) -> np.ndarray:
    return cv2.Rodrigues(np.asarray(aa, dtype=np.float64).reshape(3, 1))[0]


def _add_objects(root: Path, truth: dict) -> dict[str, np.ndarray]:
    """Write the template for every sequence's object and move each object so that its centre is in view in
    some frames and far right of the image in others (every 5th frame from the 3rd on); ARCTIC's per-frame
    is_valid worked out with cv2: the mean of the template's vertices projected through the lens, inside
    1 <= u <= 64, 1 <= v <= 48."""
    expected = {}
    for name, t in truth.items():
        sid, seq = name.split("/")
        folder = root / "meta" / "object_vtemplates" / seq.split("_")[0]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mesh.obj").write_text("# ARCTIC-style template\n" + "".join(
            f"v {x:.1f} {y:.1f} {z:.1f}\n" for x, y, z in _TEMPLATE_MM) + "f 1 2 3\n")
        (folder / "parts.json").write_text(json.dumps(_TEMPLATE_PARTS))
        path = root / "raw_seqs" / sid / f"{seq}.object.npy"
        obj = np.load(path).astype(np.float64)
        frames = len(obj)
        away = (np.arange(frames) % 5) == 2
        centre_cam = np.where(away[:, None], [0.6, 0.0, 0.4], [0.0, 0.02, 0.4])  # (F, 3) metres
        obj[:, 0] = np.linspace(0.0, 1.2, frames)  # articulation, radians
        obj[:, 4:] = 1000 * np.einsum("fji,fj->fi", t["cam_R"], centre_cam - t["cam_t"])  # world, mm
        np.save(path, obj.astype(np.float32))
        obj = obj.astype(np.float32).astype(np.float64)  # what the reader sees
        flags = np.empty(frames, dtype=bool)
        for f in range(frames):
            local = _TEMPLATE_MM / 1000.0
            turn = _rodrigues([0.0, 0.0, -obj[f, 0]])
            local = np.array([turn @ v if p == 0 else v for v, p in zip(local, _TEMPLATE_PARTS)])
            world = local @ _rodrigues(obj[f, 1:4]).T + obj[f, 4:] / 1000.0
            cam = world @ t["cam_R"][f].T + t["cam_t"][f]
            uv, _ = cv2.projectPoints(cam, np.zeros(3), np.zeros(3), t["K"], t["dist"])
            u, v = uv.reshape(-1, 2).mean(0)
            flags[f] = 1 <= u <= 64 and 1 <= v <= 48
        expected[name] = flags
    return expected


@pytest.mark.parametrize("real", [False, True], ids=["explicit", "auto_on_real_data"])
def test_arctics_validity_rule(synthetic_dataset, tmp_path, real):
    root = _copy(synthetic_dataset.root, tmp_path)
    in_view = _add_objects(root, synthetic_dataset.truth)
    overrides = {"data.root": str(root), "data.cache_dir": str(tmp_path / "cache"), "data.min_visible_joints": 21}
    if real:  # the same files without the generator's marker: a real ARCTIC folder, where auto means arctic
        (root / ".synthetic.json").unlink()
    else:
        overrides["data.valid_rule"] = "arctic"
    cfg = synthetic_dataset.config(overrides)
    assert data.resolve_valid_rule(cfg.data.valid_rule, cfg.data.root) == "arctic"
    flags, objects, differs = [], [], False
    for split in ("train", "val", "test"):
        ds = build_dataset(cfg, split, cached=False)
        for item in _items(ds):
            name = ds.sequences[int(item["seq_index"])]
            truth, f = synthetic_dataset.truth[name], item["frame_index"].numpy()
            hands = _arctic_rule(truth["joints_cam"][f], truth)
            expected = hands & in_view[name][f][:, None]  # ARCTIC: left_valid * is_valid, right_valid * is_valid
            np.testing.assert_array_equal(item["hand_valid"].numpy(), expected)
            visible = item["joints_visible"].numpy()
            differs |= bool((expected != (visible[..., 0] & (visible.sum(-1) >= 21))).any())
            flags.append(expected)
            objects.append(hands & ~in_view[name][f][:, None])
    flags = np.concatenate(flags)
    assert flags.any() and not flags.all()
    assert np.concatenate(objects).any()  # some hands pass the hand rule but not the object's
    assert differs  # min_visible_joints (21 here, which would differ) belongs to the other rule


def test_arctics_rule_needs_the_object_templates(synthetic_dataset, tmp_path):
    cfg = synthetic_dataset.config({"data.valid_rule": "arctic", "data.cache_dir": str(tmp_path / "cache")})
    with pytest.raises(DatasetError, match=r"object_vtemplates/\w+/mesh.obj does not exist.*valid_rule=visible_joints"):
        build_dataset(cfg, "val", cached=False)


def test_auto_validity_keeps_the_visible_joints_rule_on_generated_data(synthetic_dataset):
    assert synthetic_dataset.config().data.valid_rule == "auto"
    assert data.resolve_valid_rule("auto", synthetic_dataset.root) == "visible_joints"


def test_clips_longer_than_the_sequences_are_an_error(synthetic_dataset):
    cfg = synthetic_dataset.config({"data.seq_len": 11, "data.frame_step": 2})  # 10 frames per sequence
    with pytest.raises(DatasetError, match="no clip of 11 frames.*at most 10 frames"):
        build_dataset(cfg, "val", cached=False)


def test_train_defaults_to_every_sequence_not_held_out(synthetic_dataset, tmp_path):
    root = _copy(synthetic_dataset.root, tmp_path)
    path = root / "splits_json" / "protocol_p2.json"
    splits = json.loads(path.read_text())
    full_train = splits["train"]
    for train in ([], None):
        modified = {k: v for k, v in splits.items() if k != "train"} | ({"train": train} if train is not None else {})
        path.write_text(json.dumps(modified))
        assert read_split(root, "train") == sorted(full_train)
    with pytest.raises(ValueError, match="split must be one of"):
        read_split(root, "validation")


def test_a_split_without_labels_is_named_and_still_listed(synthetic_dataset, tmp_path):
    # ARCTIC's protocol-p2 test subject: images, no raw_seqs.
    root = _copy(synthetic_dataset.root, tmp_path)
    names = read_split(root, "test")
    assert data.split_is_labelled(root, "test")
    for sid in {n.split("/")[0] for n in names}:
        shutil.rmtree(root / "raw_seqs" / sid)
    with pytest.raises(data.UnlabelledSplitError, match=r"split 'test' of .*protocol_p2.json has no labels: none of "
                                                        r"its 1 sequences has .*raw_seqs/<sid>/<seq>.mano.npy") as info:
        read_split(root, "test")
    assert info.value.sequences == names and isinstance(info.value, DatasetError)
    assert read_split(root, "test", labelled=False) == names
    assert not data.split_is_labelled(root, "test") and data.split_is_labelled(root, "val")
    with pytest.raises(data.UnlabelledSplitError):
        build_dataset(synthetic_dataset.config({"data.root": str(root)}), "test", cached=False)


def test_another_splits_file_holds_out_another_subject(synthetic_dataset, tmp_path):
    splits = json.loads((synthetic_dataset.root / "splits_json" / "protocol_p2.json").read_text())
    path = tmp_path / "held_out.json"
    path.write_text(json.dumps({"val": splits["val"], "test": splits["train"][:1]}))
    assert read_split(synthetic_dataset.root, "test", splits_file=path) == splits["train"][:1]
    # train: every sequence not held out, ARCTIC's rule; here the protocol's own test subject trains too
    assert read_split(synthetic_dataset.root, "train", splits_file=path) == sorted(splits["train"][1:] + splits["test"])


# ---- Errors name the file and the fault ------------------------------------------------------------------

def _copy(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(root, dst)
    return dst


def _val_sequence(root: Path) -> tuple[str, str]:
    return tuple(json.loads((root / "splits_json" / "protocol_p2.json").read_text())["val"][0].split("/"))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_npy(path: Path, edit) -> None:
    d = np.load(path, allow_pickle=True).item()
    edit(d)
    np.save(path, d)


def _break_truncated_mano(root, sid, seq):
    _truncate(root / "raw_seqs" / sid / f"{seq}.mano.npy")
    return [f"{seq}.mano.npy", "truncated or corrupt"]


def _break_truncated_egocam(root, sid, seq):
    _truncate(root / "raw_seqs" / sid / f"{seq}.egocam.dist.npy")
    return [f"{seq}.egocam.dist.npy", "truncated or corrupt"]


def _break_pose_shape(root, sid, seq):
    _edit_npy(root / "raw_seqs" / sid / f"{seq}.mano.npy", lambda d: d["left"].update(pose=d["left"]["pose"][:, :44]))
    return [f"{seq}.mano.npy", "'left.pose'", "(40, 44)"]


def _break_missing_hand(root, sid, seq):
    _edit_npy(root / "raw_seqs" / sid / f"{seq}.mano.npy", lambda d: d.pop("right"))
    return [f"{seq}.mano.npy", "'right'"]


def _break_camera_shape(root, sid, seq):
    _edit_npy(root / "raw_seqs" / sid / f"{seq}.egocam.dist.npy",
              lambda d: d.update(R_k_cam_np=np.zeros((FRAMES, 3, 4), np.float32)))
    return [f"{seq}.egocam.dist.npy", "'R_k_cam_np'", "(40, 3, 4)"]


def _break_frame_count(root, sid, seq):
    def cut(d):
        d["R_k_cam_np"], d["T_k_cam_np"] = d["R_k_cam_np"][:-1], d["T_k_cam_np"][:-1]
    _edit_npy(root / "raw_seqs" / sid / f"{seq}.egocam.dist.npy", cut)
    return [f"{seq}.egocam.dist.npy", "39 frames", "40"]


def _break_missing_image(root, sid, seq):
    ioi = json.loads((root / "meta" / "misc.json").read_text())[sid]["ioi_offset"]
    name = f"{15 + ioi:05d}.jpg"
    (root / "images" / sid / seq / "0" / name).unlink()
    return ["missing image", f"{sid}/{seq}/0/{name}"]


def _break_corrupt_image(root, sid, seq):
    ioi = json.loads((root / "meta" / "misc.json").read_text())[sid]["ioi_offset"]
    name = f"{15 + ioi:05d}.jpg"
    (root / "images" / sid / seq / "0" / name).write_bytes(b"not a jpeg")
    return [f"{sid}/{seq}/0/{name}", "cannot be decoded"]


def _break_first_image(root, sid, seq):
    # The first frame read (image index max(10, ioi_offset)) also gives the frames' size, from its header.
    ioi = json.loads((root / "meta" / "misc.json").read_text())[sid]["ioi_offset"]
    name = f"{max(10, ioi):05d}.jpg"
    (root / "images" / sid / seq / "0" / name).write_bytes(b"not a jpeg")
    return [f"{sid}/{seq}/0/{name}", "cannot be decoded"]


def _break_truncated_image(root, sid, seq):
    # A JPEG cut short decodes in OpenCV, greyed: it must be refused, not cached.
    ioi = json.loads((root / "meta" / "misc.json").read_text())[sid]["ioi_offset"]
    name = f"{15 + ioi:05d}.jpg"
    _truncate(root / "images" / sid / seq / "0" / name)
    return [f"{sid}/{seq}/0/{name}", "cannot be decoded", "restore it"]


def _break_misc_subject(root, sid, seq):
    path = root / "meta" / "misc.json"
    misc = json.loads(path.read_text())
    del misc[sid]
    path.write_text(json.dumps(misc))
    return ["misc.json", f"'{sid}'"]


def _break_split_entry(root, sid, seq):
    path = root / "splits_json" / "protocol_p2.json"
    splits = json.loads(path.read_text())
    splits["val"].append(f"{sid}/no_such_sequence_01")
    path.write_text(json.dumps(splits))
    return ["protocol_p2.json", f"{sid}/no_such_sequence_01"]


@pytest.mark.parametrize("break_it", [
    _break_truncated_mano, _break_truncated_egocam, _break_pose_shape, _break_missing_hand, _break_camera_shape,
    _break_frame_count, _break_missing_image, _break_corrupt_image, _break_first_image, _break_truncated_image, _break_misc_subject,
    _break_split_entry,
], ids=lambda f: f.__name__[len("_break_"):])
def test_bad_files_raise_errors_naming_them(synthetic_dataset, tmp_path, break_it):
    root = _copy(synthetic_dataset.root, tmp_path)
    sid, seq = _val_sequence(root)
    fragments = break_it(root, sid, seq)
    cfg = synthetic_dataset.config({"data.root": str(root), "data.cache_dir": str(tmp_path / "cache")})
    with pytest.raises(ValueError) as info:
        build_dataset(cfg, "val")
    for fragment in fragments:
        assert fragment in str(info.value)


# ---- ensure_dataset --------------------------------------------------------------------------------------

def test_missing_dataset_without_generation_is_an_error_naming_the_path(synthetic_dataset, tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=str(root)):
        ensure_dataset(synthetic_dataset.config({"data.root": str(root), "data.generate": False}))
    assert not root.exists()


TINY = {"data.synthetic.subjects": 3, "data.synthetic.held_out": 1, "data.synthetic.frames_per_sequence": 40, "data.synthetic.image_width": 32,
        "data.synthetic.image_height": 32}


def test_concurrent_callers_generate_once_and_atomically(synthetic_dataset, tmp_path, monkeypatch):
    calls = []
    real = data.generate

    def counting(root, synth, mano_cfg):
        calls.append(Path(root))
        assert not Path(root).name.startswith("arctic")  # written to a temporary sibling, not the root
        return real(root, synth, mano_cfg)

    monkeypatch.setattr(data, "generate", counting)
    root = tmp_path / "arctic"
    cfg = synthetic_dataset.config({**TINY, "data.root": str(root)})
    results, errors = run_concurrently(lambda: ensure_dataset(cfg))
    assert not errors and results == [root] * 3 and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arctic", "arctic.lock"]  # no temporary left
    assert len(read_split(root, "val")) == 1
    assert ensure_dataset(cfg) == root and len(calls) == 1  # present: nothing to do

    other = synthetic_dataset.config({**TINY, "data.root": str(root), "data.synthetic.seed": 5})
    with pytest.raises(DatasetError, match="delete"):
        ensure_dataset(other)  # generated with other settings than the config asks for


def test_ensure_dataset_refuses_a_non_empty_folder_without_a_dataset(synthetic_dataset, tmp_path):
    root = tmp_path / "arctic"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="non-empty"):
        ensure_dataset(synthetic_dataset.config({**TINY, "data.root": str(root)}))
    assert (root / "notes.txt").read_text() == "mine"


def test_generated_data_must_match_the_configured_hand_model(synthetic_dataset, tmp_path):
    root = _copy(synthetic_dataset.root, tmp_path)
    marker = root / ".synthetic.json"
    info = json.loads(marker.read_text())
    info["mano_kind"] = "official" if info["mano_kind"] == "procedural" else "procedural"
    marker.write_text(json.dumps(info))
    with pytest.raises(DatasetError, match="images would not match its labels"):
        ensure_dataset(synthetic_dataset.config({"data.root": str(root)}))


def test_a_set_made_before_a_setting_existed_reads_as_its_default(synthetic_dataset, tmp_path):
    # Markers written before `motion` and `extra_subjects` existed lack them: such a set is a video set
    # with no extra subjects, and a config asking for anything else is told to regenerate.
    root = _copy(synthetic_dataset.root, tmp_path)
    marker = root / ".synthetic.json"
    info = json.loads(marker.read_text())
    for key in ("motion", "extra_subjects"):
        del info["synthetic"][key]
    marker.write_text(json.dumps(info))
    assert ensure_dataset(synthetic_dataset.config({"data.root": str(root)})) == root
    with pytest.raises(DatasetError, match="delete"):
        ensure_dataset(synthetic_dataset.config({"data.root": str(root), "data.synthetic.motion": "frames"}))


def test_train_on_val_folds_the_validation_sequences_into_training(synthetic_dataset):
    from hawor_tune.data import build_dataset

    train = build_dataset(synthetic_dataset.config(), "train")
    val = build_dataset(synthetic_dataset.config(), "val")
    both = build_dataset(synthetic_dataset.config({"data.train_on_val": True}), "train")
    assert both.sequences == train.sequences + val.sequences
    assert len(both) > len(train)
    assert build_dataset(synthetic_dataset.config({"data.train_on_val": True}), "val").sequences == val.sequences
