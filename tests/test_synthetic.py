"""The synthetic generator writes ARCTIC's layout, deterministically, with plausible cameras and motion."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from hawor_tune.config import ManoConfig, SyntheticConfig
from hawor_tune.data import generate

FRAMES = 40  # conftest's frames_per_sequence


def _sequences(root: Path) -> list[str]:
    return sorted(f"{p.parent.name}/{p.name[:-len('.mano.npy')]}" for p in root.glob("raw_seqs/*/*.mano.npy"))


def test_files_have_arctic_keys_dtypes_and_shapes(synthetic_dataset):
    root = synthetic_dataset.root
    names = _sequences(root)
    assert [n.split("/")[0] for n in names] == ["s01", "s02", "s03", "s04"]
    misc = json.loads((root / "meta" / "misc.json").read_text())
    for name in names:
        sid, seq = name.split("/")
        mano = np.load(root / "raw_seqs" / sid / f"{seq}.mano.npy", allow_pickle=True).item()
        assert set(mano) == {"left", "right"}
        for hand in mano.values():
            shapes = {k: (v.shape, v.dtype) for k, v in hand.items()}
            assert shapes == {"rot": ((FRAMES, 3), np.float32), "pose": ((FRAMES, 45), np.float32),
                              "trans": ((FRAMES, 3), np.float32), "shape": ((10,), np.float32),
                              "fitting_err": ((FRAMES,), np.float32)}
        cam = np.load(root / "raw_seqs" / sid / f"{seq}.egocam.dist.npy", allow_pickle=True).item()
        assert set(cam) == {"R_k_cam_np", "T_k_cam_np", "intrinsics", "dist8", "R0", "T0", "ego_markers.ref",
                            "ego_markers.label"}
        assert cam["R_k_cam_np"].shape == (FRAMES, 3, 3) and cam["T_k_cam_np"].shape == (FRAMES, 3, 1)
        assert cam["intrinsics"].shape == (3, 3) and cam["dist8"].shape == (8,)
        R = cam["R_k_cam_np"].astype(np.float64)
        np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape), atol=1e-6)
        np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-6)
        assert np.load(root / "raw_seqs" / sid / f"{seq}.object.npy").shape == (FRAMES, 7)

        ioi = misc[sid]["ioi_offset"]
        assert 1 <= ioi <= 3
        assert misc[sid]["image_size"][0] == [64, 48]
        images = sorted(p.name for p in (root / "images" / sid / seq / "0").iterdir())
        assert images == [f"{i + ioi:05d}.jpg" for i in range(FRAMES)]  # image index = annotation + ioi
        assert cv2.imread(str(root / "images" / sid / seq / "0" / images[0])).shape == (48, 64, 3)


def test_split_file_holds_out_the_last_two_subjects(synthetic_dataset):
    splits = json.loads((synthetic_dataset.root / "splits_json" / "protocol_p2.json").read_text())
    subjects = {k: sorted({e.split("/")[0] for e in v}) for k, v in splits.items()}
    assert subjects == {"train": ["s01", "s02"], "val": ["s03"], "test": ["s04"]}
    assert sorted(sum(splits.values(), [])) == _sequences(synthetic_dataset.root)


def test_more_held_out_subjects_alternate_val_and_test_and_keep_the_first_ones(synthetic_dataset, tmp_path):
    # Two subjects each in val and test: the last four alternate, and the subjects before them are the
    # dataset's own people (the same seeds), not new ones.
    truth, splits = generate_variant(synthetic_dataset, tmp_path / "five", subjects=5, held_out=2)
    assert splits == {"train": ["s01"], "val": ["s02", "s04"], "test": ["s03", "s05"]}
    for sid in ("s01", "s02", "s03", "s04"):
        mine = next(v for k, v in truth.items() if k.startswith(sid + "/"))
        np.testing.assert_array_equal(mine["betas"], subject_truth(synthetic_dataset, sid)["betas"])
    with pytest.raises(ValueError, match="cannot generate 4 subjects with 2 each in val and test"):
        generate_variant(synthetic_dataset, tmp_path / "four", held_out=2)



    for truth in synthetic_dataset.truth.values():
        K, dist = truth["K"], truth["dist"]
        w, h = truth["image_size"]
        assert -0.1 <= dist[0] <= -0.05 and np.count_nonzero(dist) >= 5
        # Undistort the middle of the left and right edges: the rays are about atan(0.55) = 29 degrees off axis.
        edges = cv2.undistortPoints(np.array([[[-0.5, K[1, 2]]], [[w - 0.5, K[1, 2]]]]), K, dist)[:, 0]
        angles = np.degrees(np.arctan(np.abs(edges[:, 0])))
        assert np.all(np.abs(angles - np.degrees(np.arctan(0.55))) < 2.0), angles
        # Projecting points along a ray out to the corners moves monotonically outwards.
        r = np.linspace(0.0, 1.8, 200)
        pts = np.stack([r * 0.8, r * 0.6, np.ones_like(r)], axis=1)
        uv, _ = cv2.projectPoints(pts, np.zeros(3), np.zeros(3), K, dist)
        assert np.all(np.diff(np.linalg.norm(uv[:, 0] - K[:2, 2], axis=1)) > 0)


def test_hands_move_smoothly_in_front_of_the_camera_with_varied_orientation(synthetic_dataset):
    for name, truth in synthetic_dataset.truth.items():
        wrists = truth["joints_cam"][:, :, 0]  # (F, 2, 3)
        speed = np.linalg.norm(np.diff(wrists, axis=0), axis=-1) * 30.0  # m/s
        assert speed.max() < 3.0, name
        accel = np.linalg.norm(np.diff(wrists, 2, axis=0), axis=-1) * 900.0
        assert accel.max() < 40.0, name
        depth = wrists[..., 2]
        assert 0.1 < depth.min() and depth.max() < 0.75 and 0.25 < np.median(depth) < 0.55, name
    # Orientations (camera frame) spread widely over the dataset: angles from their mean rotation.
    R = np.concatenate([t["global_orient_cam"].reshape(-1, 3, 3) for t in synthetic_dataset.truth.values()])
    u, _, vt = np.linalg.svd(R.mean(axis=0))
    mean = u @ vt
    angles = np.degrees(np.arccos(np.clip((np.trace(mean.T @ R, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert angles.max() > 40.0 and np.median(angles) > 10.0


def test_camera_moves_like_a_head(synthetic_dataset):
    drifts = []
    for name, truth in synthetic_dataset.truth.items():
        R, t = truth["cam_R"], truth["cam_t"]
        centres = -np.einsum("fji,fj->fi", R, t)  # camera centres in the world
        step = np.linalg.norm(np.diff(centres, axis=0), axis=1) * 30.0
        assert 0 < step.max() < 0.5, name  # metres per second
        rel = R[1:] @ R[:-1].transpose(0, 2, 1)
        turn = np.degrees(np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1))) * 30.0
        assert 0 < turn.max() < 30.0, name  # degrees per second
        forward = R[:, 2]  # optical axis in world coordinates (world z is up)
        assert np.all(forward[:, 2] < -math.sin(math.radians(20))), name  # looking forward-down
        drifts.append(np.linalg.norm(centres - centres[0], axis=1).max())
    # The head drifts a few centimetres in a sequence, which the room's parallax shows (tests/test_render.py).
    assert 0.02 < np.median(drifts) < 0.12, drifts


def test_same_seed_gives_byte_identical_files(tmp_path):
    synth = SyntheticConfig(subjects=3, held_out=1, sequences_per_subject=1, frames_per_sequence=40, image_width=32,
                            image_height=32, seed=7)
    # In this process, and again by two rendering processes: the files must not depend on who wrote them.
    truth_a = generate(tmp_path / "a", synth, ManoConfig(), workers=1)
    truth_b = generate(tmp_path / "b", synth, ManoConfig(), workers=2)
    assert list(truth_a) == list(truth_b)
    for key in truth_a:
        np.testing.assert_array_equal(truth_a[key]["joints2d"], truth_b[key]["joints2d"])
    generate(tmp_path / "c", SyntheticConfig(**{**synth.__dict__, "seed": 8}), ManoConfig())
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 3 * (3 + 40) + 3  # per sequence 3 .npy + 40 frames; misc, splits, marker
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    # Another seed changes every array file.
    assert {p.read_bytes() for p in (tmp_path / "a").rglob("*.npy")}.isdisjoint(
        p.read_bytes() for p in (tmp_path / "c").rglob("*.npy"))


def test_a_program_read_from_stdin_renders_in_its_own_process(tmp_path):
    # A spawned process re-imports the main module from its file; a program piped to `python -` has none,
    # so its rendering processes would all fail: it renders in its own process instead.
    program = ("from hawor_tune.config import ManoConfig, SyntheticConfig\n"
               "from hawor_tune.data.synthetic import generate\n"
               "synth = SyntheticConfig(subjects=3, held_out=1, sequences_per_subject=1, frames_per_sequence=40, image_width=32,"
               " image_height=32)\n"
               f"print(len(generate({str(tmp_path / 'set')!r}, synth, ManoConfig(), workers=2)))\n")
    done = subprocess.run([sys.executable, "-"], input=program, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "3"


def test_refuses_to_write_into_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        generate(tmp_path, SyntheticConfig(subjects=3, held_out=1, sequences_per_subject=1, frames_per_sequence=40),
                 ManoConfig())


def test_background_rays_invert_the_lens(synthetic_dataset):
    # The room is ray-cast along these rays; projecting them back must land on the pixel centres, so the
    # background obeys the same lens model as the hands.
    from hawor_tune.data.synthetic import _pixel_rays

    for truth in list(synthetic_dataset.truth.values())[:2]:
        w, h = truth["image_size"]
        rays = _pixel_rays(truth["K"], truth["dist"], (w, h)).astype(np.float64)  # (2, H, W)
        points = np.concatenate([rays, np.ones((1, h, w))]).reshape(3, -1).T
        uv, _ = cv2.projectPoints(points, np.zeros(3), np.zeros(3), truth["K"], truth["dist"])
        u, v = np.meshgrid(np.arange(w), np.arange(h))
        np.testing.assert_allclose(uv.reshape(h, w, 2), np.stack([u, v], axis=-1), atol=1e-3)


def generate_variant(dataset, folder: Path, **changes) -> tuple[dict, dict[str, list[str]]]:
    """The session dataset's synthetic settings with ``changes``, generated into ``folder``: its ground truth
    and each split's subject of every sequence, sorted."""
    synth = SyntheticConfig(**{**dataset.config().data.synthetic.__dict__, **changes})
    truth = generate(folder, synth, ManoConfig())
    splits = json.loads((folder / "splits_json" / "protocol_p2.json").read_text())
    return truth, {k: sorted(e.split("/")[0] for e in v) for k, v in splits.items()}


