"""The GPU profile on a GPU: step time, peak memory, achieved FLOP/s and the loader against the step.

    python benchmarks/gpu_check.py                 # full size, about 100 steps; within 8 minutes on an H100
    python benchmarks/gpu_check.py --smoke         # reduced depth and images on the CPU (the test suite runs it)

It runs the shipped ``configs/arctic.yaml`` unchanged but for its files: generated data in ARCTIC's layout at
ARCTIC's egocentric image size (2800x2000), and a HaMeR-format checkpoint of random weights written by
:func:`hawor_tune.pretrained.timm_to_hamer`. The steps are the project's own ``train_one_epoch``; the FLOPs of
a step are counted as ``bench_gpu_plan.py`` counts them; the loader is also timed alone, with the profile's
``data.num_workers``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
from bench_gpu_plan import H100_BF16_TFLOPS, count_step
from bench_train import TimedLoader

from hawor_tune.config import ExperimentConfig, load_config
from hawor_tune.data import build_dataloader
from hawor_tune.model import build_model
from hawor_tune.pretrained import timm_to_hamer
from hawor_tune.runtime import seed_everything, select_device
from hawor_tune.train import build_optimizer, train_one_epoch

PROFILE = Path(__file__).resolve().parents[1] / "configs" / "arctic.yaml"
# A small ARCTIC-layout set: three subjects (train, val, test) of three 60-frame sequences, so that the data
# is made in minutes at full resolution; the steps cycle over its training clips.
DATA = {"data.generate": True, "data.synthetic.subjects": 3, "data.synthetic.held_out": 1, "data.synthetic.sequences_per_subject": 3,
        "data.synthetic.frames_per_sequence": 60, "data.synthetic.image_width": 2800,
        "data.synthetic.image_height": 2000, "train.max_eval_batches": 1}
SMOKE = {"model.backbone_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8},
         "model.camera_backbone": "resnet10t", "model.temporal_dim": 32, "model.temporal_layers": 1,
         "model.temporal_heads": 2, "model.head_hidden": 32, "model.decoder_dim": 32, "model.decoder_layers": 1,
         "model.motion_hidden": 16, "model.motion_layers": 1, "model.infiller_hidden": 16, "model.infiller_layers": 1,
         "data.seq_len": 4, "data.stride": 2, "data.batch_size": 2, "data.num_workers": 0, "data.frame_size": 64,
         "data.crop_size": 32, "data.img_size": 32, "data.flow_grid": 4, "data.synthetic.image_width": 64,
         "data.synthetic.image_height": 48, "data.synthetic.frames_per_sequence": 40, "train.device": "cpu"}


class _Cycle:
    """``steps`` batches from a loader, epoch after epoch."""

    def __init__(self, loader, steps: int) -> None:
        self.loader, self.steps = loader, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return itertools.islice(itertools.chain.from_iterable(itertools.repeat(self.loader)), self.steps)


def _write_random_hamer_checkpoint(cfg: ExperimentConfig, path: Path) -> None:
    model = build_model(load_config(cfg.to_dict(), {"model.pretrained_path": "", "model.require_pretrained": False}),
                        pretrained=False)
    state = {**timm_to_hamer(model.backbone.state_dict()),
             **{f"mano_head.{k}": v for k, v in model.mano_head.state_dict().items()}}
    torch.save({"state_dict": state, "hyper_parameters": {}, "epoch": 0}, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="reduced depth and images, on the CPU")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="/tmp/hawor_gpu_check", help="folder for the data and the checkpoint")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = {**DATA, **(SMOKE if args.smoke else {}), "data.root": str(out / "arctic_data" / "data"),
                 "mano.model_dir": "", "model.pretrained_path": str(out / "hamer.ckpt"),
                 "train.out_dir": str(out / "run")}
    cfg = load_config(PROFILE, overrides)
    device = select_device(cfg.train.device)
    t0 = time.perf_counter()
    if not (out / "hamer.ckpt").is_file():
        _write_random_hamer_checkpoint(cfg, out / "hamer.ckpt")
    loader = build_dataloader(cfg, "train", shuffle=True)  # generates the data and its caches once
    print(f"data and checkpoint ready in {time.perf_counter() - t0:.0f} s ({len(loader)} batches an epoch)", flush=True)

    seed_everything(0)
    model = build_model(cfg).to(device)
    optimizer = build_optimizer(model, cfg)
    warm = 1 if args.smoke else 5
    train_one_epoch(model, _Cycle(loader, warm), optimizer, None, cfg, device)  # kernels chosen, memory pooled
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timed = TimedLoader(_Cycle(loader, args.steps))
    start = time.perf_counter()
    train_one_epoch(model, timed, optimizer, None, cfg, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    step_s = (wall - timed.wait_s) / args.steps
    crops = 2 * cfg.data.batch_size * cfg.data.seq_len

    start = time.perf_counter()
    n = sum(1 for _ in _Cycle(loader, args.steps))
    loader_crops = n * crops / (time.perf_counter() - start)
    tflop = count_step(cfg, cfg.data.batch_size).tflop
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}: {args.steps} steps of {cfg.data.batch_size} clips x {cfg.data.seq_len} frames x 2 hands")
    print(f"step {step_s:.3f} s (waiting for data {timed.wait_s / wall:.1%} of the time); peak memory {peak:.1f} GiB")
    print(f"achieved {tflop / step_s:.1f} TFLOP/s ({tflop:.2f} TFLOP a step, counted) = "
          f"{tflop / step_s / H100_BF16_TFLOPS:.1%} of an H100's {H100_BF16_TFLOPS:.0f} dense bf16 TFLOP/s")
    print(f"loader alone {loader_crops:.0f} crops/s with {cfg.data.num_workers} workers against {crops / step_s:.0f} "
          f"the step consumes ({loader_crops / (crops / step_s):.2f}x; goal at least 2x)")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
