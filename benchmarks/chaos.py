"""Fault injection: each fault on a real small search or training run, then what must hold afterwards.

Every fault is injected into the project's own entry points (``run_search.py``, ``python -m hawor_tune.train``,
:func:`hawor_tune.search.run_search`) on a tiny generated dataset and model in a temporary folder. A search
must end with nothing lost: ``num_samples`` trials TERMINATED (but those that failed on their own), each with
its full epochs or its ASHA stop, every ``(trial_id, epoch)`` row of ``epochs.parquet`` once and none missing,
``trials.parquet`` holding exactly the trials and statuses of Ray's own record
(``ray.tune.ExperimentAnalysis``), and the Optuna study on disk ending each trial as ``trials.parquet`` does.
A data fault must end in one line naming the file and the fix, or in a rebuilt cache; never in a result
computed from wrong data.

Each fault waits for the state it needs (an epoch row written, a checkpoint registered, a trial's worker
frozen mid-trial), never for a fixed time, so the same invariants hold on a fast and a slow machine.

    python benchmarks/chaos.py                      # every fault
    python benchmarks/chaos.py --only worker_kill driver_sigint

Prints a table: fault, outcome, trials lost. Exits 1 if any fault broke an invariant. ``disk_full`` mounts a
small tmpfs, so it needs root (it is reported as skipped otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hawor_tune.config import load_config, save_config  # noqa: E402
from hawor_tune.data import generate  # noqa: E402
from hawor_tune.results import read_rows  # noqa: E402

NUM_SAMPLES, EPOCHS = 4, 3
# Small per-epoch budgets keep each fault's search short; most of its time is then Ray's own start-up.
BUDGET = ["--set", "train.max_train_batches=4", "--set", "train.max_eval_batches=2"]
# The lab's dataset and model: 4 generated subjects of one 40-frame sequence each, 32 px crops, one ViT block.
TINY: dict[str, Any] = {
    "data.generate": True, "data.frame_size": 64, "data.crop_size": 32, "data.img_size": 32, "data.flow_grid": 4,
    "data.seq_len": 4, "data.stride": 2, "data.frame_step": 1, "data.batch_size": 2, "data.num_workers": 0,
    "data.min_visible_joints": 8, "data.synthetic.subjects": 4, "data.synthetic.held_out": 1, "data.synthetic.sequences_per_subject": 1,
    "data.synthetic.frames_per_sequence": 40, "data.synthetic.image_width": 64,
    "data.synthetic.image_height": 48, "data.synthetic.seed": 0, "pretrain.epochs": 0,
    "model.backbone": "vit_tiny_patch16_224", "model.backbone_kwargs": {"depth": 1, "patch_size": 16},
    "model.camera_backbone": "vit_tiny_patch16_224", "model.temporal_dim": 32, "model.temporal_layers": 1,
    "model.temporal_heads": 2, "model.head_hidden": 32, "model.infiller_hidden": 16, "model.dropout": 0.0,
    "train.device": "cpu",
}
# How long a run or a wait may take before it counts as hung: far past any run's length on a loaded machine;
# nothing waits for it to pass.
HUNG = 1800.0
# A clip length the lab's sequences (20 usable frames) cannot give: a trial that draws it fails on its own.
TOO_LONG = 32


@dataclass
class Outcome:
    fault: str
    outcome: str
    lost: int | str
    ok: bool
    seconds: float = 0.0


class Lab:
    """A temporary folder with the tiny dataset, search-space files and the command lines to run."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.root = folder / "data" / "arctic_synthetic"
        self.overrides = {**TINY, "data.root": str(self.root)}
        cfg = load_config(None, self.overrides)
        generate(self.root, cfg.data.synthetic, cfg.mano)
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}

    def space(self, name: str, *, num_samples: int = NUM_SAMPLES, epochs: int = EPOCHS, **extra: Any) -> Path:
        """A search-space file over the lab's data: lr and the 2D keypoint weight, ASHA over epochs (``extra``
        replaces top-level keys)."""
        folder = self.folder / "spaces" / name
        folder.mkdir(parents=True, exist_ok=True)
        save_config(load_config(None, {**self.overrides, "train.epochs": epochs}), folder / "base.yaml")
        space = {
            "base": "base.yaml", "metric": "val/mpjpe", "mode": "min", "num_samples": num_samples,
            "max_concurrent": 2, "search": {"algorithm": "optuna", "seed": 0},
            "scheduler": {"type": "asha", "max_epochs": epochs, "grace_period": 1, "reduction_factor": 2},
            "resources": {"cpu": 1, "gpu": 0},
            "params": {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
                       "loss.keypoint_2d": {"type": "uniform", "low": 0.0, "high": 1.0}},
            **extra,
        }
        (folder / "space.yaml").write_text(yaml.safe_dump(space))
        return folder / "space.yaml"

    def search_args(self, space: Path, name: str, storage: Path | None = None) -> list[str]:
        return ["--space", str(space), "--storage", str(storage or self.folder / "results"), "--name", name,
                "--dashboard-port", "0", *BUDGET]

    def start(self, args: list[str], log: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        """run_search.py in its own process group, as a terminal would run it; its output goes to ``log``."""
        cmd = [sys.executable, str(ROOT / "run_search.py"), *args]
        return subprocess.Popen(cmd, cwd=self.folder, env={**self.env, **(extra_env or {})},
                                stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def run(self, args: list[str], log: Path, timeout: float = HUNG, **kw: Any) -> tuple[int, str]:
        proc = self.start(args, log, **kw)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = -9
        return rc, log.read_text()


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=60)


def _wait_for(predicate: Callable[[], Any], proc: subprocess.Popen | None, timeout: float = HUNG,
              running: Callable[[], bool] | None = None) -> Any:
    """Poll ``predicate`` until it holds, while ``proc`` (or ``running()``) still runs; the timeout only bounds
    a hung run. Errors count as not yet: files are read while a search rewrites them."""
    deadline = time.time() + timeout
    while time.time() < deadline and (proc is None or proc.poll() is None) and (running is None or running()):
        with contextlib.suppress(Exception):
            value = predicate()
            if value:
                return value
        time.sleep(0.2)
    return None


def _epoch_rows(exp_dir: Path) -> list[dict[str, Any]]:
    return read_rows(exp_dir / "epochs.parquet")


def _trial_rows(exp_dir: Path) -> dict[str, dict[str, Any]]:
    return {r["trial_id"]: r for r in read_rows(exp_dir / "trials.parquet")}


def _checkpoint_epoch(path: str | None) -> int | None:
    """The epoch a checkpoint folder holds (None: none, or unreadable)."""
    from hawor_tune.checkpoint import CheckpointError, load_checkpoint

    if not path:
        return None
    try:
        return int(load_checkpoint(path, mmap=True)["epoch"])
    except (CheckpointError, OSError, KeyError):
        return None


@dataclass(frozen=True)
class Frozen:
    """A trial's worker stopped (SIGSTOP) mid-trial: no epoch of it can finish and no checkpoint of it can be
    registered (both need the worker) until it is continued or killed."""

    trial_id: str
    pid: int
    registered_epoch: int  # the epoch of its last registered checkpoint, read once it was frozen
    kept: dict[int, int]   # epoch -> pid of its rows up to that epoch, then

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def _freeze_a_trial(exp_dir: Path, *, max_epochs: int, proc: subprocess.Popen | None = None,
                    running: Callable[[], bool] | None = None, trial: str | None = None,
                    node: str | None = None, spare: frozenset[int] = frozenset(), min_epoch: int = 1) -> Frozen | None:
    """Wait for a trial (``trial``, or any; on ``node`` if given) that runs with a registered checkpoint, whose
    newest epoch row, from a worker not in ``spare``, is at least ``min_epoch`` and at least two short of
    ``max_epochs``; freeze that
    worker and check the state again. A trial's worker reports an epoch and waits until the driver has taken
    it before it trains the next, so at most one more epoch of it can still reach the driver, and none can
    be registered: once frozen, the trial cannot end, and the caller's fault lands mid-trial however fast or
    slow the machine is. None: the search ended first."""

    def candidates() -> list[tuple[str, int]]:
        trials = _trial_rows(exp_dir)
        newest: dict[str, dict[str, Any]] = {}
        for r in _epoch_rows(exp_dir):
            if r["epoch"] >= newest.get(r["trial_id"], {}).get("epoch", 0):
                newest[r["trial_id"]] = r
        return [(trial_id, int(row["pid"])) for trial_id, row in newest.items()
                if (trial is None or trial_id == trial) and (node is None or row["node_id"] == node)
                and trials.get(trial_id, {}).get("status") not in ("TERMINATED", "ERROR")
                and trials.get(trial_id, {}).get("checkpoint") and min_epoch <= row["epoch"] <= max_epochs - 2
                and row.get("pid") and int(row["pid"]) not in spare]

    while True:
        found = _wait_for(lambda: candidates()[:1], proc, running=running)
        if not found:
            return None
        trial_id, pid = found[0]
        if not _signal(pid, signal.SIGSTOP):
            continue
        if (trial_id, pid) in candidates():
            registered = _checkpoint_epoch(_trial_rows(exp_dir)[trial_id]["checkpoint"])
            if registered is not None:
                kept = {int(r["epoch"]): int(r["pid"]) for r in _epoch_rows(exp_dir)
                        if r["trial_id"] == trial_id and r["epoch"] <= registered}
                return Frozen(trial_id, pid, registered, kept)
        _signal(pid, signal.SIGCONT)  # it moved on meanwhile: let it go, and wait for the next chance


# ---- the invariants ----------------------------------------------------------------------------------------

def check_experiment(exp_dir: Path, *, num_samples: int = NUM_SAMPLES, max_epochs: int = EPOCHS,
                     failed: frozenset[str] = frozenset()) -> tuple[int, list[str]]:
    """(trials lost, broken invariants) of a finished search.

    A trial counts as kept when it is TERMINATED with epochs 1..n each once, n the full budget or an ASHA
    stop; the search must hold ``num_samples`` trials, all kept but those in ``failed`` (which must be ERROR,
    failed on their own); its parquet files and its Optuna study must agree with Ray's record.
    """
    from ray.tune import ExperimentAnalysis

    problems = []
    trials = _trial_rows(exp_dir)
    epochs = [(r["trial_id"], int(r["epoch"])) for r in _epoch_rows(exp_dir)]
    ray_record = {t.trial_id: t.status for t in ExperimentAnalysis(str(exp_dir)).trials}
    if {t: r["status"] for t, r in trials.items()} != ray_record:
        problems.append(f"trials.parquet {({t: r['status'] for t, r in trials.items()})} != Ray's {ray_record}")
    if len(epochs) != len(set(epochs)):
        problems.append(f"duplicate (trial_id, epoch) rows: {sorted(e for e in set(epochs) if epochs.count(e) > 1)}")
    kept = 0
    for trial_id, row in trials.items():
        seen = sorted(e for t, e in epochs if t == trial_id)
        complete = row["epochs"] == max_epochs or row["stopped_early"]
        if seen != list(range(1, row["epochs"] + 1)):
            problems.append(f"trial {trial_id}: epochs {seen}, expected 1..{row['epochs']}")
        elif trial_id in failed:
            if (row["status"], row["failed_by"]) != ("ERROR", "trial"):
                problems.append(f"trial {trial_id}: {row['status']} ({row['failed_by']}), expected ERROR on its own")
        elif row["status"] == "TERMINATED" and complete and not row["diverged"]:
            kept += 1
        else:
            problems.append(f"trial {trial_id}: {row['status']} after {row['epochs']} epochs")
    stray = {t for t, _ in epochs} - set(trials)
    if stray:
        problems.append(f"epoch rows of trials not in trials.parquet: {sorted(stray)}")
    if len(trials) != num_samples or kept != num_samples - len(failed):
        problems.append(f"{kept} complete trials of {len(trials)}, expected {num_samples - len(failed)} of {num_samples}")
    problems += _check_study(exp_dir, trials)
    return max(0, num_samples - len(failed) - kept), problems


def _check_study(exp_dir: Path, trials: dict[str, dict[str, Any]]) -> list[str]:
    """The Optuna study on disk ends each trial as trials.parquet does: COMPLETE or PRUNED (an ASHA stop) when
    it completed, FAIL when it failed; the trials a resume dropped (never in Ray's record) are FAIL."""
    from optuna.trial import TrialState

    from hawor_tune.optuna_study import load_study

    states = {}
    for t in load_study(exp_dir).get_trials(deepcopy=False):
        if not t.user_attrs.get("dropped_on_resume"):
            states[t.user_attrs["ray_trial_id"]] = t.state
        elif t.state != TrialState.FAIL:
            return [f"study: dropped trial {t.user_attrs['ray_trial_id']} is {t.state.name}"]
    if set(states) != set(trials):
        return [f"study trials {sorted(states)} != trials.parquet's {sorted(trials)}"]
    wrong = []
    for trial_id, row in trials.items():
        expected = ({TrialState.FAIL} if row["status"] == "ERROR" or row["diverged"] else
                    {TrialState.PRUNED} if row["stopped_early"] else {TrialState.COMPLETE})
        if states[trial_id] not in expected:
            wrong.append(f"{trial_id} {states[trial_id].name}")
    return [f"study: {', '.join(wrong)} (trials.parquet disagrees)"] if wrong else []


def _one_line_error(output: str, search: bool = False) -> str | None:
    """The ``error: ...`` line of a run that must fail in one line, or None when it shows a traceback.

    A search's output may hold Ray's log of a trial's failure (``Trial task failed``, with the worker's
    traceback); only a traceback of the command itself, which passes through run_search.py, counts then.
    """
    if ('run_search.py", line' if search else "Traceback") in output:
        return None
    lines = [ln for ln in output.splitlines() if ln.startswith("error: ")]
    return lines[-1] if len(lines) == 1 else None


def _search_outcome(fault: str, exp_dir: Path, t0: float, done: str, extra: list[str] | None = None,
                    **kw: Any) -> Outcome:
    lost, problems = check_experiment(exp_dir, **kw)
    problems = (extra or []) + problems
    return Outcome(fault, done if not problems else "; ".join(problems), lost, not problems, time.time() - t0)


# ---- search faults -----------------------------------------------------------------------------------------

def worker_kill(lab: Lab) -> Outcome:
    """SIGKILL the workers of up to two trials mid-trial (at least one; ASHA may end the others first), each
    once its trial has a registered checkpoint: Ray retries each from it."""
    t0, exp_dir, epochs = time.time(), lab.folder / "results" / "worker_kill", 5
    proc = lab.start(lab.search_args(lab.space("worker_kill", epochs=epochs), "worker_kill"),
                     lab.folder / "worker_kill.log")
    killed: list[Frozen] = []
    for _ in range(2):
        frozen = _freeze_a_trial(exp_dir, max_epochs=epochs, proc=proc,
                                 spare=frozenset(k.pid for k in killed))
        if frozen is None:
            break
        frozen.kill()
        killed.append(frozen)
    rc = proc.wait(timeout=HUNG)
    log = (lab.folder / "worker_kill.log").read_text()
    extra = [] if rc == 0 else [f"search exited {rc}"]
    extra += [] if killed else ["no worker was killed"]
    extra += _resumed_from_registered(exp_dir, killed)
    return _search_outcome("worker SIGKILL mid-trial", exp_dir, t0,
                           f"{len(killed)} workers killed, {log.count('Trial task failed')} trial failures, each "
                           f"retried from its registered checkpoint", extra, max_epochs=epochs)


def _resumed_from_registered(exp_dir: Path, faults: list[Frozen]) -> list[str]:
    """Each trial hit by a fault lost at most the epoch in flight: the epochs up to the checkpoint registered
    before the fault were not trained again (a re-trained epoch replaces its row, with another worker's pid)."""
    rows = {(r["trial_id"], int(r["epoch"])): int(r["pid"]) for r in _epoch_rows(exp_dir)}
    problems = []
    for f in faults:
        again = sorted(e for e, pid in f.kept.items() if rows.get((f.trial_id, e)) != pid)
        if again:
            problems.append(f"trial {f.trial_id}: epochs {again} trained again after the fault, though its "
                            f"checkpoint of epoch {f.registered_epoch} was registered")
    return problems


def _stop_driver_then_resume(lab: Lab, name: str, sig: int, *, truncate: bool = False) -> tuple[list[str], str]:
    """Start a search, stop its driver with ``sig`` once 3 epoch rows exist, then ``--resume`` it.

    ``truncate`` (with SIGKILL): first freeze an unfinished trial past its second epoch, wait until Ray's own
    record holds its checkpoint, then kill the driver and cut the newest checkpoint of every unfinished trial
    of Ray's record in half. Returns (problems, what the stop printed)."""
    exp_dir = lab.folder / "results" / name
    epochs = 5 if truncate else EPOCHS
    space = lab.space(name, epochs=epochs, scheduler={"type": "fifo"}) if truncate else lab.space(name)
    args = lab.search_args(space, name)
    # A crash lands between two of Ray's state snapshots: make them rare (only those Ray forces), so the
    # resume has trials and epochs to drop that Ray never recorded.
    env = {"TUNE_GLOBAL_CHECKPOINT_S": "600"} if sig == signal.SIGKILL and not truncate else {}
    proc = lab.start(args, lab.folder / f"{name}.log", extra_env=env)
    problems = []
    if truncate:
        frozen = _freeze_a_trial(exp_dir, max_epochs=epochs, proc=proc, min_epoch=2)
        recorded = frozen and _wait_for(
            lambda: {t.trial_id: t.checkpoint for t in _analysis(exp_dir).trials}.get(frozen.trial_id), proc)
        if not recorded:
            problems.append("the search ended before the fault")
    elif not _wait_for(lambda: len(_epoch_rows(exp_dir)) >= 3, proc):
        problems.append("the search ended before the fault")
    if sig == signal.SIGINT:  # Ctrl-C in a terminal: to the driver's whole process group
        os.killpg(proc.pid, signal.SIGINT)
        try:
            rc = proc.wait(timeout=HUNG)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = "hung"
    else:  # a crash of the driver and the Ray it started
        _kill_group(proc, signal.SIGKILL)
        rc = proc.returncode
    stopped = (lab.folder / f"{name}.log").read_text()
    if sig == signal.SIGINT:
        if rc != 130:
            problems.append(f"Ctrl-C: exit status {rc}, expected 130")
        if "Traceback" in stopped:
            problems.append("Ctrl-C printed a traceback")
        if not _resume_line(stopped):
            problems.append("Ctrl-C did not say how to resume")
    cut = []
    if truncate:
        state = {t.trial_id: t for t in _analysis(exp_dir).trials}
        for trial_id, trial in state.items():
            if trial.status != "TERMINATED" and trial.checkpoint is not None:
                path = Path(trial.checkpoint.path) / "checkpoint.pt"
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
                cut.append(trial_id)
        if not cut:
            problems.append("no unfinished trial had a checkpoint to truncate")
    rc, resumed = lab.run([*args, "--resume"], lab.folder / f"{name}.resume.log")
    if rc != 0:
        problems.append(f"--resume exited {rc}: {resumed.strip().splitlines()[-1:]}")
    if truncate and cut and resumed.count("cannot resume from") < len(cut):
        problems.append(f"truncated checkpoints of {cut} not reported by the resumed trials")
    return problems, stopped


def _resume_line(output: str) -> str | None:
    """The line an interrupted search prints on stderr: the command that continues it."""
    lines = [ln for ln in output.splitlines() if ln.startswith("error: search interrupted; continue with: ")]
    return lines[0] if len(lines) == 1 and lines[0].endswith(" --resume") else None


def _analysis(exp_dir: Path) -> Any:
    from ray.tune import ExperimentAnalysis

    return ExperimentAnalysis(str(exp_dir))


def driver_kill(lab: Lab) -> Outcome:
    t0 = time.time()
    problems, _ = _stop_driver_then_resume(lab, "driver_kill", signal.SIGKILL)
    return _search_outcome("driver SIGKILL, then --resume", lab.folder / "results" / "driver_kill", t0,
                           "resumed to num_samples trials", problems)


def driver_sigint(lab: Lab) -> Outcome:
    t0 = time.time()
    problems, stopped = _stop_driver_then_resume(lab, "driver_sigint", signal.SIGINT)
    said = (_resume_line(stopped) or "")[:len("error: search interrupted; continue with: python run_search.py")]
    return _search_outcome("driver SIGINT (Ctrl-C), then --resume", lab.folder / "results" / "driver_sigint", t0,
                           f"exit 130, no traceback, '{said} ... --resume'; resumed", problems)


def truncated_checkpoint(lab: Lab) -> Outcome:
    t0 = time.time()
    problems, _ = _stop_driver_then_resume(lab, "truncated_checkpoint", signal.SIGKILL, truncate=True)
    return _search_outcome("newest checkpoint truncated before a retry", lab.folder / "results" / "truncated_checkpoint",
                           t0, "fell back to the previous checkpoint (logged)", problems, max_epochs=5)


def node_removed(lab: Lab) -> Outcome:
    """A two-node ray.cluster_utils.Cluster; the worker node is removed while a trial on it is frozen mid-trial
    with a registered checkpoint: the trial continues on the head node from that checkpoint, and only the
    epoch in flight is trained again."""
    import ray
    from ray.cluster_utils import Cluster

    from hawor_tune.search import run_search
    from hawor_tune.search_space import load_search_space

    t0, name, epochs = time.time(), "node_removed", 5
    exp_dir = lab.folder / "results" / name
    space = load_search_space(lab.space(name, epochs=epochs, scheduler={"type": "fifo"}),
                              extra_overrides=["train.max_train_batches=4", "train.max_eval_batches=2"])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    searching = threading.Event()
    removed: list[Frozen] = []

    def remove_the_node_under_a_trial() -> None:
        frozen = _freeze_a_trial(exp_dir, max_epochs=epochs, node=worker.node_id, running=searching.is_set)
        if frozen is not None:
            cluster.remove_node(worker)
            frozen.kill()  # a stopped process does not notice that its node is gone
            removed.append(frozen)

    remover = threading.Thread(target=remove_the_node_under_a_trial, daemon=True)
    try:
        ray.init(address=cluster.address, logging_level="ERROR")
        searching.set()
        remover.start()
        run_search(space, storage=lab.folder / "results", name=name, verbose=0)
        searching.clear()
        remover.join(timeout=60)
    finally:
        searching.clear()
        ray.shutdown()
        cluster.shutdown()
    problems = [] if removed else ["no trial ran on the worker node before the search ended"]
    moved = ""
    if removed:
        f = removed[0]
        rows = sorted((r for r in _epoch_rows(exp_dir) if r["trial_id"] == f.trial_id), key=lambda r: r["epoch"])
        on_head = [r["epoch"] for r in rows if r["node_id"] != worker.node_id]
        problems += _resumed_from_registered(exp_dir, removed)
        if not on_head:
            problems.append(f"trial {f.trial_id} did not go on on the head node")
        elif not problems:
            moved = (f"trial {f.trial_id} went on on the head node from its checkpoint of epoch "
                     f"{on_head[0] - 1} (registered before the loss: epoch {f.registered_epoch})")
    return _search_outcome("node removed mid-trial (2-node cluster)", exp_dir, t0, moved, problems,
                           max_epochs=epochs)


def errored_trials(lab: Lab) -> Outcome:
    """A search whose trials fail: one loses its worker past its retries (three kills, each mid-trial with a
    registered checkpoint), others draw a clip length the data cannot give; then ``--resume``. The first
    kind runs again from its last checkpoint, the second stays failed, one line each says which, and the
    study and ``trials.parquet`` end with every other trial complete."""
    from hawor_tune.search import MAX_FAILURES

    t0, name, epochs = time.time(), "errored_trials", 8
    exp_dir = lab.folder / "results" / name
    params = {"optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
              "data.seq_len": {"type": "choice", "values": [4, TOO_LONG]}}
    args = lab.search_args(lab.space(name, num_samples=3, epochs=epochs, scheduler={"type": "fifo"},
                                     params=params), name)
    proc = lab.start(args, lab.folder / f"{name}.log")
    kills: list[Frozen] = []
    while len(kills) <= MAX_FAILURES:  # one more failure than Ray retries
        frozen = _freeze_a_trial(exp_dir, max_epochs=epochs, proc=proc, trial=kills[0].trial_id if kills else None,
                                 spare=frozenset(k.pid for k in kills))
        if frozen is None:
            break
        frozen.kill()
        kills.append(frozen)
    rc = proc.wait(timeout=HUNG)
    problems = [] if rc == 0 else [f"search exited {rc}"]
    if len(kills) <= MAX_FAILURES:
        return Outcome("trials errored (worker lost past its retries; a bad value), then --resume",
                       f"the search ended after {len(kills)} kills", "?", False, time.time() - t0)
    lost = kills[0].trial_id
    before = _trial_rows(exp_dir)
    bad = frozenset(t for t, r in before.items() if r["param/data.seq_len"] == TOO_LONG)
    if not bad:
        problems.append("no trial drew the bad value")
    if (before[lost]["status"], before[lost]["failed_by"]) != ("ERROR", "environment"):
        problems.append(f"trial {lost} after 3 lost workers: {before[lost]['status']} ({before[lost]['failed_by']})")
    rc, resumed = lab.run([*args, "--resume"], lab.folder / f"{name}.resume.log")
    if rc != 0:
        problems.append(f"--resume exited {rc}: {resumed.strip().splitlines()[-1:]}")
    said = [ln for ln in resumed.splitlines() if ln.startswith("resume: trial ")]
    expected = {f"resume: trial {lost} failed because its environment did"} | {
        f"resume: trial {t} failed on its own (DatasetError" for t in bad}
    if len(said) != len(expected) or not all(any(ln.startswith(e) for ln in said) for e in expected):
        problems.append(f"the resume said {said}")
    problems += _resumed_from_registered(exp_dir, kills)
    return _search_outcome("trials errored (worker lost past its retries; a bad value), then --resume", exp_dir,
                           t0, f"trial {lost} ran again from its checkpoint, {len(bad)} stayed failed; "
                           f"one line each", problems, num_samples=3, max_epochs=epochs, failed=bad)


def same_storage(lab: Lab) -> Outcome:
    """Three searches started at once on one --storage: two names, one of them twice. The two names both
    complete; of the two under one name, one completes and the other is refused in one line."""
    t0, storage = time.time(), lab.folder / "shared"
    space = lab.space("same_storage")
    runs = [("first", "a"), ("second", "b"), ("first", "c")]
    procs = {tag: lab.start(lab.search_args(space, name, storage), lab.folder / f"same_storage_{tag}.log")
             for name, tag in runs}
    rcs = {tag: p.wait(timeout=HUNG) for tag, p in procs.items()}
    logs = {tag: (lab.folder / f"same_storage_{tag}.log").read_text() for tag in rcs}
    problems = [] if rcs["b"] == 0 else [f"second exited {rcs['b']}"]
    refused = [tag for tag in ("a", "c") if rcs[tag] == 2]
    done = [tag for tag in ("a", "c") if rcs[tag] == 0]
    line = _one_line_error(logs[refused[0]], search=True) if len(refused) == 1 else None
    if len(done) != 1 or line is None or "already exists" not in line:
        problems.append(f"same name twice: exit statuses {rcs['a']}, {rcs['c']}")
    lost = 0
    for name in ("first", "second"):
        n, broken = check_experiment(storage / name)
        lost += n
        problems += [f"{name}: {b}" for b in broken]
    return Outcome("two searches at once on one --storage, then a third under a taken name",
                   "both names complete; the taken one refused: " + (line or "")[:60] + "..." if not problems
                   else "; ".join(problems), lost, not problems, time.time() - t0)


@contextlib.contextmanager
def _tmpfs(folder: Path, size_mb: int) -> Iterator[bool]:
    """A tmpfs of ``size_mb`` at ``folder`` (True), or nothing when this user cannot mount one (False)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _keep_full(filler: Path, proc: subprocess.Popen) -> None:
    """Fill the disk of ``filler`` and keep it full while ``proc`` runs."""
    with filler.open("ab", buffering=0) as f:
        while proc.poll() is None:
            try:
                f.write(b"\0" * (1 << 20))
            except OSError:
                time.sleep(0.05)  # full: look again for space freed meanwhile


def disk_full(lab: Lab) -> Outcome:
    """The search's storage fills up mid-search (a filler file takes what is left of a small tmpfs): the
    search stops with one line and the previous parquet files stay readable; space freed, --resume ends
    with nothing lost."""
    t0, name = time.time(), "disk_full"
    storage = lab.folder / "small_disk"
    with _tmpfs(storage, 512) as mounted:  # a search of 4 trials takes about 200 MB
        if not mounted:
            return Outcome("disk full during a search", "skipped: cannot mount a tmpfs (needs root)", "-", True)
        exp_dir = storage / name
        # 4 epochs and no ASHA stops: the search is still running when the disk fills.
        args = lab.search_args(lab.space(name, epochs=4, scheduler={"type": "fifo"}), name, storage)
        proc = lab.start(args, lab.folder / f"{name}.log")
        problems = []
        # A resume restores Ray's state snapshot: the disk fills once there is one, and an epoch row.
        if not _wait_for(lambda: list(exp_dir.glob("experiment_state-*.json")) and _epoch_rows(exp_dir), proc):
            problems.append("the search ended before the disk filled")
        filler = storage / "filler"
        full = threading.Thread(target=_keep_full, args=(filler, proc), daemon=True)
        full.start()  # until the search exits: space a failed write or a deleted checkpoint frees is taken again
        try:
            rc = proc.wait(timeout=HUNG)
        except subprocess.TimeoutExpired:
            rc = "hung"
        full.join()
        out = (lab.folder / f"{name}.log").read_text()
        readable = []
        for file in ("epochs.parquet", "trials.parquet"):
            try:
                readable.append(len(read_rows(exp_dir / file)))
            except Exception as e:
                problems.append(f"{file} unreadable on the full disk: {type(e).__name__}")
        line = _one_line_error(out, search=True)
        if rc != 2 or line is None:
            problems.append(f"full disk: exit {rc}, " + ("a traceback" if "Traceback" in out else
                                                         f"{out.strip().splitlines()[-1:]}"))
        filler.unlink()
        errored = sorted(t.trial_id for t in _analysis(exp_dir).trials if t.status == "ERROR")
        rc2, resumed = lab.run([*args, "--resume"], lab.folder / f"{name}.resume.log")
        if rc2 != 0:
            problems.append(f"--resume after freeing space exited {rc2}: {resumed.strip().splitlines()[-1:]}")
        for trial_id in errored:  # a trial whose checkpoint could not be written fails past its retries
            if f"resume: trial {trial_id} failed because its environment did" not in resumed:
                problems.append(f"the resume did not say that it runs errored trial {trial_id} again")
        said = (line or "").replace(str(exp_dir), "<experiment>")
        outcome = _search_outcome("disk full during a search, then --resume", exp_dir, t0,
                                  f"exit 2, '{said[:80]}...'; resumed ({len(errored)} errored trials)",
                                  problems, max_epochs=4)
    return outcome


# ---- data faults -------------------------------------------------------------------------------------------

def _val_image(root: Path, index: int = 15) -> Path:
    """An image of the first validation sequence that the dataset reads (past ARCTIC's skipped ends)."""
    splits = json.loads((root / "splits_json" / "protocol_p2.json").read_text())
    sid, seq = splits["val"][0].split("/")
    ioi = json.loads((root / "meta" / "misc.json").read_text())[sid]["ioi_offset"]
    return root / "images" / sid / seq / "0" / f"{index + ioi:05d}.jpg"


def _val_mano(root: Path) -> Path:
    sid, seq = json.loads((root / "splits_json" / "protocol_p2.json").read_text())["val"][0].split("/")
    return root / "raw_seqs" / sid / f"{seq}.mano.npy"


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _val_sequence(root: Path) -> str:
    return json.loads((root / "splits_json" / "protocol_p2.json").read_text())["val"][0]


def _cut_shard(root: Path, cache: Path) -> Path:
    """Cut the prepared shard (the tar of crops, frames and flows) of the first validation sequence in half."""
    shard = next(cache.rglob(f"{_val_sequence(root)}.tar"))
    _cut(shard)
    return shard


# fault -> (damage(root, cache) -> the damaged file, whether the data is prepared before the damage). Image
# faults strike a dataset not prepared yet, as a fresh download's would.
DATA_FAULTS: dict[str, tuple[Callable[[Path, Path], Path], bool]] = {
    "truncated prepared shard": (_cut_shard, True),
    "truncated .mano.npy": (lambda root, cache: (_cut(_val_mano(root)), _val_mano(root))[1], True),
    "missing image": (lambda root, cache: (_val_image(root).unlink(), _val_image(root))[1], False),
    "JPEG that does not decode": (lambda root, cache: (_val_image(root).write_bytes(b"\xff\xd8 not a jpeg"),
                                                       _val_image(root))[1], False),
    "JPEG cut short": (lambda root, cache: (_cut(_val_image(root)), _val_image(root))[1], False),
}


def _train(lab: Lab, root: Path, cache: Path, log: Path) -> tuple[int, str]:
    """One short training run (python -m hawor_tune.train) on the dataset at ``root``."""
    base = lab.space("data").parent / "base.yaml"
    overrides = [f"data.root={root}", f"data.cache_dir={cache}", f"train.out_dir={log.with_suffix('')}",
                 "train.epochs=1", "train.max_train_batches=2", "train.max_eval_batches=2", "data.generate=false"]
    proc = subprocess.run([sys.executable, "-m", "hawor_tune.train", "--config", str(base), *overrides],
                          cwd=lab.folder, env=lab.env, capture_output=True, text=True, timeout=HUNG)
    log.write_text(proc.stdout + proc.stderr)
    return proc.returncode, proc.stdout + proc.stderr


def data_faults(lab: Lab) -> list[Outcome]:
    """Each data fault on a fresh copy of the dataset (prepared first, where the fault needs it): the run
    either fails in one line naming the damaged file and the fix, or prepares the damaged sequence again and
    ends exactly as an undamaged run."""
    _, clean = _train(lab, lab.root, lab.folder / "data" / "cache", lab.folder / "data_clean.log")
    reference = [ln for ln in clean.splitlines() if ln.startswith("done: ")]
    outcomes = []
    for i, (fault, (damage, after_build)) in enumerate(DATA_FAULTS.items()):
        t0 = time.time()
        copy = lab.folder / f"data_fault_{i}"
        root, cache = copy / "arctic_synthetic", copy / "cache"
        shutil.copytree(lab.root, root)
        if after_build:
            _train(lab, root, cache, copy / "build.log")
        file = damage(root, cache)
        rc, out = _train(lab, root, cache, copy / "damaged.log")
        done = [ln for ln in out.splitlines() if ln.startswith("done: ")]
        line = _one_line_error(out)
        if rc == 0 and f"preparing {_val_sequence(root)} again" in out:
            same = [d.split(";")[0] for d in done] == [r.split(";")[0] for r in reference]
            outcome, ok = ("prepared again, same result as undamaged" if same else
                           f"prepared again but {done} != {reference}"), same
        elif rc == 2 and line is not None and str(file) in line:
            outcome, ok = line[len("error: "):].replace(str(copy), "...")[:110], True
        else:
            outcome, ok = f"exit {rc}: " + ("traceback" if "Traceback" in out else f"{out.strip().splitlines()[-1:]}"), False
        outcomes.append(Outcome(f"data: {fault}", outcome, "-", ok, time.time() - t0))
    return outcomes


# ---- the run -----------------------------------------------------------------------------------------------

FAULTS: dict[str, Callable[[Lab], Outcome | list[Outcome]]] = {
    "worker_kill": worker_kill,
    "driver_kill": driver_kill,
    "driver_sigint": driver_sigint,
    "node_removed": node_removed,
    "errored_trials": errored_trials,
    "truncated_checkpoint": truncated_checkpoint,
    "disk_full": disk_full,
    "same_storage": same_storage,
    "data": data_faults,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(FAULTS), help="run these faults only")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="hawor-chaos-"))
    t0 = time.time()
    outcomes: list[Outcome] = []
    try:
        lab = Lab(folder)
        for name in args.only or FAULTS:
            print(f"-- {name}", flush=True)
            try:
                result = FAULTS[name](lab)
            except Exception as e:  # a fault the harness itself did not survive is a failed fault
                traceback.print_exc()
                result = Outcome(name, f"harness error {type(e).__name__}: {e}"[:150], "?", False)
            for outcome in result if isinstance(result, list) else [result]:
                outcomes.append(outcome)
                print(f"   {outcome.fault}: {'ok' if outcome.ok else 'BROKEN'} ({outcome.seconds:.0f} s)", flush=True)
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    _print_table(outcomes)
    lost = sum(o.lost for o in outcomes if isinstance(o.lost, int))
    print(f"\n{len(outcomes)} faults injected, {sum(not o.ok for o in outcomes)} broke an invariant, "
          f"{lost} trials lost, {time.time() - t0:.0f} s")
    return 0 if all(o.ok for o in outcomes) else 1


def _print_table(outcomes: list[Outcome], width: int = 100) -> None:
    """The table, each outcome cut to ``width`` characters; a broken one in full below it."""
    header = ("fault", "outcome", "trials lost")
    rows = [(o.fault, (("" if o.ok else "BROKEN: ") + o.outcome)[:width], str(o.lost)) for o in outcomes]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print()
    for row in (header, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    for o in outcomes:
        if not o.ok:
            print(f"\n{o.fault}: {o.outcome}")


if __name__ == "__main__":
    sys.exit(main())
