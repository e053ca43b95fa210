"""What does the per-frame hand pretraining learn, and what moves it? Short pretraining runs, measured.

Runs the recipe of the hand-pretrained start (:func:`hawor_tune.pretrain.pretrain_config`: single frames,
the per-frame hand loss terms) for a short budget from scratch, once per variant, through the project's
one training loop, two runs at a time on one thread each. Prints each variant's val MPJPE and PA-MPJPE
after the budget beside the mean-pose baseline's, so a change to the crop, the backbone or the loss
balance can be judged by whether it teaches the fingers (PA-MPJPE) and not only the hand's orientation.

    python benchmarks/bench_pretrain.py [--batches 150] [--epochs 1] [--only NAME ...]

Variants (each against the CPU profile's defaults): ``default``; ``crop64`` (64 px crops); ``stride16``
(the ResNet's last stage at stride 16: 3x3 instead of 2x2 tokens from a 48 px crop); ``mano_hamer`` (the
MANO rotation term at HaMeR's 1 : 50 to the 3D keypoints, 0.02, a 25th of the default) and
``mano_x4`` (4x the default, 2.0); ``jitter0`` (the pretraining's crops unjittered); ``batch16`` (batches of 16
frames, twice as many steps: the same frames seen); ``kp2d_x10``; ``lr_x3`` (the pretraining learning rate 3x);
``bf16`` (bf16 autocast, on any CPU); ``vit_tiny`` (a plain ViT-Tiny, depth 6, 8 px patches); ``video_frames``
(the training split's video frames instead of the generated single-frame hand set); ``frames_x2`` and
``frames_x4`` (that set twice or four times as large); ``subjects_x6`` and ``subjects_x12`` (that set's 72
sequences spread over 36 or 72 training subjects, new people beside the dataset's six).

Val MPJPE and PA-MPJPE are scored on the dataset's validation split; the per-epoch curve is the
pretraining's own validation, on the set it trains from.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCORE_BATCHES = 20  # batches of the frames a variant trained on, scored for its "seen PA"

VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "crop64": {"config": {"data.crop_size": 64}},
    "stride16": {"config": {"model.backbone_kwargs": {"output_stride": 16}}},
    "mano_hamer": {"config": {"pretrain.mano_params": 0.02}},
    "mano_x4": {"config": {"pretrain.mano_params": 2.0}},
    "kp2d_x10": {"loss": {"keypoint_2d": 1.0}},
    "jitter0": {"config": {"data.crop_jitter": 0.0}},
    "batch16": {"config": {"pretrain.batch_size": 16}, "steps": 2},
    "lr_x3": {"config": {"pretrain.lr": 3e-3}},
    "bf16": {"config": {"train.precision": "bf16"}},
    "video_frames": {"config": {"pretrain.frames_sequences": 0}},
    "frames_x2": {"config": {"pretrain.frames_sequences": 24}},
    "frames_x4": {"config": {"pretrain.frames_sequences": 48}},
    "subjects_x6": {"config": {"pretrain.frames_subjects": 30, "pretrain.frames_sequences": 2}},
    "subjects_x12": {"config": {"pretrain.frames_subjects": 66, "pretrain.frames_sequences": 1}},
    "vit_tiny": {"config": {"model.backbone": "vit_tiny_patch16_224",
                            "model.backbone_kwargs": {"patch_size": 8, "depth": 6, "dynamic_img_size": True}}},
}


def run_one(config: str, epochs: int, batches: int, variant: str, out_dir: str, keep: str = "",
            seed: int | None = None) -> dict[str, float]:
    """Pretrain one variant in this process; returns its last epoch's val metrics and its PA-MPJPE on the
    frames it trained on (does it fit the fingers it sees?). ``keep``: a folder to save the model in."""
    import torch

    from hawor_tune.checkpoint import export_model
    from hawor_tune.config import load_config
    from hawor_tune.data import build_dataloader
    from hawor_tune.evaluation import evaluate
    from hawor_tune.pretrain import pretrain_config
    from hawor_tune.train import fit

    spec = VARIANTS[variant]
    cfg = load_config(config, overrides=spec.get("config", {}))
    cfg.pretrain = dataclasses.replace(cfg.pretrain, epochs=epochs, max_train_batches=batches * spec.get("steps", 1))
    pcfg = pretrain_config(cfg, out_dir)
    pcfg.loss = dataclasses.replace(pcfg.loss, **spec.get("loss", {}))
    pcfg.train.threads = 1
    if seed is not None:  # else the shared start's own seed
        pcfg.train.seed = seed
    torch.set_num_threads(1)
    result = fit(pcfg)
    # Scored on the dataset's own validation split, whatever frames the pretraining read (its per-epoch
    # validation is on the set it trained from: on generated data, the single-frame set's held-out subject).
    val = evaluate(result.model, build_dataloader(single_frames(cfg), "val", shuffle=False), pcfg)
    seen = evaluate(result.model, "train", pcfg, max_batches=TRAIN_SCORE_BATCHES, hide_rate=0.0)
    if keep:
        export_model(Path(keep) / f"{variant}.pt", model=result.model, config=pcfg, epoch=result.epochs_run,
                     history=result.history)
    return ({k: val[k] for k in ("mpjpe", "pa_mpjpe")} | {"train_pa_mpjpe": seen["pa_mpjpe"]}
            | {"epoch_s": result.history[-1]["time/epoch_s"]}
            | {"curve": [h["val/mpjpe"] for h in result.history]})


def single_frames(cfg):
    """``cfg`` reading one-frame clips of its own dataset."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=1, stride=1, train_on_val=False))


