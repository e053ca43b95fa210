"""The prepared form at ARCTIC's scale: bytes per frame, frames per second per core, the loader's crops per second,
measured on generated data in ARCTIC's layout at its egocentric image size and extrapolated to protocol p2.

    python benchmarks/bench_prepare.py                          # generates 4 subjects x 3 sequences x 80 frames
    python benchmarks/bench_prepare.py --data /tmp/arctic2800   # re-use (or keep) the generated set there
    python benchmarks/bench_prepare.py --config configs/arctic.yaml --set data.root=/data/arctic/arctic_data/data

The data settings are the GPU profile's (``configs/arctic.yaml``: 256 px crops with the jitter's margin, the
camera branch's 128 px frame, flow on the 512 px frame, 16-frame clips, batches of 8, 8 loader workers). The
image size comes from the dataset's ``meta/misc.json``; generated frames are 2800 x 2000 like ARCTIC's.

- **Preparing.** The shards of every sequence, first in this process alone (frames per CPU-second: one core's
  rate, the labels excluded), then on every usable CPU through ``prepare_dataset`` (the command's own path,
  wall time).
- **Bytes.** The shards' size per frame. Generated frames are smoother than photographs and their JPEG crops
  smaller, so crops are also cut at the same size from a photograph (matplotlib's ``grace_hopper.jpg``, at its
  own resolution) and encoded as the shards encode them: the bytes a photographic frame would take.
- **Loader.** Batches of the training split through ``build_dataloader``, in the training process (crops per
  CPU-second: one core's rate) and with every usable CPU as workers (wall time); the GPU profile's 8 workers on
  8 free cores would give 8 times one core's rate.
- **Extrapolation.** ARCTIC's p2 egocentric splits, about 184k training and 23k validation frames: size on
  disk and preparation time on 32 cores; the loader's rate against twice what the GPU step consumes
  (``python benchmarks/bench_gpu_plan.py``: 0.174 s for 256 crops on an H100, 1471 crops/s).

Rates per core are counted in CPU-seconds (``getrusage``), which other programs on the machine inflate far less
than wall time; the load average is printed before and after each phase all the same.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from hawor_tune.config import load_config, parse_override
from hawor_tune.data import build_dataloader, ensure_dataset, prepare_dataset, read_split
from hawor_tune.data.arctic import MISC_FILE, _read_json, _subject_meta
from hawor_tune.data.build import frame_spec, prepared_folder, prepared_spec, window_frames
from hawor_tune.data.frames import JPEG_QUALITY
from hawor_tune.data.shards import write_shard
from hawor_tune.mano import HANDS, build_mano

P2_FRAMES = {"train": 184_000, "val": 23_000}  # ARCTIC's p2 egocentric splits, after its 10-frame skips
GPU_CROPS_PER_S = 256 / 0.174  # the GPU profile's H100 step (benchmarks/bench_gpu_plan.py)
GOALS = {"size_gb": 25.0, "minutes_on_32": 30.0, "loader_x": 2.0}
PHOTO = Path(cv2.__file__).parents[1] / "matplotlib" / "mpl-data" / "sample_data" / "grace_hopper.jpg"


def _cpu() -> float:
    """CPU-seconds (user + system) of this process and its finished children: what a phase cost in cores,
    which other load on the machine inflates far less than it does wall time."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def _load() -> str:
    return f"load {os.getloadavg()[0]:.2f}"


