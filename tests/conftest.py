"""Shared test fixtures: a tiny synthetic ARCTIC-layout dataset, generated once per test session.

Use it from any test file::

    def test_something(synthetic_dataset):
        cfg = synthetic_dataset.config({"train.epochs": 1})
        loader = build_dataloader(cfg, "train", shuffle=True)

The dataset has 4 subjects (s01-s02 train, s03 val, s04 test) with one 40-frame sequence each (20 frames
left after ARCTIC's 10-frame skip at both ends), 64x48 frames letterboxed to 64 px, 32 px hand crops
and 32 px whole frames; ``config()`` gives
4-frame clips with stride 2 and batches of 2, and points data.root and the cache into the session's
temporary folder. ``TINY_MODEL_OVERRIDES`` (``from conftest import TINY_MODEL_OVERRIDES``) adds a model
small enough to train in tests.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from hawor_tune.config import ExperimentConfig, load_config
from hawor_tune.data import generate

TINY_DATA_OVERRIDES: dict[str, Any] = {
    "data.generate": True,
    "data.frame_size": 64,
    "data.crop_size": 32,
    "data.img_size": 32,
    "data.flow_grid": 4,
    "data.seq_len": 4,
    "data.stride": 2,
    "data.frame_step": 1,
    "data.batch_size": 2,
    "data.num_workers": 0,
    "data.min_visible_joints": 8,
    "data.synthetic.subjects": 4,
    "data.synthetic.held_out": 1,
    "data.synthetic.sequences_per_subject": 1,
    "data.synthetic.frames_per_sequence": 40,
    "data.synthetic.image_width": 64,
    "data.synthetic.image_height": 48,
    "data.synthetic.seed": 0,
    "pretrain.epochs": 0,  # tests that need the pretrained start turn it on (tests/test_pretrain.py)
}

# A model small enough for tests to train in seconds on 32 px frames: one ViT block with 16 px patches.
TINY_MODEL_OVERRIDES: dict[str, Any] = {
    "model.backbone": "vit_tiny_patch16_224",
    "model.backbone_kwargs": {"depth": 1, "patch_size": 16},
    "model.camera_backbone": "vit_tiny_patch16_224",
    "model.temporal_dim": 32,
    "model.temporal_layers": 1,
    "model.temporal_heads": 2,
    "model.head_hidden": 32,
    "model.infiller_hidden": 16,
    "model.dropout": 0.0,
    "train.device": "cpu",
}


@dataclass
class SyntheticDataset:
    """A generated dataset: its root, the generator's ground truth and matching configs.

    Attributes:
        root: the ARCTIC-layout folder (``data.root``); its prepared shards go to ``root.parent / 'cache'``.
        truth: per ``"<sid>/<seq>"`` the generator's own arrays (see :func:`hawor_tune.data.generate`).
        overrides: the dotted config overrides that describe it.
    """

    root: Path
    truth: dict[str, dict[str, Any]]
    overrides: dict[str, Any] = field(default_factory=dict)

    def config(self, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
        """An ExperimentConfig reading this dataset, with extra dotted ``overrides`` applied on top."""
        return load_config(None, {**self.overrides, **dict(overrides or {})})


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    """The tiny synthetic dataset, generated once per session into a temporary folder."""
    root = tmp_path_factory.mktemp("synthetic") / "arctic_synthetic"
    overrides = {**TINY_DATA_OVERRIDES, "data.root": str(root)}
    cfg = load_config(None, overrides)
    truth = generate(root, cfg.data.synthetic, cfg.mano)
    return SyntheticDataset(root=root, truth=truth, overrides=overrides)


# Search-space files for tests that load and map spaces without running them (tests/test_search_space.py,
# tests/test_tune_space.py): a small base config, a valid space over it.
BASE = {"data": {"seq_len": 8, "root": "data/x"}, "optim": {"lr": 1.0e-3, "warmup_epochs": 0.5},
        "train": {"epochs": 6, "device": "cpu"}}
VALID = {"base": "base.yaml", "metric": "val/mpjpe", "mode": "min", "num_samples": 4,
         "params": {"optim.lr": {"type": "loguniform", "low": 1.0e-4, "high": 1.0e-2}}}
# One parameter of every type and field kind.
EVERY_TYPE = {
    "optim.lr": {"type": "loguniform", "low": 1.0e-4, "high": 1.0e-2},
    "optim.weight_decay": {"type": "uniform", "low": 0.0, "high": 0.1},
    "optim.warmup_epochs": {"type": "quniform", "low": 0.0, "high": 2.0, "q": 0.5},
    "data.seq_len": {"type": "quniform", "low": 4, "high": 16, "q": 4},
    "model.temporal_layers": {"type": "quniform", "low": 0, "high": 3, "q": 1},
    "data.stride": {"type": "randint", "low": 1, "high": 8},
    "train.device": {"type": "choice", "values": ["cpu", "auto"]},
    "model.dropout": {"type": "choice", "values": [0, 0.5]},
}


def write_space(tmp_path: Path, snippet: str = "", drop: tuple[str, ...] = (), **top) -> Path:
    """A search-space file to check and map, not to run (its base reads no data): VALID with the snippet's
    top-level keys (YAML) and ``top`` replacing its own, ``drop`` removed."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    data = {**VALID, **(yaml.safe_load(snippet) or {}), **top}
    for key in drop:
        del data[key]
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def write_search_space(folder: Path, dataset: SyntheticDataset, *, num_samples: int = 4, epochs: int = 3,
                       **extra: Any) -> Path:
    """A search-space file over the tiny dataset and model: lr and the 2D keypoint weight, ASHA over epochs."""
    from hawor_tune.config import save_config

    folder.mkdir(parents=True, exist_ok=True)
    save_config(dataset.config({**TINY_MODEL_OVERRIDES, "train.epochs": epochs}), folder / "base.yaml")
    space = {
        "base": "base.yaml", "metric": "val/mpjpe", "mode": "min", "num_samples": num_samples,
        "max_concurrent": 2, "search": {"algorithm": "optuna", "seed": 0},
        "scheduler": {"type": "asha", "max_epochs": epochs, "grace_period": 1, "reduction_factor": 2},
        "resources": {"cpu": 1, "gpu": 0},
        "params": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
                   "loss.keypoint_2d": {"type": "uniform", "low": 0.0, "high": 1.0}},
        **extra,
    }
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


