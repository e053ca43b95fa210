"""End-to-end searches on the tiny synthetic dataset: parquet contents, resume, a two-node cluster, CLI errors."""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import ray
from conftest import write_search_space, write_space

import run_search
from hawor_tune.results import ExperimentRecord, read_rows
from hawor_tune.search import ParquetExporter, start_ray
from hawor_tune.search import run_search as run_search_fn
from hawor_tune.search_space import load_search_space

REPO = Path(__file__).resolve().parents[1]


def _reported(trial_dir: Path) -> list[dict]:
    """What one trial reported, per epoch, as Ray itself recorded it (result.json, a JSON object per line)."""
    lines = (trial_dir / "result.json").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_search_end_to_end_parquet_matches_reports(tiny_search):
    epochs = read_rows(tiny_search / "epochs.parquet")
    trials = read_rows(tiny_search / "trials.parquet")
    record = ExperimentRecord.load(tiny_search)
    trial_dirs = [d for d in tiny_search.iterdir() if (d / "result.json").is_file()]
    assert len(trial_dirs) == 4 and len(trials) == 4
    space = load_search_space(record.space.path)
    assert record.space == space and record.name == "tiny"

    by_trial = {r["trial_id"]: r for r in trials}
    first_params = None
    # Trial folders are train_trial_<id>_<n>_<params>...: n counts trials in the order Optuna proposed them.
    for trial_dir in sorted(trial_dirs, key=lambda d: int(d.name.split("_")[3])):
        reported = _reported(trial_dir)
        trial_id = reported[0]["trial_id"]
        config = json.loads((trial_dir / "params.json").read_text())
        first_params = first_params or config
        rows = sorted((r for r in epochs if r["trial_id"] == trial_id), key=lambda r: r["epoch"])
        assert [r["epoch"] for r in rows] == [x["training_iteration"] for x in reported]
        for row, rep in zip(rows, reported):
            for key in ("val/mpjpe", "val/pa_mpjpe", "train/loss", "lr", "node_id"):
                assert row[key] == pytest.approx(rep[key], rel=1e-12) if key != "node_id" else row[key] == rep[key]
        t = by_trial[trial_id]
        values = [r["val/mpjpe"] for r in rows]
        assert t["status"] == "TERMINATED"
        assert t["epochs"] == len(rows)
        assert t["best/val/mpjpe"] == pytest.approx(min(values))
        assert t["last/val/mpjpe"] == pytest.approx(values[-1])
        assert t["best_epoch"] == rows[values.index(min(values))]["epoch"]
        assert t["stopped_early"] == (len(rows) < 3)
        for p in space.params:
            assert t[f"param/{p}"] == pytest.approx(config[p])
        assert t["checkpoint"] and Path(t["checkpoint"]).is_dir()
        assert t["wall_time_s"] > 0
        assert list(trial_dir.glob("events.out.tfevents*"))          # TensorBoard files are kept
        # The storage holds Tune's kept checkpoints (the 2 best and the newest) and no other copy of any
        # epoch's weights.
        kept = sorted(p.parent.name for p in trial_dir.rglob("checkpoint.pt"))
        assert kept and len(kept) <= 3 and all(name.startswith("checkpoint_0") for name in kept), kept
        assert Path(t["checkpoint"]).name in kept
    # Optuna's first point is the base config's own values
    assert first_params == pytest.approx(space.default_point())


def test_a_search_runs_at_most_max_concurrent_trials_at_once(tmp_path, synthetic_dataset):
    """The searcher's own concurrency limit holds (TuneConfig's max_concurrent_trials is not passed: beside a
    ConcurrencyLimiter, Ray only warns and ignores it)."""
    space = load_search_space(write_search_space(tmp_path, synthetic_dataset, num_samples=3, epochs=1,
                                                 max_concurrent=1))
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        outcome = run_search_fn(space, storage=tmp_path / "results", name="one", verbose=0)
    finally:
        ray.shutdown()
    spans = []  # (start, end) of each trial; Ray's timestamps are whole seconds
    for trial_dir in (d for d in outcome.experiment_dir.iterdir() if (d / "result.json").is_file()):
        reported = _reported(trial_dir)
        spans.append((reported[0]["timestamp"] - reported[0]["time_this_iter_s"], reported[-1]["timestamp"]))
    spans.sort()
    assert len(spans) == 3
    assert all(end - 1.0 <= start for (_, end), (start, _) in zip(spans, spans[1:])), spans


