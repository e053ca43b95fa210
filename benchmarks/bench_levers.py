"""Which change moves which figure? Variants of a space's base configuration, trained side by side.

Each variant is a set of dotted overrides of the search space's trial config (``SearchSpace.trial_config``:
the base file, the space's overrides, ``--set``, then the variant), trained for every ``--seeds`` seed by the
project's one training loop, two runs at a time in fresh processes (as ``bench_signal.py`` trains them).
Prints, per variant, the seed mean of the last epoch's validation figures, each as a fraction of the
mean-pose baseline's on the same split (a static mean hand and a static camera score 1.0; jerk is given
against the ground truth's own), and the space's objective. It isolates one lever at a time: the world
trajectory's smoothness (``model.hand_trajectory_degree``, ``model.camera_trajectory_degree``), the
fingers' resolution and head, a loss weight.

    python benchmarks/bench_levers.py --variant "free=model.hand_trajectory_degree:0,model.camera_trajectory_degree:0" \\
        --variant "smooth=" [--seeds 0 1] [--space search_spaces/loss_weights.yaml] [--set key=value ...]

A variant is ``name=key:value,key:value`` (values parsed as YAML; ``name=`` is the base configuration).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench_signal import train_all

ROOT = Path(__file__).resolve().parents[1]
# (metric, what it is divided by: "baseline" or the metric holding the ground truth's own figure)
COLUMNS = (("mpjpe", "baseline"), ("pa_mpjpe", "baseline"), ("finger_angle_error", "baseline"),
           ("w_mpjpe", "baseline"), ("wa_mpjpe", "baseline"), ("accel_error", "baseline"), ("jerk", "jerk_gt"),
           ("w_mpjpe_infilled", "baseline"), ("cam_trans_error", "baseline"), ("cam_accel_error", "baseline"))


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``name=key:value,key:value`` -> (name, overrides)."""
    import yaml

    name, sep, body = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--variant {text!r}: expected name=key:value,... (name= for the base configuration)")
    overrides = {}
    for item in filter(None, body.split(",")):
        key, sep, value = item.partition(":")
        if not sep:
            raise SystemExit(f"--variant {text!r}: {item!r} is not key:value")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "loss_weights.yaml"))
    parser.add_argument("--variant", action="append", required=True, metavar="name=key:value,...")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--set", action="append", default=[], metavar="key=value")
    args = parser.parse_args(argv)

    from hawor_tune.evaluation import cached_baseline
    from hawor_tune.search import prepare_data
    from hawor_tune.search_space import load_search_space

    space = load_search_space(args.space, extra_overrides=args.set)
    variants = dict(parse_variant(v) for v in args.variant)
    t0 = time.perf_counter()
    prepare_data(space.base_config)
    baseline = cached_baseline(space.base_config, "val")
    print(f"data, pretrained start, flow fit and baseline ready in {time.perf_counter() - t0:.0f} s")
    runs = {f"{name} seed {seed}": {**over, "train.seed": seed} for name, over in variants.items() for seed in args.seeds}
    t0 = time.perf_counter()
    results = train_all(space, runs)
    failed = {name: r["reason"] for name, r in results.items() if r["status"] != "completed"}
    if failed:
        print(f"runs that did not complete: {failed}", file=sys.stderr)
        return 1
    base = space.base_config
    print(f"\nspace {args.space}, budget {base.train.epochs} epochs x {base.train.max_train_batches or 'all'} batches, "
          f"seeds {args.seeds}, extra overrides {args.set or 'none'}; {time.perf_counter() - t0:.0f} s of training")
    print("validation, seed means, each metric / the mean-pose baseline's (jerk / the ground truth's own); "
          "below each variant, its seeds' spread (max - min)")
    width = max(len(n) for n in variants) + 2
    widths = [max(len(m), 6) + 2 for m, _ in COLUMNS] + [11]
    print(f"{'variant':<{width}}" + "".join(f"{m:>{w}}" for (m, _), w in zip(COLUMNS, widths)) + f"{'objective':>11}")
    for name in variants:
        rows = [results[f"{name} seed {seed}"] for seed in args.seeds]
        columns = [[r[f"val/{m}"] / (baseline[m] if ref == "baseline" else r[f"val/{ref}"]) for r in rows]
                   for m, ref in COLUMNS] + [[r.get("val/objective", float("nan")) for r in rows]]
        print(f"{name:<{width}}" + "".join(f"{statistics.mean(c):>{w}.3f}" for c, w in zip(columns, widths)))
        print(f"{'  spread':<{width}}" + "".join(f"{max(c) - min(c):>{w}.3f}" for c, w in zip(columns, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
