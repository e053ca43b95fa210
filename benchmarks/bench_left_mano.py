"""How far apart are the left hand's joints with and without the shapedirs fix (smplx issue 48)?

The official MANO_LEFT.pkl carries the right model's shape directions unmirrored; smplx (and so ARCTIC's labels
and networks) uses them as stored, while a "fixed" layer negates their x-component. For the same betas and
pose the two layers place the joints apart by the x-component of the shape blend, carried through the
kinematic chain. This prints that distance in mm over both conventions' joints:

- per shape component: betas = e_k (one standard deviation of MANO's whitened shape space), mean pose;
- over a population: betas ~ N(0, I) (MANO's shape prior; ARCTIC's subjects' betas are such draws) and
  finger poses ~ N(0, 0.3 rad) around the mean hand, both the wrist-relative MPJPE and the raw joint distance.

    python benchmarks/bench_left_mano.py [--mano-dir DIR] [--samples 2000] [--seed 0]
    python benchmarks/bench_left_mano.py --procedural-stand-in   # no MANO files: see below

It needs the official files (``--mano-dir``, else ``mano.model_dir`` / ``$HAWOR_MANO_DIR``). Without them,
``--procedural-stand-in`` measures the built-in procedural hand with its left x-components un-mirrored the way
the official file's are: a hand of MANO's size and shape-space design, not MANO itself.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

from hawor_tune.cli import ArgumentParser, fail
from hawor_tune.config import ManoConfig
from hawor_tune.errors import HaworTuneError
from hawor_tune.mano import MANO_DIR_ENV, MANOLayer, build_mano
from hawor_tune.procedural_hand import make_procedural_hand


def _layers(args: argparse.Namespace) -> tuple[MANOLayer, MANOLayer, str]:
    """(left as stored, left fixed, what was measured)."""
    if args.procedural_stand_in:
        left, right = make_procedural_hand("left"), make_procedural_hand("right")
        unfixed = dict(left)
        unfixed["shapedirs"] = left["shapedirs"].copy()
        unfixed["shapedirs"][:, 0] = right["shapedirs"][:, 0]  # the official file's state: x not mirrored
        return (MANOLayer(unfixed, "left", "procedural"), MANOLayer(left, "left", "procedural"),
                "procedural hand, left x-components un-mirrored as in the official file (a stand-in)")
    model_dir = args.mano_dir or os.environ.get(MANO_DIR_ENV, "")
    if not model_dir:
        raise HaworTuneError(f"no MANO files: pass --mano-dir DIR (MANO_LEFT.pkl and MANO_RIGHT.pkl) or set "
                             f"${MANO_DIR_ENV}; --procedural-stand-in measures the built-in hand instead")
    cfg = ManoConfig(model_dir=model_dir)
    stored, fixed = build_mano(cfg, "left", fix_left_shapedirs=False), build_mano(cfg, "left", fix_left_shapedirs=True)
    if fixed.shapedirs_fix != "fixed":
        raise HaworTuneError(f"{model_dir}: MANO_LEFT.pkl's shapedirs are '{fixed.shapedirs_fix}', not the official "
                             f"unmirrored ones; nothing to compare")
    return stored, fixed, f"official MANO from {model_dir}"


@torch.no_grad()
def _joints(layer: MANOLayer, betas: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """(N, 21, 3) joints in metres, pose (N, 45) relative to the mean hand, zero global orientation."""
    b = torch.from_numpy(betas).double()
    R = layer.pose_to_rotmats(torch.zeros(len(b), 3, dtype=torch.float64), torch.from_numpy(pose).double(),
                              relative_to_mean=True)
    return layer.double().joints(R, b).numpy()


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mano-dir", help="folder with MANO_LEFT.pkl and MANO_RIGHT.pkl")
    p.add_argument("--procedural-stand-in", action="store_true", help="measure the built-in hand instead")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        stored, fixed, what = _layers(args)
    except HaworTuneError as e:
        return fail(e)
    print(f"left hand, stored vs fixed shapedirs: {what}")
    nb = stored.num_betas
    eye, zero = np.eye(nb), np.zeros((nb, 45))
    diff = _joints(stored, eye, zero) - _joints(fixed, eye, zero)  # (B, 21, 3)
    rel = diff - diff[:, :1]
    print("betas = e_k, mean pose: wrist-relative MPJPE (mm) per component k")
    print("  " + "  ".join(f"{k}: {1000 * np.linalg.norm(rel[k], axis=-1).mean():.2f}" for k in range(nb)))
    rng = np.random.default_rng(args.seed)
    betas = rng.standard_normal((args.samples, nb))
    pose = rng.normal(0.0, 0.3, (args.samples, 45))
    d = _joints(stored, betas, pose) - _joints(fixed, betas, pose)  # (N, 21, 3)
    mpjpe = 1000 * np.linalg.norm(d - d[:, :1], axis=-1).mean(-1)  # (N,) wrist-relative
    raw = 1000 * np.linalg.norm(d, axis=-1).mean(-1)
    q = lambda x: f"mean {x.mean():.2f}, median {np.median(x):.2f}, 95th pct {np.percentile(x, 95):.2f}, max {x.max():.2f}"  # noqa: E731
    print(f"betas ~ N(0, I), fingers ~ N(0, 0.3 rad), {args.samples} hands:")
    print(f"  wrist-relative MPJPE (mm): {q(mpjpe)}")
    print(f"  joint distance, no alignment (mm): {q(raw)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
