"""How long the input pipeline takes: synthetic generation, annotation precompute, preparing the shards, and
loading a batch, set against the time budget of one model step.

    python benchmarks/bench_data.py                              # default config, fresh temporary folder
    python benchmarks/bench_data.py --set data.num_workers=2 --step-ms 300
    python benchmarks/bench_data.py --config configs/arctic.yaml --keep   # real data: no generation

The default step budget (``--step-ms``) is the CPU profile's training step (4 clips x 8 frames, 64 hand
crops) as ``python benchmarks/bench_train.py`` measures it on a 2-core machine; pass your own machine's.
Loading should take a small fraction of it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from hawor_tune.config import load_config, parse_override
from hawor_tune.data import build_dataloader, build_dataset, ensure_dataset


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: the dataclass defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    parser.add_argument("--step-ms", type=float, default=860.0, help="model step time budget per batch")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the training split to time")
    parser.add_argument("--keep", action="store_true",
                        help="use data.root and data.cache_dir as configured instead of a temporary folder")
    args = parser.parse_args()

    overrides = dict(parse_override(item) for item in args.set)
    tmp = None
    if not args.keep:
        tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
        overrides = {"data.root": str(Path(tmp.name) / "arctic_synthetic"), "data.cache_dir": "", **overrides}
    cfg = load_config(args.config, overrides)
    d = cfg.data
    print(f"root {d.root}  img_size {d.img_size}  seq_len {d.seq_len}  batch {d.batch_size}  "
          f"workers {d.num_workers}  cpus {os.cpu_count()}")

    had_data = (Path(d.root) / "raw_seqs").is_dir()
    _, t_generate = _timed(lambda: ensure_dataset(cfg))
    s = d.synthetic
    what = "present already" if had_data else (f"{s.subjects} subjects x {s.sequences_per_subject} sequences x "
                                               f"{s.frames_per_sequence} frames at {s.image_width}x{s.image_height}")
    print(f"generation          {t_generate:8.2f} s   ({what})")

    for split in ("train", "val", "test"):
        labelled, t_labels = _timed(lambda: build_dataset(cfg, split, cached=False))  # noqa: B023
        cached, t_first = _timed(lambda: build_dataset(cfg, split))  # noqa: B023
        _, t_reopen = _timed(lambda: build_dataset(cfg, split))  # noqa: B023
        frames = int(cached.source.count.sum())
        nbytes = sum(p.stat().st_size for p in cached.source.tars)
        print(f"{split:<5} labels      {t_labels:8.2f} s   ({len(labelled.sequences)} sequences, {frames} frames, "
              f"{len(labelled)} clips)")
        print(f"{split:<5} prepare     {max(t_first - t_labels, 0.0):8.2f} s   "
              f"({nbytes / 2**20:.1f} MiB at {cached.source.folder}); reopen {t_reopen:.2f} s")

    ds = build_dataset(cfg, "train")
    _, t_items = _timed(lambda: [ds[i] for i in range(len(ds))])
    per_frame_ms = 1e3 * t_items / (len(ds) * d.seq_len)
    loader = build_dataloader(cfg, "train", shuffle=True, seed=0)
    times = []
    for _ in range(args.epochs):
        start = time.perf_counter()
        for _batch in loader:
            now = time.perf_counter()
            times.append(now - start)
            start = now
    batch_ms = 1e3 * float(np.mean(times[len(loader):] or times))  # the first epoch starts the workers
    uncached = build_dataloader(cfg, "train", shuffle=True, seed=0, cached=False)
    start = time.perf_counter()
    for _, _batch in zip(range(10), uncached):
        pass
    uncached_ms = 1e3 * (time.perf_counter() - start) / min(10, len(uncached))
    print(f"__getitem__ shards  {per_frame_ms:8.4f} ms per frame")
    print(f"batch load shards   {batch_ms:8.2f} ms   = {100 * batch_ms / args.step_ms:5.2f} % of a "
          f"{args.step_ms:.0f} ms model step")
    print(f"batch load JPEG     {uncached_ms:8.2f} ms   = {100 * uncached_ms / args.step_ms:5.2f} % (each frame "
          "prepared from its image, for comparison)")
    del loader, uncached  # stops worker processes before their files go away
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
