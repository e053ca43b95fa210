"""Does a search have something to find? Configuration spread against seed noise, measured.

Trains the base configuration of a search space with 3 seeds, and 3 deliberately different
configurations (learning rate x0.1 and x10, the 3D keypoint loss off), each built as a search builds a trial
(``SearchSpace.trial_config``: the base file, the space's overrides, ``--set``, then the variant) and
trained by the project's one training loop (``hawor_tune.train.fit``), two runs at a time in fresh
processes on one thread each, as a search's trials run. The data, the pretrained start and the flow fit are
prepared once beforehand by the search's own preparation (``prepare_data``). Prints every run's final val
MPJPE, the seed standard deviation of the base configuration, the spread between the configurations (max -
min of their final val MPJPE, the base counted by its seed mean) and their ratio (goal: at least 4).

    python benchmarks/bench_signal.py [--space search_spaces/loss_weights.yaml] [--set key=value ...]

Extra ``--set`` overrides apply to every run. ``--seeds-only`` trains just the 3 seeds of the base
configuration, for an ablation: e.g. ``--seeds-only --set model.hand_fusion=false --set
model.pretrained_path=<the cached start>`` fine-tunes the same start without the hand-fusion block.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from hawor_tune.config import ExperimentConfig

ROOT = Path(__file__).resolve().parents[1]


def variants(base_lr: float) -> dict[str, dict[str, Any]]:
    """The runs, by name: dotted overrides of the base configuration."""
    return {
        "base seed 0": {"train.seed": 0},
        "base seed 1": {"train.seed": 1},
        "base seed 2": {"train.seed": 2},
        "lr x0.1": {"optim.lr": base_lr * 0.1},
        "lr x10": {"optim.lr": base_lr * 10},
        "keypoint_3d off": {"loss.keypoint_3d": 0.0},
    }


def _train(cfg: ExperimentConfig) -> dict[str, Any]:
    """One training run (in a worker process of its own); its status, last epoch's metrics and wall time."""
    from hawor_tune.train import fit, prepare_run

    t0 = time.perf_counter()
    result = fit(prepare_run(cfg))  # finds what prepare_data made
    return {"status": result.status, "reason": result.reason, **result.last, "wall_s": time.perf_counter() - t0}


def train_all(space: Any, runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Train each named run (dotted overrides of the space's trial config) two at a time, each in a fresh
    process on one thread, as a search's trials run; their results by name (see :func:`_train`)."""
    with tempfile.TemporaryDirectory() as tmp:
        # As the trainable builds a trial's config: one thread, one checkpoint kept, its own folder.
        configs = {name: space.trial_config(overrides={**over, "train.out_dir": str(Path(tmp) / name.replace(" ", "_")),
                                                       "train.threads": 1, "train.keep_checkpoints": 1})
                   for name, over in runs.items()}
        # A fresh process per run (spawned, one task each): no run inherits another's allocator or threads.
        with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"),
                                 max_tasks_per_child=1) as pool:
            futures = {name: pool.submit(_train, cfg) for name, cfg in configs.items()}
            return {name: f.result() for name, f in futures.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "loss_weights.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="key=value")
    parser.add_argument("--seeds-only", action="store_true", help="only the 3 seeds of the base configuration")
    args = parser.parse_args(argv)

    import yaml

    from hawor_tune.search import prepare_data
    from hawor_tune.search_space import load_search_space

    space = load_search_space(args.space, extra_overrides=args.set)
    base = space.base_config
    t0 = time.perf_counter()
    prepare_data(base)
    print(f"data, pretrained start and flow fit ready in {time.perf_counter() - t0:.0f} s")
    runs = variants(base.optim.lr)
    if args.seeds_only:
        runs = {k: v for k, v in runs.items() if k.startswith("base seed")}
    results = train_all(space, runs)
    failed = {name: r["reason"] for name, r in results.items() if r["status"] != "completed"}
    if failed:
        print(f"runs that did not complete: {failed}", file=sys.stderr)
        return 1
    print(f"\nspace {args.space}, budget {base.train.epochs} epochs x "
          f"{base.train.max_train_batches or 'all'} batches, extra overrides {args.set or 'none'}")
    print(f"{'run':<18}{'val/mpjpe':>11}{'val/pa_mpjpe':>14}{'wall s':>9}")
    for name, r in results.items():
        print(f"{name:<18}{r['val/mpjpe']:>11.2f}{r['val/pa_mpjpe']:>14.2f}{r['wall_s']:>9.0f}")
    seeds = [results[f"base seed {i}"]["val/mpjpe"] for i in range(3)]
    print(f"\nbase configuration: mean {statistics.mean(seeds):.2f} mm over 3 seeds")
    if args.seeds_only:
        return 0
    configs_mpjpe = [statistics.mean(seeds)] + [results[n]["val/mpjpe"] for n in ("lr x0.1", "lr x10", "keypoint_3d off")]
    seed_std = statistics.stdev(seeds)
    spread = max(configs_mpjpe) - min(configs_mpjpe)
    print(f"\nseed std {seed_std:.2f} mm, configuration spread {spread:.2f} mm, "
          f"ratio {spread / max(seed_std, 1e-9):.1f} (goal >= 4)")
    print(yaml.safe_dump({"seed_std_mm": round(seed_std, 3), "spread_mm": round(spread, 3)}).strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
