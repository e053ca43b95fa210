"""The names of what a training run reports once per epoch: the trainer's record, the metric a search space
may optimise, the columns of ``epochs.parquet``. Kept free of torch, so that the search's driver checks a
space without importing the trainer (torch, timm and torchvision take seconds to import)."""

from __future__ import annotations

import dataclasses
import math

from hawor_tune.config import ConfigError, LossConfig

LOSS_TERMS = tuple(f.name for f in dataclasses.fields(LossConfig))
# Every metric a trial reports once per epoch; a search space's `metric` must be one of these.
REPORTED_METRICS = (
    "val/mpjpe", "val/mpjpe_left", "val/mpjpe_right",
    "val/pa_mpjpe", "val/pa_mpjpe_left", "val/pa_mpjpe_right", "val/mpjpe_infilled",
    "val/pa_mpjpe_gt_shape", "val/finger_angle_error",
    "val/w_mpjpe", "val/wa_mpjpe", "val/accel_error", "val/rte", "val/jerk",
    "val/cam_trans_error", "val/cam_rot_error", "val/cam_accel_error", "val/cam_jerk",
    "train/loss", *(f"train/{t}" for t in LOSS_TERMS),
    "lr", "epoch", "time/epoch_s",
)
# The weighted objective (train.objective), reported beside them by a run that declares one.
OBJECTIVE = "val/objective"


# Each constraint (train.constraints) is reported as CONSTRAINT_PREFIX + metric: value / baseline - bound.
CONSTRAINT_PREFIX = "constraint/"


def constraint_value(value: object) -> float:
    """A reported constraint value as Optuna is told it; a missing or non-finite one counts as broken (inf)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else math.inf


def constraint_columns(constraints: dict) -> list[str]:
    """The reported name of each constraint of ``train.constraints``, in its order."""
    return [CONSTRAINT_PREFIX + name for name in constraints]


def check_objective(weights: dict, key: str = "train.objective") -> None:
    """Every key of ``train.objective`` (or ``train.constraints``) names a reported validation metric (without
    its ``val/`` prefix).

    Raises:
        ConfigError: an unknown metric, naming the allowed ones.
    """
    allowed = [m[len("val/"):] for m in REPORTED_METRICS if m.startswith("val/")]
    for name in weights:
        if name not in allowed:
            raise ConfigError(f"config key '{key}': {name!r} is not a reported validation metric "
                              f"(allowed: {', '.join(allowed)})")