@pytest.fixture(scope="session")
def tiny_search(tmp_path_factory: pytest.TempPathFactory, synthetic_dataset: SyntheticDataset) -> Path:
    """A finished 4-trial Optuna + ASHA search on the tiny dataset (embedded Ray); its experiment folder."""
    import ray

    from hawor_tune.search import run_search
    from hawor_tune.search_space import load_search_space

    folder = tmp_path_factory.mktemp("search")
    space = load_search_space(write_search_space(folder, synthetic_dataset))
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        outcome = run_search(space, storage=folder / "results", name="tiny", verbose=0)
    finally:
        ray.shutdown()
    return outcome.experiment_dir


def run_concurrently(fn: Any, n: int = 3) -> tuple[list[Any], list[BaseException]]:
    """Call ``fn()`` from ``n`` threads at once; its results and the exceptions it raised."""
    import threading

    results: list[Any] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(fn())
        except Exception as e:  # surfaced to the caller
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


# The GPU profile (configs/arctic.yaml) at test size: its code path (HaMeR's ViT layout, HaWoR's hand modules,
# a frozen backbone, a HaMeR-format checkpoint) with every module narrow and shallow, on the tiny dataset.
GPU_PROFILE_SMALL: dict[str, Any] = {
    "model.backbone_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8},
    "model.camera_backbone": "resnet10t",
    "model.require_pretrained": True,
    "model.temporal_dim": 32,
    "model.temporal_layers": 1,
    "model.temporal_heads": 2,
    "model.head_hidden": 32,
    "model.decoder_dim": 32,
    "model.decoder_layers": 1,
    "model.motion_hidden": 16,
    "model.motion_layers": 1,
    "model.infiller_hidden": 16,
    "model.infiller_layers": 1,
    "data.num_workers": 0,
    "data.batch_size": 2,
    "train.device": "cpu",
    "train.epochs": 2,
    "train.max_train_batches": 2,
    "train.max_eval_batches": 2,
}
GPU_PROFILE_VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8, "decoder_dim": 32, "decoder_depth": 1}


