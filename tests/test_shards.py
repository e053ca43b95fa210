"""The prepared form: tar shards a tar reader streams, built in parallel (processes or Ray tasks), announced and
checked for space first, interrupted and resumed, prepared again where damaged, and trained and evaluated from."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import TINY_DATA_OVERRIDES, TINY_MODEL_OVERRIDES

from hawor_tune.atomic import DiskFullError
from hawor_tune.config import load_config
from hawor_tune.data import build_dataset, generate, prepare_dataset
from hawor_tune.data import prepare as prepare_command
from hawor_tune.data.frames import MEMBERS, FrameSpec, SequenceFrames, cut_crops, prepare_rows, stored_map
from hawor_tune.data.shards import read_index

REPO = Path(__file__).resolve().parents[1]
# 3 subjects x 3 sequences of 100 frames (80 after ARCTIC's skip) at 64x48: nine shards, enough that a build
# has several still to do when it is interrupted.
SHARD_DATA = {**TINY_DATA_OVERRIDES, "data.synthetic.subjects": 3, "data.synthetic.sequences_per_subject": 3,
              "data.synthetic.frames_per_sequence": 100}
SEQUENCES = 9


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards") / "arctic_synthetic"
    cfg = load_config(None, {**SHARD_DATA, "data.root": str(root)})
    generate(root, cfg.data.synthetic, cfg.mano, workers=1)
    return root


def _config(root: Path, cache: Path, **overrides):
    return load_config(None, {**SHARD_DATA, "data.root": str(root), "data.cache_dir": str(cache), **overrides})


def _tars(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.tar"))}


def _write_config(path: Path, root: Path, cache: Path) -> Path:
    """SHARD_DATA as a YAML config file for the command line."""
    nested: dict = {}
    for key, value in {**SHARD_DATA, "data.root": str(root), "data.cache_dir": str(cache)}.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(nested))
    return path


def _done(folder: Path, names: list[str]) -> list[str]:
    return [name for name in names if read_index(folder, name) is not None]


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """The shards one process prepares, for the parallel, resumed and Ray builds to equal."""
    shards = prepare_dataset(_config(dataset, tmp_path_factory.mktemp("one")), workers=1)
    assert len(shards.names) == SEQUENCES
    return shards


def test_shards_are_tar_files_that_a_tar_reader_streams(reference):
    spec = json.loads((reference.folder / "spec.json").read_text())
    frame = FrameSpec(**spec["frame"])
    for name, tar_path in zip(reference.names, reference.tars, strict=True):
        index = read_index(reference.folder, name)
        with tarfile.open(tar_path) as tar:
            members = tar.getmembers()
            # WebDataset's grouping: a frame's members are adjacent and share the key before the first dot.
            assert len(members) == len(MEMBERS) * len(index.image_index)
            for row, image_index in enumerate(index.image_index):
                group = [m.name.split(".", 1) for m in members[row * len(MEMBERS):(row + 1) * len(MEMBERS)]]
                assert group == [[f"{name}/{image_index:05d}", member] for member in MEMBERS]
            # The index's offsets are where tar put each member's data.
            np.testing.assert_array_equal(index.offsets.reshape(-1), [m.offset_data for m in members])
            np.testing.assert_array_equal(index.sizes.reshape(-1), [m.size for m in members])
            left, _, cam, flow, meta = (tar.extractfile(m).read() for m in members[:len(MEMBERS)])
        left = cv2.imdecode(np.frombuffer(left, np.uint8), cv2.IMREAD_COLOR)
        cam = cv2.imdecode(np.frombuffer(cam, np.uint8), cv2.IMREAD_COLOR)
        assert left.shape == (frame.stored_size,) * 2 + (3,) and cam.shape == (frame.img_size,) * 2 + (3,)
        assert not np.load(io.BytesIO(flow)).any()  # the first frame's: no frame before it
        meta = json.loads(meta)
        assert meta["sequence"] == name and meta["image"].endswith(f"{index.image_index[0]:05d}.jpg")
        box = meta["left"]["box"]
        np.testing.assert_allclose(meta["left"]["map"], stored_map(np.array(box[:2]), box[2], frame)[:2])


def test_a_parallel_build_writes_the_same_bytes(dataset, reference, tmp_path):
    shards = prepare_dataset(_config(dataset, tmp_path), workers=2)  # two spawned processes
    assert _tars(shards.folder) == _tars(reference.folder)
    for name in reference.names:
        a, b = read_index(reference.folder, name), read_index(shards.folder, name)
        for key in ("image_index", "offsets", "sizes", "boxes"):
            np.testing.assert_array_equal(getattr(a, key), getattr(b, key))


def test_an_interrupted_build_resumes_with_the_sequences_it_had_not_finished(dataset, reference, tmp_path, caplog):
    cfg = _config(dataset, tmp_path)
    finished: list[str] = []

    def interrupt_after_two(name: str) -> None:
        finished.append(name)
        if len(finished) == 2:
            raise KeyboardInterrupt  # as Ctrl-C in the middle of the build

    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(cfg, workers=2, on_shard=interrupt_after_two)
    (folder,) = tmp_path.glob("prepared-*")
    done = _done(folder, reference.names)
    assert set(finished) <= set(done) and 2 <= len(done) < SEQUENCES  # and those already in flight
    again: list[str] = []
    caplog.clear()
    shards = prepare_dataset(cfg, workers=2, on_shard=again.append)
    assert sorted(again) == sorted(set(reference.names) - set(done))  # only the rest
    assert f"{len(done)} of {SEQUENCES} prepared already" in caplog.text
    assert _tars(shards.folder) == _tars(reference.folder)
    assert not list(tmp_path.rglob(".*tmp*"))  # no temporary file left behind


def test_the_command_announces_is_stopped_by_ctrl_c_and_resumes_then_trains_and_evaluates(dataset, reference,
                                                                                             tmp_path):
    from hawor_tune.evaluation import evaluate
    from hawor_tune.train import fit

    cfg = _config(dataset, tmp_path / "cache", **TINY_MODEL_OVERRIDES, **{"train.epochs": 1,
                  "train.out_dir": str(tmp_path / "run"), "train.max_train_batches": 2,
                  "train.max_eval_batches": 4})
    config = _write_config(tmp_path / "config.yaml", dataset, tmp_path / "cache")
    command = [sys.executable, "-m", "hawor_tune.data.prepare", "--config", str(config), "--workers", "2"]
    # Ctrl-C reaches the whole foreground process group: the command and its worker processes.
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "cache").glob("prepared-*/*/*.idx.npz")) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err.splitlines()[-1] and "run the same command again" in err
    assert "about" in err and "free there" in err  # the estimate came first
    (folder,) = (tmp_path / "cache").glob("prepared-*")
    done = _done(folder, reference.names)
    assert 1 <= len(done) < SEQUENCES

    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(done)} of {SEQUENCES} prepared already" in resumed.stderr
    assert resumed.stdout.startswith(f"prepared: {folder}")
    assert _tars(folder) == _tars(reference.folder)

    # Training and evaluation read these shards; nothing is prepared again.
    mtimes = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    result = fit(cfg)
    assert np.isfinite(result.history[-1]["val/mpjpe"])
    val = evaluate(result.model, "val", cfg, max_batches=4)
    assert val["mpjpe"] == pytest.approx(result.history[-1]["val/mpjpe"], rel=1e-6)
    assert build_dataset(cfg, "train").source.folder == folder
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == mtimes


def test_a_script_without_a_main_guard_prepares_in_its_own_process(dataset, reference, tmp_path):
    # A spawned worker runs such a script again from the top: here it would prepare again and wait for the
    # lock its parent holds. The build stays in the script's process instead.
    script = tmp_path / "prepare_here.py"
    script.write_text("from hawor_tune.config import load_config\nfrom hawor_tune.data import prepare_dataset\n"
                      f"cfg = load_config({str(_write_config(tmp_path / 'c.yaml', dataset, tmp_path / 'cache'))!r})\n"
                      "print(prepare_dataset(cfg, workers=2).folder)\n")
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert _tars(Path(run.stdout.strip())) == _tars(reference.folder)


def test_ray_tasks_prepare_the_same_shards(dataset, reference, tmp_path):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        shards = prepare_dataset(_config(dataset, tmp_path), address="auto")  # the Ray this process joined
    finally:
        ray.shutdown()
    assert _tars(shards.folder) == _tars(reference.folder)


def test_free_space_is_checked_before_anything_is_written(dataset, tmp_path, monkeypatch, capsys):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("hawor_tune.data.build.shutil.disk_usage",
                        lambda path: usage._replace(free=10_000))  # a nearly full disk
    cfg = _config(dataset, tmp_path / "cache")
    with pytest.raises(DiskFullError, match=r"needs about .* but only 10.0 KB are free there; free space, or set "
                                            r"data.cache_dir"):
        prepare_dataset(cfg)
    assert not list((tmp_path / "cache").rglob("*.tar"))
    config = _write_config(tmp_path / "config.yaml", dataset, tmp_path / "cache")
    assert prepare_command.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: preparing") and "free there" in err[-1]


@pytest.mark.parametrize("damage", ["cut tar", "cut index", "lost tar", "images changed", "other settings"])
def test_a_damaged_or_stale_shard_alone_is_prepared_again(dataset, reference, tmp_path, damage, caplog):
    cfg = _config(dataset, tmp_path)
    shards = prepare_dataset(cfg, workers=1)
    name = shards.names[4]
    tar, index = shards.tars[4], shards.tars[4].with_name(shards.tars[4].stem + ".idx.npz")
    others = {p: p.stat().st_mtime_ns for p in shards.tars if p != tar}
    if damage in ("cut tar", "cut index"):
        path = tar if damage == "cut tar" else index
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "lost tar":
        tar.unlink()
    elif damage == "images changed":
        sid, seq = name.split("/")
        os.utime(dataset / "images" / sid / seq / "0", ns=(time.time_ns(), time.time_ns()))
    else:
        meta = read_index(shards.folder, name)
        with np.load(index) as z:
            arrays = dict(z)
        arrays["meta"] = np.array(json.dumps({**meta.meta, "spec_key": "another"}))
        with open(index, "wb") as f:
            np.savez(f, **arrays)
    again: list[str] = []
    rebuilt = prepare_dataset(cfg, workers=1, on_shard=again.append)
    assert again == [name]
    assert {p: p.stat().st_mtime_ns for p in rebuilt.tars if p != tar} == others
    assert _tars(rebuilt.folder) == _tars(reference.folder)


# ---- Frames -------------------------------------------------------------------------------------------------

def _blob_image(path: Path, centre: tuple[float, float], size: tuple[int, int] = (1600, 1200)) -> None:
    """A grey image with a bright Gaussian blob at a sub-pixel ``centre`` (pixel centres at integers)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    blob = 40 + 200 * np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * 30.0**2))
    cv2.imwrite(str(path), np.repeat(blob[..., None], 3, axis=2).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 98])


