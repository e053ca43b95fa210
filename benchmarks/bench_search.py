"""Search efficiency, measured: search strategies side by side on a recorded grid, and the service's overheads.

    python benchmarks/bench_search.py --record-grid --storage /tmp/bench_grid      # once: the live grid
    python benchmarks/bench_search.py --replay --grid /tmp/bench_grid/lr_seq-grid --out benchmarks/out
    python benchmarks/bench_search.py --overheads --out /tmp/bench_over                 # the service's costs
    python benchmarks/bench_search.py --startup 8 --out /tmp/bench_startup              # its start-up alone

BENCHMARKS.md says what each mode measures and holds the latest figures.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # replay.py and _overheads.py beside this file

from hawor_tune.cli import ArgumentParser, UsageError, fail, positive_int  # noqa: E402
from hawor_tune.errors import HaworTuneError  # noqa: E402


def record_grid(space_path: Path, *, storage: Path, name: str, n: int, seed: int, dashboard_port: int,
                concurrency: int = 1) -> Path:
    """Train ``n`` quasi-random configurations of the space live, ``concurrency`` at a time on one CPU each,
    every one to the full epoch budget (fifo: nobody stops a trial), exporting every epoch as a search does.
    The recorded epoch times, the replay's cost, are those of ``concurrency`` trials sharing the machine."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from replay import quasi_random_grid

    from hawor_tune.results import check_storage
    from hawor_tune.search import ParquetExporter, build_tuner, prepare_data, start_ray, train_trial
    from hawor_tune.search_space import load_search_space

    space = load_search_space(space_path)
    grid = quasi_random_grid(space, n, seed=seed)
    storage = check_storage(storage)
    exp_dir = storage / name
    exp_dir.mkdir(parents=True, exist_ok=False)
    prepare_data(space.base_config)
    start_ray(None, dashboard_port, num_cpus=concurrency)
    epochs = space.base_config.train.epochs
    exporter = ParquetExporter(exp_dir, metric=space.metric, mode=space.mode, max_epochs=epochs,
                               param_paths=list(space.params))
    trainable = tune.with_resources(tune.with_parameters(train_trial, space=space), {"cpu": 1, "gpu": 0})
    tuner = build_tuner(space, trainable, storage=storage, name=name, callbacks=[exporter], verbose=1,
                        searcher=BasicVariantGenerator(points_to_evaluate=grid, max_concurrent=concurrency),
                        scheduler=FIFOScheduler(), num_samples=len(grid))
    t0 = time.perf_counter()
    tuner.fit()
    from hawor_tune.results import TRIALS_FILE, read_rows

    done = sum(r["status"] == "TERMINATED" and r["epochs"] == epochs for r in read_rows(exp_dir / TRIALS_FILE))
    print(f"{done} of {len(grid)} configurations x {epochs} epochs recorded in {exp_dir} "
          f"({time.perf_counter() - t0:.0f} s; an interrupted grid keeps its finished trials)")
    return exp_dir


# The five strategies, each a change of the space's searcher and scheduler (same trials, same epoch budget).
METHODS = {
    "a": ("random, no early stopping", {"search_algorithm": "random", "scheduler_type": "fifo"}),
    "b": ("random + ASHA", {"search_algorithm": "random", "scheduler_type": "asha"}),
    "c": ("TPE, no early stopping", {"search_algorithm": "optuna", "scheduler_type": "fifo"}),
    "d": ("TPE + ASHA, stops told COMPLETE (Ray's OptunaSearch)", {"search_algorithm": "optuna",
                                                                   "scheduler_type": "asha",
                                                                   "search_stopped_as": "complete"}),
    "e": ("TPE + ASHA, stops told PRUNED", {"search_algorithm": "optuna", "scheduler_type": "asha",
                                            "search_stopped_as": "pruned"}),
}
TARGET_GAP = 0.02  # "within 2 % of (a)'s final best"


