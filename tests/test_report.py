"""Tests for hawor_tune.report: figures are real PNGs with content, skeletons land where the joints are,
importance ranks the parameter that drives the metric first, and report.md holds the numbers and links."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from hawor_tune import report
from hawor_tune.mano import FINGERS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    """A valid, non-blank PNG and no temporary file left beside it."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = cv2.imread(str(path))
    assert img is not None and img.shape[0] >= 150 and img.shape[1] >= 150
    assert float(img.std()) > 8.0, "blank canvas"
    assert [p.name for p in path.parent.iterdir()] == [path.name]


# ---- inputs ------------------------------------------------------------------------------------------------

def history() -> list[dict[str, float]]:
    terms = ("keypoint_3d", "keypoint_2d", "mano_params", "temporal", "camera", "hand_world")
    rows = []
    for e in range(1, 7):
        row = {"epoch": e, "train/loss": 2.0 / e, "lr": 1e-3 * (0.8 ** e),
               "val/mpjpe": 60.0 - 3 * e, "val/pa_mpjpe": 30.0 - e}
        row.update({f"train/{t}": (i + 1) * 0.1 / e for i, t in enumerate(terms)})
        row["train/hand_world"] = 0.0  # a zero-weight term is skipped on the log axis
        rows.append(row)
    return rows


def search_rows() -> tuple[list[dict], list[dict]]:
    """Six trials: t0 best (8 epochs), t1 and t2 stopped by ASHA, t3 diverged, t4 NaN epoch, t5 bool param."""
    epochs, trials = [], []
    for i in range(6):
        n = 8 if i in (0, 4, 5) else 2
        for e in range(1, n + 1):
            value = 50.0 + 5 * i - 2 * e
            epochs.append({"trial_id": f"t{i}", "epoch": e, "val/mpjpe": math.nan if (i, e) == (4, 3) else value,
                           "diverged": i == 3 and e == 2})
        trials.append({"trial_id": f"t{i}", "stopped_early": i in (1, 2), "diverged": i == 3,
                       "param/optim.lr": 10 ** (-4 + 0.4 * i), "param/data.seq_len": [4, 8, 16][i % 3],
                       "param/model.flag": i % 2 == 0, "best/val/mpjpe": 50.0 + 5 * i - 2 * n})
    return epochs, trials


def sample_metrics() -> dict[str, float]:
    m = {"mpjpe": 23.456, "pa_mpjpe": 9.871, "mpjpe_left": 24.0, "mpjpe_right": 22.9, "pa_mpjpe_left": 10.0,
         "pa_mpjpe_right": 9.7, "accel_error": 3.21, "w_mpjpe": 120.5, "wa_mpjpe": 80.25, "jerk": 152.0,
         "jerk_gt": 98.5, "cam_trans_error": 41.0, "valid_hand_frames": 512.0}
    m.update({f"joint_{j:02d}": 10.0 + j for j in range(21)})
    m.update({f"finger_{f}": 15.0 + i for i, f in enumerate(("thumb", "index", "middle", "ring", "pinky"))})
    return m


# ---- figures -----------------------------------------------------------------------------------------------

def _overlays(path: Path) -> Path:
    rng = np.random.default_rng(0)
    n = 3
    images = np.tile(np.linspace(0, 200, 96, dtype=np.uint8)[None, None, :, None], (n, 96, 1, 3))
    gt = rng.uniform(10, 86, (n, 2, 21, 2))
    valid = np.array([[True, True], [True, False], [False, False]])
    return report.plot_skeleton_overlays(images, gt + rng.normal(0, 3, gt.shape), gt, valid, path, upscale=3)


def _trajectory(path: Path) -> Path:
    t = np.linspace(0, 2 * np.pi, 40)
    gt = np.stack([np.cos(t), 0.1 * t, np.sin(t)], axis=1)
    return report.plot_camera_trajectory(gt, gt * 1.1 + 0.05, path, segments=np.repeat(np.arange(4), 10))


