"""The GPU profile's training step, counted without a GPU: memory, FLOPs, step and epoch time, search budget.

    python benchmarks/bench_gpu_plan.py                      # configs/arctic.yaml, batch 8 x 16 frames x 2 hands
    python benchmarks/bench_gpu_plan.py --set model.temporal_layers=4 --train-frames 150000

The shipped profile is built at full size on the ``meta`` device and every tensor of a training step (forward
under bf16 autocast, backward, the optimiser's step) is a fake tensor with the real shape
(``torch._subclasses.FakeTensorMode``): nothing is allocated. A dispatch mode adds up the bytes of the
storages alive after each operation (weights, gradients, AdamW state, saved activations, temporaries), so
the printed peak is the largest live total of the step; ``torch.utils.flop_counter`` counts its FLOPs.
One ViT-H block's saved activations are also measured on real CPU tensors and set beside the count.

Variants: the shipped frozen backbone (HaWoR's recipe), the last N blocks trained, the whole backbone trained,
with and without activation checkpointing. The CPU's autocast decides which operations run in bf16 (its
lists cover linear, matmul and convolution as CUDA's do; layer norms and softmax stay in float32 in both).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
import weakref
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from hawor_tune.checkpoint import frozen_keys
from hawor_tune.config import ConfigError, ExperimentConfig, load_config
from hawor_tune.model import build_model
from hawor_tune.search_space import load_search_space
from hawor_tune.train import build_optimizer

GIB = 2**30
# NVIDIA H100 SXM: 989 dense bf16 TFLOP/s (the datasheet's 1979 is with 2:4 sparsity).
H100_BF16_TFLOPS = 989.0
UTILISATION = 0.40
# ARCTIC's egocentric view in protocol p2 (zc-alexfan/arctic, splits_json/protocol_p2.json): about 184k
# training and 23k validation frames after its 10-frame skips; --train-frames gives the exact count.
P2_TRAIN_FRAMES = 184_000
P2_VAL_FRAMES = 23_000
CARDS_GIB = {"80 GB (H100)": 80, "24 GB": 24, "16 GB": 16}
CUDA_CONTEXT_GIB = 1.0  # what the CUDA context and allocator reserve beyond the tensors


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive, after each operation, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._ids: set[int] = set()

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._ids:
            return
        n = storage.nbytes()
        self._ids.add(key)
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._gone, key, n)

    def _gone(self, key: int, n: int) -> None:
        self._ids.discard(key)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


@dataclass
class StepCount:
    peak_gib: float
    tflop: float
    trainable: int
    checkpoint_gib: float


def count_step(cfg: ExperimentConfig, clips: int) -> StepCount:
    """Count one training step of ``cfg``'s model on ``clips`` clips (the second of two, so that the
    optimiser's state exists), without allocating anything."""
    model = build_model(cfg, pretrained=False, device="meta")
    T, C, S, G = cfg.data.seq_len, cfg.data.crop_size, cfg.data.img_size, cfg.data.flow_grid
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = frozen_keys(model)
    state = model.state_dict()
    # What a checkpoint holds: the trainable state (frozen tensors stay in the pretrained file), AdamW's
    # two float32 moments per trainable parameter.
    ckpt = sum(v.numel() * v.element_size() for k, v in state.items() if k not in frozen) + 8 * trainable
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device="cpu").train()
        optimizer = build_optimizer(model, cfg)
        live = _LiveBytes()
        inputs = (torch.empty(clips, T, 2, 3, C, C, dtype=torch.uint8), torch.empty(clips, T, 2, 3, 3),
                  torch.empty(clips, T, 3, S, S, dtype=torch.uint8), torch.ones(clips, T, 2, dtype=torch.bool))
        flow = torch.empty(clips, T, 2, G, G)
        for t in (*model.parameters(), *model.buffers(), *inputs, flow):
            live.track(t)
        flops = FlopCounterMode(display=False)
        for step in range(2):
            live.peak = live.live
            with live, (flops if step else contextlib.nullcontext()):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = model(*inputs, flow=flow)
                loss = out.joints.sum() + out.vertices.sum() + out.cam_t.sum() + out.cam_R.sum()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                del out, loss
    return StepCount(peak_gib=live.peak / GIB, tflop=flops.get_total_flops() / 1e12, trainable=trainable,
                     checkpoint_gib=ckpt / GIB)


def block_saved_bytes(cfg: ExperimentConfig) -> tuple[float, float]:
    """Bytes one trainable ViT block saves for backward per crop, measured on real CPU tensors and counted
    on fake ones (the method of :func:`count_step`): the difference between two crops and one, so that the
    bf16 copies of the block's weights, saved once whatever the batch, fall out."""
    from hawor_tune.backbones import create_backbone

    kwargs = {**cfg.model.backbone_kwargs, "depth": 1}
    sizes = []
    for fake in (False, True):
        with torch.device("meta" if fake else "cpu"):
            backbone = create_backbone(cfg.model.backbone, cfg.data.crop_size, kwargs)
        with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
            if fake:
                backbone = backbone.to_empty(device="cpu")
            saved_by_crops = []
            for crops in (1, 2):
                x = torch.randn(crops, backbone.patch_embed.num_patches, backbone.num_features, requires_grad=True)
                saved: dict[int, int] = {}

                def pack(t: torch.Tensor, saved: dict[int, int] = saved) -> torch.Tensor:
                    storage = t.untyped_storage()
                    saved[id(storage)] = storage.nbytes()
                    return t

                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                        torch.autocast("cpu", dtype=torch.bfloat16):
                    out = backbone.blocks[0](x)
                mine = {id(p.untyped_storage()) for p in backbone.parameters()} | {id(x.untyped_storage())}
                saved_by_crops.append(sum(n for k, n in saved.items() if k not in mine))
                del out
            sizes.append(saved_by_crops[1] - saved_by_crops[0])
    return sizes[0], sizes[1]