def method_space(space, method: str, seed: int, num_samples: int):
    """The space as method ``method`` searches it: its searcher and scheduler, this seed, one trial at a time.
    ASHA keeps the file's grace period and reduction factor (or grace 1, factor 3 when the file is fifo)."""
    import dataclasses

    change = dict(METHODS[method][1])
    if change["scheduler_type"] == "fifo":
        change.update(grace_period=None, reduction_factor=None, max_epochs=space.base_config.train.epochs)
    else:
        change.update(grace_period=space.grace_period or 1, reduction_factor=space.reduction_factor or 3)
    change.setdefault("search_stopped_as", "complete")
    return dataclasses.replace(space, **change, search_seed=seed, num_samples=num_samples, max_concurrent=1)


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    import numpy as np

    q = np.quantile(np.asarray(values, dtype=float), [0.25, 0.5, 0.75], method="inverted_cdf")
    return float(q[0]), float(q[1]), float(q[2])


def replay(space_path: Path, grid_dir: Path, *, out: Path, seeds: int, num_samples: int | None,
           methods: str, first_point: str = "default") -> dict:
    """Every method for ``seeds`` seeds over the recorded grid; prints the table, writes results.json and
    anytime.png into ``out``."""
    import json
    import tempfile

    import ray
    from replay import RecordedGrid, anytime_curve, epochs_to_reach, replay_search

    from hawor_tune.search_space import load_search_space

    space = load_search_space(space_path)
    epochs = space.base_config.train.epochs
    grid = RecordedGrid(grid_dir, space, epochs=epochs)
    n = num_samples or space.num_samples
    print(f"recorded grid: {len(grid.trials)} configurations x {epochs} epochs from {grid_dir}; "
          f"{n} trials per search, {seeds} seeds per method, first trial: "
          f"{'the base config' if first_point == 'default' else 'the searcher'}", flush=True)
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
    runs: dict[str, list] = {}
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as storage:
            for m in methods:
                runs[m] = []
                for seed in range(seeds):
                    reported = replay_search(method_space(space, m, seed, n), grid, storage=storage,
                                             name=f"{m}-{seed}", first_point_default=first_point == "default")
                    runs[m].append(anytime_curve(reported, space.mode))
                print(f"  ({m}) {seeds} seeds replayed, {time.perf_counter() - t0:.0f} s so far", flush=True)
    finally:
        ray.shutdown()
    pick = max if space.mode == "max" else min
    reference = _quantiles([c[-1][2] for c in runs["a"]])[1] if "a" in runs else pick(grid.final_values(space.metric))
    target = reference * (1 - TARGET_GAP) if space.mode == "max" else reference * (1 + TARGET_GAP)
    summary = {}
    for m, curves in runs.items():
        finals = [c[-1][2] for c in curves]
        to_target = [epochs_to_reach(c, target, space.mode) for c in curves]
        cost_to_target = [next((s for e, s, b in c if e == k), float("inf")) for c, k in zip(curves, to_target)]
        summary[m] = {"label": METHODS[m][0], "final_best": _quantiles(finals),
                      "epochs_total": _quantiles([c[-1][0] for c in curves]),
                      "hours_total": _quantiles([c[-1][1] / 3600 for c in curves]),
                      "epochs_to_target": _quantiles(to_target),
                      "hours_to_target": _quantiles([s / 3600 for s in cost_to_target]),
                      "reached": sum(k < float("inf") for k in to_target)}
    ref_epochs = summary.get("a", {}).get("epochs_to_target", (0, float("nan"), 0))[1]
    print(f"\ntarget: within {TARGET_GAP:.0%} of (a)'s median final best {reference:.2f} -> {target:.2f} "
          f"({space.metric}, {space.mode}); median [25 %, 75 %] over {seeds} seeds")
    print(f"{'method':58s} {'final best':>22s} {'epochs used':>16s} {'epochs to target':>20s} {'vs (a)':>7s} "
          f"{'reached':>8s}")
    for m, s in summary.items():
        lo, med, hi = s["epochs_to_target"]
        ratio = med / ref_epochs if ref_epochs and ref_epochs == ref_epochs else float("nan")
        s["epochs_to_target_vs_a"] = ratio
        f = s["final_best"]
        e = s["epochs_total"]
        print(f"({m}) {s['label']:54s} {f[1]:7.2f} [{f[0]:.2f}, {f[2]:.2f}] {e[1]:5.0f} [{e[0]:.0f}, {e[2]:.0f}] "
              f"{med:7.0f} [{lo:.0f}, {hi:.0f}] {ratio:7.0%} {s['reached']:4d}/{seeds}")
    out.mkdir(parents=True, exist_ok=True)
    result = {"grid": str(grid_dir), "first_point": first_point, "configurations": len(grid.trials), "epochs": epochs, "num_samples": n,
              "seeds": seeds, "metric": space.metric, "mode": space.mode, "reference": reference, "target": target,
              "summary": summary, "curves": {m: [[list(p) for p in c] for c in cs] for m, cs in runs.items()}}
    stem = f"replay-{first_point}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    _plot(runs, summary, target, space.metric, out / f"{stem}.png")
    print(f"\nwrote {out / (stem + '.json')} and {out / (stem + '.png')} ({time.perf_counter() - t0:.0f} s)")
    return result