_T = np.linspace(0, 2 * np.pi, 40)  # a circle traced by both wrists
PLOTS = {
    "training_curves": lambda p: report.plot_training_curves(history(), p),
    "trial_curves": lambda p: report.plot_trial_curves(*search_rows(), "val/mpjpe", p, best_trial_id="t0"),
    "params_vs_metric": lambda p: report.plot_params_vs_metric(
        search_rows()[1], ["optim.lr", "data.seq_len", "model.flag"], "val/mpjpe", p, log_params={"optim.lr"}),
    "importance": lambda p: report.plot_importance({"optim.lr": 0.7, "data.seq_len": 0.2, "model.flag": 0.1}, p),
    "per_finger": lambda p: report.plot_per_finger(sample_metrics(), p,
                                                   baseline={f"finger_{f}": 30.0 for f in FINGERS}),
    "per_finger_no_baseline": lambda p: report.plot_per_finger(sample_metrics(), p),
    "skeleton_overlays": _overlays,
    "camera_trajectory": _trajectory,
    "wrist_trajectories": lambda p: report.plot_wrist_trajectories(
        np.stack([np.stack([np.cos(_T), 0.1 * _T, np.sin(_T) + h], -1) for h in (0, 1)], 1),
        np.stack([np.stack([np.cos(_T) + 0.02, 0.1 * _T, np.sin(_T) + h], -1) for h in (0, 1)], 1),
        np.arange(80).reshape(40, 2) % 7 != 3, p),  # gaps: frames a hand is not valid
}


@pytest.mark.parametrize("name", PLOTS)
def test_plot_writes_png_with_content(tmp_path: Path, name: str) -> None:
    path = tmp_path / "figures" / f"{name}.png"
    assert PLOTS[name](path) == path
    assert_png(path)


def test_trial_curves_without_any_usable_trial_is_an_error(tmp_path: Path) -> None:
    epochs = [{"trial_id": "a", "epoch": 1, "val/mpjpe": math.inf, "diverged": False},
              {"trial_id": "b", "epoch": 1, "val/mpjpe": 40.0, "diverged": True}]
    with pytest.raises(ValueError, match="val/mpjpe"):
        report.plot_trial_curves(epochs, [], "val/mpjpe", tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


# ---- Pareto front ------------------------------------------------------------------------------------------

def two_objective_rows() -> list[dict]:
    """Twelve trials; t0 errored and t1 diverged (both would dominate everything), t2 lacks one value."""
    rng = np.random.default_rng(3)
    rows = [{"trial_id": f"t{i}", "status": "TERMINATED", "diverged": False,
             "best/val/mpjpe": float(rng.uniform(30, 60)), "best/val/cam_trans_error": float(rng.uniform(5, 40))}
            for i in range(12)]
    rows[0].update({"status": "ERROR", "best/val/mpjpe": 1.0, "best/val/cam_trans_error": 1.0})
    rows[1].update({"diverged": True, "best/val/mpjpe": 1.0, "best/val/cam_trans_error": 1.0})
    rows[2]["best/val/cam_trans_error"] = math.nan
    return rows


@pytest.mark.parametrize("modes", [("min", "min"), ("min", "max"), ("max", "max")])
def test_pareto_front_highlights_the_non_dominated_trials(tmp_path: Path, modes: tuple[str, str]) -> None:
    rows = two_objective_rows()
    objectives = list(zip(("val/mpjpe", "val/cam_trans_error"), modes, strict=True))
    # Worked out here by brute force over the counting trials, in "lower is better" signs.
    sign = [1.0 if m == "min" else -1.0 for m in modes]
    counting = {r["trial_id"]: (sign[0] * r["best/val/mpjpe"], sign[1] * r["best/val/cam_trans_error"])
                for r in rows[3:]}
    expected = {t for t, p in counting.items()
                if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in counting.values())}
    assert 0 < len(expected) < len(counting)
    points = report.pareto_front_points(rows, objectives)
    assert [p["trial_id"] for p in points] == list(counting)
    assert {p["trial_id"] for p in points if p["pareto"]} == expected
    path = tmp_path / "figures" / "pareto_front.png"
    assert report.plot_pareto_front(rows, objectives, path, chosen_trial_id=sorted(expected)[0]) == path
    assert_png(path)


def test_pareto_front_is_not_drawn_for_a_single_objective(tmp_path: Path) -> None:
    path = tmp_path / "pareto_front.png"
    assert report.plot_pareto_front(two_objective_rows(), [("val/mpjpe", "min")], path) is None
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="exactly 2"):
        report.pareto_front_points(two_objective_rows(), [("val/mpjpe", "min")])


# ---- skeletons ---------------------------------------------------------------------------------------------

def test_bones_are_the_openpose_hand() -> None:
    expected = {(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11),
                (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20)}
    assert len(report.BONES) == 20 and set(report.BONES) == expected


