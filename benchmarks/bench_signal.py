"""Does a search have something to find? Configuration spread against seed noise, measured.

Trains the base configuration of a search space with 3 seeds, and 3 deliberately different
configurations (learning rate x0.1 and x10, the 3D keypoint loss off), each with the search's own budget
(the space's overrides), through the project's one training loop (``hawor_tune.train.fit``), two runs at
a time on one thread each, as a search's trials run. Prints every run's final val MPJPE, the seed standard
deviation of the base configuration, the spread between the configurations (max - min of their final val
MPJPE, the base counted by its seed mean) and their ratio (goal: at least 4).

    python benchmarks/bench_signal.py [--space search_spaces/loss_weights.yaml] [--set key=value ...]

Extra ``--set`` overrides apply to every run. ``--seeds-only`` trains just the 3 seeds of the base
configuration, for an ablation: e.g. ``--seeds-only --set model.hand_fusion=false --set
model.pretrained_path=<the cached start>`` fine-tunes the same start without the hand-fusion block.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _variants(base_lr: float) -> dict[str, dict[str, object]]:
    return {
        "base seed 0": {"train.seed": 0},
        "base seed 1": {"train.seed": 1},
        "base seed 2": {"train.seed": 2},
        "lr x0.1": {"optim.lr": base_lr * 0.1},
        "lr x10": {"optim.lr": base_lr * 10},
        "keypoint_3d off": {"loss.keypoint_3d": 0.0},
    }


def _run_one(config: Path, overrides: dict[str, object], out_dir: Path) -> dict[str, float]:
    """One training run in a child process (one thread), returning its last epoch's record."""
    code = (
        "import json, sys, torch; torch.set_num_threads(1)\n"
        "from hawor_tune.config import load_config\n"
        "from hawor_tune.train import fit\n"
        "cfg = load_config(sys.argv[1], json.loads(sys.argv[2]))\n"
        "r = fit(cfg)\n"
        "print('RESULT ' + json.dumps({'status': r.status, **r.last}))\n"
    )
    over = {**overrides, "train.out_dir": str(out_dir), "train.threads": 1}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(config), json.dumps(over)], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"run {overrides} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "loss_weights.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="key=value")
    parser.add_argument("--seeds-only", action="store_true", help="only the 3 seeds of the base configuration")
    args = parser.parse_args(argv)

    import yaml

    from hawor_tune.config import load_config, parse_override, save_config
    from hawor_tune.search_space import load_search_space

    space = load_search_space(args.space)
    extra = dict(parse_override(s) for s in args.set)
    base = load_config(space.base, {**space.overrides, **extra})
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "base.yaml"
        save_config(base, config)
        # Prepare the data and the pretrained start once, as run_search.py does, before the runs.
        from hawor_tune.data import build_dataset
        from hawor_tune.pretrain import ensure_pretrained

        for split in ("train", "val"):
            build_dataset(base, split)
        t0 = time.perf_counter()
        ensure_pretrained(base)
        print(f"pretrained start ready in {time.perf_counter() - t0:.0f} s")
        variants = _variants(base.optim.lr)
        if args.seeds_only:
            variants = {k: v for k, v in variants.items() if k.startswith("base seed")}
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {name: pool.submit(_run_one, config, over, Path(tmp) / name.replace(" ", "_"))
                       for name, over in variants.items()}
            results = {name: f.result() for name, f in futures.items()}
    print(f"\nspace {args.space}, budget {base.train.epochs} epochs x "
          f"{base.train.max_train_batches or 'all'} batches, extra overrides {extra or 'none'}")
    print(f"{'run':<18}{'val/mpjpe':>11}{'val/pa_mpjpe':>14}{'wall s':>9}")
    for name, r in results.items():
        print(f"{name:<18}{r['val/mpjpe']:>11.2f}{r['val/pa_mpjpe']:>14.2f}{r['wall_s']:>9.0f}")
    seeds = [results[f"base seed {i}"]["val/mpjpe"] for i in range(3)]
    print(f"\nbase configuration: mean {statistics.mean(seeds):.2f} mm over 3 seeds")
    if args.seeds_only:
        return 0
    configs = [statistics.mean(seeds)] + [results[n]["val/mpjpe"] for n in ("lr x0.1", "lr x10", "keypoint_3d off")]
    seed_std = statistics.stdev(seeds)
    spread = max(configs) - min(configs)
    print(f"\nseed std {seed_std:.2f} mm, configuration spread {spread:.2f} mm, "
          f"ratio {spread / max(seed_std, 1e-9):.1f} (goal >= 4)")
    print(yaml.safe_dump({"seed_std_mm": round(seed_std, 3), "spread_mm": round(spread, 3)}).strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