def hamer_state(*, crop_size: int, depth: int, embed_dim: int, num_heads: int, patch_size: int, decoder_dim: int,
                decoder_depth: int, seed: int = 0) -> dict[str, Any]:
    """Random tensors under the names and shapes of HaMeR's checkpoint (geopavlakos/hamer: ``backbone.*`` of
    hamer/models/backbones/vit.py with its 1 + N positions and ``last_norm``; ``mano_head.*`` of
    hamer/models/heads/mano_head.py, 8 heads of 64 channels; a discriminator and MANO buffers that a
    loader must leave alone), at a size a test chooses."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    E, grid = embed_dim, (crop_size // patch_size) * (crop_size * 3 // 4 // patch_size)
    s: dict[str, Any] = {"backbone.pos_embed": r(1, grid + 1, E), "backbone.patch_embed.proj.weight": r(E, 3, patch_size, patch_size),
                         "backbone.patch_embed.proj.bias": r(E)}
    for i in range(depth):
        b = f"backbone.blocks.{i}."
        s.update({b + "norm1.weight": 1 + r(E), b + "norm1.bias": r(E), b + "attn.qkv.weight": r(3 * E, E),
                  b + "attn.qkv.bias": r(3 * E), b + "attn.proj.weight": r(E, E), b + "attn.proj.bias": r(E),
                  b + "norm2.weight": 1 + r(E), b + "norm2.bias": r(E), b + "mlp.fc1.weight": r(4 * E, E),
                  b + "mlp.fc1.bias": r(4 * E), b + "mlp.fc2.weight": r(E, 4 * E), b + "mlp.fc2.bias": r(E)})
    s.update({"backbone.last_norm.weight": 1 + r(E), "backbone.last_norm.bias": r(E)})
    D, inner = decoder_dim, 8 * 64
    h = "mano_head."
    s.update({h + "init_hand_pose": r(1, 96, scale=1.0), h + "init_betas": r(1, 10), h + "init_cam": torch.tensor([[9.0, 0.1, 0.2]]),
              h + "transformer.to_token_embedding.weight": r(D, 1), h + "transformer.to_token_embedding.bias": r(D),
              h + "transformer.pos_embedding": r(1, 1, D, scale=1.0)})
    for i in range(decoder_depth):
        layer = f"{h}transformer.transformer.layers.{i}."
        for j in range(3):
            s.update({layer + f"{j}.norm.weight": 1 + r(D), layer + f"{j}.norm.bias": r(D)})
        s.update({layer + "0.fn.to_qkv.weight": r(3 * inner, D), layer + "0.fn.to_out.0.weight": r(D, inner),
                  layer + "0.fn.to_out.0.bias": r(D), layer + "1.fn.to_kv.weight": r(2 * inner, E),
                  layer + "1.fn.to_q.weight": r(inner, D), layer + "1.fn.to_out.0.weight": r(D, inner),
                  layer + "1.fn.to_out.0.bias": r(D), layer + "2.fn.net.0.weight": r(D, D), layer + "2.fn.net.0.bias": r(D),
                  layer + "2.fn.net.3.weight": r(D, D), layer + "2.fn.net.3.bias": r(D)})
    s.update({h + "decpose.weight": r(96, D), h + "decpose.bias": r(96), h + "decshape.weight": r(10, D),
              h + "decshape.bias": r(10), h + "deccam.weight": r(3, D), h + "deccam.bias": r(3),
              "discriminator.D_conv1.weight": r(32, 9, 1, 1), "mano.shapedirs": r(778, 3, 10), "initialized": torch.tensor(True)})
    return s


def hawor_infiller_shapes(*, dim: int = 384, layers: int = 8, ff_dim: int = 2048, window: int = 120,
                          io_dim: int = 218) -> dict[str, tuple[int, ...]]:
    """The names and shapes of HaWoR's infiller.pt state dict, written from its layer definitions
    (ThunderVVV/HaWoR infiller/lib/model/network.py, ``TransformerModel`` with ``masked_attention_stage``:
    the sinusoidal ``pe`` buffer, input_layer over the frame and its observed flag, per layer a bias-free
    ``MultiHeadedAttention`` and a ``FeedForward``, a final LayerNorm, torch's post-norm
    ``TransformerEncoder`` and the decoder). The defaults are the released sizes."""
    s: dict[str, tuple[int, ...]] = {"pos_embedding.pe": (window, 1, dim), "input_layer.weight": (dim, io_dim + 1),
                                     "input_layer.bias": (dim,)}
    for i in range(layers):
        a, f = f"att_layers.{i}.", f"pff_layers.{i}."
        s.update({a + "q_linear.weight": (dim, dim), a + "k_linear.weight": (dim, dim), a + "v_linear.weight": (dim, dim),
                  a + "out_linear.weight": (dim, dim), a + "layer_norm.weight": (dim,), a + "layer_norm.bias": (dim,),
                  f + "layer_norm.weight": (dim,), f + "layer_norm.bias": (dim,), f + "network.0.weight": (ff_dim, dim),
                  f + "network.0.bias": (ff_dim,), f + "network.3.weight": (dim, ff_dim), f + "network.3.bias": (dim,)})
    s.update({"layer_norm.weight": (dim,), "layer_norm.bias": (dim,)})
    for i in range(layers):
        e = f"transformer_encoder.layers.{i}."
        s.update({e + "self_attn.in_proj_weight": (3 * dim, dim), e + "self_attn.in_proj_bias": (3 * dim,),
                  e + "self_attn.out_proj.weight": (dim, dim), e + "self_attn.out_proj.bias": (dim,),
                  e + "linear1.weight": (ff_dim, dim), e + "linear1.bias": (ff_dim,), e + "linear2.weight": (dim, ff_dim),
                  e + "linear2.bias": (dim,), e + "norm1.weight": (dim,), e + "norm1.bias": (dim,),
                  e + "norm2.weight": (dim,), e + "norm2.bias": (dim,)})
    s.update({"decoder.weight": (io_dim, dim), "decoder.bias": (io_dim,)})
    return s


def hawor_infiller_state(*, dim: int, layers: int, ff_dim: int = 2048, seed: int = 0) -> dict[str, Any]:
    """Random tensors under HaWoR's infiller names and shapes (:func:`hawor_infiller_shapes`), norms near 1."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {k: (1.0 if k.endswith("norm.weight") or ".norm1.weight" in k or ".norm2.weight" in k else 0.0)
            + torch.randn(*shape, generator=g) * (0.3 if k == "pos_embedding.pe" else 0.1)
            for k, shape in hawor_infiller_shapes(dim=dim, layers=layers, ff_dim=ff_dim).items()}


