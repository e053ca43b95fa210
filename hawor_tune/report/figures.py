"""Report figures (PNG) from plain data: training and search curves, importance bars, per-finger errors,
2D skeletons over test frames, camera trajectories, the Pareto front of a two-objective search.

Every plot function takes lists of dicts / numpy arrays and an output path, writes the PNG atomically
(:mod:`hawor_tune.atomic`), closes its figure and returns the path.
Inputs follow :mod:`hawor_tune.results` (``trials.parquet`` / ``epochs.parquet`` rows) and
:func:`hawor_tune.evaluation.compute_metrics` (test metrics keyed without a split prefix).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import matplotlib
import numpy as np

matplotlib.use("Agg")  # headless: reports are written by workers and CI without a display
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from hawor_tune.atomic import atomic_write, atomic_write_text  # noqa: E402
from hawor_tune.mano import FINGERS, HANDS, NUM_JOINTS  # noqa: E402
from hawor_tune.results import is_finite_number, pareto_optimal  # noqa: E402

logger = logging.getLogger(__name__)

# The 20 bones of the OpenPose hand: wrist -> each finger's base, then base -> tip along the finger.
BONES: tuple[tuple[int, int], ...] = tuple(
    pair for joints in FINGERS.values() for pair in zip([0, *joints[:-1]], joints, strict=True))
# Joint names in OpenPose order (the thumb's joints are CMC, MCP, IP; the other fingers' MCP, PIP, DIP).
JOINT_NAMES: tuple[str, ...] = ("wrist", *(
    f"{finger} {part}" for finger in FINGERS
    for part in (("CMC", "MCP", "IP", "tip") if finger == "thumb" else ("MCP", "PIP", "DIP", "tip"))))
# Units of the test metrics (compute_metrics) for axis labels and tables.
_UNITS = {"mpjpe": "mm", "pa_mpjpe": "mm", "mpjpe_infilled": "mm", "w_mpjpe": "mm", "wa_mpjpe": "mm",
          "accel_error": "m/s^2", "jerk": "m/s^3", "jerk_gt": "m/s^3",
          "clip_w_mpjpe": "mm", "clip_wa_mpjpe": "mm", "clip_accel_error": "mm/frame^2", "clip_jerk": "m/s^3",
          "clip_jerk_gt": "m/s^3", "cam_trans_error": "mm", "cam_rot_error": "deg",
          "cam_accel_error": "mm/frame^2", "cam_jerk": "m/s^3", "cam_jerk_gt": "m/s^3",
          "valid_hand_frames": "frames", "infilled_hand_frames": "frames",
          "bridged_hand_frames": "frames"}
_GT_COLOR = (0, 200, 0)                                  # RGB
_PRED_COLORS = {"left": (230, 30, 30), "right": (40, 90, 255)}

# ---- Small helpers ---------------------------------------------------------------------------------------

def _unit(metric: str) -> str:
    """Unit of a metric name such as ``val/mpjpe``, ``best/val/pa_mpjpe_left``, ``finger_index``."""
    name = metric.rsplit("/", 1)[-1]
    for suffix in ("_" + h for h in HANDS):
        name = name.removesuffix(suffix)
    if name.startswith(("joint_", "finger_")):
        return "mm"
    return _UNITS.get(name, "")


def _label(metric: str) -> str:
    unit = _unit(metric)
    return f"{metric} ({unit})" if unit else metric


def _save(fig: Any, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG atomically (:func:`atomic_write`), then close it."""
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)


def _write_text_atomic(text: str, path: Path) -> None:
    atomic_write_text(path, text)


