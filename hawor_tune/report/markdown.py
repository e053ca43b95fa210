"""``report.md``: what was trained, the test (or stand-in split's) results beside the baseline and the search, and
the figures."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hawor_tune.mano import FINGERS, HANDS, NUM_JOINTS
from hawor_tune.report.figures import JOINT_NAMES, _finger_names, _unit, _write_text_atomic
from hawor_tune.results import is_finite_number

logger = logging.getLogger(__name__)

_WORLD_ROWS = (("w_mpjpe", "W-MPJPE (whole sequences in world coordinates, 100-frame chunks aligned on their "
                            "first two frames; WHAM's protocol)"),
               ("wa_mpjpe", "WA-MPJPE (as W-MPJPE, each chunk aligned on all its frames)"),
               ("accel_error", "acceleration error of the world joints"),
               ("rte", "RTE: the wrist's path rigidly aligned over the sequence, over its length (HaWoR's)"),
               ("w_mpjpe_infilled", "W-MPJPE of the infilled frames"),
               ("accel_error_infilled", "acceleration error at the infilled frames"),
               ("jerk", "jerk of predicted world joints"),
               ("jerk_gt", "jerk of ground-truth world joints (reference)"),
               ("clip_w_mpjpe", "clip-level W-MPJPE (each clip in its first camera, one chunk per clip)"),
               ("clip_wa_mpjpe", "clip-level WA-MPJPE"),
               ("clip_accel_error", "clip-level acceleration error (wrist-relative joints)"),
               ("cam_trans_error", "camera translation error"),
               ("cam_rot_error", "camera rotation error (geodesic)"),
               ("cam_accel_error", "camera acceleration error (centres in each clip's first camera)"),
               ("cam_jerk", "jerk of the predicted camera trajectory"),
               ("cam_jerk_gt", "jerk of the ground-truth camera trajectory (reference)"),
               ("valid_hand_frames", "hand-frames observed by the model (the hand metrics' frames)"),
               ("infilled_hand_frames", "valid hand-frames hidden from the model"),
               ("bridged_hand_frames", "hidden hand-frames in no clip that observes the hand, filled across clips"))

# ---- report.md -------------------------------------------------------------------------------------------

def _comparison(c: Mapping[str, Any], split: str) -> list[str]:
    """The 'what the search bought' section: the winner against the space's base config, both retrained
    with the same budget and seeds, each metric's mean and half-range over the seeds."""
    lines = ["## What the search bought", "",
             f"The winner and the search space's base configuration (its own values of the searched parameters), "
             f"each retrained with the same budget and seeds {list(c['seeds'])}, on the {split} split: mean "
             f"+- half the range over the seeds. A difference counts when it exceeds twice the larger spread.", ""]
    rows = []
    for name, r in c["metrics"].items():
        rows.append([name, f"{_fmt(r['winner'])} +- {_fmt(r['winner_spread'])}",
                     f"{_fmt(r['base'])} +- {_fmt(r['base_spread'])}", _fmt(r["winner"] - r["base"]),
                     "yes" if r["beats"] else "no"])
    return lines + _table(("metric", "winner", "base", "winner - base", "winner better beyond 2x spread"),
                          rows) + [""]