def asha_epochs(trials: int, grace: int, eta: float, max_epochs: int) -> float:
    """Trial-epochs an ASHA search spends when each rung keeps 1/eta of the trials that reach it."""
    total, rung, reaching, done = 0.0, grace, float(trials), 0
    while True:
        total += reaching * (min(rung, max_epochs) - done)
        if rung >= max_epochs:
            return total
        done, reaching, rung = min(rung, max_epochs), reaching / eta, int(rung * eta)


def _variants(cfg: ExperimentConfig, blocks: int) -> list[tuple[str, dict]]:
    depth = {**{"depth": 32}, **cfg.model.backbone_kwargs}["depth"]
    return [("frozen (shipped)", {}),
            (f"last {blocks} blocks, checkpointed", {"model.trainable_blocks": blocks, "model.grad_checkpointing": True}),
            (f"last {blocks} blocks", {"model.trainable_blocks": blocks}),
            (f"all {depth} blocks, checkpointed", {"model.freeze_backbone": False, "model.grad_checkpointing": True}),
            (f"all {depth} blocks", {"model.freeze_backbone": False})]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/arctic.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value", help="dotted overrides")
    parser.add_argument("--blocks", type=int, default=8, help="trainable blocks of the last-N variant")
    parser.add_argument("--train-frames", type=int, default=P2_TRAIN_FRAMES)
    parser.add_argument("--spaces", nargs="*", default=["search_spaces/arctic_lr.yaml",
                                                          "search_spaces/arctic_loss_weights.yaml"])
    args = parser.parse_args(argv)
    try:
        # The profile's own files need not exist to be counted.
        cfg = load_config(args.config, ["mano.model_dir=", "model.pretrained_path=/counted/not/read.ckpt",
                                        *args.set])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    B, T = cfg.data.batch_size, cfg.data.seq_len
    real, counted = block_saved_bytes(cfg)
    print(f"one ViT block's saved activations for one crop: {real / 2**20:.2f} MiB measured on the CPU, "
          f"{counted / 2**20:.2f} MiB counted")
    steps_per_epoch = math.ceil(args.train_frames / cfg.data.stride / B)
    peak_tflops = H100_BF16_TFLOPS * UTILISATION
    print(f"\nbatch {B} clips x {T} frames x 2 hands = {2 * B * T} crops of {cfg.data.crop_size} px; "
          f"{steps_per_epoch} steps an epoch ({args.train_frames} frames, stride {cfg.data.stride}); "
          f"H100 at {UTILISATION:.0%} of {H100_BF16_TFLOPS:.0f} dense bf16 TFLOP/s\n")
    header = ("variant", "trainable", "peak GiB", "TFLOP/step", "H100 step s", "epoch h", "crops/s",
              "ckpt GiB", "max batch 24 GB", "max batch 16 GB")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    shipped = None
    for name, extra in _variants(cfg, args.blocks):
        vcfg = load_config(cfg.to_dict(), extra)
        one, full = count_step(vcfg, 1), count_step(vcfg, B)
        per_clip = (full.peak_gib - one.peak_gib) / max(B - 1, 1)
        fits = [max(0, int((gib - CUDA_CONTEXT_GIB - one.peak_gib) // per_clip) + 1) if gib - CUDA_CONTEXT_GIB >= one.peak_gib
                else 0 for gib in (24, 16)]
        step_s = full.tflop / peak_tflops
        row = (name, f"{full.trainable / 1e6:.0f} M", f"{full.peak_gib:.1f}", f"{full.tflop:.1f}", f"{step_s:.3f}",
               f"{step_s * steps_per_epoch / 3600:.2f}", f"{2 * B * T / step_s:.0f}", f"{full.checkpoint_gib:.2f}",
               str(fits[0]), str(fits[1]))
        print(" | ".join(row), flush=True)
        shipped = shipped or (full, step_s)
    full, step_s = shipped
    epoch_h = step_s * steps_per_epoch / 3600
    print(f"\nshipped profile: counted peak {full.peak_gib:.1f} GiB (goal: at most 64 GB = "
          f"{64e9 / GIB:.1f} GiB): {'met' if full.peak_gib * GIB <= 64e9 else 'NOT met'}")
    print(f"validation epoch: about {P2_VAL_FRAMES / cfg.data.stride / B * full.tflop / 3 / peak_tflops / 3600:.2f} h "
          "(forward only: a third of a training step's FLOPs)")
    for path in args.spaces:
        space = load_search_space(path)
        if space.grace_period is not None:
            epochs = asha_epochs(space.num_samples, space.grace_period, space.reduction_factor, space.max_epochs)
        else:
            epochs = space.num_samples * space.max_epochs
        worst = space.num_samples * space.max_epochs
        print(f"{path}: {space.num_samples} trials x up to {space.max_epochs} epochs: about {epochs:.0f} "
              f"trial-epochs under ASHA = {epochs * epoch_h:.1f} GPU-hours ({worst * epoch_h:.1f} if every trial "
              f"ran in full); {epoch_h:.2f} GPU-hours a trial-epoch")
    print(f"\ncounted in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