def live(space_path: Path, *, storage: Path, out: Path, methods: str, seed: int, num_samples: int | None,
         dashboard_port: int) -> dict:
    """Run ``methods`` live through the service (``hawor_tune.search.run_search``: real training, the space's
    own concurrency), one search each with this seed, and print the figures the replay predicts for them:
    final best, epochs used and epochs to within TARGET_GAP of (a)'s final best (or the first method's)."""
    import dataclasses
    import json

    from replay import epochs_to_reach

    from hawor_tune.results import EPOCHS_FILE, read_rows
    from hawor_tune.search import run_search
    from hawor_tune.search_space import load_search_space

    space = load_search_space(space_path)
    n = num_samples or space.num_samples
    pick = max if space.mode == "max" else min
    curves: dict[str, list] = {}
    t0 = time.perf_counter()
    for m in methods:
        m_space = dataclasses.replace(method_space(space, m, seed, n), max_concurrent=space.max_concurrent)
        name = f"live-{m}-seed{seed}"
        started = time.perf_counter()
        run_search(m_space, storage=storage, name=name, dashboard_port=dashboard_port)
        rows = sorted(read_rows(Path(storage) / name / EPOCHS_FILE), key=lambda r: (r["timestamp"], r["time_total_s"]))
        curve, best, cost = [], None, 0.0
        for i, r in enumerate(rows, start=1):  # the epochs in the order the search reported them
            cost += float(r["time/epoch_s"])
            best = r[space.metric] if best is None else pick(best, r[space.metric])
            curve.append((i, cost, float(best)))
        curves[m] = curve
        print(f"  ({m}) live: {len(rows)} epochs, {time.perf_counter() - started:.0f} s wall", flush=True)
    reference = curves["a" if "a" in curves else methods[0]][-1][2]
    target = reference * (1 - TARGET_GAP) if space.mode == "max" else reference * (1 + TARGET_GAP)
    summary = {}
    print(f"\nlive, seed {seed}, {n} trials, {space.max_concurrent} at a time; target: within {TARGET_GAP:.0%} of "
          f"{reference:.2f} -> {target:.2f} ({space.metric})")
    for m, c in curves.items():
        k = epochs_to_reach(c, target, space.mode)
        summary[m] = {"label": METHODS[m][0], "final_best": c[-1][2], "epochs_total": c[-1][0],
                      "hours_total": c[-1][1] / 3600, "epochs_to_target": k}
        print(f"({m}) {METHODS[m][0]:54s} final best {c[-1][2]:.2f}  epochs {c[-1][0]:3d}  "
              f"({c[-1][1] / 3600:.2f} h of training)  epochs to target {k:.0f}")
    out.mkdir(parents=True, exist_ok=True)
    result = {"seed": seed, "num_samples": n, "reference": reference, "target": target, "summary": summary,
              "curves": {m: [list(p) for p in c] for m, c in curves.items()}, "wall_s": time.perf_counter() - t0}
    (out / f"live-seed{seed}.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / f'live-seed{seed}.json'}")
    return result