def _single_bone(a: tuple[float, float], b: tuple[float, float]) -> np.ndarray:
    """Left hand with only joints 0 and 1 (the wrist-thumb bone) finite; right hand all NaN."""
    joints = np.full((2, 21, 2), np.nan)
    joints[0, 0], joints[0, 1] = a, b
    return joints


@pytest.mark.parametrize("a, b", [((10.0, 10.0), (50.0, 10.0)), ((8.0, 40.0), (52.0, 12.0))])
def test_draw_skeleton_colors_the_bone_and_nothing_far_from_it(a: tuple, b: tuple) -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    out = report.draw_skeleton(image, _single_bone(a, b), np.array([True, True]),
                               color_left=(255, 0, 0), color_right=(0, 0, 255))
    assert not image.any(), "input image modified"
    # Along the segment (away from the end dots) the nearest pixel is (nearly) fully red.
    for s in np.linspace(0.2, 0.8, 7):
        x, y = np.add(a, s * np.subtract(b, a))
        patch = out[int(round(y)) - 1:int(round(y)) + 2, int(round(x)) - 1:int(round(x)) + 2]
        assert patch[..., 0].max() >= 200 and patch[..., 1:].max() == 0
    # Pixels more than 3 px from the segment stay black (a 1-px line, end dots of radius 2, anti-aliasing).
    ys, xs = np.mgrid[0:64, 0:64]
    p, d = np.stack([xs, ys], -1).astype(float), np.subtract(b, a)
    t = np.clip(((p - a) @ d) / (d @ d), 0, 1)
    dist = np.linalg.norm(p - (np.asarray(a) + t[..., None] * d), axis=-1)
    assert not out[dist > 3.5].any()
    assert out[dist <= 1].any()


@pytest.mark.parametrize("valid", [[False, False], [False, True]])
def test_draw_skeleton_leaves_invalid_hands_undrawn(valid: list[bool]) -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
    joints = np.full((2, 21, 2), np.nan)
    joints[0] = rng.uniform(5, 43, (21, 2))            # only the left hand has joints
    out = report.draw_skeleton(image, joints, np.array(valid), color_left=(0, 255, 0), color_right=(0, 0, 255))
    np.testing.assert_array_equal(out, image)
    drawn = report.draw_skeleton(image, joints, np.array([True, False]), color_left=(0, 255, 0),
                                 color_right=(0, 0, 255))
    assert (drawn != image).any()


def test_draw_skeleton_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="joints2d"):
        report.draw_skeleton(np.zeros((8, 8, 3), np.uint8), np.zeros((21, 2)), np.ones(2, bool),
                             color_left=(1, 1, 1), color_right=(1, 1, 1))


# ---- importance --------------------------------------------------------------------------------------------

DISTS = {"a": FloatDistribution(1e-4, 1e-2, log=True), "b": FloatDistribution(0.0, 1.0),
         "c": CategoricalDistribution([4, 8, 16]), "d": IntDistribution(0, 10, step=2)}


