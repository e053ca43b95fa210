"""Reading the prepared form: the same batches as making each frame from its image, the shards built once (also
under concurrency) beside the dataset and shared by worker processes; letterboxing and decoding images."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import run_concurrently

from hawor_tune.data import Letterbox, build_dataloader, build_dataset, read_frame
from hawor_tune.data.cache import decode_image


def _batches_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _seeded_batches(loader) -> list[dict]:
    """Every batch of a single-process loader, with torch's RNG (which draws the training crops' jitter)
    seeded first."""
    torch.manual_seed(0)
    return list(loader)


@pytest.mark.parametrize("split,shuffle", [("train", True), ("val", False), ("test", False)])
def test_prepared_and_on_the_fly_loaders_give_identical_batches(synthetic_dataset, split, shuffle):
    cfg = synthetic_dataset.config()
    prepared = _seeded_batches(build_dataloader(cfg, split, shuffle=shuffle, seed=3))
    on_the_fly = _seeded_batches(build_dataloader(cfg, split, shuffle=shuffle, seed=3, cached=False))
    assert len(prepared) == len(on_the_fly) > 0
    assert all(_batches_equal(a, b) for a, b in zip(prepared, on_the_fly))


def test_prepared_form_sits_beside_the_dataset_is_reused_and_serves_clip_settings(synthetic_dataset):
    root = synthetic_dataset.root
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    cfg = synthetic_dataset.config()
    first = build_dataset(cfg, "val").source
    assert first.folder.parent == root.parent / "cache"  # default: <root>/../cache
    (tar,) = first.tars
    mtime = tar.stat().st_mtime_ns
    again = build_dataset(cfg, "val").source
    assert again.folder == first.folder and tar.stat().st_mtime_ns == mtime
    assert again.names == build_dataset(cfg, "val").sequences
    # Clip length, stride, frame step and the validity rule are read at load time: the same shards serve them.
    clips = {"data.seq_len": 6, "data.stride": 3, "data.frame_step": 2, "data.min_visible_joints": 21}
    assert build_dataset(synthetic_dataset.config(clips), "val").source.folder == first.folder
    # What the pixels depend on makes another preparation.
    # Without jitter (the flow-head fit, evaluation) the default jitter's margin is kept: the same shards.
    assert build_dataset(synthetic_dataset.config({"data.crop_jitter": 0.0}), "val").source.folder == first.folder
    for change in ({"data.crop_size": 24}, {"data.img_size": 16}, {"data.frame_size": 40}, {"data.crop_jitter": 0.2},
                   {"data.crop_scale": 1.5}, {"data.flow_grid": 2}):
        other = build_dataset(synthetic_dataset.config(change), "val").source
        assert other.folder != first.folder, change
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing written into the dataset
    assert not list((root.parent / "cache").rglob(".*tmp*"))


def test_concurrent_builders_prepare_once(synthetic_dataset, tmp_path):
    cfg = synthetic_dataset.config({"data.cache_dir": str(tmp_path)})

    datasets, errors = run_concurrently(lambda: build_dataset(cfg, "test"))
    assert not errors and len({ds.source.folder for ds in datasets}) == 1
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [datasets[0].source.folder.name]
    on_the_fly = build_dataset(cfg, "test", cached=False)
    for ds in datasets:
        assert all(_batches_equal(ds[i], on_the_fly[i]) for i in range(len(ds)))


def test_dataset_pickles_without_pixels_and_works_in_worker_processes(synthetic_dataset):
    # Without crop jitter: it draws from each process's torch RNG, so jittered crops depend on the workers.
    cfg = synthetic_dataset.config({"data.crop_jitter": 0.0})
    ds = build_dataset(cfg, "train")
    ds[0]  # opens shard files: a pickle must not carry them
    blob = pickle.dumps(ds)
    assert len(blob) < sum(p.stat().st_size for p in ds.source.tars)  # no shard content in the pickle
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


@pytest.mark.parametrize("reduce,flags", [(2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4)])
def test_decode_image_reduced_checks_the_full_size(tmp_path, reduce, flags):
    path = tmp_path / "00001.jpg"
    cv2.imwrite(str(path), np.zeros((48, 64, 3), np.uint8))
    assert decode_image(path, 64, 48, flags, reduce).shape == (48 // reduce, 64 // reduce, 3)
    with pytest.raises(ValueError, match=r"64x48 pixels, expected 80x48"):
        decode_image(path, 80, 48, flags, reduce)


def test_read_frame_refuses_a_jpeg_cut_short(tmp_path):
    # OpenCV would decode it, greying the missing rows: a wrong frame, not an error.
    path = tmp_path / "00001.jpg"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert cv2.imread(str(path)) is not None
    with pytest.raises(ValueError, match=f"image {path} cannot be decoded .*restore it from the dataset"):
        read_frame(path, Letterbox(64, 48, 32))