def write_hawor_infiller(path: Path, state_dict: dict[str, Any]) -> Path:
    """Save ``state_dict`` as HaWoR's infiller.pt holds it: under ``transformer_encoder_state_dict``, which
    ``hawor_infiller`` (scripts/scripts_test_video/hawor_video.py) loads."""
    import torch

    torch.save({"transformer_encoder_state_dict": state_dict}, path)
    return path


def write_lightning_checkpoint(path: Path, state_dict: dict[str, Any]) -> Path:
    """Save ``state_dict`` as PyTorch Lightning does, with ``hyper_parameters`` holding a pickled yacs-style
    ``CfgNode`` from a module that is then uninstalled (as yacs is where hawor-tune runs)."""
    import sys
    import types

    import torch

    module = types.ModuleType("fake_yacs.config")

    class CfgNode(dict):
        def __reduce__(self) -> tuple:
            return (CfgNode, (), dict(self.__dict__), None, iter(self.items()))

    CfgNode.__module__ = module.__name__
    CfgNode.__qualname__ = "CfgNode"
    module.CfgNode = CfgNode
    sys.modules["fake_yacs"], sys.modules["fake_yacs.config"] = types.ModuleType("fake_yacs"), module
    try:
        cfg = CfgNode({"MODEL": CfgNode({"IMAGE_SIZE": 256, "BBOX_SHAPE": [192, 256]})})
        torch.save({"epoch": 10, "global_step": 1000, "pytorch-lightning_version": "2.1.0",
                    "state_dict": state_dict, "hyper_parameters": {"cfg": cfg}, "loops": {}, "callbacks": {},
                    "optimizer_states": [], "lr_schedulers": []}, path)
    finally:
        del sys.modules["fake_yacs"], sys.modules["fake_yacs.config"]
    return path