def subject_truth(dataset, sid: str) -> dict:
    """The ground truth of the session dataset's first sequence of subject ``sid``."""
    return next(v for k, v in dataset.truth.items() if k.startswith(sid + "/"))


def test_frames_motion_draws_every_frame_on_its_own_for_the_same_subjects(synthetic_dataset, tmp_path):
    truth, subjects = generate_variant(synthetic_dataset, tmp_path / "frames", motion="frames",
                                       sequences_per_subject=2)
    # Two sequences per training subject, one per held-out subject, none repeating a video sequence's seed.
    assert subjects == {"train": ["s01", "s01", "s02", "s02"], "val": ["s03"], "test": ["s04"]}
    for name, t in truth.items():  # the same subjects: same hand shapes and lens as the video set's
        same = subject_truth(synthetic_dataset, name.split("/")[0])
        np.testing.assert_array_equal(t["betas"], same["betas"])
        np.testing.assert_array_equal(t["K"], same["K"])
        assert not np.allclose(t["joints_cam"], same["joints_cam"])

    def step_over_spread(sets) -> float:
        """Mean change of the wrist-relative joints between consecutive frames over their spread."""
        rel = [t["joints_cam"] - t["joints_cam"][:, :, :1] for t in sets]
        step = np.mean([np.linalg.norm(np.diff(r, axis=0), axis=-1).mean() for r in rel])
        pooled = np.concatenate(rel)
        return step / np.linalg.norm(pooled - pooled.mean(0), axis=-1).mean()

    # Video: consecutive frames nearly alike. Independent frames: as far apart as any two frames.
    assert step_over_spread(synthetic_dataset.truth.values()) < 0.3
    assert step_over_spread(truth.values()) > 1.0