def _array(name: str, x: Any, shape: tuple[int | None, ...], dtype: Any = np.float64) -> np.ndarray:
    """``x`` as an array of ``shape`` (None = any size); a clear error otherwise."""
    arr = np.asarray(x)
    if arr.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, arr.shape, strict=True)):
        want = "(" + ", ".join("N" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {arr.shape}")
    return arr.astype(dtype, copy=False)


# ---- Training and search curves --------------------------------------------------------------------------

def plot_training_curves(history: Sequence[Mapping[str, float]], path: str | os.PathLike) -> Path:
    """Losses (log scale, with the learning rate) and validation MPJPE / PA-MPJPE against epoch.

    Args:
        history: one row per epoch with ``epoch``, ``train/loss``, ``train/<term>``, ``val/mpjpe``,
            ``val/pa_mpjpe`` and ``lr``; missing or non-finite values leave gaps.
        path: the PNG to write.
    """
    if not history:
        raise ValueError("plot_training_curves: history is empty; nothing to plot")
    epochs = [float(r.get("epoch", i + 1)) for i, r in enumerate(history)]
    keys = list(dict.fromkeys(k for r in history for k in r))
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))

    def series(key: str, positive: bool = False) -> tuple[list[float], list[float]]:
        pts = [(e, float(r[key])) for e, r in zip(epochs, history, strict=True)
               if is_finite_number(r.get(key)) and (not positive or r[key] > 0)]
        return [p[0] for p in pts], [p[1] for p in pts]

    for key in [k for k in keys if k.startswith("train/")]:
        x, y = series(key, positive=True)  # log axis: zero-weight terms (0.0) are left out
        if x:
            total = key == "train/loss"
            ax_loss.plot(x, y, marker="o", ms=3, lw=2.5 if total else 1.2, color="black" if total else None,
                         label=key.removeprefix("train/") + (" (weighted total)" if total else ""))
    ax_loss.set_yscale("log")
    ax_loss.set(title="Training losses", xlabel="epoch", ylabel="loss (log scale)")
    ax_loss.grid(True, which="both", alpha=0.3)
    x, y = series("lr", positive=True)
    handles, labels = ax_loss.get_legend_handles_labels()
    if x:
        ax_lr = ax_loss.twinx()
        (line,) = ax_lr.plot(x, y, ls="--", color="grey", label="learning rate")
        ax_lr.set_yscale("log")
        ax_lr.set_ylabel("learning rate (log scale)")
        handles, labels = [*handles, line], [*labels, "learning rate"]
    if handles:
        ax_loss.legend(handles, labels, fontsize=8, loc="upper right")

    for key, style in (("val/mpjpe", "-o"), ("val/pa_mpjpe", "-s")):
        x, y = series(key)
        if x:
            ax_val.plot(x, y, style, ms=4, label=key.removeprefix("val/").upper().replace("_", "-"))
            if key == "val/mpjpe":
                i = int(np.argmin(y))
                ax_val.annotate(f"best {y[i]:.1f} mm @ {x[i]:g}", (x[i], y[i]), textcoords="offset points",
                                xytext=(0, 10), ha="center", fontsize=8)
    ax_val.set(title="Validation error", xlabel="epoch", ylabel="error (mm)")
    ax_val.grid(True, alpha=0.3)
    if ax_val.lines:
        ax_val.legend()
    else:
        ax_val.text(0.5, 0.5, "no validation values", ha="center", va="center", transform=ax_val.transAxes)
    fig.tight_layout()
    return _save(fig, path)


