"""hawor_tune.evaluation: sequences joined in world coordinates, the published world metrics, the hidden
(infilled) frames and the mean-pose baseline, against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hawor_tune.data import build_dataloader, build_dataset
from hawor_tune.evaluation import (
    INFILL_EVAL_RATE,
    Predictions,
    SequenceWorld,
    compute_metrics,
    gather,
    hidden_frames,
    mean_pose_baseline,
    world_metrics,
    world_sequences,
)


def _rot(axis: int, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    i, j = [k for k in range(3) if k != axis]
    R = np.eye(3)
    R[i, i], R[i, j], R[j, i], R[j, j] = c, -s, s, c
    return R


def _hand(seed: int = 0) -> np.ndarray:
    """(2, 21, 3) two non-degenerate hands about 0.4 m in front of the camera."""
    return np.random.default_rng(seed).uniform(-0.05, 0.05, (2, 21, 3)) + np.array([0.0, 0.0, 0.4])


# ---- Whole sequences -----------------------------------------------------------------------------------

def _screw_sequence(n: int, clips: list[tuple[int, int]], T: int) -> tuple[Predictions, np.ndarray]:
    """A camera moving with constant velocity (camera f to world = D^f, a fixed screw motion D), the hands
    still in the world, and clips (start, first scored) of T frames whose predicted relative poses and
    camera-frame joints are exact. Returns the predictions and the true world joints in the first camera,
    (n, 2, 21, 3)."""
    D = np.eye(4)
    D[:3, :3], D[:3, 3] = _rot(1, 0.05) @ _rot(0, 0.02), [0.01, -0.004, 0.006]
    G = np.stack([np.linalg.matrix_power(D, f) for f in range(n)])  # (n, 4, 4) camera f -> world (= camera 0)
    world = _hand()  # (2, 21, 3) in camera 0
    # World-to-camera poses of ARCTIC's world, which is camera 0 moved by some fixed transform W.
    W = np.eye(4)
    W[:3, :3], W[:3, 3] = _rot(2, 0.7), [0.3, -1.0, 2.0]
    w2c = np.linalg.inv(W @ G)  # (n, 4, 4) ARCTIC world -> camera f
    cam = np.einsum("fij,hkj->fhki", np.linalg.inv(G)[:, :3, :3], world) + np.linalg.inv(G)[:, None, None, :3, 3]
    fields = {k: [] for k in ("pred_joints", "gt_joints", "pred_cam_R", "pred_cam_t", "w2c_R", "w2c_t", "frames",
                              "scored")}
    for start, first_scored in clips:
        f = np.arange(start, start + T)
        rel = np.linalg.inv(G[start]) @ G[f]  # (T, 4, 4) camera t -> the clip's camera 0
        scored = np.arange(T) >= first_scored
        pred = cam[f]
        for k, v in (("pred_joints", pred), ("gt_joints", cam[f]), ("pred_cam_R", rel[:, :3, :3]),
                     ("pred_cam_t", rel[:, :3, 3]), ("w2c_R", w2c[f, :3, :3]), ("w2c_t", w2c[f, :3, 3]),
                     ("frames", f), ("scored", scored)):
            fields[k].append(v)
    a = {k: np.stack(v) for k, v in fields.items()}
    C = len(clips)
    valid = np.broadcast_to(a["scored"][..., None], (C, T, 2)).copy()
    p = Predictions(pred_joints=a["pred_joints"], gt_joints=a["gt_joints"], valid=valid, pred_cam_R=a["pred_cam_R"],
                    pred_cam_t=a["pred_cam_t"], gt_cam_R=a["pred_cam_R"], gt_cam_t=a["pred_cam_t"],
                    world_to_cam_R=a["w2c_R"], world_to_cam_t=a["w2c_t"], seq_index=np.zeros(C, np.int64),
                    frame_index=a["frames"] + 7, scored=a["scored"])  # annotation indices start at 7
    return p, np.broadcast_to(world, (n, 2, 21, 3))


@pytest.mark.parametrize("T,clips", [
    (4, [(0, 0), (4, 0), (6, 2)]),  # two clips and an end-aligned one scoring frames 8, 9
    (1, [(f, 0) for f in range(10)]),  # one-frame clips: every step is a junction
    (10, [(0, 0)]),  # one clip
])
def test_clips_are_chained_over_the_sequence(T, clips):
    # Constant velocity: the junction's repeated step is exact, so the chained world is the true one.
    p, world = _screw_sequence(10, clips, T)
    rng = np.random.default_rng(1)
    shuffled = rng.permutation(len(clips))  # the order of the clips in the split does not matter
    p = Predictions(**{k: (v[shuffled] if isinstance(v, np.ndarray) and v.shape[:1] == (len(clips),) else v)
                       for k, v in vars(p).items()})
    (seq,) = world_sequences(p)
    np.testing.assert_array_equal(seq.frame_index, np.arange(10) + 7)
    if T == 1:  # no predicted motion at all: a static camera, the hands where the first camera saw them
        camera = p.gt_joints[np.argsort(p.frame_index[:, 0]), 0]  # (10, 2, 21, 3) each frame's camera frame
        np.testing.assert_allclose(seq.pred_joints, camera, atol=1e-12)
    else:
        np.testing.assert_allclose(seq.pred_joints, world, atol=1e-12)
    np.testing.assert_allclose(seq.gt_joints, world, atol=1e-12)
    assert seq.valid.all()
    if T > 1:
        m = world_metrics([seq], fps=30.0)
        for key in ("w_mpjpe", "wa_mpjpe", "accel_error"):
            assert m[key] == pytest.approx(0.0, abs=1e-6), key
        assert m["jerk"] == pytest.approx(m["jerk_gt"], abs=1e-6)


def test_overlapping_clips_are_blended_by_their_window_weights():
    # Frames 0..3 (clip a) and 2..5 (clip b, scoring 4 and 5), a static camera; a puts every joint at 1 cm,
    # b at 4 cm and its camera 3 cm along x. Frame 2 is a's t=2 (weight 2) and b's t=0 (weight 1); frame 3
    # a's t=3 (weight 1) and b's t=1 (weight 2).
    T = 4
    eye = np.broadcast_to(np.eye(3), (2, T, 3, 3))
    joints = np.zeros((2, T, 2, 21, 3))
    joints[0], joints[1] = 0.01, 0.04
    pred_t = np.zeros((2, T, 3))
    pred_t[1, 1:, 0] = 0.03  # clip b: its frames after its first are 3 cm along x from it
    p = Predictions(pred_joints=joints, gt_joints=joints, valid=np.ones((2, T, 2), bool), pred_cam_R=eye,
                    pred_cam_t=pred_t, gt_cam_R=eye, gt_cam_t=pred_t, world_to_cam_R=eye,
                    world_to_cam_t=np.zeros((2, T, 3)), seq_index=np.zeros(2, np.int64),
                    frame_index=np.array([[0, 1, 2, 3], [2, 3, 4, 5]]),
                    scored=np.array([[True] * 4, [False, False, True, True]]))
    (seq,) = world_sequences(p)
    y = seq.pred_joints[:, 0, 0, 1]  # a y coordinate: moved by the joints alone
    np.testing.assert_allclose(y, [0.01, 0.01, (2 * 0.01 + 0.04) / 3, (0.01 + 2 * 0.04) / 3, 0.04, 0.04], atol=1e-12)
    x_cam = seq.pred_cam_to_world[:, 0, 3]  # b's frame 3 is at 3 cm, a's at 0: weights 1 and 2
    np.testing.assert_allclose(x_cam, [0, 0, 0, 2 * 0.03 / 3, 0.03, 0.03], atol=1e-12)


def test_a_junction_repeats_the_last_predicted_step():
    # Clip 1 predicts the camera static for frames 0..3; clip 2 (frames 4..7) moves 1 cm per frame along x.
    T, step = 4, 0.01
    C = 2
    eye = np.broadcast_to(np.eye(3), (C, T, 3, 3))
    pred_t = np.zeros((C, T, 3))
    pred_t[1, :, 0] = step * np.arange(T)
    zeros = np.zeros((C, T, 2, 21, 3))
    p = Predictions(pred_joints=zeros, gt_joints=zeros, valid=np.ones((C, T, 2), bool), pred_cam_R=eye,
                    pred_cam_t=pred_t, gt_cam_R=eye, gt_cam_t=pred_t, world_to_cam_R=eye,
                    world_to_cam_t=np.zeros((C, T, 3)), seq_index=np.zeros(C, np.int64),
                    frame_index=np.arange(C * T).reshape(C, T))
    (seq,) = world_sequences(p)
    # Frame 4 repeats clip 1's last step (none), so the camera centres are 0, 0, 0, 0, 0, 1, 2, 3 cm.
    np.testing.assert_allclose(seq.pred_cam_to_world[:, 0, 3], [0, 0, 0, 0, 0, step, 2 * step, 3 * step], atol=1e-12)
    p.pred_cam_t[0, :, 0] = -step * np.arange(T)  # clip 1 now moves -1 cm per frame: frame 4 is at -4 cm
    (seq,) = world_sequences(p)
    np.testing.assert_allclose(seq.pred_cam_to_world[:, 0, 3], step * np.array([0, -1, -2, -3, -4, -3, -2, -1]),
                               atol=1e-12)


def test_a_gap_longer_than_a_clip_is_bridged_in_the_world_across_clips():
    # A static camera and a hand moving 1 cm per frame along x over frames 0..17; 4-frame clips start at every
    # frame. The left hand is unseen over frames 4..12: clips that see it somewhere predict it exactly (their
    # infiller filled it), clips that see it nowhere (starting at 4..9) predict it 1 m off (a regression with
    # nothing to read). Frames 7..9 lie in no clip that sees it: they are bridged between frames 6 and 10,
    # which on a straight path puts them on the truth. The right hand is seen everywhere.
    n, T = 18, 4
    starts = np.arange(n - T + 1)
    frames = starts[:, None] + np.arange(T)  # (C, T)
    truth = _hand()[None] + 0.01 * np.arange(n)[:, None, None, None] * np.array([1.0, 0.0, 0.0])  # (n, 2, 21, 3)
    observed = np.ones((len(starts), T, 2), dtype=bool)
    observed[..., 0] = (frames < 4) | (frames > 12)
    pred = truth[frames].copy()  # (C, T, 2, 21, 3)
    pred[~observed[..., 0].any(axis=1), :, 0] += 1.0
    C = len(starts)
    eye = np.broadcast_to(np.eye(3), (C, T, 3, 3))
    zeros = np.zeros((C, T, 3))
    scored = np.zeros((C, T), dtype=bool)
    for f in range(n):  # each frame scored once, in the first clip holding it
        c = min(f, C - 1)
        scored[c, f - starts[c]] = True
    args = dict(pred_joints=pred, gt_joints=truth[frames], valid=np.ones((C, T, 2), bool), pred_cam_R=eye,
                pred_cam_t=zeros, gt_cam_R=eye, gt_cam_t=zeros, world_to_cam_R=eye, world_to_cam_t=zeros,
                seq_index=np.zeros(C, np.int64), frame_index=frames, scored=scored)
    (seq,) = world_sequences(Predictions(**args, observed=observed))
    np.testing.assert_allclose(seq.pred_joints, truth, atol=1e-12)
    assert seq.bridged[:, 0].tolist() == [f in (7, 8, 9) for f in range(n)] and not seq.bridged[:, 1].any()
    # Without the flags every clip counts, the blind ones too: the gap's frames are off.
    (seq,) = world_sequences(Predictions(**args))
    assert np.abs(seq.pred_joints - truth)[4:13, 0].max() > 0.2 and not seq.bridged.any()


def _still_sequence(n: int, shift_from: int, delta: float, valid: np.ndarray | None = None) -> SequenceWorld:
    """Both hands still in the world; the prediction equals the truth until frame shift_from, then is moved
    rigidly by delta metres along x."""
    gt = np.broadcast_to(_hand(2), (n, 2, 21, 3)).copy()
    pred = gt.copy()
    pred[shift_from:, :, :, 0] += delta
    return SequenceWorld(seq_index=0, frame_index=np.arange(n), pred_joints=pred, gt_joints=gt,
                         valid=np.ones((n, 2), bool) if valid is None else valid, pred_cam_to_world=np.eye(4)[None])


@pytest.mark.parametrize("n", [150, 50])
def test_w_mpjpe_uses_100_frame_chunks_aligned_on_their_first_two_frames(n):
    delta = 0.01
    m = world_metrics([_still_sequence(n, 2, delta)], fps=30.0)
    # Chunk 1 (frames 0-99, or the whole 50-frame sequence): its first two frames match, so the alignment is
    # the identity and frames 2.. are off by delta. Chunk 2 (frames 100-149) is moved as a whole: aligned
    # away, error 0. Per-frame errors are pooled.
    first = min(n, 100)
    assert m["w_mpjpe"] == pytest.approx(1000.0 * delta * (first - 2) / n, rel=1e-9)
    # Second differences: delta at (0, 1, 2), -delta at (1, 2, 3), 0 elsewhere; m/s^2 at 30 fps.
    assert m["accel_error"] == pytest.approx(2 * delta * 30.0**2 / (n - 2), rel=1e-9)
    assert 0.0 < m["wa_mpjpe"] < m["w_mpjpe"]


def test_acceleration_error_is_in_metres_per_second_squared_on_valid_triplets():
    n, a, fps = 12, 2e-4, 30.0
    seq = _still_sequence(n, 0, 0.0)
    seq.pred_joints[..., 0] += 0.5 * a * np.arange(n)[:, None, None] ** 2  # constant acceleration a per frame^2
    assert world_metrics([seq], fps=fps)["accel_error"] == pytest.approx(a * fps**2, rel=1e-9)
    # An invalid frame removes the three second differences that touch it (WHAM's rule); the rest still give a.
    seq.valid[5, 0] = False
    seq.pred_joints[5, 0] += 1.0  # whatever is predicted there does not count
    m = world_metrics([seq], fps=fps)
    assert m["accel_error"] == pytest.approx(a * fps**2, rel=1e-9)
    assert m["jerk"] == pytest.approx(0.0, abs=1e-6) and m["jerk_gt"] == pytest.approx(0.0, abs=1e-6)


# ---- Hidden (infilled) frames --------------------------------------------------------------------------

def test_hidden_frames_are_fixed_per_frame_and_only_valid_ones():
    seq = torch.arange(40).repeat_interleave(50)  # 40 sequences x 50 frames, as one-frame clips
    frames = torch.arange(50).repeat(40)[:, None]
    valid = torch.ones(len(seq), 1, 2, dtype=torch.bool)
    hidden = hidden_frames(seq, frames, valid)  # (2000, 1, 2)
    assert abs(hidden.float().mean().item() - INFILL_EVAL_RATE) < 0.03
    # The same frames as clips of 5: a frame's fate does not depend on the clip it is in.
    as_clips = hidden_frames(seq.view(-1, 5)[:, 0], frames.view(-1, 5), valid.view(-1, 5, 2))
    assert torch.equal(as_clips.reshape(-1, 2), hidden.reshape(-1, 2))
    invalid = valid.clone()
    invalid[::2] = False
    assert torch.equal(hidden_frames(seq, frames, invalid), hidden & invalid)
    assert not hidden_frames(seq, frames, valid, rate=0.0).any()
    assert not torch.equal(hidden_frames(seq, frames, valid, seed=1), hidden)


def test_hidden_frames_come_in_runs_of_the_span():
    seq = torch.arange(40).repeat_interleave(50)  # 40 sequences x 50 frames, as one-frame clips
    frames = torch.arange(50).repeat(40)[:, None]
    valid = torch.ones(len(seq), 1, 2, dtype=torch.bool)
    hidden = hidden_frames(seq, frames, valid, span=10).view(40, 5, 10, 2)  # sequence, run, frame in it, hand
    assert (hidden == hidden[:, :, :1]).all()  # a run is hidden whole or not at all
    assert abs(hidden.float().mean().item() - INFILL_EVAL_RATE) < 0.06
    assert not torch.equal(hidden.flatten(), hidden_frames(seq, frames, valid).flatten())
    with pytest.raises(ValueError, match="span must be >= 1 frame, got 0"):
        hidden_frames(seq, frames, valid, span=0)


def _offset_predictor(seen: list[torch.Tensor]):
    """Ground-truth joints moved 1 mm along x (wrist excepted) where the hand is shown as valid, 5 mm where it
    is not; records the hand_valid it was given. Wrist-relative error: 20/21 mm and 100/21 mm."""
    def predict(batch):
        seen.append(batch["hand_valid"].clone())
        gt = batch["joints3d"]
        shift = torch.where(batch["hand_valid"], 0.001, 0.005)[..., None, None] * torch.tensor([1.0, 0.0, 0.0])
        shift = shift.expand_as(gt).clone()
        shift[..., 0, :] = 0.0
        B, T = gt.shape[:2]
        return {"joints": gt + shift, "cam_R": torch.eye(3).expand(B, T, 3, 3), "cam_t": torch.zeros(B, T, 3)}
    return predict


@pytest.mark.parametrize("seq_len", [4, 6])
def test_hidden_frames_are_scored_apart_from_the_observed_ones(synthetic_dataset, seq_len):
    cfg = synthetic_dataset.config({"data.seq_len": seq_len})
    seen: list[torch.Tensor] = []
    p = gather(_offset_predictor(seen), build_dataloader(cfg, "val", shuffle=False), torch.device("cpu"),
               hide_rate=INFILL_EVAL_RATE)
    shown = torch.cat(seen).numpy()
    valid_all = np.concatenate([b["hand_valid"].numpy() for b in build_dataloader(cfg, "val", shuffle=False)])
    assert p.hidden.any() and not (p.hidden & ~p.valid).any()
    np.testing.assert_array_equal(shown[p.hidden], False)  # the model never saw the hidden frames as valid
    np.testing.assert_array_equal(shown | (p.hidden | ~p.scored[..., None]), valid_all | ~p.scored[..., None])
    m = compute_metrics(p)
    assert m["mpjpe"] == pytest.approx(20 / 21, rel=1e-4)
    assert m["mpjpe_infilled"] == pytest.approx(100 / 21, rel=1e-4)
    assert m["valid_hand_frames"] + m["infilled_hand_frames"] == p.valid.sum()
    assert m["infilled_hand_frames"] == p.hidden.sum()
    # Nothing hidden: every valid frame is observed, and there is no infilled score.
    p0 = gather(_offset_predictor([]), build_dataloader(cfg, "val", shuffle=False), torch.device("cpu"))
    m0 = compute_metrics(p0)
    assert m0["mpjpe"] == pytest.approx(20 / 21, rel=1e-4) and math.isnan(m0["mpjpe_infilled"])
    assert m0["valid_hand_frames"] == p0.valid.sum() == m["valid_hand_frames"] + m["infilled_hand_frames"]


def test_the_hidden_frames_do_not_depend_on_the_clip_length(synthetic_dataset):
    sets = []
    for seq_len in (4, 6):
        cfg = synthetic_dataset.config({"data.seq_len": seq_len})
        p = gather(_offset_predictor([]), build_dataloader(cfg, "val", shuffle=False), torch.device("cpu"),
                   hide_rate=INFILL_EVAL_RATE)
        c, t, h = np.nonzero(p.hidden)
        sets.append({(int(p.seq_index[i]), int(p.frame_index[i, j]), int(k)) for i, j, k in zip(c, t, h)})
    assert sets[0] == sets[1] and sets[0]


# ---- End to end on the dataset --------------------------------------------------------------------------

def _truth_predictor(batch):
    """Ground-truth camera-frame joints and relative camera poses: a perfect model."""
    from hawor_tune.geometry import relative_camera_pose

    R, t = relative_camera_pose(batch["cam_R"].double(), batch["cam_t"].double())
    return {"joints": batch["joints3d"], "cam_R": R.float(), "cam_t": t.float(), "rotmats": batch["rotmats"],
            "joints_gt_shape": batch["joints3d"]}


@pytest.mark.parametrize("seq_len", [20, 4])
def test_a_perfect_model_has_zero_world_error_over_whole_sequences(synthetic_dataset, seq_len):
    # One clip per sequence, or many overlapping ones: each clip starts on a placed frame, so the chained
    # camera path is exact either way.
    cfg = synthetic_dataset.config({"data.seq_len": seq_len})
    p = gather(_truth_predictor, build_dataloader(cfg, "val", shuffle=False), torch.device("cpu"),
               hide_rate=INFILL_EVAL_RATE)
    m = compute_metrics(p, fps=30.0)
    for key in ("mpjpe", "mpjpe_infilled", "w_mpjpe", "wa_mpjpe", "accel_error", "clip_w_mpjpe", "clip_wa_mpjpe",
                "clip_accel_error", "w_mpjpe_infilled", "accel_error_infilled", "pa_mpjpe_gt_shape"):
        assert m[key] == pytest.approx(0.0, abs=1e-2), key  # float32 labels: hundredths of a millimetre
    assert m["rte"] == pytest.approx(0.0, abs=1e-3) and m["finger_angle_error"] == pytest.approx(0.0, abs=0.05)
    assert m["jerk"] == pytest.approx(m["jerk_gt"], rel=1e-3)


# ---- The mean-pose baseline -------------------------------------------------------------------------------

def test_the_baseline_places_the_mean_pose_at_the_training_sets_mean_wrist(synthetic_dataset):
    cfg = synthetic_dataset.config()
    # The training clips' mean wrist-relative pose and mean camera-frame wrist, per hand, over valid frames.
    rel_sum, wrist_sum, count = np.zeros((2, 21, 3)), np.zeros((2, 3)), np.zeros(2)
    train = build_dataset(cfg, "train")
    for i in range(len(train)):  # every training clip, as the baseline's pass over the training loader
        item = train[i]
        joints, valid = item["joints3d"].double().numpy(), item["hand_valid"].numpy()  # (T, 2, 21, 3), (T, 2)
        rel_sum += np.einsum("th,thkc->hkc", valid, joints - joints[:, :, :1])
        wrist_sum += np.einsum("th,thc->hc", valid, joints[:, :, 0])
        count += valid.sum(0)
    mean_rel, mean_wrist = rel_sum / count[:, None, None], wrist_sum / count[:, None]
    expected_joints = torch.from_numpy(mean_rel + mean_wrist[:, None]).float()  # (2, 21, 3)

    def mean_hands(batch):
        B, T = batch["joints3d"].shape[:2]
        return {"joints": expected_joints.expand(B, T, 2, 21, 3), "cam_R": torch.eye(3).expand(B, T, 3, 3),
                "cam_t": torch.zeros(B, T, 3)}

    expected = compute_metrics(gather(mean_hands, build_dataloader(cfg, "val", shuffle=False), torch.device("cpu"),
                                      hide_rate=INFILL_EVAL_RATE))
    baseline = mean_pose_baseline(cfg, "val")
    assert set(baseline) == set(expected)
    # The articulation metrics need the baseline's mean rotations, which mean_hands does not give.
    assert baseline["finger_angle_error"] > 1.0 and baseline["pa_mpjpe_gt_shape"] > 1.0
    for key in ("finger_angle_error", "pa_mpjpe_gt_shape"):
        expected.pop(key)
    for key, value in expected.items():
        assert baseline[key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), key
    assert math.isfinite(baseline["w_mpjpe"]) and baseline["w_mpjpe"] > 10.0  # no ground-truth wrist given away


def test_constraint_values_are_fractions_of_the_baseline_minus_the_bound():
    from hawor_tune.evaluation import constraint_values

    got = constraint_values({"accel_error": 3.0, "jerk": float("nan")}, {"accel_error": 2.0, "jerk": 1.0},
                            {"accel_error": 1.0, "jerk": 3.0})
    assert got == {"accel_error": 0.5, "jerk": float("inf")}  # 3 / 2 - 1; a metric not computed does not hold