def _child(config: str, epochs: int, batches: int, variant: str, keep: str, seed: int | None) -> dict[str, float]:
    """One variant in its own process (its own torch threads), via this script's ``--child`` mode."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--config", config, "--epochs", str(epochs), "--batches", str(batches),
               "--child", variant, "--out", tmp, "--keep", keep] + ([] if seed is None else ["--seed", str(seed)])
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batches", type=int, default=150, help="training batches per epoch")
    parser.add_argument("--only", nargs="*", choices=sorted(VARIANTS), help="variants to run (default: all)")
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--keep", default="", help="folder to save each variant's model in (<variant>.pt)")
    parser.add_argument("--seed", type=int, help="training seed of every variant (default: the shared start's)")
    args = parser.parse_args()
    if args.child:
        print("RESULT", json.dumps(run_one(args.config, args.epochs, args.batches, args.child, args.out, args.keep,
                                          args.seed)))
        return

    from hawor_tune.config import load_config
    from hawor_tune.data import build_dataset
    from hawor_tune.evaluation import mean_pose_baseline
    from hawor_tune.pretrain import pretrain_config

    cfg = load_config(args.config)
    for split in ("train", "val"):
        build_dataset(cfg, split)  # the dataset and its prepared shards, built once before the runs
    names = args.only or list(VARIANTS)
    seen_baseline, by_data = {}, {}  # the mean pose's PA-MPJPE on each variant's frames, once per frame set
    for name in names:  # and each variant's pretraining frames
        pcfg = pretrain_config(load_config(args.config, overrides=VARIANTS[name].get("config", {})), "unused")
        data = json.dumps(dataclasses.asdict(pcfg.data), sort_keys=True, default=str)
        if data not in by_data:
            build_dataset(pcfg, "train")
            by_data[data] = mean_pose_baseline(pcfg, "train", hide_rate=0.0)["pa_mpjpe"]
        seen_baseline[name] = by_data[data]
    baseline = mean_pose_baseline(cfg, "val")
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(names, pool.map(lambda v: _child(args.config, args.epochs, args.batches, v, args.keep, args.seed),
                                           names)))
    print(f"\n{args.epochs} epoch(s) x {args.batches} batches of {cfg.pretrain.batch_size} frames, from scratch")
    print(f"{'variant':<12} {'val MPJPE':>10} {'PA-MPJPE':>9} {'seen PA':>8} {'s/epoch':>8}  "
          "pretraining's own val MPJPE per epoch")
    print(f"{'baseline':<12} {baseline['mpjpe']:>10.2f} {baseline['pa_mpjpe']:>9.2f}")
    for name, r in results.items():
        curve = " ".join(f"{m:.1f}" for m in r["curve"])
        seen = f"{r['train_pa_mpjpe']:.2f}/{seen_baseline[name]:.2f}"
        print(f"{name:<12} {r['mpjpe']:>10.2f} {r['pa_mpjpe']:>9.2f} {seen:>11} {r['epoch_s']:>8.0f}  {curve}")


if __name__ == "__main__":
    main()