def plot_trial_curves(epoch_rows: Sequence[Mapping[str, Any]], trial_rows: Sequence[Mapping[str, Any]],
                      metric: str, path: str | os.PathLike, *, best_trial_id: str | None = None) -> Path:
    """Every trial's ``metric`` against epoch, as the scheduler saw it.

    Trials that ASHA stopped (``stopped_early``) end in an ``x``; the best trial is drawn thick and
    labelled. Diverged trials are left out (except the best trial, should it be one), and so are epoch
    rows flagged ``diverged`` or with a non-finite value.

    Args:
        epoch_rows: rows of ``epochs.parquet`` (``trial_id``, ``epoch``, ``metric``, ``diverged``).
        trial_rows: rows of ``trials.parquet`` (``trial_id``, ``stopped_early``, ``diverged``).
        metric: the reported metric to plot, e.g. ``val/mpjpe``.
        path: the PNG to write.
        best_trial_id: the trial to highlight.
    """
    meta = {str(r["trial_id"]): r for r in trial_rows}
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in epoch_rows:
        if not r.get("diverged") and is_finite_number(r.get(metric)) and is_finite_number(r.get("epoch")):
            curves.setdefault(str(r["trial_id"]), []).append((float(r["epoch"]), float(r[metric])))
    skipped = [t for t in curves if meta.get(t, {}).get("diverged") and t != best_trial_id]
    for t in skipped:
        del curves[t]
    if not curves:
        raise ValueError(f"plot_trial_curves: no trial has a finite '{metric}' in the epoch rows")
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab20")
    for i, (trial_id, pts) in enumerate(sorted(curves.items())):
        pts.sort()
        x, y = [p[0] for p in pts], [p[1] for p in pts]
        best = trial_id == best_trial_id
        ax.plot(x, y, "-", lw=3 if best else 1.2, color="black" if best else colors(i % 20),
                alpha=1.0 if best else 0.75, zorder=3 if best else 2)
        if meta.get(trial_id, {}).get("stopped_early"):
            ax.plot(x[-1], y[-1], "x", ms=9, mew=2, color="black" if best else colors(i % 20), zorder=4)
    handles = [Line2D([], [], color="tab:blue", lw=1.2, label=f"trial ({len(curves)} shown)"),
               Line2D([], [], color="grey", marker="x", ls="none", ms=9, mew=2, label="stopped by ASHA")]
    if best_trial_id in curves:
        handles.insert(0, Line2D([], [], color="black", lw=3, label=f"best trial {best_trial_id}"))
    if skipped:
        handles.append(Line2D([], [], ls="none", label=f"{len(skipped)} diverged trial(s) not shown"))
    ax.legend(handles=handles, fontsize=8)
    ax.set(title=f"{metric} of every trial", xlabel="epoch", ylabel=_label(metric))
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_params_vs_metric(trial_rows: Sequence[Mapping[str, Any]], params: Sequence[str], metric: str,
                          path: str | os.PathLike, *, log_params: Iterable[str] = frozenset()) -> Path:
    """One scatter per searched parameter: ``param/<p>`` against the trial's ``best/<metric>``.

    Non-numeric values (strings, booleans) are categorical and drawn at positions 0, 1, ... with the
    values as tick labels. Trials that ASHA stopped are drawn as ``x``, diverged ones (whose best value
    comes from the epochs before they diverged) as triangles.

    Args:
        trial_rows: rows of ``trials.parquet``.
        params: the searched parameters (dotted paths).
        metric: the search metric, e.g. ``val/mpjpe``.
        path: the PNG to write.
        log_params: parameters drawn on a log x axis (log-uniform ones).
    """
    if not params:
        raise ValueError("plot_params_vs_metric: params is empty; nothing to plot")
    log_params = set(log_params)
    ncols = min(3, len(params))
    nrows = math.ceil(len(params) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(params):]:
        ax.set_visible(False)
    for ax, p in zip(axes.flat, params, strict=False):
        pts = [(r.get(f"param/{p}"), float(r[f"best/{metric}"]), _trial_kind(r))
               for r in trial_rows if r.get(f"param/{p}") is not None and is_finite_number(r.get(f"best/{metric}"))]
        ax.set(title=p, xlabel=p, ylabel=f"best {_label(metric)}")
        ax.grid(True, alpha=0.3)
        if not pts:
            ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
            continue
        categorical = any(not is_finite_number(v) for v, _, _ in pts)
        if categorical:
            categories = sorted({str(v) for v, _, _ in pts})
            xs = [categories.index(str(v)) for v, _, _ in pts]
            ax.set_xticks(range(len(categories)), categories)
            ax.set_xlim(-0.5, len(categories) - 0.5)
        else:
            xs = [float(v) for v, _, _ in pts]
            if p in log_params and min(xs) > 0:
                ax.set_xscale("log")
        for kind, (marker, color) in _TRIAL_MARKERS.items():
            sel = [(x, y) for x, (_, y, k) in zip(xs, pts, strict=True) if k == kind]
            if sel:
                ax.scatter([s[0] for s in sel], [s[1] for s in sel], marker=marker, s=36, color=color)
    kinds = {_trial_kind(r) for r in trial_rows}
    handles = [Line2D([], [], marker=marker, ls="none", color=color, label=kind)
               for kind, (marker, color) in _TRIAL_MARKERS.items() if kind in kinds]
    fig.legend(handles=handles, loc="upper right", fontsize=8)
    fig.suptitle(f"Best {metric} of each trial against its searched parameters")
    fig.tight_layout(rect=(0, 0, 0.92, 0.95))
    return _save(fig, path)


