"""Can the fingers be learned from this dataset at all? A learning curve over the training set's size.

The HaWoR model's PA-MPJPE (finger articulation) barely moves from the mean-pose baseline however its
losses are weighted. This benchmark asks the question underneath, with the model out of the way: a plain
timm ResNet-10 regresses the 15 finger rotations (6D, standardised) straight from the hand crops the
model reads (right-hand form: left crops arrive mirrored, so their rotations are mirrored too), trained
on a growing share of the training split and scored on the validation split (new subjects). It prints,
per share, the residual on the training crops it saw and on validation as a fraction of the validation
targets' variance: "explained" = 1 - residual / variance. A network that memorises the training fingers
but explains little of validation's means the data, not the model, limits finger learning; a rising
curve says how much more data would help. ``--holdout`` also scores a share of the training sequences that
are never trained on (the training subjects, new sequences), which tells new sequences from new subjects.

    python benchmarks/bench_fingers.py [--config configs/tiny.yaml] [--shares 0.25 0.5 1.0] [--steps 400]
                                       [--set key=value ...]

``--set`` overrides the config, e.g. a larger generated dataset in its own folder:
``--set data.root=data/arctic_synthetic_x50 --set data.synthetic.sequences_per_subject=50``.

The probe has its own few-line loop on purpose: it trains no HaWoR model, only answers a data question.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]


def finger_crops(cfg, split: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Every valid hand crop of ``split`` (uint8 (N, 3, C, C)), its finger rotations in right-hand form
    as 6D (N, 90), and the sequence each came from (N,)."""
    import torch

    from hawor_tune.data import build_dataset
    from hawor_tune.geometry import matrix_to_rot6d
    from hawor_tune.mano import HANDS
    from hawor_tune.model import MIRROR_ROT6D

    ds = build_dataset(cfg, split)
    mirror = torch.tensor(MIRROR_ROT6D).repeat(15)  # (90,) D R D on each rotation's 6D form
    crops, targets, seqs = [], [], []
    for i in range(len(ds)):
        item = ds[i]
        for h, side in enumerate(HANDS):
            if item["hand_valid"][0, h]:
                rot6d = matrix_to_rot6d(item["rotmats"][0, h, 1:]).flatten()  # (90,) fingers only
                crops.append(item["crops"][0, h])
                targets.append(rot6d * mirror if side == "left" else rot6d)
                seqs.append(int(item["seq_index"]))
    return torch.stack(crops), torch.stack(targets).float(), np.array(seqs)


def probe(train_x, train_y, evals: list[tuple[torch.Tensor, torch.Tensor]], *, steps: int, batch: int,
          seed: int) -> list[float]:
    """Train a fresh ResNet-10 on (train_x, train_y); returns the explained variance on train and on each
    (x, y) of ``evals``."""
    import timm
    import torch

    torch.manual_seed(seed)
    mu, sd = train_y.mean(0), train_y.std(0) + 1e-3
    net = timm.create_model("resnet10t", pretrained=False, num_classes=train_y.shape[1])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    norm = lambda x: x.float() / 255.0 - 0.5  # noqa: E731
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        sel = torch.randint(0, len(train_x), (batch,), generator=g)
        loss = (net(norm(train_x[sel])) - (train_y[sel] - mu) / sd).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()

    def explained(x, y) -> float:
        with torch.no_grad():
            pred = torch.cat([net(norm(x[s:s + 256])) for s in range(0, len(x), 256)]) * sd + mu
        return 1.0 - float((pred - y).square().sum(1).mean() / (y - y.mean(0)).square().sum(1).mean())

    return [explained(train_x, train_y)] + [explained(x, y) for x, y in evals]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5, 1.0],
                        help="shares of the training sequences to train on (0 < share <= 1)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--holdout", type=float, default=0.0,
                        help="share of the training sequences never trained on, scored apart (0 <= share < 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="key=value")
    args = parser.parse_args()
    bad = [s for s in args.shares if not 0 < s <= 1]
    if bad or args.steps < 1 or args.batch < 1 or not 0 <= args.holdout < 1:
        parser.error(f"--shares must lie in (0, 1] (got {bad}), --holdout in [0, 1) (got {args.holdout}), "
                     "--steps and --batch must be >= 1")

    import torch

    from hawor_tune.config import load_config, parse_override
    from hawor_tune.errors import HaworTuneError

    torch.set_num_threads(args.threads)
    try:
        extra = dict(parse_override(s) for s in args.set)
        cfg = load_config(args.config, overrides={**extra, "data.seq_len": 1, "data.stride": 1,
                                                  "data.crop_jitter": 0.0})
    except HaworTuneError as e:
        parser.error(str(e).splitlines()[0])
    t0 = time.perf_counter()
    tx, ty, tseq = finger_crops(cfg, "train")
    vx, vy, _ = finger_crops(cfg, "val")
    print(f"{len(tx)} training and {len(vx)} validation hand crops ({cfg.data.crop_size} px) from "
          f"{len(np.unique(tseq))} training sequences, loaded in {time.perf_counter() - t0:.0f} s; "
          f"{args.steps} steps of {args.batch}, ResNet-10 from scratch")
    order = np.random.default_rng(args.seed).permutation(np.unique(tseq))
    held = order[: round(args.holdout * len(order))]
    order = order[len(held):]
    evals = [(vx, vy)]
    header = f"{'share':>6} {'sequences':>10} {'crops':>6} {'explained train':>16} {'explained val':>14}"
    if len(held):
        out = np.isin(tseq, held)
        evals.append((tx[out], ty[out]))
        header += f" {'held-out sequences':>19}"
        print(f"{len(held)} training sequences ({int(out.sum())} crops) held out: training subjects, unseen sequences")
    print(header)
    for share in args.shares:
        keep = np.isin(tseq, order[: max(1, round(share * len(order)))])
        scores = probe(tx[keep], ty[keep], evals, steps=args.steps, batch=args.batch, seed=args.seed)
        print(f"{share:>6.2f} {int(np.isin(order, tseq[keep]).sum()):>10} {int(keep.sum()):>6} {scores[0]:>16.2f} "
              + " ".join(f"{v:>14.2f}" if i == 0 else f"{v:>19.2f}" for i, v in enumerate(scores[1:])), flush=True)


if __name__ == "__main__":
    main()