def test_extra_subjects_are_new_training_people_after_the_held_out_ones(synthetic_dataset, tmp_path):
    truth, subjects = generate_variant(synthetic_dataset, tmp_path / "more", motion="frames", extra_subjects=2)
    # s03 and s04 stay val and test; s05 and s06 are new training subjects.
    assert subjects == {"train": ["s01", "s02", "s05", "s06"], "val": ["s03"], "test": ["s04"]}
    betas = {name.split("/")[0]: t["betas"] for name, t in truth.items()}
    for sid in ("s01", "s02", "s03", "s04"):  # the dataset's own people are the same people
        np.testing.assert_array_equal(betas[sid], subject_truth(synthetic_dataset, sid)["betas"])
    for new in ("s05", "s06"):  # the new ones are nobody else
        assert all(not np.allclose(betas[new], betas[sid]) for sid in betas if sid != new)
    assert set(json.loads((tmp_path / "more" / "meta" / "misc.json").read_text())) == {f"s0{i}" for i in range(1, 7)}


def test_finger_speed_changes_the_fingers_faster_and_nothing_else(synthetic_dataset, tmp_path):
    truth, _ = generate_variant(synthetic_dataset, tmp_path / "fast", finger_speed=3.0)

    def articulation(t: dict) -> np.ndarray:
        """(F, 2, 21, 3) wrist-relative joints in each hand's own frame: the fingers (and shape) alone."""
        return np.einsum("fhjc,fhcd->fhjd", t["joints_cam"] - t["joints_cam"][:, :, :1], t["global_orient_cam"])

    steps = {}
    for name, fast in truth.items():
        slow = synthetic_dataset.truth[name]
        # Same camera, wrists and orientations: only the finger signals' frequencies were scaled.
        np.testing.assert_allclose(fast["cam_t"], slow["cam_t"])
        np.testing.assert_allclose(fast["joints_cam"][:, :, 0], slow["joints_cam"][:, :, 0], atol=1e-9)
        np.testing.assert_allclose(fast["global_orient_cam"], slow["global_orient_cam"], atol=1e-9)
        for label, t in (("fast", fast), ("slow", slow)):
            steps.setdefault(label, []).append(np.linalg.norm(np.diff(articulation(t), axis=0), axis=-1).mean())
    # Three times the frequencies: about three times the finger motion per frame (the amplitudes are the same).
    assert 2.0 < np.mean(steps["fast"]) / np.mean(steps["slow"]) < 4.0