_TRIAL_MARKERS = {"ran all epochs": ("o", "tab:blue"), "stopped by ASHA": ("x", "tab:orange"),
                  "diverged": ("^", "tab:red")}


def _trial_kind(row: Mapping[str, Any]) -> str:
    if row.get("diverged"):
        return "diverged"
    return "stopped by ASHA" if row.get("stopped_early") else "ran all epochs"



def pareto_front_points(trial_rows: Sequence[Mapping[str, Any]],
                        objectives: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """The points :func:`plot_pareto_front` draws: one per counting trial, flagged Pareto-optimal or not.

    A trial counts when it neither errored nor diverged and has a finite ``best/<metric>`` of both
    objectives; the flag is :func:`hawor_tune.results.pareto_optimal`'s, the rule of the ``pareto`` column.

    Args:
        trial_rows: rows of ``trials.parquet``.
        objectives: two (metric, mode) pairs, mode ``min`` or ``max``.

    Returns:
        ``trial_id``, ``x`` and ``y`` (the two best values) and ``pareto`` per counting trial, in row order.
    """
    if len(objectives) != 2:
        raise ValueError(f"pareto_front_points: {len(objectives)} objectives; allowed: exactly 2")
    (mx, _), (my, _) = objectives
    flags = pareto_optimal(trial_rows, objectives)
    return [{"trial_id": str(r["trial_id"]), "x": float(r[f"best/{mx}"]), "y": float(r[f"best/{my}"]),
             "pareto": flag}
            for r, flag in zip(trial_rows, flags, strict=True)
            if r.get("status") != "ERROR" and not r.get("diverged")
            and is_finite_number(r.get(f"best/{mx}")) and is_finite_number(r.get(f"best/{my}"))]


def plot_pareto_front(trial_rows: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]],
                      path: str | os.PathLike, *, chosen_trial_id: str | None = None) -> Path | None:
    """Scatter of every counting trial's two objective values; the Pareto front highlighted and stepped.

    Only a search of exactly two objectives has a front to draw: otherwise nothing is written and None is
    returned, so a single-objective report is unchanged.

    Args:
        trial_rows: rows of ``trials.parquet``.
        objectives: the search's (metric, mode) pairs.
        path: the PNG to write.
        chosen_trial_id: the retrained trial, marked with a star.
    """
    if len(objectives) != 2:
        return None
    points = pareto_front_points(trial_rows, objectives)
    if not points:
        raise ValueError(f"plot_pareto_front: no trial has finite best/{objectives[0][0]} and "
                         f"best/{objectives[1][0]} (errored and diverged trials do not count)")
    (mx, mode_x), (my, mode_y) = objectives
    fig, ax = plt.subplots(figsize=(7, 5.5))
    rest = [p for p in points if not p["pareto"]]
    front = [p for p in points if p["pareto"]]
    if rest:
        ax.scatter([p["x"] for p in rest], [p["y"] for p in rest], s=30, color="tab:blue", alpha=0.6,
                   label=f"trial ({len(rest)})")
    # The step line bounds the region the front dominates: sorted along x from its best end, each point's
    # y holds until the next point's x (signs flipped for max so both objectives read as "lower is better").
    sx, sy = (1.0 if mode_x == "min" else -1.0), (1.0 if mode_y == "min" else -1.0)
    front.sort(key=lambda p: (sx * p["x"], sy * p["y"]))
    line_x, line_y = [], []
    for i, p in enumerate(front):
        line_x.append(p["x"])
        line_y.append(p["y"])
        if i + 1 < len(front):
            line_x.append(front[i + 1]["x"])
            line_y.append(p["y"])
    ax.plot(line_x, line_y, "-", color="tab:red", lw=1.5, zorder=2)
    ax.scatter([p["x"] for p in front], [p["y"] for p in front], s=60, color="tab:red", edgecolor="black",
               zorder=3, label=f"Pareto-optimal ({len(front)})")
    chosen = [p for p in points if p["trial_id"] == chosen_trial_id]
    if chosen:
        ax.scatter([chosen[0]["x"]], [chosen[0]["y"]], s=260, marker="*", color="gold", edgecolor="black",
                   zorder=4, label=f"retrained trial {chosen_trial_id}")
    skipped = len(trial_rows) - len(points)
    if skipped:
        ax.plot([], [], ls="none", label=f"{skipped} errored, diverged or incomplete trial(s) not shown")
    ax.set(title=f"Pareto front of {mx} and {my}", xlabel=f"best {_label(mx)}, {mode_x}imised",
           ylabel=f"best {_label(my)}, {mode_y}imised")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)



