"""Where a trained model's hand error comes from: per hand-frame MPJPE and the rotation that would align its
prediction with the truth, on val and on a sample of the training split.

A wrist-relative MPJPE well above PA-MPJPE is global orientation (and scale) error. This prints, per split,
the spread of the per-hand-frame MPJPE and of the angle of the rotation that best aligns the predicted
wrist-relative joints with the true ones (Kabsch, no scale): a bimodal angle (many near 180 degrees) would be a
palm/back confusion, a unimodal one a plainly imprecise orientation; train close to val says the model
underfits orientation rather than failing to generalise it.

    python benchmarks/bench_errors.py MODEL.pt [--train-batches 60]

MODEL.pt is any hawor-tune model file, e.g. ``<experiment>/best/model.pt`` written by ``run_best.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hawor_tune.cli import ArgumentParser, fail  # noqa: E402
from hawor_tune.errors import HaworTuneError  # noqa: E402

BINS = (0, 10, 20, 30, 45, 60, 90, 120, 180)


def alignment_angles(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(N, J, 3) wrist-relative joints -> (N,) degrees of the rotation that best maps pred onto gt (Kabsch)."""
    H = np.einsum("nji,njk->nik", pred, gt)  # (N, 3, 3)
    U, _, Vt = np.linalg.svd(H)
    d = np.sign(np.linalg.det(np.einsum("nij,njk->nik", Vt.transpose(0, 2, 1), U.transpose(0, 2, 1))))
    D = np.zeros_like(H)
    D[:, 0, 0] = D[:, 1, 1] = 1.0
    D[:, 2, 2] = d
    R = Vt.transpose(0, 2, 1) @ D @ U.transpose(0, 2, 1)
    return np.degrees(np.arccos(np.clip((np.trace(R, axis1=1, axis2=2) - 1) / 2, -1.0, 1.0)))


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a hawor-tune model file")
    p.add_argument("--train-batches", type=int, default=60, help="training batches to score (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        import torch

        from hawor_tune.checkpoint import load_model
        from hawor_tune.data import build_dataloader
        from hawor_tune.evaluation import predict

        torch.set_num_threads(1)
        model, cfg = load_model(args.model)
        for split, cap in (("val", 0), ("train", args.train_batches)):
            pr = predict(model, build_dataloader(cfg, split, shuffle=False), torch.device("cpu"), max_batches=cap)
            pred, gt = pr.pred_joints[pr.valid], pr.gt_joints[pr.valid]  # (N, 21, 3)
            pred, gt = pred - pred[:, :1], gt - gt[:, :1]
            err = np.linalg.norm(pred - gt, axis=-1).mean(-1) * 1000
            ang = alignment_angles(pred, gt)
            print(f"{split}: {len(err)} hand-frames; MPJPE mean {err.mean():.1f} mm, 10/50/90 % "
                  f"{' / '.join(f'{v:.1f}' for v in np.percentile(err, [10, 50, 90]))}")
            print(f"  aligning rotation mean {ang.mean():.1f} deg, 10/50/90 % "
                  f"{' / '.join(f'{v:.1f}' for v in np.percentile(ang, [10, 50, 90]))}; over 90 deg: "
                  f"{(ang > 90).mean():.1%}")
            print(f"  histogram over {list(BINS)} deg: {np.histogram(ang, bins=BINS)[0].tolist()}")
    except HaworTuneError as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
