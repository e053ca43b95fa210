"""Where a training epoch's time goes: waiting for batches vs. computing, and throughput.

    python benchmarks/bench_train.py                           # configs/tiny.yaml, 30 steps
    python benchmarks/bench_train.py --steps 60 --set train.threads=1
    python benchmarks/bench_train.py --config configs/arctic.yaml --steps 20

It runs the project's own ``train_one_epoch`` over a loader wrapped so that the time spent inside the
loader's ``__next__`` is counted; everything else is model, loss, backward and optimiser. The input
pipeline must never be what training waits on: the printed data share should stay in the low percent.
"""

from __future__ import annotations

import argparse
import time

import torch

from hawor_tune.config import load_config
from hawor_tune.data import build_dataloader
from hawor_tune.model import build_model
from hawor_tune.runtime import seed_everything, select_device
from hawor_tune.train import build_optimizer, train_one_epoch


class TimedLoader:
    """Wraps a loader and adds up the time spent waiting for each batch."""

    def __init__(self, loader) -> None:
        self.loader, self.wait_s, self.batches = loader, 0.0, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        it = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait_s += time.perf_counter() - start
            self.batches += 1
            yield batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = select_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    t0 = time.perf_counter()
    loader = build_dataloader(cfg, "train", shuffle=True)
    model = build_model(cfg).to(device)
    setup_s = time.perf_counter() - t0
    optimizer = build_optimizer(model, cfg)
    train_one_epoch(model, loader, optimizer, None, cfg, device, max_batches=3)  # warm-up, not timed
    timed = TimedLoader(loader)
    start = time.perf_counter()
    train_one_epoch(model, timed, optimizer, None, cfg, device, max_batches=args.steps)
    total = time.perf_counter() - start
    frames = timed.batches * cfg.data.batch_size * cfg.data.seq_len
    print(f"device {device}, torch threads {torch.get_num_threads()}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    print(f"setup (dataset + model): {setup_s:.2f} s; {len(loader)} steps per epoch")
    print(f"{timed.batches} steps in {total:.2f} s: {1000 * total / timed.batches:.0f} ms/step, "
          f"{frames / total:.0f} frames/s")
    print(f"waiting for data: {1000 * timed.wait_s / timed.batches:.2f} ms/step "
          f"({100 * timed.wait_s / total:.2f} % of the step)")


if __name__ == "__main__":
    main()