def plot_importance(importances: Mapping[str, float], path: str | os.PathLike) -> Path:
    """Horizontal bars of parameter importances, the most important at the top."""
    if not importances:
        raise ValueError("plot_importance: importances is empty; nothing to plot")
    items = sorted(importances.items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(items) + 1.6))
    bars = ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    ax.bar_label(bars, fmt="%.2f", padding=3, fontsize=8)
    ax.set_xlim(0, max(1e-9, max(v for _, v in items)) * 1.18)
    ax.set(title="Hyperparameter importance (PED-ANOVA)", xlabel="relative importance (sums to 1)",
           ylabel="searched parameter")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


# ---- Test-set figures ------------------------------------------------------------------------------------

def _finger_names(*sources: Mapping[str, float] | None) -> list[str]:
    found = {k.removeprefix("finger_") for s in sources if s for k in s if k.startswith("finger_")}
    return [f for f in FINGERS if f in found] + sorted(found - set(FINGERS))


def plot_per_finger(metrics: Mapping[str, float], path: str | os.PathLike, *,
                    baseline: Mapping[str, float] | None = None) -> Path:
    """Bars of the mean joint error of each finger (``finger_<name>``, mm), beside the baseline's."""
    fingers = _finger_names(metrics)
    if not fingers:
        raise ValueError(f"plot_per_finger: no finger_<name> key in metrics (keys: {sorted(metrics)[:8]}...)")
    base = [baseline.get(f"finger_{f}") if baseline else None for f in fingers]
    has_base = any(is_finite_number(b) for b in base)
    width = 0.38 if has_base else 0.6
    x = np.arange(len(fingers))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    model = [float(metrics[f"finger_{f}"]) if is_finite_number(metrics.get(f"finger_{f}")) else np.nan for f in fingers]
    bars = ax.bar(x - (width / 2 if has_base else 0), model, width, color="tab:blue", label="model")
    ax.bar_label(bars, fmt="%.1f", padding=2, fontsize=8)
    if has_base:
        vals = [float(b) if is_finite_number(b) else np.nan for b in base]
        bars = ax.bar(x + width / 2, vals, width, color="tab:grey", label="mean-pose baseline")
        ax.bar_label(bars, fmt="%.1f", padding=2, fontsize=8)
    ax.set_xticks(x, fingers)
    ax.set(title="Per-finger error (wrist-relative, test split)", xlabel="finger",
           ylabel="mean joint error (mm)")
    ax.margins(y=0.1)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars of any height stay readable
    fig.tight_layout()
    return _save(fig, path)