def _plot(runs: dict, summary: dict, target: float, metric: str, path: Path) -> None:
    """Best value so far against cumulative epochs and against cumulative recorded training time: the median
    over seeds and its 25-75 % band (a finished run holds its final value)."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for m, curves in runs.items():
        for ax, col, scale in ((axes[0], 0, 1.0), (axes[1], 1, 1 / 3600)):
            end = max(c[-1][col] for c in curves) * scale
            xs = np.linspace(0, end, 200)
            ys = np.array([[_step(c, col, x / scale) for x in xs] for c in curves])
            with np.errstate(all="ignore"), warnings.catch_warnings():  # NaN before a run's first epoch
                warnings.simplefilter("ignore", RuntimeWarning)
                med = np.nanmedian(ys, axis=0)
                lo, hi = np.nanquantile(ys, 0.25, axis=0), np.nanquantile(ys, 0.75, axis=0)
            (line,) = ax.plot(xs, med, label=f"({m}) {summary[m]['label']}")
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    for ax, xlabel in zip(axes, ("cumulative training epochs", "cumulative recorded training time (h, one core)")):
        ax.axhline(target, color="grey", ls="--", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"best {metric} so far")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Anytime performance, replayed over the recorded grid (median, 25-75 % over seeds; "
                 "dashed: 2 % of (a)'s final best)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _step(curve: list, col: int, x: float) -> float:
    """The curve's best at abscissa ``x`` (NaN before its first point)."""
    best = float("nan")
    for point in curve:
        if point[col] > x:
            break
        best = point[2]
    return best


def _positive_int_or_zero(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return int(text)


def _methods(text: str) -> str:
    if not text or any(m not in METHODS for m in text) or len(set(text)) != len(text):
        raise argparse.ArgumentTypeError(f"must be distinct letters of {''.join(METHODS)}, got {text!r}")
    return "".join(m for m in METHODS if m in text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--record-grid", action="store_true", help="train the live grid once")
    p.add_argument("--replay", action="store_true", help="replay every method over the recorded grid")
    p.add_argument("--live", action="store_true",
                   help="run --methods live through the service, one seed (--live-seed), to confirm the replay")
    p.add_argument("--live-seed", type=_positive_int_or_zero, default=0)
    p.add_argument("--overheads", action="store_true", help="measure the service's own costs (run last: uses both cores)")
    p.add_argument("--startup", type=positive_int, metavar="RUNS",
                   help="measure only the start-up, over RUNS one-trial searches of one short epoch (run alone)")
    p.add_argument("--smoke", action="store_true", help="with --overheads: a couple of batches per run, to check the plumbing")
    p.add_argument("--grid", help="the recorded grid's folder (default: <storage>/<name>)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out"), help="folder for results.json and figures")
    p.add_argument("--seeds", type=positive_int, default=10, help="seeds per method (default: %(default)s)")
    p.add_argument("--num-samples", type=positive_int, help="trials per search (default: the space's)")
    p.add_argument("--first-point", choices=("default", "sampler"), default="default",
                   help="first trial of every search: the base config's point, as the service does (default), or "
                        "the searcher's own (the samplers alone)")
    p.add_argument("--methods", type=_methods, default="abcde", help="which of a-e (default: %(default)s)")
    p.add_argument("--space", default=str(ROOT / "search_spaces" / "lr_seq.yaml"))
    p.add_argument("--storage", default="/tmp/bench_grid")
    p.add_argument("--name", default="lr_seq-grid")
    p.add_argument("--grid-size", type=positive_int, default=12)
    p.add_argument("--grid-seed", type=_positive_int_or_zero, default=0)
    p.add_argument("--grid-concurrency", type=positive_int, default=1,
                   help="grid trials at a time, one CPU each (default: %(default)s)")
    p.add_argument("--dashboard-port", type=int, default=8266)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.record_grid:
            record_grid(Path(args.space), storage=Path(args.storage), name=args.name, n=args.grid_size,
                        concurrency=args.grid_concurrency,
                        seed=args.grid_seed, dashboard_port=args.dashboard_port)
        if args.replay:
            grid = Path(args.grid) if args.grid else Path(args.storage) / args.name
            if not (grid / "epochs.parquet").is_file():
                raise UsageError(f"--grid {grid}: no epochs.parquet there; record the grid first (--record-grid)")
            replay(Path(args.space), grid, out=Path(args.out), seeds=args.seeds, num_samples=args.num_samples,
                   methods=args.methods, first_point=args.first_point)
        if args.live:
            live(Path(args.space), storage=Path(args.storage), out=Path(args.out), methods=args.methods,
                 seed=args.live_seed, num_samples=args.num_samples, dashboard_port=args.dashboard_port)
        if args.startup:
            from _overheads import measure_startup
            measure_startup(Path(args.out), args.startup)
        if args.overheads:
            from _overheads import measure_overheads
            measure_overheads(Path(args.out), smoke=args.smoke)
    except (HaworTuneError, UsageError) as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
