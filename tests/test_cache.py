"""The frame cache: identical to decoding JPEGs, built once (also under concurrency), shared read-only."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import run_concurrently

from hawor_tune.data import Letterbox, build_dataloader, build_dataset, read_frame


def _batches_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _seeded_batches(loader) -> list[dict]:
    """Every batch of a single-process loader, with torch's RNG (which draws the training crops' jitter)
    seeded first."""
    torch.manual_seed(0)
    return list(loader)


@pytest.mark.parametrize("split,shuffle", [("train", True), ("val", False), ("test", False)])
def test_cached_and_uncached_loaders_give_identical_batches(synthetic_dataset, split, shuffle):
    cfg = synthetic_dataset.config()
    cached = _seeded_batches(build_dataloader(cfg, split, shuffle=shuffle, seed=3))
    uncached = _seeded_batches(build_dataloader(cfg, split, shuffle=shuffle, seed=3, cached=False))
    assert len(cached) == len(uncached) > 0
    assert all(_batches_equal(a, b) for a, b in zip(cached, uncached))


def test_cache_sits_beside_the_dataset_is_reused_and_read_only(synthetic_dataset):
    root = synthetic_dataset.root
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    cfg = synthetic_dataset.config()
    first = build_dataset(cfg, "val").cache
    assert first.folder.parent == root.parent / "cache"  # default: <root>/../cache
    mtime = (first.folder / "frames.npy").stat().st_mtime_ns
    again = build_dataset(cfg, "val").cache
    assert again.folder == first.folder and (again.folder / "frames.npy").stat().st_mtime_ns == mtime
    assert not again.frames.flags.writeable
    assert again.frames.shape == (20, 3, 64, 64) and again.names == build_dataset(cfg, "val").sequences
    # Crops and the whole-frame input are cut from the cached frames: only frame_size makes another cache.
    inputs = build_dataset(synthetic_dataset.config({"data.img_size": 16, "data.crop_size": 24}), "val").cache
    assert inputs.folder == first.folder
    other = build_dataset(synthetic_dataset.config({"data.frame_size": 40}), "val").cache
    assert other.folder != first.folder and other.frames.shape == (20, 3, 40, 40)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing written into the dataset
    assert not list((root.parent / "cache").glob(".*tmp*"))


def test_concurrent_builders_build_one_cache(synthetic_dataset, tmp_path):
    cfg = synthetic_dataset.config({"data.cache_dir": str(tmp_path)})

    datasets, errors = run_concurrently(lambda: build_dataset(cfg, "test"))
    assert not errors and len({ds.cache.folder for ds in datasets}) == 1
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [datasets[0].cache.folder.name]
    uncached = build_dataset(cfg, "test", cached=False)
    for ds in datasets:
        assert all(_batches_equal(ds[i], uncached[i]) for i in range(len(ds)))


def test_dataset_pickles_without_pixels_and_works_in_worker_processes(synthetic_dataset):
    # Without crop jitter: it draws from each process's torch RNG, so jittered crops depend on the workers.
    cfg = synthetic_dataset.config({"data.crop_jitter": 0.0})
    ds = build_dataset(cfg, "train")
    blob = pickle.dumps(ds)
    assert len(blob) < ds.cache.frames.nbytes  # the mapped frames are not copied into the pickle
    clone = pickle.loads(blob)
    assert _batches_equal(clone[3], ds[3])
    single = list(build_dataloader(cfg, "train", shuffle=True, seed=1))
    workers = build_dataloader(synthetic_dataset.config({"data.crop_jitter": 0.0, "data.num_workers": 2}), "train",
                               shuffle=True, seed=1)
    # Workers start anew each epoch, seeded from the loader's generator, which the training loop re-seeds
    # per epoch: a resumed run draws the same jittered crops as an uninterrupted one.
    assert not workers.persistent_workers
    assert all(_batches_equal(a, b) for a, b in zip(single, workers, strict=True))
    jittered = build_dataloader(synthetic_dataset.config({"data.num_workers": 2}), "train", shuffle=True, seed=1)
    first = list(jittered)
    jittered.generator.manual_seed(1)
    assert all(_batches_equal(a, b) for a, b in zip(first, jittered, strict=True))


def test_loader_shuffles_by_seed_and_drops_the_last_train_batch_only(synthetic_dataset):
    cfg = synthetic_dataset.config({"data.batch_size": 4})
    order = lambda seed: torch.cat([b["frame_index"][:, 0] * 100 + b["seq_index"]  # noqa: E731
                                    for b in build_dataloader(cfg, "train", shuffle=True, seed=seed)])
    assert torch.equal(order(0), order(0)) and not torch.equal(order(0), order(1))
    train = build_dataloader(cfg, "train", shuffle=True)
    assert train.drop_last and len(train) == 18 // 4  # 18 clips: the partial batch is dropped
    assert not build_dataloader(cfg, "val", shuffle=False).drop_last  # 5 clips, all evaluated
    big = build_dataloader(synthetic_dataset.config({"data.batch_size": 32}), "train", shuffle=True)
    assert not big.drop_last and len(big) == 1  # a single batch is never dropped
    assert train.pin_memory == torch.cuda.is_available()


@pytest.mark.parametrize("width,height,size", [(64, 48, 32), (48, 64, 32), (50, 30, 40), (40, 40, 96)])
def test_letterbox_keeps_aspect_pads_and_moves_K_with_the_pixels(width, height, size):
    box = Letterbox(width, height, size)
    # A small bright disc at a sub-pixel position (u, v): after letterboxing, its centroid must land on the
    # principal point of the transformed K, whose principal point was (u, v).
    u, v = 0.37 * width + 0.3, 0.61 * height - 0.2
    image = np.zeros((height, width, 3), np.uint8)
    cv2.circle(image, (round(u * 256), round(v * 256)), 4 * 256, (255, 255, 255), -1, cv2.LINE_AA, 8)
    out = box.apply(image)  # (3, S, S) RGB
    assert out.shape == (3, size, size) and out.dtype == np.uint8
    scale = size / max(width, height)
    w, h = round(width * scale), round(height * scale)
    pad_x, pad_y = (size - w) // 2, (size - h) // 2
    content = np.zeros((size, size), bool)
    content[pad_y:pad_y + h, pad_x:pad_x + w] = True
    assert not out[:, ~content].any()  # black padding outside the scaled image
    weight = out[0].astype(np.float64)
    ys, xs = np.mgrid[0:size, 0:size]
    centroid = np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()
    K = np.array([[1.0, 0.0, u], [0.0, 1.0, v], [0.0, 0.0, 1.0]])  # projects (0, 0, 1) onto the disc
    K2 = box.transform_K(K)
    np.testing.assert_allclose(centroid, K2[:2, 2], atol=0.1)
    np.testing.assert_allclose(np.diag(K2)[:2], [w / width, h / height])


def test_read_frame_names_unreadable_and_wrong_sized_files(tmp_path):
    bad = tmp_path / "00001.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(ValueError, match=str(bad)):
        read_frame(bad, Letterbox(64, 48, 32))
    good = tmp_path / "00002.jpg"
    cv2.imwrite(str(good), np.zeros((30, 40, 3), np.uint8))
    with pytest.raises(ValueError, match=r"40x30 pixels, expected 64x48"):
        read_frame(good, Letterbox(64, 48, 32))
    assert not Path(tmp_path / "missing.jpg").exists()
    with pytest.raises(ValueError, match="does not exist"):
        read_frame(tmp_path / "missing.jpg", Letterbox(64, 48, 32))


def test_read_frame_refuses_a_jpeg_cut_short(tmp_path):
    # OpenCV would decode it, greying the missing rows: a wrong frame, not an error.
    path = tmp_path / "00001.jpg"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert cv2.imread(str(path)) is not None
    with pytest.raises(ValueError, match=f"image {path} cannot be decoded .*restore it from the dataset"):
        read_frame(path, Letterbox(64, 48, 32))


@pytest.mark.parametrize("damage", ["truncate frames", "truncate index", "empty frames"])
def test_a_damaged_frame_cache_is_rebuilt(synthetic_dataset, tmp_path, damage, caplog):
    cfg = synthetic_dataset.config({"data.cache_dir": str(tmp_path)})
    built = build_dataset(cfg, "test")
    expected = np.array(built.cache.frames)
    folder = built.cache.folder
    name = "index.json" if damage == "truncate index" else "frames.npy"
    size = 0 if damage == "empty frames" else (folder / name).stat().st_size // 2
    with open(folder / name, "r+b") as f:
        f.truncate(size)
    rebuilt = build_dataset(cfg, "test")
    assert rebuilt.cache.folder == folder
    np.testing.assert_array_equal(rebuilt.cache.frames, expected)
    assert any("rebuilding a damaged frame cache" in r.message and str(folder) in r.message for r in caplog.records)