def _centroid(image: np.ndarray) -> np.ndarray:
    weight = np.clip(image[..., 1].astype(np.float64) - 60, 0, None)
    y, x = np.mgrid[0:image.shape[0], 0:image.shape[1]]
    return np.array([(weight * x).sum(), (weight * y).sum()]) / weight.sum()


@pytest.mark.parametrize("side,reduce", [(150.0, 1), (300.0, 2), (700.0, 4)])
def test_crops_from_a_reduced_decode_stay_in_place(tmp_path, side, reduce):
    # A large hand box needs fewer pixels than the image has: the frame is decoded at 1/2 or 1/4 in the JPEG's
    # DCT, and the stored crop must still put each image point where its map says.
    path = tmp_path / "00010.jpg"
    blob = (801.3, 597.8)
    _blob_image(path, blob)
    spec = FrameSpec(crop_size=128, margin=16, img_size=64, frame_size=256, flow_grid=4)
    box = np.array([[blob[0] + 20.0, blob[1] - 10.0, side]] * 2)  # both hands: the same box
    seq = SequenceFrames(name="s01/blob", paths=(path,), image_index=np.array([10]), width=1600, height=1200,
                         K=np.array([[800.0, 0, 799.5], [0, 800.0, 599.5], [0, 0, 1]]), boxes=box[None])
    ((_, members),) = prepare_rows(seq, spec)
    assert json.loads(members["json"])["reduce"] == reduce
    stored = cv2.imdecode(np.frombuffer(members["left.jpg"], np.uint8), cv2.IMREAD_COLOR)
    A = stored_map(box[0, :2], side, spec)
    expected = A[:2, :2] @ np.array(blob) + A[:2, 2]
    np.testing.assert_allclose(_centroid(stored), expected, atol=0.1)


