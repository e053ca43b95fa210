"""Datasets: the ARCTIC reader, the synthetic ARCTIC-layout generator and the prepared form.

Entry points read the experiment config; everything below them takes explicit arguments:

- :func:`ensure_dataset`: make sure ``data.root`` holds a dataset, generating the synthetic one once
  (under a file lock) when it is missing and ``data.generate`` is set.
- :func:`build_dataset`: the :class:`ArcticClips` of one split, its frames read from the prepared form
  (:mod:`hawor_tune.data.build`, built on first use or ahead by ``python -m hawor_tune.data.prepare``).
- :func:`build_dataloader`: a DataLoader over it yielding the batch dicts of the project spec.
- :func:`prepare_dataset`: prepare every labelled split ahead, on every usable CPU or as Ray tasks (the
  command ``python -m hawor_tune.data.prepare``).

Modules: ``arctic`` (files, splits, labels), ``synthetic`` and ``render`` (the generated stand-in), ``frames``
(one prepared frame), ``flow``, ``crop``, ``shards`` (their files), ``build`` and ``prepare`` (building them; the command), ``clips`` (the
dataset), ``boxes`` (unlabelled splits from hand boxes), ``cache`` (decoding, letterboxes, cache keys).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from hawor_tune.atomic import atomic_replace_dir, build_once
from hawor_tune.config import ExperimentConfig, SyntheticConfig
from hawor_tune.data.arctic import (
    SPLITS,
    DatasetError,
    SequenceLabels,
    UnlabelledSplitError,
    load_sequence,
    load_sequences,
    read_split,
    split_is_labelled,
)
from hawor_tune.data.build import ensure_prepared, frame_spec
from hawor_tune.data.cache import Letterbox, read_frame
from hawor_tune.data.clips import ArcticClips
from hawor_tune.data.shards import Shards
from hawor_tune.data.synthetic import GENERATOR_VERSION, MARKER, generate
from hawor_tune.mano import HANDS, build_mano

__all__ = ["SPLITS", "ArcticClips", "DatasetError", "Letterbox", "SequenceLabels", "UnlabelledSplitError",
           "build_dataloader", "build_dataset", "ensure_dataset", "generate", "load_sequence", "load_sequences",
           "prepare_dataset", "read_frame", "read_split", "resolve_valid_rule", "split_is_labelled"]

log = logging.getLogger(__name__)


def ensure_dataset(cfg: ExperimentConfig) -> Path:
    """Return ``data.root``, generating the synthetic dataset there first when it is missing.

    Generation happens once even when many processes (Ray trials) ask at the same time: under a file lock
    next to the root, into a temporary sibling folder swapped into place when complete
    (:func:`hawor_tune.atomic.atomic_replace_dir`).

    Raises:
        DatasetError: the root has no ``raw_seqs`` and ``data.generate`` is false; the root is a non-empty
            folder that is not a dataset; or a generated dataset there does not match the config.
    """
    root = Path(cfg.data.root)
    if not (root / "raw_seqs").is_dir():
        if not cfg.data.generate:
            raise DatasetError(f"data.root {root} holds no dataset (no raw_seqs/ folder): point data.root at "
                               "ARCTIC's 'arctic_data/data' folder, or set data.generate=true to generate a "
                               "synthetic dataset there")
        build_once(root, lambda: root if (root / "raw_seqs").is_dir() else None,
                   lambda: _generate_atomically(root, cfg))
    _check_generated(root, cfg)
    return root


def _generate_atomically(root: Path, cfg: ExperimentConfig) -> None:
    if root.exists() and any(root.iterdir()):
        raise DatasetError(f"data.root {root} exists but holds no dataset (no raw_seqs/); refusing to generate "
                           "into a non-empty folder: empty it or choose another data.root")
    for stale in root.parent.glob(f".{root.name}.tmp-*"):  # left by a killed generator (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    atomic_replace_dir(root, lambda tmp: generate(tmp, cfg.data.synthetic, cfg.mano))


def _check_generated(root: Path, cfg: ExperimentConfig) -> None:
    """A generated dataset must have been made with this MANO model (its pixels show that hand), and, when
    the config asks for generation, with these settings."""
    marker = root / MARKER
    if not marker.is_file():
        return  # a real ARCTIC folder
    info = json.loads(marker.read_text())
    kind = build_mano(cfg.mano, HANDS[1]).kind
    if info.get("mano_kind") != kind:
        raise DatasetError(f"{root} was generated with the {info.get('mano_kind')} MANO model but the config "
                           f"uses the {kind} one, so its images would not match its labels; delete {root} to "
                           "regenerate it or point data.root elsewhere")
    wanted = {"generator_version": GENERATOR_VERSION, "synthetic": dataclasses.asdict(cfg.data.synthetic)}
    found = {k: info.get(k) for k in wanted}
    if isinstance(found["synthetic"], dict):  # a setting added after the set was made has its default there
        found["synthetic"] = {**dataclasses.asdict(SyntheticConfig()), **found["synthetic"]}
    if cfg.data.generate and found != wanted:
        raise DatasetError(f"{root} was generated with {found} but the config asks for {wanted}; delete {root} "
                           "to regenerate it, or point data.root elsewhere")


def build_dataset(cfg: ExperimentConfig, split: str, *, cached: bool = True) -> ArcticClips:
    """The clip dataset of one split (``data`` and ``mano`` sections), generating the data if needed.

    Args:
        cfg: experiment config.
        split: 'train', 'val' or 'test'.
        cached: read the frames' crops, camera frames and flow from the prepared form (its missing shards
            prepared first, on every usable CPU) rather than making them from the images as they are read;
            both give the same bytes.

    With ``data.train_on_val`` the training split also holds the validation sequences; ``data.splits`` names
    another splits file to read the splits from.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    d = cfg.data
    root = ensure_dataset(cfg)
    # Labels come from the hand model the annotations were fitted with, built by the same call as the
    # network's layers: one left-hand convention for both (hawor_tune.mano.FIX_LEFT_SHAPEDIRS).
    mano = [build_mano(cfg.mano, side) for side in HANDS]
    return ArcticClips(root, split, mano=mano, seq_len=d.seq_len, stride=d.stride, eval_hop=d.eval_hop,
                       frame_step=d.frame_step, frame_size=d.frame_size, crop_size=d.crop_size,
                       crop_scale=d.crop_scale, crop_jitter=d.crop_jitter, img_size=d.img_size, flow_grid=d.flow_grid,
                       min_visible_joints=d.min_visible_joints,
                       valid_rule=resolve_valid_rule(d.valid_rule, root),
                       cache_dir=d.cache_dir or None, prepared=cached,
                       extra_splits=("val",) if split == "train" and d.train_on_val else (),
                       splits_file=d.splits or None)


