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
                                       [--cosine] [--pretrain-set] [--set key=value ...] [--model PATH]

``--pretrain-set`` trains on the crops of the hand-pretrained start's generated single-frame set
(:func:`hawor_tune.pretrain.pretrain_data`: every frame's pose drawn on its own) instead of the training
split's video frames, still scored on the validation split. First it prints how much of the validation
split's mean-pose PA-MPJPE is the hand's shape and how much its fingers: the ground truth's own joints
through the hand model with the mean fingers (only the fingers' error left) or with the mean shape (only
the shape's error left).

``--model PATH`` trains no probe: it asks where a trained model file (the cached hand-pretrained start,
``data/cache/pretrained/hand-<key>.pt``, or a run's ``model.pt``) keeps or loses the fingers. On the
training crops (``--pretrain-set``: the start's own single-frame set) and on validation it prints the finger
variance explained by a ridge readout of the backbone's spatial tokens, by one of the spatial head's token
(what the rest of the model reads) and by the model's own prediction. On the training crops each readout is
scored twice: in-sample (the best any linear map of those features can do on them, so no linear head trained
otherwise reaches it) and on training sequences left out of its fit (what the features hold of new frames of
the same people).

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
RIDGE_LAMBDA = 0.1  # the readouts' ridge penalty per sample, on standardised features


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


def pa_parts(cfg, split: str) -> dict[str, float]:
    """PA-MPJPE (mm) of the true hands posed with the mean fingers, with the mean shape (betas 0), and with
    both, over ``split``'s valid hand-frames: what the shape and the fingers each add to the mean pose's."""
    import torch

    from hawor_tune.data import build_dataset
    from hawor_tune.mano import HANDS, build_mano
    from hawor_tune.metrics import pa_mpjpe

    frames = build_dataset(cfg, split)
    labels = {k: np.concatenate([frames[i][k][:1] for i in range(len(frames))]) for k in ("rotmats", "betas",
                                                                                          "hand_valid")}
    parts = {"mean fingers": [], "mean shape": [], "both": []}
    for h, side in enumerate(HANDS):
        layer = build_mano(cfg.mano, side, fix_left_shapedirs=False)  # the labels' own hand model
        valid = labels["hand_valid"][:, h]
        rot = torch.from_numpy(labels["rotmats"][valid, h]).double()  # (N, 16, 3, 3)
        betas = torch.from_numpy(labels["betas"][valid, h]).double()
        mean = layer.pose_to_rotmats(torch.zeros(len(rot), 3, dtype=torch.float64),
                                     torch.zeros(len(rot), 45, dtype=torch.float64), relative_to_mean=True)[:, 1:]
        mean_fingers = torch.cat([rot[:, :1], mean], dim=1)
        with torch.no_grad():
            truth = layer(rot, betas).joints.numpy()
            for name, (r, b) in {"mean fingers": (mean_fingers, betas), "mean shape": (rot, torch.zeros_like(betas)),
                                 "both": (mean_fingers, torch.zeros_like(betas))}.items():
                parts[name].append(pa_mpjpe(layer(r, b).joints.numpy(), truth))
    return {k: float(np.concatenate(v).mean() * 1000) for k, v in parts.items()}


def probe(train_x, train_y, evals: list[tuple[torch.Tensor, torch.Tensor]], *, steps: int, batch: int,
          seed: int, cosine: bool = False) -> list[float]:
    """Train a fresh ResNet-10 on (train_x, train_y), at a constant learning rate or (``cosine``) one decayed
    to 0 over ``steps``; returns the explained variance on train and on each (x, y) of ``evals``."""
    import timm
    import torch

    torch.manual_seed(seed)
    mu, sd = train_y.mean(0), train_y.std(0) + 1e-3
    net = timm.create_model("resnet10t", pretrained=False, num_classes=train_y.shape[1])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine else None
    norm = lambda x: x.float() / 255.0 - 0.5  # noqa: E731
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        sel = torch.randint(0, len(train_x), (batch,), generator=g)
        loss = (net(norm(train_x[sel])) - (train_y[sel] - mu) / sd).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if schedule is not None:
            schedule.step()
    net.eval()

    def score(x, y) -> float:
        with torch.no_grad():
            pred = torch.cat([net(norm(x[s:s + 256])) for s in range(0, len(x), 256)]) * sd + mu
        return explained(pred, y)

    return [score(train_x, train_y)] + [score(x, y) for x, y in evals]


def model_readouts(model, cfg, split: str, *, max_batches: int = 0) -> dict[str, torch.Tensor]:
    """What a trained HaWoR model carries of the fingers of ``split``'s valid hand crops, in right-hand
    form: the backbone's spatial tokens (N, L*F) and the spatial head's token (N, D) that the rest of the
    model reads, its own finger prediction (N, 90, 6D), the truth (N, 90) and each crop's sequence (N,)."""
    import torch

    from hawor_tune.data import build_dataloader
    from hawor_tune.geometry import matrix_to_rot6d
    from hawor_tune.mano import HANDS
    from hawor_tune.model import MIRROR_ROT6D, run_model

    seen: dict[str, torch.Tensor] = {}
    hook = model.spatial_head.register_forward_hook(
        lambda _m, args, out: seen.update(tokens=args[0].flatten(1), head=out))
    mirror = torch.tensor(MIRROR_ROT6D).repeat(15)
    parts: dict[str, list[torch.Tensor]] = {"tokens": [], "head": [], "pred": [], "truth": [], "seq": []}
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(build_dataloader(cfg, split, shuffle=False)):
                if max_batches and i >= max_batches:
                    break
                out = run_model(model, batch)
                valid = batch["hand_valid"]  # (B, T, 2), the order of the crops the head saw
                sign = torch.ones(2, 90)
                sign[HANDS.index("left")] = mirror
                sign = sign.expand(*valid.shape, 90)[valid]  # (N, 90) left hands into right-hand form
                parts["tokens"].append(seen["tokens"][valid.flatten()])
                parts["head"].append(seen["head"][valid.flatten()])
                parts["pred"].append(matrix_to_rot6d(out.rotmats[..., 1:, :, :])[valid].flatten(1) * sign)
                parts["truth"].append(matrix_to_rot6d(batch["rotmats"][..., 1:, :, :].float())[valid].flatten(1) * sign)
                parts["seq"].append(batch["seq_index"][:, None, None].expand(valid.shape)[valid])
    finally:
        hook.remove()
    return {k: torch.cat(v) if k == "seq" else torch.cat(v).double() for k, v in parts.items()}


def explained(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """1 - residual / variance of ``truth`` about its own mean (0: the mean pose)."""
    return 1.0 - float((pred - truth).square().sum(1).mean() / (truth - truth.mean(0)).square().sum(1).mean())


def ridge(train_x, train_y, *, lam: float = RIDGE_LAMBDA):
    """A ridge regression (standardised features, penalty ``lam`` per sample) fitted on (train_x, train_y):
    features (N, F) -> predictions (N, K)."""
    import torch

    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a = (train_x - mu) / sd
    y_mean = train_y.mean(0)
    w = torch.linalg.solve(a.T @ a + lam * len(a) * torch.eye(a.shape[1], dtype=a.dtype), a.T @ (train_y - y_mean))
    return lambda x: ((x - mu) / sd) @ w + y_mean


def ridge_readout(train_x, train_y, evals, *, lam: float = RIDGE_LAMBDA) -> list[float]:
    """Explained variance of a :func:`ridge` readout fitted on (train_x, train_y), on the training set and on
    each (x, y) of ``evals``."""
    predict = ridge(train_x, train_y, lam=lam)
    return [explained(predict(x), y) for x, y in [(train_x, train_y), *evals]]


def held_out_readout(x, y, seq, *, folds: int = 5, lam: float = RIDGE_LAMBDA) -> float:
    """Explained variance of :func:`ridge` readouts on sequences they were not fitted on: the sequences split
    into ``folds`` groups, each predicted by a readout fitted on the others. Unlike the in-sample fit, which is
    the best any linear map of ``x`` can do on the crops it was fitted to, this is what the features hold of
    unseen frames of the same people."""
    import torch

    fold = torch.searchsorted(torch.unique(seq), seq) % folds  # (N,) sequences dealt round-robin
    pred = torch.empty_like(y)
    for k in range(folds):
        test = fold == k
        pred[test] = ridge(x[~test], y[~test], lam=lam)(x[test])
    return explained(pred, y)


def diagnose_model(path: str, cfg, train_cfg, *, max_batches: int) -> None:
    """Print where a trained model's finger information is: in its backbone's tokens, in the spatial head's
    token, in its own prediction."""
    import torch

    from hawor_tune.checkpoint import load_model

    model, _ = load_model(path)
    train = model_readouts(model, train_cfg, "train", max_batches=max_batches)
    val = model_readouts(model, cfg, "val")
    print(f"{path}: {len(train['truth'])} training hand crops ({len(torch.unique(train['seq']))} sequences) and "
          f"{len(val['truth'])} validation ones; finger variance explained (0: the mean pose) on the training crops "
          f"(in-sample fit), on training sequences left out of the readout's fit (5 folds), on validation")
    for name in ("tokens", "head"):
        width = train[name].shape[1]
        fit = ridge_readout(train[name], train["truth"], [(val[name], val["truth"])])
        held = held_out_readout(train[name], train["truth"], train["seq"])
        print(f"  ridge readout of the {'backbone tokens' if name == 'tokens' else 'spatial head token'} "
              f"({width} features): {fit[0]:.2f} / {held:.2f} / {fit[1]:.2f}")
    print(f"  the model's own finger prediction (trained on every training crop): "
          f"{explained(train['pred'], train['truth']):.2f} / - / {explained(val['pred'], val['truth']):.2f}; "
          f"its spread {float(train['pred'].std(0).norm() / train['truth'].std(0).norm()):.2f} of the truth's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5, 1.0],
                        help="shares of the training sequences to train on (0 < share <= 1)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--cosine", action="store_true",
                        help="decay the probe's learning rate to 0 over --steps (cosine) instead of keeping it")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--holdout", type=float, default=0.0,
                        help="share of the training sequences never trained on, scored apart (0 <= share < 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pretrain-set", action="store_true",
                        help="train on the pretraining's generated single-frame set instead of the training split")
    parser.add_argument("--set", action="append", default=[], metavar="key=value")
    parser.add_argument("--model", help="instead of the probe: where a trained model file (e.g. the cached "
                        "hand-pretrained start) keeps or loses the fingers")
    parser.add_argument("--model-batches", type=int, default=0,
                        help="training batches read for --model's readouts (0: all)")
    args = parser.parse_args()
    bad = [s for s in args.shares if not 0 < s <= 1]
    if bad or args.steps < 1 or args.batch < 1 or not 0 <= args.holdout < 1:
        parser.error(f"--shares must lie in (0, 1] (got {bad}), --holdout in [0, 1) (got {args.holdout}), "
                     "--steps and --batch must be >= 1")

    import torch

    from hawor_tune.config import load_config, parse_override
    from hawor_tune.errors import HaworTuneError
    from hawor_tune.pretrain import pretrain_config

    torch.set_num_threads(args.threads)
    try:
        extra = dict(parse_override(s) for s in args.set)
        cfg = load_config(args.config, overrides={**extra, "data.seq_len": 1, "data.stride": 1,
                                                  "data.crop_jitter": 0.0})
    except HaworTuneError as e:
        parser.error(str(e).splitlines()[0])
    if args.model:
        diagnose_model(args.model, cfg, pretrain_config(cfg, "unused") if args.pretrain_set else cfg,
                       max_batches=args.model_batches)
        return
    parts = pa_parts(cfg, "val")
    print(f"val PA-MPJPE of the true hands with the mean fingers {parts['mean fingers']:.2f} mm (the fingers' "
          f"error alone), with the mean shape {parts['mean shape']:.2f} mm (the shape's error alone), with both "
          f"{parts['both']:.2f} mm")
    t0 = time.perf_counter()
    tx, ty, tseq = finger_crops(pretrain_config(cfg, "unused") if args.pretrain_set else cfg, "train")
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
        scores = probe(tx[keep], ty[keep], evals, steps=args.steps, batch=args.batch, seed=args.seed,
                       cosine=args.cosine)
        print(f"{share:>6.2f} {int(np.isin(order, tseq[keep]).sum()):>10} {int(keep.sum()):>6} {scores[0]:>16.2f} "
              + " ".join(f"{v:>14.2f}" if i == 0 else f"{v:>19.2f}" for i, v in enumerate(scores[1:])), flush=True)


if __name__ == "__main__":
    main()