def write_box_files(dataset: SyntheticDataset, folder: Path, split: str, *, intrinsics: bool = False) -> dict[str, Any]:
    """Hand boxes in the documented box-file format (docs/evaluation.md) for every sequence of ``split``, made
    from the generator's ground truth as a perfect detector would: for every image of ARCTIC's window, each
    valid hand's box is the extent of its visible 2D keypoints in original pixels (score 1), null otherwise.
    Which hands are valid and which joints visible come from the labelled dataset, read before any label is
    removed. Returns what was written, per ``"<sid>/<seq>"``."""
    import json

    import numpy as np

    from hawor_tune.data import build_dataset

    cfg = dataset.config()
    ds = build_dataset(cfg, split, cached=False)
    misc = json.loads((dataset.root / "meta" / "misc.json").read_text())
    frames: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {name: {} for name in ds.sequences}
    for i in range(len(ds)):
        item = ds[i]
        name = ds.sequences[int(item["seq_index"])]
        for t, f in enumerate(item["frame_index"].tolist()):
            frames[name][f] = (item["hand_valid"][t].numpy(), item["joints_visible"][t].numpy())
    written = {}
    for name, per_frame in frames.items():
        truth, ioi = dataset.truth[name], misc[name.split("/")[0]]["ioi_offset"]
        order = sorted(per_frame)
        entry: dict[str, Any] = {"image_index": [f + ioi for f in order], "left": [], "right": []}
        for f in order:
            valid, visible = per_frame[f]
            for h, hand in enumerate(("left", "right")):
                uv = truth["joints2d"][f, h][visible[h]]  # (J, 2) original pixels
                entry[hand].append([*map(float, uv.min(0)), *map(float, uv.max(0)), 1.0] if valid[h] else None)
        if intrinsics:
            entry["intrinsics"] = np.asarray(truth["K"], dtype=float).tolist()
        path = folder / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(entry))
        written[name] = entry
    return written


# ---- MANO files in the official format (tests/test_mano.py, the GPU profile's end-to-end test) -------------

MANO_PARENTS = [4294967295, 0, 1, 2, 0, 4, 5, 0, 7, 8, 0, 10, 11, 0, 13, 14]
FAKE_MODULES = ("chumpy", "chumpy.ch", "chumpy.reordering", "scipy", "scipy.sparse", "scipy.sparse.csc")


def random_official_mano(seed: int, num_vertices: int = 778) -> dict[str, np.ndarray]:
    """A MANO-shaped model with random content (778 vertices so the official tip ids are valid)."""
    rng = np.random.default_rng(seed)
    V = num_vertices
    regressor = np.zeros((16, V))
    for j in range(16):  # like MANO's: each joint from a few vertices, rows summing to 1
        ids = rng.choice(V, 12, replace=False)
        w = rng.uniform(0.1, 1.0, 12)
        regressor[j, ids] = w / w.sum()
    weights = rng.uniform(0, 1, (V, 16)) ** 4
    return {
        "v_template": rng.normal(0, 0.05, (V, 3)),
        "shapedirs": rng.normal(0, 0.002, (V, 3, 10)),
        "posedirs": rng.normal(0, 0.002, (V, 3, 135)),
        "J_regressor": regressor,
        "weights": weights / weights.sum(1, keepdims=True),
        "kintree_table": np.array([MANO_PARENTS, list(range(16))], dtype=np.int64),
        "f": rng.integers(0, V, (1538, 3)),
        "hands_components": np.linalg.qr(rng.normal(size=(45, 45)))[0],
        "hands_mean": rng.normal(0, 0.2, 45),
    }