def prepare_dataset(cfg: ExperimentConfig, *, splits: Sequence[str] = ("train", "val", "test"),
                    workers: int | None = None, address: str | None = None,
                    on_shard: Callable[[str], None] | None = None) -> Shards:
    """Prepare every labelled sequence of ``cfg``'s ``splits`` (``data`` and ``mano``), generating the dataset
    first where the config says so. A split without labels (ARCTIC's p2 test) is skipped with a note: its
    frames are cut from hand boxes when it is predicted (docs/evaluation.md). ``workers``, ``address`` and
    ``on_shard`` as :func:`ensure_prepared`."""
    d = cfg.data
    root = ensure_dataset(cfg)
    names: list[str] = []
    for split in splits:
        if not split_is_labelled(root, split, splits_file=d.splits or None):
            log.warning("split '%s' has no labels: not prepared (predict it from hand boxes: docs/evaluation.md)", split)
            continue
        names += [n for n in read_split(root, split, splits_file=d.splits or None) if n not in names]
    mano = [build_mano(cfg.mano, side) for side in HANDS]
    return ensure_prepared(root, names, mano=mano, spec=frame_spec(d), crop_scale=d.crop_scale,
                           cache_dir=d.cache_dir or None, workers=workers, address=address, on_shard=on_shard)


def resolve_valid_rule(rule: str, root: str | os.PathLike) -> str:
    """``data.valid_rule`` for the dataset at ``root``: 'auto' is ARCTIC's own rule on real ARCTIC data (so
    that numbers compare with published protocol-p2 results) and 'visible_joints' on generated data (the
    rule its documented results used)."""
    if rule != "auto":
        return rule
    return "visible_joints" if (Path(root) / MARKER).is_file() else "arctic"


def build_dataloader(cfg: ExperimentConfig, split: str, *, shuffle: bool, seed: int = 0,
                     cached: bool = True) -> DataLoader:
    """A DataLoader of batch dicts (see the project spec) over one split.

    ``data.num_workers`` worker processes, started anew every epoch: their random state (the crop
    jitter) is then seeded from ``generator``, which the training loop re-seeds per epoch, so a resumed
    run draws the same crops as an uninterrupted one (persistent workers would keep their first seed);
    pinned memory only when
    CUDA is available; shuffling from a generator seeded with ``seed``; the last incomplete batch dropped
    for training when the split holds more than one batch.
    """
    dataset = build_dataset(cfg, split, cached=cached)
    d = cfg.data
    workers = d.num_workers
    return DataLoader(dataset, batch_size=d.batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed), num_workers=workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available(),
                      drop_last=split == "train" and len(dataset) > d.batch_size)