def _fmt(value: Any) -> str:
    """A table cell: floats with 2 decimals (3 significant digits when tiny or huge), 'n/a' when missing."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if not is_finite_number(value):
        return "n/a" if value is None or isinstance(value, (float, np.floating)) else str(value)
    v = float(value)
    if v != 0 and (abs(v) < 0.01 or abs(v) >= 1e5):
        return f"{v:.3g}"
    return f"{v:.2f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _figure_link(out_dir: Path, path: str) -> str:
    p = Path(path)
    return Path(os.path.relpath(p, out_dir)).as_posix() if p.is_absolute() else p.as_posix()


def write_report(out_dir: str | os.PathLike, *, metrics: Mapping[str, float],
                 baseline: Mapping[str, float] | None, search: Mapping[str, Any] | None,
                 figures: Mapping[str, str], notes: Sequence[str] = (), split: str = "test",
                 notice: str | None = None, comparison: Mapping[str, Any] | None = None,
                 constraints: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Write ``out_dir/report.md`` (atomically) and return its path.

    Args:
        out_dir: the report folder; figure paths are linked relative to it.
        metrics: the split's metrics from :func:`hawor_tune.evaluation.compute_metrics`.
        baseline: the mean-pose baseline's metrics on the same split (same keys), or None.
        search: what was retrained: ``experiment``, ``trial_id``, ``params`` (dict), ``metric``,
            ``val_value`` (the search's validation value of its metric), ``epochs``, ``config_path``;
            None when no search was used.
        figures: caption -> PNG path (absolute, or relative to ``out_dir``), in display order.
        notes: free-text lines listed at the end (e.g. why a figure is missing).
        split: the split ``metrics`` were computed on; it names the results' columns.
        notice: a paragraph shown right under the title (e.g. why ``split`` is not test).
        comparison: what the search bought (:func:`hawor_tune.retrain.compare_with_base`), or None.
        constraints: per constrained metric (``train.constraints``): ``bound`` and ``ratio`` (its value over
            the baseline's on ``split``) and ``met``; None or empty: the search had none.

    Missing keys are shown as ``n/a``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    search = search or {}
    baseline = baseline or {}
    lines = [f"# Final retrain report{': ' + str(search['experiment']) if search.get('experiment') else ''}", ""]
    if notice:
        lines += [f"**Evaluated on the {split} split.** {notice}", ""]

    lines += ["## What was trained", ""]
    if search:
        lines += [f"- experiment: {search.get('experiment') or 'n/a'}",
                  f"- trial: {search.get('trial_id') or 'n/a'}",
                  f"- search metric: {search.get('metric') or 'n/a'}, best trial's validation value "
                  f"{_fmt(search.get('val_value'))} {_unit(str(search.get('metric', '')))}".rstrip(),
                  f"- epochs: {_fmt(search.get('epochs'))}",
                  f"- resolved config: {search.get('config_path') or 'n/a'}", ""]
        params = search.get("params") or {}
        if params:
            lines += _table(("parameter", "value"),
                            ((f"`{k}`", f"{v:.4g}" if is_finite_number(v) and isinstance(v, float) else _fmt(v))
                             for k, v in params.items()))
        else:
            lines.append("Searched parameters: n/a")
    else:
        lines.append("No search result was given: the model was trained from its config as is.")
    lines.append("")

    val_metric = str(search.get("metric", "")).removeprefix("val/")
    shown: set[str] = set()

    def cell(key: str, source: Mapping[str, Any]) -> str:
        value = source.get(key)
        if _unit(key) == "frames" and is_finite_number(value) and float(value).is_integer():
            return str(int(value))  # a count
        return _fmt(value)

    def row(key: str, label: str | None = None) -> list[str]:
        shown.add(key)
        cells = [label or key, _unit(key) or "-", cell(key, metrics), cell(key, baseline)]
        if not search:
            return cells
        # The search's validation value sits in the row of the metric it optimised ("-": not that row).
        return [*cells, _fmt(search.get("val_value")) if key == val_metric else "-"]

    header = ("metric", "unit", split, f"mean-pose baseline ({split})", *(("search best (val)",) if search else ()))
    lines += [f"## Results ({split} split)", ""]
    lines += _table(header, [row("mpjpe", "MPJPE (wrist-relative, observed frames)"), row("pa_mpjpe", "PA-MPJPE"),
                             row("pa_mpjpe_gt_shape", "PA-MPJPE of the predicted pose on the true shape"),
                             row("finger_angle_error", "finger joint-angle error (15 joints)"),
                             row("mpjpe_infilled", "MPJPE of the infilled frames (hidden from the model)")]) + [""]
    lines += ["### Per hand", ""]
    lines += _table(header, [row(f"{m}_{h}", f"{label}, {h}") for h in HANDS
                             for m, label in (("mpjpe", "MPJPE"), ("pa_mpjpe", "PA-MPJPE"))]) + [""]
    fingers = _finger_names(metrics, baseline) or list(FINGERS)
    lines += ["### Per finger (mean over its 4 joints, both hands)", ""]
    lines += _table(("finger", f"{split} (mm)", "mean-pose baseline (mm)"),
                    ([f, _fmt(metrics.get(f"finger_{f}")), _fmt(baseline.get(f"finger_{f}"))]
                     for f in fingers)) + [""]
    shown.update(f"finger_{f}" for f in fingers)
    lines += ["### Per joint (both hands)", ""]
    lines += _table(("joint", "name", f"{split} (mm)", "mean-pose baseline (mm)"),
                    ([f"{j:02d}", JOINT_NAMES[j], _fmt(metrics.get(f"joint_{j:02d}")),
                      _fmt(baseline.get(f"joint_{j:02d}"))] for j in range(NUM_JOINTS))) + [""]
    shown.update(f"joint_{j:02d}" for j in range(NUM_JOINTS))
    lines += ["## World, camera and smoothness", ""]
    lines += _table(header, [row(k, label) for k, label in _WORLD_ROWS]) + [""]
    others = [k for k in dict.fromkeys([*metrics, *baseline]) if k not in shown]
    if others:
        lines += ["### Other metrics", ""] + _table(header, [row(k) for k in others]) + [""]

    if constraints:
        lines += [f"## Constraints ({split} split)", "",
                  "Each bound is a fraction of the mean-pose baseline's value; the search's TPE sampled where they "
                  "held on validation and its best trial is one that met them there, when any did.", ""]
        lines += _table(("metric", "bound (x baseline)", f"{split} / baseline", "met"),
                        ([m, _fmt(c["bound"]), _fmt(c["ratio"]), "yes" if c["met"] else "no"]
                         for m, c in constraints.items())) + [""]
    if comparison:
        lines += _comparison(comparison, split)
    lines += ["## Figures", ""]
    if figures:
        for caption, fig_path in figures.items():
            lines += [f"### {caption}", "", f"![{caption}]({_figure_link(out_dir, str(fig_path))})", ""]
    else:
        lines += ["No figures were written.", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    path = out_dir / "report.md"
    _write_text_atomic("\n".join(lines), path)
    return path

