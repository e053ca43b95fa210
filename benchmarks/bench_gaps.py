"""Hands lost for longer than a clip: the world error of the frames the model never saw, bridged or not.

    python benchmarks/bench_gaps.py results/<search>/best/model.pt             # val, runs of 1, 8 and 24 frames
    python benchmarks/bench_gaps.py MODEL --split test --spans 1 24 --rate 0.15

A saved model (``run_best.py``'s ``model.pt`` or a checkpoint) is evaluated with the evaluation's hidden
hand-frames (``--rate`` of the valid ones) in runs of each span, as a tracker loses a hand for a while. Within
a clip the infiller fills a hidden frame from the frames that clip observes; a run longer than a clip leaves
clips that observe the hand nowhere, and their frames are bridged across clips in the world
(``hawor_tune.evaluation.world_sequences``). Each span is scored twice from the same predictions: bridged,
and with every clip's prediction blended, as before the bridge. Printed per span: how many hidden hand-frames
were bridged, the hidden frames' wrist-relative MPJPE (mm), their W-MPJPE (mm) and acceleration error
(m/s^2), and the whole sequences' W-MPJPE and acceleration error.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from hawor_tune.checkpoint import load_model
from hawor_tune.cli import ArgumentParser, fail, positive_int
from hawor_tune.errors import HaworTuneError
from hawor_tune.evaluation import DATASET_FPS, INFILL_EVAL_RATE, compute_metrics, evaluate

COLUMNS = ("mpjpe_infilled", "w_mpjpe_infilled", "accel_error_infilled", "w_mpjpe", "accel_error")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model.pt or a checkpoint")
    parser.add_argument("--split", default="val", choices=("val", "test"))
    parser.add_argument("--spans", type=positive_int, nargs="+", default=[1, 8, 24], help="frames per hidden run")
    parser.add_argument("--rate", type=float, default=INFILL_EVAL_RATE, help="share of valid hand-frames hidden")
    args = parser.parse_args(argv)
    if not 0.0 < args.rate <= 1.0:
        parser.error(f"argument --rate: must be in (0, 1], got {args.rate}")
    try:
        model, cfg = load_model(args.model)
    except HaworTuneError as e:
        return fail(e)
    fps = DATASET_FPS / cfg.data.frame_step
    print(f"{args.split}, {args.rate:.0%} of the valid hand-frames hidden; clips of {cfg.data.seq_len} frames")
    print(f"{'span':>4}  {'scoring':<9}  {'bridged':>8}  " + "  ".join(f"{c:>20}" for c in COLUMNS))
    for span in args.spans:
        result, preds = evaluate(model, args.split, cfg, return_predictions=True, hide_rate=args.rate,
                                 hide_span=span)
        unbridged = compute_metrics(dataclasses.replace(preds, observed=None), fps=fps)
        bridged = f"{result['bridged_hand_frames']:.0f}/{result['infilled_hand_frames']:.0f}"
        for name, values, count in (("bridged", result, bridged), ("blended", unbridged, "0")):
            print(f"{span:>4}  {name:<9}  {count:>8}  " + "  ".join(f"{values[c]:>20.2f}" for c in COLUMNS),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