def draw_skeleton(image: np.ndarray, joints2d: np.ndarray, valid: np.ndarray, *,
                  color_left: tuple[int, int, int], color_right: tuple[int, int, int],
                  thickness: int = 1) -> np.ndarray:
    """Draw the 21-joint OpenPose skeleton of each valid hand on a copy of ``image``.

    Args:
        image: (H, W, 3) uint8 RGB.
        joints2d: (2, 21, 2) pixel coordinates (x, y), hand 0 = left; non-finite joints and their bones
            are not drawn.
        valid: (2,) bool; an invalid hand is not drawn.
        color_left, color_right: RGB colours of the hands.
        thickness: bone thickness in pixels; joints are dots of radius ``thickness + 1``.

    Returns:
        A new (H, W, 3) uint8 image.
    """
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"draw_skeleton: image must be a (H, W, 3) uint8 array, got "
                         f"{getattr(image, 'shape', None)} {getattr(image, 'dtype', type(image).__name__)}")
    joints2d = _array("draw_skeleton: joints2d", joints2d, (2, NUM_JOINTS, 2))
    valid = _array("draw_skeleton: valid", valid, (2,), bool)
    out = np.ascontiguousarray(image).copy()
    shift = 4  # sub-pixel endpoints: cv2 takes fixed-point ints with 4 fractional bits
    for h, color in enumerate((color_left, color_right)):
        if not valid[h]:
            continue
        color = tuple(int(c) for c in color)
        ok = np.isfinite(joints2d[h]).all(axis=1)                           # (21,)
        # Far-off points are clipped to stay inside cv2's int range; cv2 clips the lines to the image.
        xy = np.clip(np.nan_to_num(joints2d[h], nan=0.0, posinf=0.0, neginf=0.0), -1e5, 1e5)   # (21, 2)
        pts = np.round(xy * (1 << shift)).astype(np.int64)
        for a, b in BONES:
            if ok[a] and ok[b]:
                cv2.line(out, tuple(map(int, pts[a])), tuple(map(int, pts[b])), color, thickness,
                         cv2.LINE_AA, shift)
        for j in np.flatnonzero(ok):
            cv2.circle(out, tuple(map(int, pts[j])), (thickness + 1) << shift, color, -1, cv2.LINE_AA, shift)
    return out


