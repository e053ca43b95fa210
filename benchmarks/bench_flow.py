"""How the camera's flow head reads a clip's path best: from which flow, chained from steps or not.

    python benchmarks/bench_flow.py                   # the CPU profile's generated set, 8- and 16-frame clips
    python benchmarks/bench_flow.py --frames 16 --set data.root=/data/arctic_synthetic

The camera's flow head (``hawor_tune/flow_fit.py``) is a small MLP fitted on the training split's clips and
scored on the validation and test splits, for three flows of the same clips from their first frame to each
frame, each pooled onto ``data.flow_grid`` cells:

- ``direct``: DIS flow from the clip's first frame to each frame (one pair per clip and frame; what a cache per
  clip length would hold);
- ``strides``: the sum along ``hawor_tune.data.flow.flow_path`` of pair flows 1, 2, 4 and 8 frames apart (what
  the prepared form stores, once per pair, for every clip length, and what the model reads);
- ``consecutive``: the sum of the flows between consecutive frames.

and two ways of reading them (``hawor_tune.flow_fit.head_path``):

- ``chained`` (the model's): each frame's pose in the previous frame's camera, from the difference of the two
  frames' flows (for ``consecutive``, exactly the flow between them), chained into the path as a visual
  odometry chains it, so each step's error carries on to every later frame;
- ``first frame``: each frame's pose in the first camera straight from its flow from the first frame.

Lower is better; the static camera's error is printed beside each. For the stored flow read from the first
frame, a linear map fitted by ridge regression (the best of penalties 1 to 10^4 on val; what the flow head was
before it became an MLP) is scored beside it.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from hawor_tune.config import load_config, parse_override
from hawor_tune.data import build_dataset
from hawor_tune.data.flow import flow_path, pair_flow
from hawor_tune.flow_fit import fit_flow_head, head_path
from hawor_tune.geometry import relative_camera_pose
from hawor_tune.model import FlowHead


def _flows(ds, index: int, grid: int) -> dict[str, np.ndarray]:
    s = ds._clips[index][0]
    focal = float(ds._K_frame[s][0, 0])  # the letterboxed frame's, the flow's unit
    grey = [cv2.cvtColor(ds.frame_with_intrinsics(index, t)[0], cv2.COLOR_RGB2GRAY) for t in range(ds.seq_len)]
    pairs: dict[tuple[int, int], np.ndarray] = {}

    def pair(a: int, b: int) -> np.ndarray:
        if (a, b) not in pairs:
            pairs[a, b] = pair_flow(grey[a], grey[b], focal, grid)
        return pairs[a, b]

    out = {k: np.zeros((ds.seq_len, 2, grid, grid), np.float32) for k in ("direct", "strides", "consecutive")}
    for t in range(1, ds.seq_len):
        out["direct"][t] = pair(0, t)
        out["strides"][t] = sum(pair(a, a + k) for a, k in flow_path(t))
        out["consecutive"][t] = sum(pair(a, a + 1) for a in range(t))
    return out


def _head(fit: dict) -> FlowHead:
    state = fit["state"]
    head = FlowHead(state["w1"].shape[1], state["w3"].shape[0], state["w1"].shape[0])
    head.load_state_dict(state)
    return head


def _reader(head: FlowHead, key: str, chained: bool) -> Callable[[dict], torch.Tensor]:
    """A clip -> its translations (T-1, 3) as the fitted head reads them from the clip's ``key`` flow."""
    return lambda clip: head_path(head, torch.from_numpy(clip[key]), chained=chained)


def _ridge(clips: list[dict], key: str, penalty: float) -> Callable[[dict], torch.Tensor]:
    """A linear map from a frame's flow from the first frame to its camera translation in the first camera,
    by ridge regression on standardised flow: a clip -> its translations (T-1, 3)."""
    X = torch.cat([torch.from_numpy(c[key][1:]).flatten(1).double() for c in clips])
    Y = torch.cat([relative_camera_pose(c["cam_R"].double(), c["cam_t"].double())[1][1:] for c in clips])
    mu, sd = X.mean(0), X.std(0).clamp_min(1e-6)
    A = torch.cat([(X - mu) / sd, torch.ones(len(X), 1, dtype=X.dtype)], dim=1)
    eye = penalty * torch.eye(A.shape[1], dtype=X.dtype)
    eye[-1, -1] = 0.0  # the intercept is not shrunk
    W = torch.linalg.solve(A.T @ A + eye, A.T @ Y)
    return lambda clip: ((torch.from_numpy(clip[key][1:]).flatten(1).double() - mu) / sd) @ W[:-1] + W[-1]


def _error(predict: Callable[[dict], torch.Tensor], clips: list[dict]) -> tuple[float, float]:
    """Mean camera translation error (mm) of ``predict`` (a clip -> its translations in its first camera
    (T-1, 3)) and of a static camera over the clips' frames but the first."""
    errors, static = [], []
    for c in clips:
        _, t = relative_camera_pose(c["cam_R"].double(), c["cam_t"].double())
        with torch.no_grad():
            pred = predict(c).double()
        errors.append((pred - t[1:]).norm(dim=1))
        static.append(t[1:].norm(dim=1))
    return float(torch.cat(errors).mean() * 1000), float(torch.cat(static).mean() * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: the CPU profile)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16], help="clip lengths")
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="bench_flow_")
    base = {"data.root": str(Path(tmp.name) / "arctic_synthetic"), "data.crop_jitter": 0.0, "data.stride": 4,
            **dict(parse_override(s) for s in args.set)}
    for frames in args.frames:
        cfg = load_config(args.config, {**base, "data.seq_len": frames})
        clips = {}
        for split in ("train", "val", "test"):
            ds = build_dataset(cfg, split)
            clips[split] = [{**_flows(ds, i, cfg.data.flow_grid), "cam_R": ds[i]["cam_R"], "cam_t": ds[i]["cam_t"]}
                            for i in range(len(ds))]
        for key in ("direct", "strides", "consecutive"):
            predictors = {}
            for chained in (True, False):
                fit = fit_flow_head([{"flow": torch.from_numpy(c[key]), "cam_R": c["cam_R"], "cam_t": c["cam_t"]}
                                     for c in clips["train"]], chained=chained)
                predictors[f"{key}, {'chained' if chained else 'first frame'}"] = _reader(_head(fit), key, chained)
            if key == "strides":
                ridges = [_ridge(clips["train"], key, p) for p in (1.0, 10.0, 100.0, 1000.0, 1e4)]
                predictors["strides, first frame, linear"] = min(ridges, key=lambda r: _error(r, clips["val"])[0])
            for name, predict in predictors.items():
                val, test = _error(predict, clips["val"]), _error(predict, clips["test"])
                print(f"{frames:2d} frames  {name:<30}  val {val[0]:6.2f} mm (static {val[1]:.2f})  "
                      f"test {test[0]:6.2f} mm (static {test[1]:.2f})", flush=True)
    tmp.cleanup()


if __name__ == "__main__":
    main()
