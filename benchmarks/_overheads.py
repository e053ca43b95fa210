"""What the search service itself costs, as ratios measured side by side (``bench_search.py --overheads``).

Every run trains the CPU profile's base configuration (``configs/tiny.yaml``: the default point of
``search_spaces/lr_seq.yaml``) on one torch thread, from the cached data and pretrained start:

- in this process: the loader alone against the training step (batches per second, the data share of a step),
  the step's FLOPs (``torch.utils.flop_counter.FlopCounterMode``) against this machine's measured matmul
  FLOP/s in the precision the step computes in (``train.precision``), and a ``torch.profiler`` top three of
  a step's time;
- ``fit()`` bare in a child process, 4 epochs, against the same configuration as a one-trial search
  (``run_search.py``), 4 epochs: the median wall time of epochs 2-4 between consecutive epoch ends
  (checkpoint included in both; the median, as one epoch's time varies by a few per cent from run to run),
  and the start-up from ``run_search.py``'s start to the first trial's first training step;
- the Tune overhead once more, **paired**: a one-trial search of 6 epochs with a bare ``fit()`` of 5 epochs
  started beside it when the trial's first epoch ends, one core each, so that both train at the same time
  and the machine's drift between runs minutes apart falls on both alike: the trial's epochs 3-6
  against the bare run's 2-5 (medians). Both are slower than alone (they share the memory bus), as are the
  two concurrent trials below;
- a two-trial search, 2 trials at once on 1 CPU each, against one trial, both with ``EPOCHS`` epochs per
  trial: epochs per hour from each trial's median epoch time; the share of a core each trial, the driver and
  Ray's other processes got while both trials ran (what bounds the concurrency and the paired overhead on 2
  cores), read without the page maps (a USS read holds the trial's memory map lock, see :class:`_ProcessWatch`);
- a second two-trial search of 2 epochs: the peak memory of the driver and of each trial with two at once
  (RSS, and USS: the pages only that process holds, so the page cache of the shared prepared shards is not in it),
  against the one-trial search's;
- the same concurrency of two bare ``fit()``s without Ray: what the machine itself gives two 1-thread
  trainings, which share its L3 and memory bus.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "configs" / "tiny.yaml"


EPOCHS = 4  # of the bare fit() and the one-trial search
PAIRED_EPOCHS = 6  # of the paired one-trial search; its bare fit() runs one epoch fewer

# --smoke: every run cut to a couple of batches, to check the plumbing in a minute (its figures mean nothing).
SMOKE = {"train.max_train_batches": 2, "train.max_eval_batches": 1}


def _space_file(folder: Path, *, num_samples: int, max_concurrent: int, epochs: int, extra: dict) -> Path:
    """A search over the training seed only (nothing that changes a trial's cost), fifo, 1 CPU per trial;
    every trial otherwise the base configuration."""
    import yaml

    space = {"base": str(BASE), "overrides": {"train.epochs": epochs, **extra}, "metric": "val/mpjpe", "mode": "min",
             "num_samples": num_samples, "max_concurrent": max_concurrent, "search": {"algorithm": "optuna", "seed": 0},
             "scheduler": {"type": "fifo"}, "resources": {"cpu": 1, "gpu": 0},
             "params": {"train.seed": {"type": "choice", "values": [0, 1, 2, 3]}}}
    path = folder / f"space-{num_samples}x{max_concurrent}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


class _ProcessWatch:
    """Watches a process tree: ``root`` and its descendants, among them a search's driver (``driver``), Ray's
    daemons and workers, and a bare ``fit()`` when ``root`` is this benchmark.

    Every second it reads each process's RSS and CPU time (``/proc/<pid>/statm`` and ``stat``: microseconds);
    every 5 s it refreshes the tree and, with ``uss``, reads the USS of the driver and of each Ray trial worker
    (``ray::ImplicitFunc``/``ray::train_trial``). It keeps the driver's and each trial's peaks, and the CPU
    shares while the most trainings ran at once (:meth:`cpu_shares`).

    The USS walks the process's whole page map (psutil reads ``/proc/<pid>/smaps_rollup``) with the trial's
    memory map lock held, so it costs the watched trials CPU. Hence it is read only every few seconds, and the
    two-trial search whose epochs give the concurrency runs with ``uss=False``; a second one gives the memory
    peaks."""

    TICK_S = 1.0
    TREE_EVERY = 5  # ticks: the tree and the USS every 5 s

    def __init__(self, root: int, driver: int, *, uss: bool) -> None:
        self.root, self.driver_pid, self.uss = root, driver, uss
        self.driver = {"rss": 0, "uss": 0}
        self.trials: dict[int, dict[str, int]] = {}
        self.ticks: list[tuple[float, float, dict[int, tuple[str, float]]]] = []  # (time, own CPU, {pid: (kind, CPU s)})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _ProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _kind(self, p: Any) -> str:
        if p.pid == self.driver_pid:
            return "driver"
        if p.pid == self.root:
            return "bench"
        cmd = p.cmdline()
        if cmd and cmd[0].startswith(("ray::ImplicitFunc", "ray::train_trial")):
            return "trial"
        return "bare" if "from hawor_tune.train import fit" in " ".join(cmd) else "ray"

    def _run(self) -> None:
        import psutil

        root = psutil.Process(self.root)
        procs: dict[int, tuple[Any, str]] = {}
        tick = 0
        while not self._stop.wait(self.TICK_S):
            full = tick % self.TREE_EVERY == 0
            tick += 1
            if full:
                try:
                    for p in [root, *root.children(recursive=True)]:
                        # A worker takes its ray:: title after it starts: a "ray" process may become a trial.
                        if procs.get(p.pid, (p, "ray"))[1] == "ray":
                            procs[p.pid] = (p, self._kind(p))
                except psutil.Error:
                    pass
            cpu: dict[int, tuple[str, float]] = {}
            for pid, (p, kind) in list(procs.items()):
                try:
                    times = p.cpu_times()
                    rss = p.memory_info().rss
                    uss = p.memory_full_info().uss if self.uss and full and kind in ("driver", "trial") else 0
                except (psutil.Error, OSError):
                    del procs[pid]
                    continue
                cpu[pid] = (kind, times.user + times.system)
                if kind in ("driver", "trial"):
                    peak = self.driver if kind == "driver" else self.trials.setdefault(pid, {"rss": 0, "uss": 0})
                    peak["rss"] = max(peak["rss"], rss)
                    peak["uss"] = max(peak["uss"], uss)
            self.ticks.append((time.time(), time.thread_time(), cpu))

    def cpu_shares(self) -> dict[str, Any] | None:
        """Share of one core each trial and bare ``fit()`` got, and the driver, Ray's other processes together,
        this benchmark's process and its watch, from the first to the last tick at which the most trainings
        (trials and bare runs) were alive; None when none was seen."""
        counts = [sum(kind in ("trial", "bare") for kind, _ in cpu.values()) for _, _, cpu in self.ticks]
        most = max(counts, default=0)
        if most == 0:
            return None
        first = counts.index(most)
        last = len(counts) - 1 - counts[::-1].index(most)
        (t0, own0, cpu0), (t1, own1, cpu1) = self.ticks[first], self.ticks[last]
        if t1 - t0 < 1.0:
            return None
        span = t1 - t0
        used = [(kind, (busy - cpu0[pid][1] if pid in cpu0 else busy) / span) for pid, (kind, busy) in cpu1.items()]
        shares: dict[str, Any] = {"window_s": span, "watch": (own1 - own0) / span}
        for kind in ("trial", "bare"):
            shares[kind] = sorted((share for k, share in used if k == kind), reverse=True)
        for kind in ("driver", "ray", "bench"):
            shares[kind] = sum(share for k, share in used if k == kind)
        return shares


def measure_startup(out: Path, runs: int) -> dict[str, Any]:
    """Start-up alone, ``runs`` times: one-trial searches of one epoch of a couple of batches (``SMOKE``), each
    from ``run_search.py``'s start to its trial's first training step, as in :func:`measure_overheads`.
    One run varies by seconds with what else the machine does; the median of several is the figure."""
    from hawor_tune.config import load_config
    from hawor_tune.search import prepare_data

    out.mkdir(parents=True, exist_ok=True)
    prepare_data(load_config(str(BASE)))
    times, milestones = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        space = _space_file(work, num_samples=1, max_concurrent=1, epochs=1, extra=SMOKE)
        for k in range(runs):
            run = _search(space, work / "r", f"startup{k}", watch="off")
            times.append(_startup_s(run))
            milestones.append(run["milestones"])
            print(f"run {k + 1}/{runs}: start-up {times[-1]:.1f} s (output lines at "
                  + ", ".join(f"{key} {v} s" for key, v in run["milestones"].items()) + ")", flush=True)
    figures = {"startup_s": times, "median_s": float(np.median(times)), "milestones_s": milestones,
               "load_average": os.getloadavg()[0]}
    (out / "startup.json").write_text(json.dumps(figures, indent=1))
    print(f"start-up over {runs} runs: median {figures['median_s']:.1f} s, {min(times):.1f}-{max(times):.1f} s "
          f"(goal <= 15 s); wrote startup.json in {out}")
    return figures


def _startup_s(run: dict[str, Any]) -> float:
    """From a one-trial :func:`_search`'s start to its trial's first training step. The first step starts when
    epoch 1's clock starts: its row's appearance less its time/epoch_s (the report and the parquet write after
    it count against the service)."""
    (first,) = (r for r in run["rows"] if int(r["epoch"]) == 1)
    return run["seen"][(str(first["trial_id"]), 1)] - float(first["time/epoch_s"]) - run["start"]


def _search(space: Path, storage: Path, name: str, on_first_epoch: Callable[[], None] | None = None,
            watch: str = "memory") -> dict[str, Any]:
    """Run ``run_search.py`` on ``space``; the times each epoch row first appeared in epochs.parquet (its
    modification time polled every 0.1 s, the file read when it changed), every row, the start time and what
    ``watch`` asks of a :class:`_ProcessWatch`: ``memory``, the search's memory peaks and CPU shares;
    ``cpu``, the CPU shares of this whole benchmark's process tree (a bare ``fit()`` beside the search
    included), reading no page map, as that holds the watched process's memory map lock; ``off``, nothing.
    ``on_first_epoch`` is called once, when the first epoch row appears."""
    from hawor_tune.results import read_rows

    parquet = storage / name / "epochs.parquet"
    seen: dict[tuple[str, int], float] = {}
    t_start = time.time()
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_search.py"), "--space", str(space), "--storage",
                             str(storage), "--name", name, "--dashboard-port", "8267"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []  # (seconds since start, line) of the search's output

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.time() - t_start, line.rstrip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    watcher = (_ProcessWatch(proc.pid if watch == "memory" else os.getpid(), proc.pid, uss=watch == "memory")
               if watch != "off" else None)
    read_mtime = None
    with watcher or contextlib.nullcontext():
        while proc.poll() is None:
            time.sleep(0.1)
            try:
                mtime = parquet.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if mtime != read_mtime:
                try:
                    rows = read_rows(parquet)
                except Exception:  # noqa: BLE001 - a file being replaced; read it next time
                    continue
                read_mtime = mtime
                for r in rows:
                    seen.setdefault((str(r["trial_id"]), int(r["epoch"])), time.time())
                if seen and on_first_epoch is not None:
                    on_first_epoch()
                    on_first_epoch = None
    reader.join(timeout=5)
    if proc.returncode != 0:
        raise RuntimeError("run_search.py failed:\n" + "\n".join(text for _, text in lines[-40:]))
    rows = read_rows(parquet)
    milestones = {key: next((round(t, 1) for t, text in lines if key in text), None)
                  for key in ("data ready", "pretrained start ready", "dashboard", "RUNNING")}
    return {"start": t_start, "seen": seen, "rows": rows, "milestones": milestones,
            "driver": watcher.driver if watcher else None, "trials": list(watcher.trials.values()) if watcher else [],
            "cpu": watcher.cpu_shares() if watcher else None}


_BARE_FIT = """
import json, sys, time, torch
torch.set_num_threads(1)
from hawor_tune.config import load_config
from hawor_tune.train import fit, prepare_run
cfg = prepare_run(load_config(sys.argv[1], json.loads(sys.argv[2])))
ends = []
fit(cfg, on_epoch=lambda record, ckpt: ends.append((time.time(), record["time/epoch_s"])))
print("ENDS " + json.dumps(ends))
"""


def _start_bare_fit(out_dir: Path, epochs: int, extra: dict) -> tuple[subprocess.Popen, Path]:
    """``fit()`` of the base configuration in a child process on one thread (see :func:`_bare_ends`)."""
    overrides = {"train.out_dir": str(out_dir), "train.threads": 1, "train.epochs": epochs, "train.keep_checkpoints": 1,
                 **extra}
    out_dir.mkdir(parents=True)
    # Its output goes to files: a pipe nobody reads while it trains would fill and stall it.
    with open(out_dir / "stdout.txt", "w") as stdout, open(out_dir / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", _BARE_FIT, str(BASE), json.dumps(overrides)], cwd=ROOT,
                                stdout=stdout, stderr=stderr, text=True)
    return proc, out_dir


def _bare_ends(started: tuple[subprocess.Popen, Path]) -> list[tuple[float, float]]:
    """Each epoch's end (wall clock, after its checkpoint) and its ``time/epoch_s``, once the run exits."""
    proc, out_dir = started
    proc.wait()
    lines = [ln for ln in (out_dir / "stdout.txt").read_text().splitlines() if ln.startswith("ENDS ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bare fit failed:\n{(out_dir / 'stderr.txt').read_text()[-3000:]}")
    return [tuple(e) for e in json.loads(lines[-1][5:])]


def _trial_epoch_times(rows: list[dict[str, Any]]) -> list[list[float]]:
    """Each trial's ``time/epoch_s`` values, one list per trial, from a search's epoch rows."""
    per_trial: dict[str, list[float]] = {}
    for r in rows:
        per_trial.setdefault(str(r["trial_id"]), []).append(float(r["time/epoch_s"]))
    return list(per_trial.values())


def _epochs_per_hour(runs: list[list[float]]) -> float:
    """Epochs per hour of trainings that ran at the same time: each one's from its median epoch time, added."""
    return sum(3600 / float(np.median(times)) for times in runs)


def _epoch_gaps(ends: list[float], epochs: range) -> float:
    """Median wall time of ``epochs`` (1-based), each the gap between its end and the previous epoch's."""
    return float(np.median([ends[e - 1] - ends[e - 2] for e in epochs]))


def _in_process(steps: int) -> dict[str, Any]:
    """Loader against step, FLOPs against matmul peak, and the profile's top three, on one thread."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from hawor_tune.config import load_config
    from hawor_tune.data import build_dataloader
    from hawor_tune.model import build_model
    from hawor_tune.runtime import autocast_dtype, resolved_precision, select_device
    from hawor_tune.train import build_optimizer, prepare_run, train_one_epoch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    cfg = prepare_run(load_config(str(BASE), {"train.threads": 1}))
    device = select_device("cpu")
    loader = build_dataloader(cfg, "train", shuffle=True, seed=0)

    t0 = time.perf_counter()
    n = 0
    for _ in loader:
        n += 1
        if n == steps * 2:
            break
    loader_rate = n / (time.perf_counter() - t0)

    model = build_model(cfg, pretrained=True).to(device)
    optimizer = build_optimizer(model, cfg)
    train_one_epoch(model, loader, optimizer, None, cfg, device, max_batches=2)  # warm-up

    from bench_train import TimedLoader  # beside this file, as bench_search.py puts it on sys.path

    timed = TimedLoader(loader)
    t0 = time.perf_counter()
    train_one_epoch(model, timed, optimizer, None, cfg, device, max_batches=steps)
    step_s = (time.perf_counter() - t0) / steps

    with FlopCounterMode(display=False) as counter:
        train_one_epoch(model, loader, optimizer, None, cfg, device, max_batches=2)
    step_flops = counter.get_total_flops() / 2

    # The peak to compare with: this machine's matmul in the precision the step computes in.
    precision = resolved_precision("cpu", cfg.train.precision)
    dtype = autocast_dtype(device, cfg.train.precision) or torch.float32
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    torch.mm(a, b)
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    matmul_flops = 2 * 1024 ** 3 * reps / (time.perf_counter() - t0)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_one_epoch(model, loader, optimizer, None, cfg, device, max_batches=5)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    top = [(e.key, e.self_cpu_time_total / total) for e in events[:3]]
    return {"loader_batches_per_s": loader_rate, "step_s": step_s, "steps_per_s": 1 / step_s,
            "loader_vs_step": loader_rate * step_s, "data_share": timed.wait_s / (step_s * steps),
            "step_gflop": step_flops / 1e9, "achieved_gflops": step_flops / step_s / 1e9,
            "matmul_gflops": matmul_flops / 1e9, "flop_efficiency": step_flops / step_s / matmul_flops,
            "profile_top3": top, "batch": f"{cfg.data.batch_size} clips x {cfg.data.seq_len} frames",
            "precision": precision}


def measure_overheads(out: Path, *, smoke: bool = False) -> dict[str, Any]:
    """Every figure of the module docstring; prints them as a table and writes ``overheads.json`` to ``out``."""
    from hawor_tune.config import load_config
    from hawor_tune.search import prepare_data

    out.mkdir(parents=True, exist_ok=True)
    prepare_data(load_config(str(BASE)))  # the data and the pretrained start are ready before any timing
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("in-process: loader, step, FLOPs, profile ...", flush=True)
        extra = SMOKE if smoke else {}
        figures["step"] = _in_process(steps=3 if smoke else 20)
        print(f"bare fit(), {EPOCHS} epochs ...", flush=True)
        bare = _bare_ends(_start_bare_fit(work / "bare", epochs=EPOCHS, extra=extra))
        print(f"one-trial search, {EPOCHS} epochs ...", flush=True)
        one = _search(_space_file(work, num_samples=1, max_concurrent=1, epochs=EPOCHS, extra=extra), work / "r", "one")
        print(f"paired: a one-trial search of {PAIRED_EPOCHS} epochs and a bare fit() beside it ...", flush=True)
        beside: list[tuple[subprocess.Popen, Path]] = []
        paired = _search(_space_file(work, num_samples=1, max_concurrent=1, epochs=PAIRED_EPOCHS, extra=extra),
                         work / "r", "paired", watch="cpu", on_first_epoch=lambda: beside.append(
                             _start_bare_fit(work / "beside", epochs=PAIRED_EPOCHS - 1, extra=extra)))
        paired_bare = _bare_ends(beside[0])
        print(f"two trials at once, {EPOCHS} epochs each ...", flush=True)
        two = _search(_space_file(work, num_samples=2, max_concurrent=2, epochs=EPOCHS, extra=extra), work / "r", "two",
                      watch="cpu")
        print("two trials at once again, 2 epochs each, their memory watched ...", flush=True)
        two_memory = _search(_space_file(work, num_samples=2, max_concurrent=2, epochs=2, extra=extra), work / "r",
                             "two-memory")
        print(f"two bare fit()s at once, no Ray, {EPOCHS} epochs each ...", flush=True)
        pair = [_start_bare_fit(work / f"pair{k}", epochs=EPOCHS, extra=extra) for k in range(2)]
        pair_ends = [_bare_ends(started) for started in pair]

    rows = {int(r["epoch"]): r for r in one["rows"]}
    (trial_id,) = {tid for tid, _ in one["seen"]}
    seen = [one["seen"][(trial_id, e)] for e in range(1, EPOCHS + 1)]
    later = range(1, EPOCHS)  # 0-based indices of epochs 2..EPOCHS
    figures["tune_epoch_wall_s"] = _epoch_gaps(seen, range(2, EPOCHS + 1))
    figures["bare_epoch_wall_s"] = _epoch_gaps([end for end, _ in bare], range(2, EPOCHS + 1))
    figures["tune_overhead"] = figures["tune_epoch_wall_s"] / figures["bare_epoch_wall_s"] - 1
    (paired_id,) = {tid for tid, _ in paired["seen"]}
    paired_seen = [paired["seen"][(paired_id, e)] for e in range(1, PAIRED_EPOCHS + 1)]
    figures["paired_tune_epoch_wall_s"] = _epoch_gaps(paired_seen, range(3, PAIRED_EPOCHS + 1))
    figures["paired_bare_epoch_wall_s"] = _epoch_gaps([end for end, _ in paired_bare], range(2, PAIRED_EPOCHS))
    figures["paired_tune_overhead"] = figures["paired_tune_epoch_wall_s"] / figures["paired_bare_epoch_wall_s"] - 1
    figures["tune_epoch_inside_fit_s"] = float(np.median([rows[k + 1]["time/epoch_s"] for k in later]))
    figures["bare_epoch_inside_fit_s"] = float(np.median([bare[k][1] for k in later]))
    figures["startup_s"] = _startup_s(one)
    figures["startup_milestones_s"] = one["milestones"]
    one_rate = _epochs_per_hour(_trial_epoch_times(one["rows"]))
    two_rate = _epochs_per_hour(_trial_epoch_times(two["rows"]))
    figures.update(epochs_per_hour_1=one_rate, epochs_per_hour_2=two_rate, concurrency_speedup=two_rate / one_rate)
    bare_rate = _epochs_per_hour([[inside for _, inside in bare]])
    pair_rate = _epochs_per_hour([[inside for _, inside in ends] for ends in pair_ends])
    figures.update(bare_epochs_per_hour_1=bare_rate, bare_epochs_per_hour_2=pair_rate,
                   bare_concurrency_speedup=pair_rate / bare_rate)
    mib = 1 / 2 ** 20
    figures["memory_mib"] = {
        "driver_1": {k: v * mib for k, v in one["driver"].items()},
        "driver_2": {k: v * mib for k, v in two_memory["driver"].items()},
        "trial_1": [{k: v * mib for k, v in t.items()} for t in one["trials"]],
        "trial_2": [{k: v * mib for k, v in t.items()} for t in two_memory["trials"]]}
    figures["cpu_share_2"] = two["cpu"]
    figures["cpu_share_paired"] = paired["cpu"]
    figures["smoke"] = smoke
    (out / ("overheads-smoke.json" if smoke else "overheads.json")).write_text(json.dumps(figures, indent=1))
    _print(figures)
    print(f"\nwrote overheads{'-smoke' if smoke else ''}.json in {out} (load average now {os.getloadavg()[0]:.2f})")
    return figures


def _cpu_row(c: dict[str, Any] | None, parts: tuple[str, ...]) -> str:
    """The shares of ``parts`` (keys of :meth:`_ProcessWatch.cpu_shares`), ' / '-separated, in % of a core."""
    if c is None:
        return "n/a (no window with the trainings alive)"

    def cell(part: str) -> str:
        share = c[part]
        return " + ".join(f"{x:.1%}" for x in share) if isinstance(share, list) else f"{share:.1%}"

    return " / ".join(cell(part) for part in parts) + f" of a core (over {c['window_s']:.0f} s)"


def _print(f: dict[str, Any]) -> None:
    s = f["step"]
    m = f["memory_mib"]
    rows = [
        (f"Tune overhead: trial / bare fit() epoch wall - 1 (median, epochs 2-{EPOCHS})",
         f"{f['tune_overhead']:+.1%} ({f['tune_epoch_wall_s']:.1f} s vs {f['bare_epoch_wall_s']:.1f} s; inside "
         f"fit {f['tune_epoch_inside_fit_s']:.1f} vs {f['bare_epoch_inside_fit_s']:.1f} s)", "<= 3 %"),
        (f"Tune overhead, paired: trial epochs 3-{PAIRED_EPOCHS} / bare fit() epochs 2-{PAIRED_EPOCHS - 1} "
         "at the same time, wall - 1 (medians)",
         f"{f['paired_tune_overhead']:+.1%} ({f['paired_tune_epoch_wall_s']:.1f} s vs "
         f"{f['paired_bare_epoch_wall_s']:.1f} s)", "<= 3 %"),
        ("Start-up: run_search.py start -> first trial's first step", f"{f['startup_s']:.1f} s (output lines at "
         + ", ".join(f"{k} {v} s" for k, v in f["startup_milestones_s"].items()) + ")", "<= 15 s"),
        ("Concurrency: 2 trials at once vs 1, epochs/hour",
         f"{f['concurrency_speedup']:.2f}x ({f['epochs_per_hour_2']:.0f} vs {f['epochs_per_hour_1']:.0f})", ">= 1.8x"),
        ("Concurrency of the machine itself: 2 bare fit()s at once vs 1, no Ray, epochs/hour",
         f"{f['bare_concurrency_speedup']:.2f}x ({f['bare_epochs_per_hour_2']:.0f} vs {f['bare_epochs_per_hour_1']:.0f})",
         "explain"),
        ("Input pipeline: loader batches/s vs training steps/s",
         f"{s['loader_vs_step']:.0f}x ({s['loader_batches_per_s']:.1f} vs {s['steps_per_s']:.2f})", ">= 20x"),
        ("Data share of a training step", f"{s['data_share']:.1%}", "< 5 %"),
        (f"CPU efficiency: step FLOP/s vs 1-thread {s.get('precision', 'fp32')} matmul FLOP/s",
         f"{s['flop_efficiency']:.1%} ({s['achieved_gflops']:.2f} of {s['matmul_gflops']:.1f} GFLOP/s; "
         f"{s['step_gflop']:.1f} GFLOP per step of {s['batch']}, {s['step_s']:.2f} s)", "report"),
        ("Profile top 3 (self CPU time of 5 steps)",
         "; ".join(f"{k} {v:.0%}" for k, v in s["profile_top3"]), "explain"),
        ("CPU while paired: trial / bare fit() / driver / Ray's other processes / this benchmark",
         _cpu_row(f["cpu_share_paired"], ("trial", "bare", "driver", "ray", "bench")), "explain"),
        ("CPU while 2 trials ran: each trial / driver / Ray's other processes / this benchmark's watch",
         _cpu_row(f["cpu_share_2"], ("trial", "driver", "ray", "watch")), "explain"),
        ("Peak memory, driver (1 trial / 2 trials), RSS",
         f"{m['driver_1']['rss']:.0f} / {m['driver_2']['rss']:.0f} MiB", "report"),
        ("Peak memory per trial, 1 trial: RSS / USS",
         ", ".join(f"{t['rss']:.0f} / {t['uss']:.0f}" for t in m["trial_1"]) + " MiB", "flat"),
        ("Peak memory per trial, 2 at once: RSS / USS",
         ", ".join(f"{t['rss']:.0f} / {t['uss']:.0f}" for t in m["trial_2"]) + " MiB", "flat"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'figure':{width}s}  {'measured':60s}  goal")
    for name, value, goal in rows:
        print(f"{name:{width}s}  {value:60s}  {goal}")