def plot_skeleton_overlays(images: np.ndarray, pred2d: np.ndarray, gt2d: np.ndarray, valid: np.ndarray,
                           path: str | os.PathLike, *, upscale: int = 3) -> Path:
    """A grid of frames with ground-truth (green) and predicted (red left / blue right) skeletons.

    Args:
        images: (N, H, W, 3) uint8 RGB model-input frames.
        pred2d, gt2d: (N, 2, 21, 2) joints in the frames' pixels.
        valid: (N, 2) bool; hands not valid in a frame are not drawn.
        path: the PNG to write.
        upscale: integer factor the frames are enlarged by (nearest neighbour) before drawing, so that
            the skeletons on small frames stay legible.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(f"plot_skeleton_overlays: images must be a non-empty (N, H, W, 3) uint8 array, got "
                         f"{images.shape} {images.dtype}")
    n = len(images)
    pred2d = _array("plot_skeleton_overlays: pred2d", pred2d, (n, 2, NUM_JOINTS, 2))
    gt2d = _array("plot_skeleton_overlays: gt2d", gt2d, (n, 2, NUM_JOINTS, 2))
    valid = _array("plot_skeleton_overlays: valid", valid, (n, 2), bool)
    if not isinstance(upscale, int) or upscale < 1:
        raise ValueError(f"plot_skeleton_overlays: upscale={upscale!r}; allowed: an integer >= 1")
    thickness = max(1, upscale // 2)
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.2 * nrows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:n]):
        h, w = images.shape[1:3]
        frame = cv2.resize(images[i], (w * upscale, h * upscale), interpolation=cv2.INTER_NEAREST)
        # Pixel centres: pixel c covers [c*s, (c+1)*s) after a nearest upscale by s.
        frame = draw_skeleton(frame, (gt2d[i] + 0.5) * upscale - 0.5, valid[i], color_left=_GT_COLOR,
                              color_right=_GT_COLOR, thickness=thickness)
        frame = draw_skeleton(frame, (pred2d[i] + 0.5) * upscale - 0.5, valid[i],
                              color_left=_PRED_COLORS["left"], color_right=_PRED_COLORS["right"],
                              thickness=thickness)
        ax.imshow(frame)
        hands = [hand for hand, v in zip(HANDS, valid[i], strict=True) if v]
        ax.set_title(f"frame {i}: " + (" + ".join(hands) if hands else "no valid hand"), fontsize=9)
    handles = [Line2D([], [], color=np.array(_GT_COLOR) / 255, lw=2, label="ground truth"),
               Line2D([], [], color=np.array(_PRED_COLORS["left"]) / 255, lw=2, label="prediction, left hand"),
               Line2D([], [], color=np.array(_PRED_COLORS["right"]) / 255, lw=2, label="prediction, right hand")]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=9)
    fig.suptitle(f"2D skeletons on test frames ({images.shape[2]}x{images.shape[1]} px, shown x{upscale})")
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    return _save(fig, path)


def plot_camera_trajectory(gt_positions: np.ndarray, pred_positions: np.ndarray, path: str | os.PathLike, *,
                           segments: np.ndarray | None = None) -> Path:
    """Top view (world x-z plane, equal aspect) of the ground-truth and predicted camera positions.

    Args:
        gt_positions, pred_positions: (N, 3) camera centres in world coordinates (m).
        path: the PNG to write.
        segments: optional (N,) ints; each segment (a clip whose prediction is re-anchored on the ground
            truth) is its own polyline, so segments are never joined. Non-finite positions are dropped.
    """
    gt = _array("plot_camera_trajectory: gt_positions", gt_positions, (None, 3))
    pred = _array("plot_camera_trajectory: pred_positions", pred_positions, (len(gt), 3))
    if len(gt) == 0:
        raise ValueError("plot_camera_trajectory: no positions to plot")
    seg = np.zeros(len(gt), np.int64) if segments is None else _array(
        "plot_camera_trajectory: segments", segments, (len(gt),), np.int64)
    fig, ax = plt.subplots(figsize=(6.5, 6.5))
    ids = list(dict.fromkeys(seg.tolist()))                 # segments in order of appearance
    for positions, color, label in ((gt, "tab:green", "ground truth"), (pred, "tab:red", "prediction")):
        for k, s in enumerate(ids):
            p = positions[seg == s]
            p = p[np.isfinite(p).all(axis=1)]
            if len(p):
                ax.plot(p[:, 0], p[:, 2], "-", color=color, lw=1.5, label=label if k == 0 else None)
                ax.plot(p[0, 0], p[0, 2], "o", color=color, ms=4)
    ax.plot([], [], "o", color="grey", ms=4, label="segment start")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set(title="Camera trajectory, top view" + (f" ({len(ids)} segments)" if segments is not None else ""),
           xlabel="world x (m)", ylabel="world z (m)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_wrist_trajectories(gt: np.ndarray, pred: np.ndarray, valid: np.ndarray, path: str | os.PathLike, *,
                            fps: float = 30.0) -> Path:
    """Both wrists' world trajectories of one sequence, prediction against ground truth: a top view (world
    x-z, equal aspect) and x, y, z over time. Frames where a hand is not valid are gaps.

    Args:
        gt, pred: (N, 2, 3) wrists (left, right) in the sequence's world (its first camera), metres.
        valid: (N, 2) bool.
        path: the PNG to write.
        fps: frame rate of the frames, for the time axis.
    """
    g = _array("plot_wrist_trajectories: gt", gt, (None, 2, 3))
    p = _array("plot_wrist_trajectories: pred", pred, (len(g), 2, 3))
    v = _array("plot_wrist_trajectories: valid", valid, (len(g), 2), bool)
    if not v.any():
        raise ValueError("plot_wrist_trajectories: no valid frame to plot")
    t = np.arange(len(g)) / fps
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    colors = {0: "tab:blue", 1: "tab:orange"}  # left, right

    def gaps(x: np.ndarray, h: int) -> np.ndarray:
        return np.where(v[:, h, None], x[:, h], np.nan)  # (N, 3)

    top = axes[0, 0]
    for h, hand in enumerate(("left", "right")):
        for x, style, what in ((g, "-", "ground truth"), (p, "--", "prediction")):
            y = gaps(x, h)
            top.plot(y[:, 0], y[:, 2], style, color=colors[h], lw=1.3, label=f"{hand}, {what}")
    top.set_aspect("equal", adjustable="datalim")
    top.set(title="Wrists, top view", xlabel="world x (m)", ylabel="world z (m)")
    top.legend(fontsize=7)
    for ax, k, name in ((axes[0, 1], 0, "x"), (axes[1, 0], 1, "y"), (axes[1, 1], 2, "z")):
        for h in range(2):
            ax.plot(t, gaps(g, h)[:, k], "-", color=colors[h], lw=1.3)
            ax.plot(t, gaps(p, h)[:, k], "--", color=colors[h], lw=1.3)
        ax.set(title=f"Wrists, world {name} over time", xlabel="time (s)", ylabel=f"{name} (m)")
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