def _photo_crop_bytes(side: int, quality: int) -> float | None:
    """Mean JPEG bytes of ``side`` px crops of a photograph at its own resolution (None without the photo)."""
    image = cv2.imread(str(PHOTO))
    if image is None or min(image.shape[:2]) < side:
        return None
    h, w = image.shape[:2]
    sizes = []
    for y in np.linspace(0, h - side, 3).astype(int):
        for x in np.linspace(0, w - side, 3).astype(int):
            ok, data = cv2.imencode(".jpg", image[y:y + side, x:x + side], [cv2.IMWRITE_JPEG_QUALITY, quality])
            sizes.append(len(data))
    return float(np.mean(sizes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/arctic.yaml", help="YAML config (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    parser.add_argument("--data", help="folder for the generated dataset (kept; default: a temporary folder)")
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--sequences", type=int, default=3, help="sequences per subject")
    parser.add_argument("--frames", type=int, default=80, help="annotated frames per sequence (20 are skipped)")
    parser.add_argument("--batches", type=int, default=12, help="loader batches to time (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="timings of the loader; the fastest is kept")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--generate-only", action="store_true", help="generate the dataset (--data) and stop: "
                        "make it while the machine is busy, time on a quiet one")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="bench_prepare_")
    root = Path(args.data or Path(tmp.name) / "arctic") / "arctic_data" / "data"
    overrides = {"data.root": str(root), "data.generate": True, "data.cache_dir": str(Path(tmp.name) / "cache"),
                 "mano.model_dir": "", "model.pretrained_path": "", "model.require_pretrained": False,
                 "data.synthetic.subjects": args.subjects, "data.synthetic.held_out": 1,
                 "data.synthetic.sequences_per_subject": args.sequences,
                 "data.synthetic.frames_per_sequence": args.frames, "data.synthetic.image_width": 2800,
                 "data.synthetic.image_height": 2000, **dict(parse_override(s) for s in args.set)}
    cfg = load_config(args.config, overrides)
    d = cfg.data
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    print(f"cpus {cpus}; crops {d.crop_size} px (jitter {d.crop_jitter}), camera frame {d.img_size} px, flow on "
          f"{d.frame_size} px at grid {d.flow_grid}; clips {d.seq_len} x batch {d.batch_size}; JPEG {JPEG_QUALITY}")

    t0 = time.perf_counter()
    ensure_dataset(cfg)
    names = [n for split in ("train", "val", "test") for n in read_split(root, split)]
    misc = _read_json(root / MISC_FILE)
    (width, height), _ = _subject_meta(root, misc, names[0].split("/")[0])
    print(f"dataset: {len(names)} sequences at {width}x{height} (meta/misc.json) in {root} "
          f"({time.perf_counter() - t0:.0f} s)")
    if args.generate_only:
        return

    # One core: the shards written in this process, the labels computed beforehand.
    spec, mano = frame_spec(d), [build_mano(cfg.mano, side) for side in HANDS]
    t0 = time.perf_counter()
    jobs = window_frames(root, names, mano=mano, spec=spec, crop_scale=d.crop_scale, misc=misc)
    labels_s = time.perf_counter() - t0
    frames = sum(len(j.paths) for j in jobs)
    print(f"labels and boxes of {frames} frames: {labels_s:.2f} s in one process")
    one = Path(tmp.name) / "one_core"
    print(f"one process ({_load()}) ...", flush=True)
    wall, cpu = time.perf_counter(), _cpu()
    for job in jobs:
        write_shard(one, job, spec, spec_key="bench", stamp={})
    one_wall, one_s = time.perf_counter() - wall, _cpu() - cpu
    print(f"  {frames} frames: {frames / one_s:.1f} frames per CPU-second ({one_s:.1f} CPU-s; wall "
          f"{one_wall:.1f} s, {frames / one_wall:.1f} frames/s) ({_load()})")
    shutil.rmtree(one)

    # Every core, as the command prepares them (labels, probe and announcement included).
    print(f"{cpus} processes ({_load()}) ...", flush=True)
    t0 = time.perf_counter()
    shards = prepare_dataset(cfg, workers=cpus)
    all_s = time.perf_counter() - t0
    folder = prepared_folder(d.cache_dir, root, prepared_spec(root, spec, crop_scale=d.crop_scale, mano=mano))
    assert shards.folder == folder
    on_disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    per_frame = on_disk / frames
    print(f"  {frames} frames in {all_s:.1f} s: {frames / all_s:.1f} frames/s on {cpus} processes ({_load()})")

    # Bytes: the shards', and a photograph's crops encoded alike.
    members = shards.sizes.mean(axis=0)  # mean bytes of left, right, cam, flow, json
    photo = _photo_crop_bytes(spec.stored_size, spec.quality)
    photo_frame = per_frame - members[0] - members[1] + 2 * photo if photo else None
    print(f"bytes per frame {per_frame / 1e3:.1f} KB (crops {members[0] / 1e3:.1f} + {members[1] / 1e3:.1f} KB, "
          f"camera frame {members[2] / 1e3:.1f} KB, flow {members[3] / 1e3:.1f} KB, json {members[4] / 1e3:.2f} KB, "
          f"tar headers and index the rest)")
    if photo:
        print(f"  a photograph's {spec.stored_size} px crop: {photo / 1e3:.1f} KB -> {photo_frame / 1e3:.1f} KB a frame")

    # The loader on the training split: in this process (crops per CPU-second), then with worker processes.
    rates, walls = {}, {}
    for workers in (0, cpus):
        lcfg = load_config(args.config, {**overrides, "data.num_workers": workers})
        loader = build_dataloader(lcfg, "train", shuffle=True, seed=0)
        it = iter(loader)
        next(it)  # the first batch starts the workers
        samples = []
        for _ in range(args.repeats):  # the fastest repeat is the one other programs disturbed least
            print(f"loader, {workers} workers ({_load()}) ...", flush=True)
            wall, cpu, n, crops = time.perf_counter(), _cpu(), 0, 0
            while n < args.batches:
                try:
                    batch = next(it)
                except StopIteration:
                    it = iter(loader)
                    continue
                n += 1
                crops += batch["crops"].shape[0] * batch["crops"].shape[1] * 2
            samples.append((crops / (time.perf_counter() - wall), crops / (_cpu() - cpu)))
            print(f"  {samples[-1][0]:.0f} crops/s wall" + ("" if workers else f", {samples[-1][1]:.0f} crops per "
                  "CPU-second") + f" with {workers} workers ({_load()})")
        walls[workers] = max(w for w, _ in samples)
        rates[workers] = max(c for _, c in samples)  # with workers: the main process's share only
        del loader, it

    per_core = rates[0]  # crops per CPU-second of the one process doing all the work
    eight = 8 * per_core
    need = GOALS["loader_x"] * GPU_CROPS_PER_S
    p2 = sum(P2_FRAMES.values())
    size_gb = p2 * per_frame / 1e9
    photo_gb = p2 * photo_frame / 1e9 if photo_frame else None
    # The labels are computed in the command's own process first, then the frames on 32 processes.
    minutes = (p2 * labels_s / frames + p2 / (frames / one_s) / 32) / 60
    print("\n| measured | value | p2 (184k + 23k frames) | goal |\n|---|---|---|---|")
    print(f"| bytes per frame | {per_frame / 1e3:.1f} KB (photograph crops: "
          f"{photo_frame / 1e3:.1f} KB) | {size_gb:.1f} GB ({photo_gb:.1f} GB) | <= {GOALS['size_gb']:.0f} GB |")
    print(f"| frames/s per core | {frames / one_s:.1f} ({frames / all_s:.1f} wall on {cpus} processes) | "
          f"{minutes:.1f} min on 32 cores (labels {p2 * labels_s / frames / 60:.1f} min of it) | "
          f"<= {GOALS['minutes_on_32']:.0f} min |")
    print(f"| loader crops/s per core | {per_core:.0f} ({walls[cpus]:.0f} wall with {cpus} workers) | {eight:.0f} with 8 "
          f"workers | >= {need:.0f} (2 x {GPU_CROPS_PER_S:.0f}) |")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "cpus": cpus, "frames": frames, "image_size": [width, height], "bytes_per_frame": per_frame,
            "photo_bytes_per_frame": photo_frame, "members": members.tolist(), "one_core_fps": frames / one_s,
            "all_cores_fps": frames / all_s, "one_core_wall_fps": frames / one_wall,
            "labels_s_per_frame": labels_s / frames, "loader_crops_per_cpu_s": rates[0],
            "loader_wall": {str(k): v for k, v in walls.items()},
            "p2_gb": size_gb, "p2_photo_gb": photo_gb, "p2_minutes_32": minutes, "loader_8_workers": eight,
            "loader_needed": need}, indent=1))
    if args.data is None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