@contextlib.contextmanager
def _fake_chumpy_and_scipy() -> Iterator[dict[str, type]]:
    """Stand-in modules chumpy.ch, chumpy.reordering and scipy.sparse.csc, present only inside the block."""
    assert not any(name in sys.modules for name in FAKE_MODULES), "the test needs chumpy/scipy absent"
    modules = {name: types.ModuleType(name) for name in FAKE_MODULES}

    class Ch:  # chumpy pickles its __dict__ minus two weak dicts; 'x' holds the array
        def __init__(self, x: np.ndarray) -> None:
            self.x, self._dirty_vars, self._itr, self._depends_on_deps = x, set(), None, {}
            self._make_dense = self._make_sparse = False

    class Select:  # chumpy.reordering.Select: a.r.ravel()[idxs].reshape(preferred_shape)
        def __init__(self, a: Ch, idxs: np.ndarray, preferred_shape: tuple[int, ...]) -> None:
            self.a, self.idxs, self.preferred_shape, self._dirty_vars = a, idxs, preferred_shape, set()

    class csc_matrix:  # noqa: N801 - scipy's name
        def __init__(self, dense: np.ndarray) -> None:
            cols = [np.nonzero(dense[:, c])[0] for c in range(dense.shape[1])]
            self.indices = np.concatenate(cols).astype(np.int32)
            self.data = np.concatenate([dense[rows, c] for c, rows in enumerate(cols)])
            self.indptr = np.concatenate([[0], np.cumsum([len(r) for r in cols])]).astype(np.int32)
            self._shape, self.maxprint = dense.shape, 50

    for cls, module in ((Ch, "chumpy.ch"), (Select, "chumpy.reordering"), (csc_matrix, "scipy.sparse.csc")):
        cls.__module__, cls.__qualname__ = module, cls.__name__
        setattr(modules[module], cls.__name__, cls)
    sys.modules.update(modules)
    try:
        yield {"Ch": Ch, "Select": Select, "csc_matrix": csc_matrix}
    finally:
        for name in FAKE_MODULES:
            sys.modules.pop(name, None)


def write_official_mano_pickle(path: Path, params: dict[str, np.ndarray], protocol: int = 2) -> None:
    """``params`` pickled as the official MANO_*.pkl are: chumpy arrays, a scipy sparse J_regressor, Python 2
    protocol, written while stand-ins of chumpy and scipy exist (hawor-tune must read it without them)."""
    with _fake_chumpy_and_scipy() as fake:
        flat = fake["Ch"](np.ascontiguousarray(params["v_template"][:, ::-1]).ravel())
        order = np.arange(flat.x.size).reshape(-1, 3)[:, ::-1].ravel()  # undo the column flip above
        data = {
            "v_template": fake["Select"](flat, order, params["v_template"].shape),
            "shapedirs": fake["Ch"](params["shapedirs"]),
            "posedirs": params["posedirs"],
            "J_regressor": fake["csc_matrix"](params["J_regressor"]),
            "weights": fake["Ch"](params["weights"]),
            "kintree_table": params["kintree_table"],
            "f": params["f"].astype(np.uint32),
            "hands_components": params["hands_components"],
            "hands_mean": params["hands_mean"],
            "hands_coeffs": np.zeros((3, 45)),
            "J": params["J_regressor"] @ params["v_template"],
            "bs_style": "lbs",
            "bs_type": "lrotmin",
        }
        path.write_bytes(pickle.dumps(data, protocol=protocol))


