"""Tests for hawor_tune.pretrain: the cached per-frame pretraining that every run fine-tunes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL_OVERRIDES, run_concurrently

from hawor_tune.checkpoint import load_checkpoint
from hawor_tune.config import load_config
from hawor_tune.data import build_dataset
from hawor_tune.data.synthetic import MARKER
from hawor_tune.model import build_model
from hawor_tune.pretrain import (
    PretrainError,
    ensure_pretrained,
    pretrain_config,
    pretrain_data,
    pretrain_key,
    pretrained_file,
)
from hawor_tune.runtime import native_bf16_cpu
from hawor_tune.train import fit, prepare_run

PRETRAIN = {"pretrain.epochs": 1, "pretrain.max_train_batches": 2, "pretrain.batch_size": 4,
            "pretrain.frames_sequences": 1, "pretrain.frames_per_sequence": 40}


@pytest.fixture()
def cfg(synthetic_dataset, tmp_path):
    return synthetic_dataset.config({**TINY_MODEL_OVERRIDES, **PRETRAIN, "data.cache_dir": str(tmp_path / "cache"),
                                     "train.out_dir": str(tmp_path / "run")})


@pytest.mark.parametrize("key, value", [
    ("optim.lr", 0.123), ("optim.weight_decay", 0.5), ("loss.keypoint_3d", 7.0), ("data.seq_len", 2),
    ("data.batch_size", 3), ("train.seed", 5), ("train.epochs", 9), ("model.infill_mask_prob", 0.5),
])
def test_the_key_ignores_what_a_run_may_vary(synthetic_dataset, key, value):
    base = synthetic_dataset.config({**TINY_MODEL_OVERRIDES, **PRETRAIN})
    assert pretrain_key(synthetic_dataset.config({**TINY_MODEL_OVERRIDES, **PRETRAIN, key: value})) == pretrain_key(base)


@pytest.mark.parametrize("key, value", [
    ("model.temporal_dim", 64), ("model.backbone_kwargs", {"depth": 2, "patch_size": 16}), ("data.crop_size", 48),
    ("data.crop_scale", 1.5), ("pretrain.epochs", 2), ("pretrain.lr", 0.01), ("pretrain.frames_sequences", 2),
    ("pretrain.frames_per_sequence", 60), ("pretrain.mano_params", 0.02), ("model.infiller", "hawor"),
])
def test_the_key_follows_what_the_weights_depend_on(synthetic_dataset, key, value):
    base = synthetic_dataset.config({**TINY_MODEL_OVERRIDES, **PRETRAIN})
    assert pretrain_key(synthetic_dataset.config({**TINY_MODEL_OVERRIDES, **PRETRAIN, key: value})) != pretrain_key(base)


def test_hawors_infiller_file_is_loaded_after_the_start_not_into_it(synthetic_dataset, tmp_path):
    hawor = {**TINY_MODEL_OVERRIDES, **PRETRAIN, "model.infiller": "hawor"}
    with_file = synthetic_dataset.config({**hawor, "model.infiller_path": str(tmp_path / "infiller.pt")})
    assert pretrain_key(with_file) == pretrain_key(synthetic_dataset.config(hawor))
    assert pretrain_config(with_file, tmp_path / "pre").model.infiller_path == ""


def test_a_run_that_freezes_its_backbone_shares_a_start_that_trained_it(synthetic_dataset, tmp_path):
    frozen = synthetic_dataset.config({**TINY_MODEL_OVERRIDES, **PRETRAIN, "model.freeze_backbone": True})
    assert pretrain_key(frozen) == pretrain_key(synthetic_dataset.config({**TINY_MODEL_OVERRIDES, **PRETRAIN}))
    assert pretrain_config(frozen, tmp_path / "pre").model.freeze_backbone is False


def test_the_pretraining_trains_its_backbone_at_its_own_full_rate(synthetic_dataset, tmp_path):
    # A run fine-tunes its backbone more gently than its fresh parts; the start trains the backbone from scratch.
    gentle = synthetic_dataset.config({**TINY_MODEL_OVERRIDES, **PRETRAIN, "optim.backbone_lr_scale": 0.1})
    optim = pretrain_config(gentle, tmp_path / "pre").optim
    assert optim.backbone_lr_scale == 1.0 and optim.lr == gentle.pretrain.lr


def test_auto_precision_shares_the_start_of_the_precision_it_means_on_this_machine(synthetic_dataset):
    keys = {p: pretrain_key(synthetic_dataset.config({**TINY_MODEL_OVERRIDES, **PRETRAIN, "train.device": "cpu",
                                                      "train.precision": p})) for p in ("auto", "fp32", "bf16")}
    assert keys["fp32"] != keys["bf16"]
    assert keys["auto"] == keys["bf16" if native_bf16_cpu() else "fp32"]


def test_pretraining_is_single_frame_hand_terms_only(cfg, tmp_path):
    p = pretrain_config(cfg, tmp_path / "p")
    assert (p.data.seq_len, p.train.epochs, p.pretrain.epochs) == (1, 1, 0)
    assert p.loss.temporal == p.loss.camera == p.loss.hand_world == p.loss.motion == 0.0
    assert p.loss.keypoint_3d > 0
    searched = load_config(cfg.to_dict(), {"train.objective": {"mpjpe": 1.0}, "train.constraints": {"accel_error": 1.0}})
    q = pretrain_config(searched, tmp_path / "q").train
    assert q.objective == {} and q.constraints == {}  # nothing to rank or bound single frames by


def test_the_pretraining_weighs_the_mano_rotations_by_its_own_key(synthetic_dataset, tmp_path):
    cfg = synthetic_dataset.config({**TINY_MODEL_OVERRIDES, **PRETRAIN, "pretrain.mano_params": 0.3,
                                    "loss.mano_params": 0.004, "loss.keypoint_3d": 7.0})
    p = pretrain_config(cfg, tmp_path / "p")
    assert p.loss.mano_params == 0.3
    assert p.loss.keypoint_3d == 1.0  # the run's own (searched) weights do not reach the shared start


def test_built_once_then_reused_and_loaded(cfg, capsys):
    assert not pretrained_file(cfg).exists()
    results, errors = run_concurrently(lambda: ensure_pretrained(cfg, trainer=fit), n=2)
    assert not errors
    # One-frame clips have no camera motion: the epoch line says so rather than printing NaN.
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("epoch ")]
    assert "cam n/a" in line and "nan" not in line
    path = pretrained_file(cfg)
    assert {r.model.pretrained_path for r in results} == {str(path)}
    stamp = path.stat().st_mtime_ns
    again = ensure_pretrained(cfg, trainer=fit)
    assert again.model.pretrained_path == str(path) and path.stat().st_mtime_ns == stamp  # re-used, not re-made
    assert cfg.model.pretrained_path == ""  # the caller's config is not changed
    assert prepare_run(cfg).model.pretrained_path == str(path)  # what a run is prepared with
    # The file is a self-describing hawor-tune model whose weights a fresh model starts from.
    state = load_checkpoint(path)
    assert state["config"]["data"]["seq_len"] == 1
    assert state["config"]["data"]["root"] == pretrain_data(cfg).root  # trained on the single-frame set
    model = build_model(again)
    for name in ("backbone", "spatial_head", "hand_head"):
        for key, value in getattr(model, name).state_dict().items():
            torch.testing.assert_close(value, state["model"][f"{name}.{key}"], msg=f"{name}.{key}")


def test_disabled_or_own_weights_need_no_pretraining(cfg, synthetic_dataset):
    off = synthetic_dataset.config({**TINY_MODEL_OVERRIDES, "pretrain.epochs": 0})
    assert ensure_pretrained(off, trainer=fit) is off
    own = synthetic_dataset.config({**TINY_MODEL_OVERRIDES, **PRETRAIN, "model.pretrained_path": "/x/y.pt"})
    assert ensure_pretrained(own, trainer=fit) is own


def test_on_generated_data_the_start_learns_from_a_generated_single_frame_set(cfg, synthetic_dataset, tmp_path):
    data = pretrain_data(cfg)
    assert Path(data.root).parent == Path(cfg.data.cache_dir) / "pretrained" and data.cache_dir == cfg.data.cache_dir
    assert (data.synthetic.motion, data.synthetic.sequences_per_subject, data.synthetic.frames_per_sequence,
            data.synthetic.seed) == ("frames", 1, 40, cfg.data.synthetic.seed)
    assert (data.seq_len, data.batch_size) == (1, 4)
    frames = build_dataset(pretrain_config(cfg, tmp_path / "p"), "train")  # generated on first use, in its folder
    assert json.loads((Path(data.root) / MARKER).read_text())["synthetic"]["motion"] == "frames"
    assert frames.root == Path(data.root) and [s.split("/")[0] for s in frames.sequences] == ["s01", "s02"]
    assert pretrain_data(cfg).root == data.root  # the same settings, the same set
    other = synthetic_dataset.config({**TINY_MODEL_OVERRIDES, **PRETRAIN, "data.cache_dir": cfg.data.cache_dir,
                                      "pretrain.frames_per_sequence": 60})
    assert pretrain_data(other).root != data.root
    more = synthetic_dataset.config({**TINY_MODEL_OVERRIDES, **PRETRAIN, "data.cache_dir": cfg.data.cache_dir,
                                     "pretrain.frames_subjects": 3})
    assert pretrain_data(more).synthetic.extra_subjects == 3 and pretrain_data(more).root != data.root


def test_without_a_single_frame_set_the_start_learns_from_the_training_split(synthetic_dataset, tmp_path):
    off = synthetic_dataset.config({**TINY_MODEL_OVERRIDES, **PRETRAIN, "pretrain.frames_sequences": 0})
    assert pretrain_data(off).root == off.data.root and pretrain_data(off).synthetic.motion == "video"
    (tmp_path / "real" / "raw_seqs").mkdir(parents=True)  # real ARCTIC: no generator marker
    real = synthetic_dataset.config({**TINY_MODEL_OVERRIDES, **PRETRAIN, "data.root": str(tmp_path / "real"),
                                     "data.generate": False})
    assert pretrain_data(real).root == str(tmp_path / "real")


def test_a_diverged_pretraining_is_one_error_naming_its_settings_and_caches_nothing(synthetic_dataset, tmp_path):
    # A rotation weight whose loss overflows float32: the first step's loss is infinite.
    cfg = synthetic_dataset.config({**TINY_MODEL_OVERRIDES, **PRETRAIN, "data.cache_dir": str(tmp_path / "cache"),
                                    "pretrain.mano_params": 1e300})
    with pytest.raises(PretrainError) as info:
        ensure_pretrained(cfg, trainer=fit)
    message = str(info.value)
    assert "\n" not in message and message.startswith("the hand-branch pretraining diverged after 0 of 1 epochs")
    assert "pretrain.mano_params (1e+300)" in message and "pretrain.lr (0.001)" in message
    assert "pretrain.epochs=0" in message and "model.pretrained_path" in message
    assert isinstance(info.value, RuntimeError)  # what callers caught before
    path = pretrained_file(cfg)
    assert not path.exists() and not path.with_name(f".{path.stem}.run").exists()  # no weights, no run folder