def test_evaluation_crops_are_a_window_of_the_stored_crop_and_jitter_stays_in_the_margin():
    spec = FrameSpec(crop_size=24, margin=4, img_size=16, frame_size=32, flow_grid=0)  # margin 1.5 x 0.1 x 24
    rng = np.random.default_rng(0)
    stored = [[rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(2)]]
    boxes = np.array([[[100.3, 50.7, 40.0], [200.1, 80.9, 55.5]]])  # (T, 2, 3) image pixels
    crops, maps = cut_crops(stored, boxes, boxes[..., :2], boxes[..., 2], spec)
    m, C = spec.margin, spec.crop_size
    for h in range(2):
        window = cv2.cvtColor(stored[0][h][m:m + C, m:m + C], cv2.COLOR_BGR2RGB).transpose(2, 0, 1)
        np.testing.assert_array_equal(crops[0, h], window[:, :, ::-1] if h == 0 else window)  # left mirrored
    # The farthest boxes the jitter (0.1) draws still lie inside the stored crop.
    for dx, dy, scale in [(0.1, 0.1, 1.1), (-0.1, 0.1, 1.1), (0.1, -0.1, 1.1), (-0.1, -0.1, 1.1)]:
        side = boxes[..., 2] * scale
        centre = boxes[..., :2] + np.array([dx, dy]) * boxes[..., 2:]
        _, maps = cut_crops(stored, boxes, centre, side, spec)
        for h in range(2):
            to_stored = stored_map(boxes[0, h, :2], boxes[0, h, 2], spec) @ np.linalg.inv(maps[0, h])
            corners = np.array([[-0.5, -0.5, 1], [C - 0.5, C - 0.5, 1]]) @ to_stored.T
            assert corners[:, :2].min() >= -0.5 - 1e-9 and corners[:, :2].max() <= spec.stored_size - 0.5 + 1e-9