def test_two_node_cluster_runs_trials_on_both_nodes(tmp_path, synthetic_dataset):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, logging_level="ERROR")
        space = load_search_space(write_search_space(tmp_path, synthetic_dataset, num_samples=2, epochs=1,
                                                     scheduler={"type": "fifo"}))
        outcome = run_search_fn(space, storage=tmp_path / "results", name="cluster", verbose=0)
        epochs = read_rows(outcome.experiment_dir / "epochs.parquet")
        nodes = {r["node_id"] for r in epochs}
        assert len(nodes) == 2, nodes
        assert nodes == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
        cluster.shutdown()


def _cli(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "run_search.py"), *args]


def test_interrupted_search_resumes_to_exactly_num_samples(tmp_path, synthetic_dataset):
    space = write_search_space(tmp_path, synthetic_dataset, num_samples=4, epochs=2)
    storage = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(_cli("--space", str(space), "--storage", str(storage), "--name", "r",
                                 "--dashboard-port", "0"), cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    trials_file = storage / "r" / "trials.parquet"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if trials_file.is_file():
            rows = read_rows(trials_file)
            if any(r["status"] == "TERMINATED" for r in rows):
                break
        time.sleep(0.5)
    assert proc.poll() is None, "search finished before it could be interrupted:\n" + proc.stdout.read()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    before = {r["trial_id"]: r for r in read_rows(trials_file)}
    done_before = {t for t, r in before.items() if r["status"] == "TERMINATED"}
    assert done_before and len(done_before) < 4

    resumed = subprocess.run(_cli("--space", str(space), "--storage", str(storage), "--name", "r", "--resume",
                                  "--dashboard-port", "0"), cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert re.search(r"epoch +[12]/2 +loss", output)  # the trials' own epoch lines reach the search's output
    assert "Checkpoint successfully created" not in output and "Fatal Python error" not in output
    assert "max_concurrent_trials" not in output  # the searcher's ConcurrencyLimiter alone limits the trials
    after = {r["trial_id"]: r for r in read_rows(trials_file)}
    assert len(after) == 4 and all(r["status"] == "TERMINATED" for r in after.values())
    epochs = read_rows(storage / "r" / "epochs.parquet")
    for t in done_before:  # finished trials were not run again
        assert after[t]["epochs"] == before[t]["epochs"]
        assert sum(r["trial_id"] == t for r in epochs) == before[t]["epochs"]
    assert "best trial" in resumed.stdout


@pytest.mark.parametrize("args, fragment", [
    (["--space", "nope.yaml"], "nope.yaml"),
    (["--space", "{space}", "--set", "optim.lr=-1"], "optim.lr"),
    (["--space", "{space}", "--num-samples", "0"], "--num-samples"),
    (["--space", "{space}", "--resume", "--name", "missing"], "missing"),
])
def test_cli_bad_input_one_line_exit_2(tmp_path, synthetic_dataset, capsys, args, fragment):
    space = write_search_space(tmp_path, synthetic_dataset)
    argv = [a.replace("{space}", str(space)) for a in args] + ["--storage", str(tmp_path / "r"), "--dashboard-port", "0"]
    assert _exit_code(run_search.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and fragment in err[-1]
    assert not any("Traceback" in line for line in err)
    assert not ray.is_initialized()


@pytest.mark.parametrize("storage", ["/proc/hawor-tune-results", "{file}", "{file}/results", "s3://bucket/r"])
def test_cli_unwritable_storage_is_one_line_before_anything_starts(tmp_path, capsys, storage):
    (tmp_path / "file").write_text("x")
    storage = storage.replace("{file}", str(tmp_path / "file"))
    # The space does not exist: the storage is checked before the space is even read.
    assert _exit_code(run_search.main, ["--space", "nope.yaml", "--storage", storage]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --storage {storage}: ")
    assert "folder this user can write" in err[0]
    assert not ray.is_initialized()


def test_cli_dashboard_port_in_use_is_one_line_before_anything_starts(tmp_path, capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The space does not exist: the port is checked before the space is read or Ray starts.
        code = _exit_code(run_search.main, ["--space", "nope.yaml", "--storage", str(tmp_path / "r"),
                                            "--dashboard-port", str(port)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --dashboard-port {port}: 127.0.0.1:{port} is in use")
    assert not ray.is_initialized()


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_cli_dashboard_port_out_of_range_is_refused(tmp_path, capsys, port):
    assert _exit_code(run_search.main, ["--space", "nope.yaml", "--dashboard-port", port]) == 2
    assert "--dashboard-port" in capsys.readouterr().err


def _exit_code(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return int(e.code)


def test_summary_counts_asha_stops(tmp_path, capsys):
    from hawor_tune.results import write_parquet_atomic

    rows = [
        {"trial_id": "a", "status": "TERMINATED", "epochs": 3, "stopped_early": False, "stopped_at_epoch": None,
         "diverged": False, "param/optim.lr": 0.001, "best/val/mpjpe": 40.0, "best_epoch": 3},
        {"trial_id": "b", "status": "TERMINATED", "epochs": 1, "stopped_early": True, "stopped_at_epoch": 1,
         "diverged": False, "param/optim.lr": 0.01, "best/val/mpjpe": 55.0, "best_epoch": 1},
    ]
    write_parquet_atomic(rows, tmp_path / "trials.parquet")
    run_search.print_summary(tmp_path, "val/mpjpe", "min")
    out = capsys.readouterr().out
    assert "best trial a: val/mpjpe = 40.000 at epoch 3" in out
    assert "ASHA stopped 1 of 2 trials (at epochs [1])" in out


@dataclass
class _Trial:
    """The part of a Ray Tune trial the exporter reads."""

    trial_id: str
    status: str
    config: dict[str, Any]
    last_result: dict[str, Any] = field(default_factory=dict)
    checkpoint: Any = None


def _exporter(folder: Path) -> ParquetExporter:
    exporter = ParquetExporter(folder, metric="val/mpjpe", mode="min", max_epochs=3, param_paths=["optim.lr"])
    exporter.setup()
    exporter.on_step_begin(0, [])
    return exporter


def _run_epochs(exporter: ParquetExporter, trial: _Trial, epochs: range) -> None:
    for epoch in epochs:
        trial.last_result = {"training_iteration": epoch}
        exporter.on_trial_result(0, [], trial, {"training_iteration": epoch, "val/mpjpe": 50.0 - epoch})


def test_exporter_after_a_driver_kill_holds_exactly_the_restored_experiment(tmp_path):
    # Before the kill: a finished, b at epoch 2, c started after Ray's last state snapshot.
    before = _exporter(tmp_path)
    a, b, c = (_Trial(t, "RUNNING", {"optim.lr": lr}) for t, lr in (("a", 1e-3), ("b", 2e-3), ("c", 3e-3)))
    for trial, epochs in ((a, range(1, 4)), (b, range(1, 3)), (c, range(1, 2))):
        before.on_trial_start(0, [], trial)
        _run_epochs(before, trial, epochs)
    before.on_trial_complete(0, [], a)
    assert {r["trial_id"] for r in read_rows(tmp_path / "trials.parquet")} == {"a", "b", "c"}

    # Ray's snapshot knew a finished and b at epoch 1 (b runs again from there); it never saw c.
    restored = [_Trial("a", "TERMINATED", a.config, {"training_iteration": 3}),
                _Trial("b", "PENDING", b.config, {"training_iteration": 1})]
    after = ParquetExporter(tmp_path, metric="val/mpjpe", mode="min", max_epochs=3, param_paths=["optim.lr"])
    after.setup()
    after.on_step_begin(0, restored)
    trials = {r["trial_id"]: r for r in read_rows(tmp_path / "trials.parquet")}
    assert {t: (r["status"], r["epochs"]) for t, r in trials.items()} == {"a": ("TERMINATED", 3), "b": ("PENDING", 1)}
    assert trials["b"]["param/optim.lr"] == pytest.approx(2e-3)
    assert sorted((r["trial_id"], r["epoch"]) for r in read_rows(tmp_path / "epochs.parquet")) == [
        ("a", 1), ("a", 2), ("a", 3), ("b", 1)]

    # The resumed run finishes b and the searcher's new proposal d; a later step changes nothing.
    b_again, d = restored[1], _Trial("d", "PENDING", {"optim.lr": 4e-3})
    after.on_trial_start(0, restored, b_again)
    _run_epochs(after, b_again, range(2, 4))
    after.on_trial_complete(0, restored, b_again)
    after.on_step_begin(1, [*restored, d])
    after.on_trial_start(0, [], d)
    _run_epochs(after, d, range(1, 2))
    after.on_trial_complete(0, [], d)
    after.on_experiment_end([*restored, d])
    trials = {r["trial_id"]: r for r in read_rows(tmp_path / "trials.parquet")}
    assert {t: (r["status"], r["epochs"]) for t, r in trials.items()} == {
        "a": ("TERMINATED", 3), "b": ("TERMINATED", 3), "d": ("TERMINATED", 1)}
    epochs = [(r["trial_id"], r["epoch"]) for r in read_rows(tmp_path / "epochs.parquet")]
    assert sorted(epochs) == [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2), ("b", 3), ("d", 1)]


def _listening(process) -> list[tuple[str, str, int]]:
    """(process name, address, port) of each TCP socket ``process`` and its descendants listen on."""
    import psutil  # ships with Ray, importable once ray is imported

    out = []
    for p in [process, *process.children(recursive=True)]:
        try:
            out += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="tcp")
                    if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            pass
    return out


def _is_worker(process) -> bool:
    import psutil

    try:
        return any(part.endswith("default_worker.py") for part in process.cmdline()) or \
            process.cmdline()[0].startswith("ray::IDLE")
    except (psutil.NoSuchProcess, IndexError):
        return False


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def test_local_ray_listens_on_loopback_only_and_runs_workers_at_the_users_priority_on_demand():
    import psutil

    assert not ray.is_initialized()
    env_before = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    try:
        url = start_ray(None, dashboard_port=0, num_cpus=1)
        assert url and url.startswith("http://127.0.0.1:")
        # No idle worker started ahead of time (Ray's default starts them while ray.init runs).
        time.sleep(1.0)
        assert not [p for p in psutil.Process().children(recursive=True) if _is_worker(p)]
        # A worker is up, at this process's niceness (Ray's default would add 15).
        assert ray.get(ray.remote(lambda: os.nice(0)).remote()) == os.nice(0)
        # Every Ray process (GCS, raylet, dashboard, agents, workers) is this process or one of its descendants.
        deadline, names = time.time() + 30, set()
        while time.time() < deadline:
            sockets = _listening(psutil.Process())
            names = {name for name, _, _ in sockets}
            if {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names:
                break
            time.sleep(0.5)
        assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, sockets
        assert any(name.startswith("ray::") and "Agent" not in name for name in names), sockets  # a worker
        assert [s for s in sockets if not _loopback(s[1])] == []
    finally:
        ray.shutdown()
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == env_before  # set for the start only


def _trial_checkpoints(folder: Path, epochs: int) -> list[Path]:
    """Ray's layout of one trial's checkpoints: checkpoint_000000 (epoch 1), checkpoint_000001, ..."""
    import torch

    from hawor_tune.checkpoint import save_checkpoint
    from hawor_tune.config import load_config

    model, config = torch.nn.Linear(2, 2), load_config(None, {})
    return [save_checkpoint(folder / f"checkpoint_{i:06d}", model=model, config=config, epoch=i + 1)
            for i in range(epochs)]


def _truncate(folder: Path) -> None:
    file = folder / "checkpoint.pt"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


@pytest.mark.parametrize("truncated, expected", [((), 2), ((2,), 1), ((1, 2), 0), ((0, 1, 2), None)])
def test_a_trial_resumes_from_its_newest_readable_checkpoint(tmp_path, caplog, truncated, expected):
    from hawor_tune.search.trainable import resume_point

    checkpoints = _trial_checkpoints(tmp_path, 3)
    for i in truncated:
        _truncate(checkpoints[i])
    point = resume_point(str(checkpoints[-1]))
    assert point == (str(checkpoints[expected]) if expected is not None else None)
    warnings = [r.message for r in caplog.records if r.levelname == "WARNING"]
    assert len([w for w in warnings if w.startswith("cannot resume from")]) == len(truncated)
    if truncated:
        assert "older checkpoint" in warnings[-1] or "starts again from epoch 1" in warnings[-1]
    assert resume_point(None) is None


# A worker as Ray Tune runs one: the trainable in a daemon thread (Ray's RunnerThread swallows SystemExit(0));
# Tune stops the trial, whose tune.report then raises SystemExit(0), and the worker exits at once.
_STOPPED_WORKER = """
import sys, threading
import torch
import hawor_tune.search.trainable as trainable

holding, stop = threading.Event(), threading.Event()

def fit_until_stopped(params, space, run_dir):
    state = [torch.nn.Linear(64, 64) for _ in range(3000)]  # the tensors fit() holds when Tune stops it
    print(run_dir, flush=True)
    holding.set()
    stop.wait()
    raise SystemExit(0)  # as ray.tune.report leaves a stopped trial

trainable._train_trial = fit_until_stopped

def runner():
    try:
        trainable.train_trial({}, None)
    except SystemExit as e:
        assert e.code == 0

threading.Thread(target=runner, daemon=True).start()
holding.wait()
stop.set()
sys.exit(0)
"""


def test_a_worker_exiting_as_tune_stops_its_trial_exits_cleanly_and_leaves_no_run_folder():
    """Freeing a stopped trial's tensors while the worker's interpreter shut down aborted it (SIGABRT and a
    crash dump in the search's output, seen at the end of the default search)."""
    done = subprocess.run([sys.executable, "-c", _STOPPED_WORKER], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Fatal Python error" not in done.stderr
    run_dir = Path(done.stdout.split()[0])
    assert run_dir.name.startswith("hawor-trial-") and not run_dir.exists()


def test_a_second_search_under_a_taken_name_is_refused_before_anything_starts(tmp_path):
    from hawor_tune.results import StorageError

    space = load_search_space(write_space(tmp_path))
    (tmp_path / "results" / "taken").mkdir(parents=True)
    with pytest.raises(StorageError, match=r"^experiment taken: .* already exists \(another search has this name"):
        run_search_fn(space, storage=tmp_path / "results", name="taken", verbose=0)
    assert not ray.is_initialized()


def test_a_full_disk_behind_rays_error_is_found():
    from ray.tune.error import TuneError

    from hawor_tune.search.service import _disk_full

    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise full
        except OSError:
            raise TuneError("Traceback (most recent call last): ...") from None  # as Ray wraps a callback's
    except TuneError as e:
        wrapped = e
    wrapped.__context__ = full
    assert _disk_full(wrapped) is full
    assert _disk_full(TuneError("other")) is None
    assert _disk_full(OSError(errno.EACCES, "denied")) is None


def test_ctrl_c_exits_130_with_the_resume_command_and_no_traceback(tmp_path, monkeypatch, capsys):
    """Ray Tune turns Ctrl-C into a normal return with unfinished trials: the CLI must not exit 0."""
    import hawor_tune.search as search
    from hawor_tune.results import write_parquet_atomic

    def interrupted(space, *, storage, name, **kwargs):
        exp_dir = storage / name
        exp_dir.mkdir()
        write_parquet_atomic([
            {"trial_id": "a", "status": "TERMINATED", "epochs": 3, "stopped_early": False, "stopped_at_epoch": None,
             "diverged": False, "best/val/mpjpe": 40.0, "best_epoch": 3},
            {"trial_id": "b", "status": "INTERRUPTED", "epochs": 1, "stopped_early": False,
             "stopped_at_epoch": None, "diverged": False, "best/val/mpjpe": 50.0, "best_epoch": 1}],
            exp_dir / "trials.parquet")
        return search.SearchOutcome(exp_dir, None)

    monkeypatch.setattr(search, "run_search", interrupted)
    monkeypatch.setattr(search, "start_ray", lambda *a, **k: None)
    monkeypatch.setattr(search, "prepare_in_background", lambda cfg: None)  # this space's base reads no data
    space = write_space(tmp_path)
    argv = ["--space", str(space), "--storage", str(tmp_path / "r"), "--name", "x", "--set", "train.epochs=3",
            "--dashboard-port", "0"]
    assert run_search.main(argv) == 130
    out, err = capsys.readouterr()
    resume = f"python run_search.py {' '.join(argv)} --resume"
    assert f"1 trials did not finish (search interrupted): continue with {resume}" in out
    assert err.strip().splitlines() == [f"error: search interrupted; continue with: {resume}"]


def test_a_multi_objective_space_gets_optunas_multi_objective_sampler(tmp_path):
    from conftest import write_space

    from hawor_tune.search import build_scheduler, build_searcher

    space = load_search_space(write_space(tmp_path, "{metric: [val/mpjpe, val/cam_trans_error], mode: [min, max]}"))
    searcher = build_searcher(space).searcher
    assert (searcher.metric, searcher.mode) == (["val/mpjpe", "val/cam_trans_error"], ["min", "max"])
    assert type(build_scheduler(space)).__name__ == "FIFOScheduler"
    assert searcher.suggest("t1") == pytest.approx(space.default_point())
    searcher.on_trial_complete("t1", {"val/mpjpe": 40.0, "val/cam_trans_error": 3.0})
    (told,) = searcher._ot_study.trials  # Ray's searcher holds its study privately; Optuna got both values
    assert told.values == [40.0, 3.0]
    assert [d.name for d in searcher._ot_study.directions] == ["MINIMIZE", "MAXIMIZE"]


def test_a_data_fault_found_while_ray_starts_is_one_line_and_frees_the_name(tmp_path, synthetic_dataset, capsys,
                                                                              monkeypatch):
    # The data is checked in a thread while Ray starts (hawor_tune.search.prepare_in_background); its
    # error still ends the CLI with one line and exit 2, and the experiment's name stays free.
    import hawor_tune.search as search

    started = []
    monkeypatch.setattr(search, "start_ray", lambda *a, **k: started.append(True))
    (tmp_path / "empty").mkdir()
    space = write_search_space(tmp_path, synthetic_dataset)
    argv = ["--space", str(space), "--storage", str(tmp_path / "r"), "--name", "x", "--dashboard-port", "0",
            "--set", f"data.root={tmp_path / 'empty'}", "--set", "data.generate=false"]
    assert _exit_code(run_search.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "empty") in err[0], err
    assert started and not (tmp_path / "r" / "x").exists()


def test_data_prepared_before_is_checked_in_a_thread_at_the_lowest_priority(synthetic_dataset, monkeypatch):
    import hawor_tune.search.preparation as search

    cfg = synthetic_dataset.config()
    search.prepare_data(cfg)  # what a first search does: here the caches and the flow-head fit
    checked = []
    real = search.prepare_data

    def recording(c):
        checked.append((threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        real(c)

    monkeypatch.setattr(search, "prepare_data", recording)
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert search.prepare_in_background(cfg).result(timeout=120) is None
    ((thread, nice),) = checked
    assert thread != threading.get_native_id()
    if sys.platform.startswith("linux"):
        assert nice == 19
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine  # that thread's alone


def test_a_first_search_is_prepared_in_a_thread_at_the_callers_priority(tmp_path, synthetic_dataset, monkeypatch):
    import hawor_tune.search.preparation as search

    prepared = []
    monkeypatch.setattr(search, "prepare_data", lambda c: prepared.append(
        (c, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))))
    fresh = synthetic_dataset.config({"data.root": str(tmp_path / "not_generated_yet")})
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert search.prepare_in_background(fresh).result(timeout=60) is None
    ((cfg, thread, nice),) = prepared  # generation and pretraining, once
    assert cfg is fresh and thread != threading.get_native_id() and nice == mine
