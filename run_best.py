"""Retrain a search's best configuration in full, evaluate it once on the held-out test split, and report.

    python run_best.py                                   # the latest experiment under ./results
    python run_best.py --experiment results/loss_weights-20261124-101500 --epochs 12
    python run_best.py --trials path/to/trials.parquet --train-on-val --seed 1
    python run_best.py --config configs/tiny.yaml        # train an explicit config instead
    python run_best.py --eval-only results/.../best/model.pt
    python run_best.py --resume                          # continue an interrupted retrain
    python run_best.py --eval-only MODEL --boxes BOXES   # test has no labels: predict it from hand boxes

Outputs in --out (default: <experiment>/best): model.pt, config.yaml, metrics.json, report.md, figures/.
When the test split has no labels (real ARCTIC: protocol p2's test subject), the report evaluates on the
validation split and says so in its first lines; with --boxes the test split is predicted from per-frame hand
boxes into predictions/ (formats: docs/evaluation.md).
Bad input prints one line naming what is wrong and exits 2; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hawor_tune.cli import ArgumentParser, fail
from hawor_tune.errors import HaworTuneError

if TYPE_CHECKING:
    import torch

    from hawor_tune.config import ExperimentConfig
    from hawor_tune.data.boxes import SequenceBoxes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--experiment", help="experiment folder (default: the latest under --storage)")
    src.add_argument("--trials", help="a search's trials.parquet (its folder is the experiment)")
    src.add_argument("--config", help="train this experiment config instead of a search's best")
    src.add_argument("--eval-only", metavar="MODEL", help="evaluate a saved model.pt on test and report")
    p.add_argument("--objective", metavar="METRIC",
                   help="rank by this objective of a multi-objective search (default: its first metric)")
    p.add_argument("--trial", metavar="ID", help="retrain this trial of the search instead of the best")
    p.add_argument("--mlflow", nargs="?", const="", metavar="URI",
                   help="log the retrain (params, test metrics, model.pt and report as artifacts) to MLflow "
                        "(optional extra): a tracking URI or folder (default: the file store <storage>/mlruns)")
    p.add_argument("--storage", default="./results", help="where searches live (default: %(default)s)")
    p.add_argument("--epochs", type=int, help="epochs to train (default: the base config's full budget)")
    p.add_argument("--train-on-val", action="store_true", help="fold the validation split into training")
    p.add_argument("--seed", type=int, help="training seed (default: the config's)")
    p.add_argument("--compare", type=int, default=2, metavar="N",
                   help="also retrain the winner and the space's base config on N seeds each (the winner's first "
                        "run is the one reported) and say what the search bought, beyond the seed spread "
                        "(default: %(default)s; 0 skips; needs a search)")
    p.add_argument("--out", help="output folder (default: <experiment>/best, or runs/best for --config)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted retrain in --out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="extra config override (repeatable)")
    p.add_argument("--boxes", metavar="DIR", help="per-frame hand boxes of the test split, <sid>/<seq>.json (format: "
                   "docs/evaluation.md): predict it into <out>/predictions (for a test split without labels)")
    args = p.parse_args(argv)
    if (args.trial or args.objective) and (args.config or args.eval_only):
        p.error("--trial and --objective choose a search's trial; they do not go with --config or --eval-only")
    if args.mlflow is not None and args.eval_only:
        p.error("--mlflow logs a retrain; it does not go with --eval-only")
    if args.epochs is not None and args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.compare == 1 or args.compare < 0:
        p.error(f"--compare must be 0 (skip) or at least 2 seeds (a spread needs two), got {args.compare}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except HaworTuneError as e:
        return fail(e)


def _run(args: argparse.Namespace) -> int:
    from hawor_tune.config import load_config, parse_override
    from hawor_tune.retrain import (
        best_config,
        choose_best_trial,
        evaluate_and_report,
        find_latest_experiment,
        load_experiment,
        retrain,
    )

    if args.eval_only:
        from hawor_tune.checkpoint import load_model

        model, cfg = load_model(args.eval_only)
        out = Path(args.out) if args.out else Path(args.eval_only).resolve().parent / "eval"
        split, notice, boxes = _evaluation_plan(cfg, args.boxes)
        result = evaluate_and_report(model, cfg, out, history=None, split=split, notice=notice)
        print(json.dumps(result[split], indent=2))
        print(f"report: {out / 'report.md'}")
        _predict(model, cfg, boxes, out)
        return 0
    mlflow_uri = None
    if args.mlflow is not None:  # checked before anything trains
        from hawor_tune.mlflow_tracking import tracking_uri
        storage = Path(args.experiment).resolve().parent if args.experiment else \
            Path(args.trials).resolve().parent.parent if args.trials else Path(args.storage)
        mlflow_uri = tracking_uri(args.mlflow, storage)
    overrides = dict(parse_override(o) for o in args.overrides)
    if args.epochs is not None:
        overrides["train.epochs"] = args.epochs
    if args.seed is not None:
        overrides["train.seed"] = args.seed
    if args.train_on_val:
        overrides["data.train_on_val"] = True
    exp = chosen = None
    if args.config:
        out = Path(args.out or "runs/best").resolve()
        cfg = load_config(args.config, {**overrides, "train.out_dir": str(out / "run")})
    else:
        exp = load_experiment(experiment=args.experiment, trials=args.trials) if (args.experiment or args.trials) \
            else load_experiment(experiment=find_latest_experiment(args.storage))
        space = exp.record.space
        if space.is_multi_objective and args.trial is None:
            ranked = args.objective or space.metric
            print(f"multi-objective search over {', '.join(space.metrics)}: of the Pareto-optimal trials, "
                  f"retraining the best in {ranked}" + ("" if args.objective else " (the first objective; "
                  "--objective METRIC ranks by another, --trial ID picks one)"))
        trial, value, epoch = choose_best_trial(exp, objective=args.objective, trial_id=args.trial)
        metric = args.objective or space.metric
        out = Path(args.out).resolve() if args.out else exp.directory / "best"
        overrides["train.out_dir"] = str(out / "run")
        cfg = best_config(exp, trial, overrides=overrides)
        params = {p: trial.get(f"param/{p}") for p in exp.record.space.params}
        chosen = {"trial_id": trial["trial_id"], "params": params, "value": value, "epoch": epoch}
        what = "trial" if args.trial else "best trial"
        print(f"{what} {trial['trial_id']} of {exp.directory.name}: {metric} = {value:.3f} "
              f"at epoch {epoch}; params {params}")
        print(f"retraining for {cfg.train.epochs} epochs into {out}")

    split, notice, boxes = _evaluation_plan(cfg, args.boxes)  # before training: bad boxes fail in seconds
    result = retrain(cfg, out, resume=args.resume)
    comparison = None
    if exp is not None and args.compare:
        from hawor_tune.evaluation import evaluate
        from hawor_tune.retrain import base_config, compare_with_base

        seeds = [cfg.train.seed + i for i in range(args.compare)]
        base = base_config(exp, overrides=overrides)
        print(f"comparing with the space's base config: {2 * len(seeds) - 1} more retrains (seeds {seeds})")
        comparison = compare_with_base(cfg, base, out / "compare", seeds=seeds, split=split,
                                       first=evaluate(result.model, split, cfg))
        for name, r in comparison["metrics"].items():
            print(f"  {name}: winner {r['winner']:.3f} +- {r['winner_spread']:.3f}, base {r['base']:.3f} +- "
                  f"{r['base_spread']:.3f}: {'better beyond 2x the spread' if r['beats'] else 'not clearly better'}")
    summary = evaluate_and_report(result.model, cfg, out, history=result.history, exp=exp, chosen=chosen,
                                  split=split, notice=notice, comparison=comparison)
    t, b = summary[split], summary["baseline"]
    print(f"{split} MPJPE {t['mpjpe']:.1f} mm (mean-pose baseline {b['mpjpe']:.1f} mm), PA-MPJPE {t['pa_mpjpe']:.1f} mm, "
          f"WA-MPJPE {t['wa_mpjpe']:.1f} mm, camera {t['cam_trans_error']:.1f} mm / {t['cam_rot_error']:.2f} deg")
    print(f"model: {out / 'model.pt'}\nreport: {out / 'report.md'}")
    _predict(result.model, cfg, boxes, out)
    if mlflow_uri:
        from hawor_tune.mlflow_tracking import log_retrain

        name = exp.directory.name if exp is not None else "run_best"
        run_id = log_retrain(mlflow_uri, name, out, params=(chosen or {}).get("params", {}), metrics=t)
        print(f"mlflow: run {run_id} in experiment {name} at {mlflow_uri}")
    return 0


def _evaluation_plan(cfg: ExperimentConfig, boxes_dir: str | None
                     ) -> tuple[str, str | None, list[SequenceBoxes] | None]:
    """The split the report scores, why it is not test (said on the console too), and the test split's
    boxes, read and checked now."""
    from hawor_tune.prediction import split_boxes
    from hawor_tune.retrain import evaluation_split

    split, notice = evaluation_split(cfg)
    if notice:
        print(f"note: {notice}")
    boxes = split_boxes(cfg, "test", boxes_dir) if boxes_dir else None
    if split != "test" and boxes is None:
        print("no test predictions: the test split has no labels and no hand boxes were given (--boxes DIR, one "
              "JSON per sequence; docs/evaluation.md)")
    return split, notice, boxes


def _predict(model: torch.nn.Module, cfg: ExperimentConfig, boxes: list[SequenceBoxes] | None, out: Path) -> None:
    if boxes is None:
        return
    from hawor_tune.prediction import predict_from_boxes
    from hawor_tune.retrain import PREDICTIONS_DIR

    index = predict_from_boxes(model, cfg, boxes, out / PREDICTIONS_DIR, split="test")
    print(f"test predictions: {len(boxes)} sequences in {index.parent} (index {index.name})")


if __name__ == "__main__":
    sys.exit(main())