def synthetic_trials(n: int, mode: str, seed: int = 0) -> list[dict]:
    """The metric is a function of a alone (best at a = 1e-3); b, c, d are noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a = float(10 ** rng.uniform(-4, -2))
        value = (math.log10(a) + 3) ** 2
        rows.append({"trial_id": f"t{i}", "param/a": a, "param/b": float(rng.uniform(0, 1)),
                     "param/c": int(rng.choice([4, 8, 16])), "param/d": float(2 * rng.integers(0, 6)),
                     "best/val/mpjpe": value if mode == "min" else -value})
    return rows


@pytest.mark.parametrize("mode", ["min", "max"])
def test_importance_ranks_the_parameter_that_drives_the_metric_first(mode: str) -> None:
    rows = synthetic_trials(16, mode)
    imp = report.hyperparameter_importance(rows, ["a", "b", "c", "d"], "val/mpjpe", mode, DISTS)
    assert list(imp)[0] == "a" and imp["a"] > max(imp["b"], imp["c"], imp["d"])
    assert sum(imp.values()) == pytest.approx(1.0)
    assert report.hyperparameter_importance(rows, ["a", "b", "c", "d"], "val/mpjpe", mode, DISTS) == imp


def test_importance_skips_values_outside_the_space_and_zeroes_constant_params() -> None:
    rows = synthetic_trials(12, "min")
    for r in rows:
        r["param/e"] = 0.5                                           # constant: no information
    rows[0]["param/a"] = 1.0                                         # outside [1e-4, 1e-2]: trial dropped
    rows[1]["param/a"] = 1e-2 * (1 + 1e-12)                          # float noise at the bound: kept
    rows[2]["param/c"] = 32                                          # not a choice: dropped
    rows[3]["best/val/mpjpe"] = math.nan                             # no metric: dropped
    dists = {**DISTS, "e": FloatDistribution(0.0, 1.0)}
    imp = report.hyperparameter_importance(rows, ["a", "b", "e"], "val/mpjpe", "min", dists)
    assert imp["e"] == 0.0 and imp["a"] > imp["b"]


@pytest.mark.parametrize("rows, match", [
    ([], "at least 2 trials"),
    (synthetic_trials(1, "min"), "at least 2 trials"),
    ([{**r, "best/val/mpjpe": math.nan} for r in synthetic_trials(5, "min")], "at least 2 trials"),
    ([{**r, "param/a": 5.0} for r in synthetic_trials(5, "min")], "at least 2 trials"),
    ([{**r, "best/val/mpjpe": 3.0} for r in synthetic_trials(5, "min")], "best/val/mpjpe has the same value"),
    ([{**r, "param/a": 1e-3, "param/b": 0.5} for r in synthetic_trials(5, "min")], "every parameter"),
])
def test_importance_without_enough_information_is_an_error(rows: list[dict], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        report.hyperparameter_importance(rows, ["a", "b"], "val/mpjpe", "min", DISTS)


def test_importance_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        report.hyperparameter_importance(synthetic_trials(4, "min"), ["a"], "val/mpjpe", "best", DISTS)


# ---- report.md ---------------------------------------------------------------------------------------------

def test_write_report_has_values_links_and_na(tmp_path: Path) -> None:
    fig = tmp_path / "figures" / "training.png"
    search = {"experiment": "lr_seq", "trial_id": "t0", "params": {"optim.lr": 0.00123456, "data.seq_len": 8},
              "metric": "val/mpjpe", "val_value": 31.204, "epochs": 8, "config_path": "config.yaml"}
    path = report.write_report(tmp_path, metrics=sample_metrics(), baseline={"mpjpe": 95.0, "pa_mpjpe": 40.5},
                               search=search, figures={"Training curves": str(fig),
                                                       "Per finger": "figures/per_finger.png"},
                               notes=["importance skipped: 1 trial"])
    assert path == tmp_path / "report.md"
    text = path.read_text()
    mpjpe_row = next(line for line in text.splitlines() if line.startswith("| MPJPE (wrist-relative, observed frames)"))
    assert mpjpe_row.split("|")[2:6] == [" mm ", " 23.46 ", " 95.00 ", " 31.20 "]
    for expected in ("9.87", "120.50", "mm/frame^2", "m/s^2", "m/s^3", "0.00123", "lr_seq", "t0",
                     "![Training curves](figures/training.png)", "![Per finger](figures/per_finger.png)",
                     "importance skipped: 1 trial", "| 20 | pinky tip | 30.00 |"):
        assert expected in text, expected
    cam_rot = next(line for line in text.splitlines() if "camera rotation error" in line)
    assert cam_rot.split("|")[2:6] == [" deg ", " n/a ", " n/a ", " - "]
    assert "| hand-frames observed by the model (the hand metrics' frames) | frames | 512 | n/a | - |" in text
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["report.md"]


def test_write_report_without_search_or_baseline(tmp_path: Path) -> None:
    text = report.write_report(tmp_path, metrics={}, baseline=None, search=None, figures={}).read_text()
    assert "No search result" in text and "No figures" in text
    assert "| MPJPE (wrist-relative, observed frames) | mm | n/a | n/a |" in text  # no search column without a search


def test_write_report_checks_the_constraints_on_its_split(tmp_path: Path) -> None:
    constraints = {"accel_error": {"bound": 1.0, "ratio": 0.93, "met": True},
                   "jerk": {"bound": 3.0, "ratio": 4.2, "met": False}}
    text = report.write_report(tmp_path, metrics={}, baseline=None, search=None, figures={},
                               constraints=constraints).read_text()
    assert "## Constraints (test split)" in text
    assert "| accel_error | 1.00 | 0.93 | yes |" in text and "| jerk | 3.00 | 4.20 | no |" in text
    assert "## Constraints" not in report.write_report(tmp_path, metrics={}, baseline=None, search=None,
                                                       figures={}).read_text()
