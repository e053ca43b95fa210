"""The names of what a training run reports once per epoch: the trainer's record, the metric a search space
may optimise, the columns of ``epochs.parquet``. Kept free of torch, so that the search's driver checks a
space without importing the trainer (torch, timm and torchvision take seconds to import)."""

from __future__ import annotations

import dataclasses

from hawor_tune.config import LossConfig

LOSS_TERMS = tuple(f.name for f in dataclasses.fields(LossConfig))
# Every metric a trial reports once per epoch; a search space's `metric` must be one of these.
REPORTED_METRICS = (
    "val/mpjpe", "val/mpjpe_left", "val/mpjpe_right",
    "val/pa_mpjpe", "val/pa_mpjpe_left", "val/pa_mpjpe_right", "val/mpjpe_infilled",
    "val/w_mpjpe", "val/wa_mpjpe", "val/accel_error",
    "val/cam_trans_error", "val/cam_rot_error", "val/cam_accel_error", "val/cam_jerk",
    "train/loss", *(f"train/{t}" for t in LOSS_TERMS),
    "lr", "epoch", "time/epoch_s",
)
