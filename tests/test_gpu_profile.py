"""The GPU profile (configs/arctic.yaml): built at full size without memory, and run end to end on the CPU at
reduced size from a HaMeR-format checkpoint on ARCTIC-layout data."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import (
    GPU_PROFILE_SMALL,
    GPU_PROFILE_VIT,
    TINY_DATA_OVERRIDES,
    hamer_state,
    random_official_mano,
    write_lightning_checkpoint,
    write_official_mano_pickle,
    write_search_space,
)

import run_best
from hawor_tune import train
from hawor_tune.checkpoint import CheckpointError, load_checkpoint, load_model, load_model_state
from hawor_tune.config import ConfigError, load_config, save_config
from hawor_tune.data import build_dataloader, generate
from hawor_tune.model import build_model, run_model
from hawor_tune.train import build_optimizer, fit


def _vit_params(*, depth: int, dim: int, patch: int, tokens: int) -> int:
    """Parameters of a ViTPose-layout ViT counted from its layers (hamer/models/backbones/vit.py), with the
    extra position HaMeR adds to every patch folded in."""
    block = 2 * 2 * dim + (dim * 3 * dim + 3 * dim) + (dim * dim + dim) + (dim * 4 * dim + 4 * dim) + (4 * dim * dim + dim)
    return 3 * patch * patch * dim + dim + tokens * dim + depth * block + 2 * dim


def test_the_shipped_gpu_profile_builds_at_full_size_with_hamers_vit_h():
    cfg = load_config("configs/arctic.yaml", {"mano.model_dir": "", "model.pretrained_path": "/nowhere/hamer.ckpt"})
    model = build_model(cfg, pretrained=False, device="meta")
    assert sum(p.numel() for p in model.backbone.parameters()) == _vit_params(depth=32, dim=1280, patch=16, tokens=192)
    assert model.backbone.patch_embed.grid_size == (16, 12) and model.backbone.patch_embed.proj.padding == (2, 2)
    assert not any(p.requires_grad for p in model.backbone.parameters())  # HaWoR's recipe: the ViT frozen
    assert sum(p.numel() for p in model.mano_head.parameters()) == 39_497_837  # HaMeR's head, counted by hand below
    # HaMeR's head: token embedding (1 -> 1024) and position, 6 x (3 pre-norms, qkv 1024 -> 1536 and out 512 ->
    # 1024, kv 1280 -> 1024, q 1024 -> 512 and out, MLP 1024 -> 1024 -> 1024), decpose/decshape/deccam.
    layer = 3 * 2048 + 1024 * 1536 + (512 * 1024 + 1024) + 1280 * 1024 + 1024 * 512 + (512 * 1024 + 1024) + 2 * (1024 * 1024 + 1024)
    assert 2048 + 1024 + 6 * layer + (1024 * 96 + 96) + (1024 * 10 + 10) + (1024 * 3 + 3) == 39_497_837


def test_trainable_blocks_train_the_last_blocks_and_need_a_frozen_transformer():
    cfg = load_config("configs/arctic.yaml", {"mano.model_dir": "", "model.pretrained_path": "/x.ckpt",
                                              "model.trainable_blocks": 2, "model.grad_checkpointing": True})
    backbone = build_model(cfg, pretrained=False, device="meta").backbone
    trainable = {n.split(".")[1] for n, p in backbone.named_parameters() if p.requires_grad and n.startswith("blocks.")}
    assert trainable == {"30", "31"} and backbone.norm.weight.requires_grad and backbone.grad_checkpointing
    with pytest.raises(ConfigError, match="model.trainable_blocks.*freeze_backbone is false"):
        load_config("configs/arctic.yaml", {"model.freeze_backbone": False, "model.trainable_blocks": 1})
    with pytest.raises(ConfigError, match="model.trainable_blocks.*has none"):
        build_model(load_config(None, {"model.freeze_backbone": True, "model.trainable_blocks": 1}), pretrained=False)


@pytest.fixture(scope="module")
def gpu_setup(tmp_path_factory):
    """A HaMeR-format checkpoint at the reduced size, MANO files in the official format (a MANO-shaped hand of
    random content), and a config of the GPU profile reading the tiny ARCTIC-layout dataset."""
    from hawor_tune.mano import MANO_FILENAMES

    folder = tmp_path_factory.mktemp("gpu")
    v = GPU_PROFILE_VIT
    ckpt = write_lightning_checkpoint(folder / "hamer.ckpt", hamer_state(
        crop_size=32, depth=v["depth"], embed_dim=v["embed_dim"], num_heads=v["num_heads"], patch_size=v["patch_size"],
        decoder_dim=v["decoder_dim"], decoder_depth=v["decoder_depth"]))
    hand = random_official_mano(seed=7)
    for side in ("left", "right"):  # the official left file's shapedirs are the right one's, unmirrored
        write_official_mano_pickle(folder / MANO_FILENAMES[side], hand)
    # The tiny dataset's layout, generated with these MANO files (images and labels must come from one hand).
    overrides = {**TINY_DATA_OVERRIDES, **GPU_PROFILE_SMALL, "data.root": str(folder / "arctic_data" / "data"),
                 "model.pretrained_path": str(ckpt), "mano.model_dir": str(folder),
                 "train.out_dir": str(folder / "run")}
    cfg = load_config(None, overrides)
    generate(cfg.data.root, cfg.data.synthetic, cfg.mano)
    return folder, ckpt, overrides


def test_test_only_runs_the_gpu_profile_on_arctic_layout_data(gpu_setup, capsys):
    _, _, overrides = gpu_setup
    args = [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in overrides.items()]
    assert train.main(["--config", "configs/arctic.yaml", "--test-only", *args]) == 0
    assert "test-only OK" in capsys.readouterr().out


def test_checkpoints_leave_the_frozen_backbone_to_its_file_and_restore_the_same_model(gpu_setup, tmp_path):
    folder, ckpt, overrides = gpu_setup
    cfg = load_config("configs/arctic.yaml", {**overrides, "train.out_dir": str(tmp_path / "run"), "train.epochs": 2})
    result = fit(cfg, epochs=1)
    state = load_checkpoint(result.checkpoint_dir)
    assert not any(k.startswith("backbone.") for k in state["model"])
    assert state["frozen"]["path"] == str(ckpt) and len(state["frozen"]["keys"]) == len(result.model.backbone.state_dict())
    assert state["pretrained_parts"] == ["backbone", "mano_head"]
    said = yaml.safe_load((tmp_path / "run" / "pretrained.yaml").read_text())
    assert said["kind"] == "released checkpoint" and set(said["loaded"]) == {"backbone", "mano_head"}
    assert {"st_module", "motion_module", "camera_backbone", "infillers"} <= set(said["fresh"])

    # Restored, the model predicts what the trained one did.
    restored, _ = load_model(result.checkpoint_dir)
    batch = next(iter(build_dataloader(cfg, "val", shuffle=False)))
    with torch.no_grad():
        a, b = run_model(result.model.eval(), batch).joints, run_model(restored.eval(), batch).joints
    torch.testing.assert_close(a, b)
    # The pretrained parts train at backbone_lr_scale x lr, also after a resume.
    groups = build_optimizer(restored, cfg).param_groups
    head = {id(p) for p in restored.mano_head.parameters()}
    assert {g["lr"] for g in groups if any(id(p) in head for p in g["params"])} == {cfg.optim.lr * cfg.optim.backbone_lr_scale}
    resumed = fit(cfg, resume_from=result.checkpoint_dir)
    assert resumed.status == "completed" and len(resumed.history) == 2

    changed = tmp_path / "changed.ckpt"
    changed.write_bytes(ckpt.read_bytes())
    state["frozen"]["path"] = str(changed)
    with open(changed, "ab") as f:
        f.write(b"\0")
    with pytest.raises(CheckpointError, match="changed since"):
        load_model_state(build_model(cfg), state)


def test_a_two_trial_search_and_run_best_through_the_gpu_profile(gpu_setup, synthetic_dataset, tmp_path):
    import ray

    from hawor_tune.search import run_search
    from hawor_tune.search_space import load_search_space

    _, _, overrides = gpu_setup
    space_file = write_search_space(tmp_path, synthetic_dataset, num_samples=2, epochs=2)
    save_config(load_config("configs/arctic.yaml", {**overrides, "train.epochs": 2}), tmp_path / "base.yaml")
    space = load_search_space(space_file)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        outcome = run_search(space, storage=tmp_path / "results", name="gpu", verbose=0)
    finally:
        ray.shutdown()
    out = tmp_path / "best"
    assert run_best.main(["--experiment", str(outcome.experiment_dir), "--epochs", "1", "--compare", "0",
                          "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["mpjpe"] > 0 and metrics["baseline"]["mpjpe"] > 0
    assert load_checkpoint(out / "model.pt")["config"]["model"]["hand_path"] == "hawor"


# ---- the counted plan and the GPU check (benchmarks/bench_gpu_plan.py, benchmarks/gpu_check.py) ----------

def _benchmarks():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_gpu_plan

    return bench_gpu_plan


def test_asha_spends_each_rungs_survivors_epochs():
    plan = _benchmarks()
    # 16 trials to epoch 2; 16/3 of them on to 6; 16/9 on to 10 (the last rung capped at max_epochs).
    assert plan.asha_epochs(16, 2, 3, 10) == pytest.approx(16 * 2 + 16 / 3 * 4 + 16 / 9 * 4)
    assert plan.asha_epochs(4, 4, 3, 4) == 16


def test_the_counted_step_sees_what_freezing_saves_and_the_real_cpu_agrees(gpu_setup):
    plan = _benchmarks()
    _, _, overrides = gpu_setup
    frozen = load_config("configs/arctic.yaml", overrides)
    trained = load_config("configs/arctic.yaml", {**overrides, "model.freeze_backbone": False})
    a, b = plan.count_step(frozen, 2), plan.count_step(trained, 2)
    n_backbone = sum(p.numel() for p in build_model(frozen, pretrained=False, device="meta").backbone.parameters())
    assert b.trainable - a.trainable == n_backbone
    assert b.peak_gib > a.peak_gib and b.tflop > a.tflop
    # A checkpoint holds the trainable state and AdamW's two float32 moments: the backbone's 12 bytes a weight.
    assert (b.checkpoint_gib - a.checkpoint_gib) * 2**30 == pytest.approx(12 * n_backbone, rel=1e-3)
    real, counted = plan.block_saved_bytes(frozen)
    assert real == counted > 0


def test_the_gpu_check_smoke_runs_on_the_cpu(tmp_path):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke", "--steps", "2", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    for line in ("device cpu: 2 steps", "achieved", "loader alone"):
        assert line in run.stdout, run.stdout


@pytest.mark.parametrize("name, gpu", [("arctic_lr", 1.0), ("arctic_loss_weights", 1.0), ("arctic_packed", 0.5)])
def test_the_gpu_spaces_search_the_gpu_profile_around_hawors_values(name, gpu):
    from pathlib import Path

    from hawor_tune.search_space import load_search_space

    space = load_search_space(Path("search_spaces") / f"{name}.yaml")
    cfg = space.trial_config()
    assert space.base.name == "arctic.yaml" and cfg.model.hand_path == "hawor" and cfg.model.freeze_backbone
    assert (space.resources_gpu, space.resources_cpu) == (gpu, 8 * gpu)
    # HaWoR's released values lie inside every range, so Optuna starts from them.
    assert space.default_point() == {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in space.params}
