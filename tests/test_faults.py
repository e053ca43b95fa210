"""Faults a search survives: why a trial failed (and so whether a resume runs it again), the record the exporter
keeps of it, Ray's writes into the storage, a node lost under a trial; and, under ``-m slow``, the errored
trials resumed and the whole fault-injection suite (benchmarks/chaos.py)."""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray import cloudpickle
from ray.exceptions import ActorDiedError, NodeDiedError, RayTaskError

import run_search
from hawor_tune.atomic import DiskFullError
from hawor_tune.config import ConfigError
from hawor_tune.errors import MissingFileError
from hawor_tune.failures import ENVIRONMENT, OWN, TrialFailedBefore, describe, failed_by
from hawor_tune.results import read_rows, write_parquet_atomic
from hawor_tune.search import ParquetExporter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import chaos  # noqa: E402


def _task_error(cause: BaseException) -> BaseException:
    """The error Ray records for a trial whose trainable raised ``cause`` (pickled and read back, as Ray
    leaves it beside the trial)."""
    return cloudpickle.loads(cloudpickle.dumps(RayTaskError("ImplicitFunc.train", "Traceback ...", cause)
                                               .as_instanceof_cause()))


@pytest.mark.parametrize(("error", "kind", "line"), [
    (ActorDiedError(), ENVIRONMENT, "ActorDiedError: The actor died unexpectedly before finishing this task."),
    (NodeDiedError("node 1 died"), ENVIRONMENT, "NodeDiedError: node 1 died"),
    (_task_error(OSError(errno.ENOSPC, "No space left on device")), ENVIRONMENT,
     "OSError: [Errno 28] No space left on device"),
    (_task_error(DiskFullError("no space left to write x")), ENVIRONMENT, "DiskFullError: no space left to write x"),
    (_task_error(ConnectionResetError(errno.ECONNRESET, "reset")), ENVIRONMENT,
     "ConnectionResetError: [Errno 104] reset"),
    (None, ENVIRONMENT, "no error recorded"),
    (_task_error(ConfigError("optim.lr: -1 is not > 0")), OWN, "ConfigError: optim.lr: -1 is not > 0"),
    (_task_error(MissingFileError("data.root: /x: no such folder")), OWN,
     "MissingFileError: data.root: /x: no such folder"),
    (_task_error(ValueError("bad value\nmore")), OWN, "ValueError: bad value"),
    (_task_error(TrialFailedBefore("trial a failed on its own")), OWN, "TrialFailedBefore: trial a failed on its own"),
])
def test_a_trial_fails_because_its_environment_did_or_on_its_own(error, kind, line):
    assert failed_by(error) == kind
    assert describe(error) == line


def _trial(folder: Path, trial_id: str, error: BaseException | None = None) -> SimpleNamespace:
    """The part of a Ray Tune trial the exporter reads; ``error`` is pickled where Ray leaves it."""
    trial = SimpleNamespace(trial_id=trial_id, status="RUNNING", config={"optim.lr": 1e-3}, pickled_error_file=None,
                            last_result={}, checkpoint=None)
    if error is not None:
        trial.pickled_error_file = folder / f"{trial_id}.pkl"
        trial.pickled_error_file.write_bytes(cloudpickle.dumps(error))
    return trial


def test_the_exporter_keeps_the_registered_checkpoint_and_why_a_trial_failed(tmp_path):
    exporter = ParquetExporter(tmp_path, metric="val/mpjpe", mode="min", max_epochs=3, param_paths=["optim.lr"])
    exporter.setup()
    lost, bad = _trial(tmp_path, "lost", ActorDiedError()), _trial(tmp_path, "bad", _task_error(ValueError("x")))
    for trial in (lost, bad):
        exporter.on_trial_start(0, [], trial)
        exporter.on_trial_result(0, [], trial, {"training_iteration": 1, "val/mpjpe": 50.0, "pid": 1234})
    # Ray registers a checkpoint (the one a retry continues from) after the epoch's row: the file says so at once.
    exporter.on_checkpoint(0, [], lost, SimpleNamespace(path="/storage/lost/checkpoint_000000"))
    assert {r["trial_id"]: r["checkpoint"] for r in read_rows(tmp_path / "trials.parquet")}["lost"] == \
        "/storage/lost/checkpoint_000000"
    assert {r["pid"] for r in read_rows(tmp_path / "epochs.parquet")} == {1234}
    for trial in (lost, bad):
        exporter.on_trial_error(0, [], trial)
    rows = {r["trial_id"]: r for r in read_rows(tmp_path / "trials.parquet")}
    assert (rows["lost"]["status"], rows["lost"]["failed_by"]) == ("ERROR", ENVIRONMENT)
    assert rows["lost"]["error"].startswith("ActorDiedError: ")
    assert (rows["bad"]["status"], rows["bad"]["failed_by"], rows["bad"]["error"]) == ("ERROR", OWN, "ValueError: x")
    assert "pid" not in {k.split("/", 1)[-1] for k in rows["lost"] if k.startswith(("best/", "last/"))}

    # --resume: Ray runs both again; the bad one is stopped at once by the trainable and keeps its first error.
    again = ParquetExporter(tmp_path, metric="val/mpjpe", mode="min", max_epochs=3, param_paths=["optim.lr"])
    again.setup()
    lost.status = bad.status = "PENDING"
    again.on_step_begin(0, [lost, bad])
    again.on_trial_error(0, [], _trial(tmp_path, "bad", _task_error(TrialFailedBefore("trial bad failed before"))))
    for epoch in (2, 3):
        again.on_trial_result(0, [], lost, {"training_iteration": epoch, "val/mpjpe": 50.0 - epoch, "pid": 99})
    again.on_trial_complete(0, [], lost)
    rows = {r["trial_id"]: r for r in read_rows(tmp_path / "trials.parquet")}
    assert (rows["lost"]["status"], rows["lost"]["epochs"], rows["lost"]["error"]) == ("TERMINATED", 3, None)
    assert (rows["bad"]["status"], rows["bad"]["failed_by"], rows["bad"]["error"]) == ("ERROR", OWN, "ValueError: x")


def test_the_summary_says_which_errored_trials_a_resume_runs_again(tmp_path, capsys):
    common = {"epochs": 1, "stopped_early": False, "stopped_at_epoch": None, "diverged": False,
              "best/val/mpjpe": 50.0, "best_epoch": 1}
    write_parquet_atomic([
        {"trial_id": "a", "status": "TERMINATED", **common, "error": None, "failed_by": None},
        {"trial_id": "b", "status": "ERROR", **common, "error": "ActorDiedError: gone", "failed_by": ENVIRONMENT},
        {"trial_id": "c", "status": "ERROR", **common, "error": "ValueError: x", "failed_by": OWN}],
        tmp_path / "trials.parquet")
    assert run_search.print_summary(tmp_path, "val/mpjpe", "min", "python run_search.py --name x --resume") == 0
    out = capsys.readouterr().out
    assert "trial b failed because its environment did (ActorDiedError: gone)\n" in out
    assert "trial c failed on its own (ValueError: x)\n" in out
    assert ("the trials whose environment failed run again from their last checkpoint with python run_search.py "
            "--name x --resume") in out


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> chaos.Lab:
    return chaos.Lab(tmp_path_factory.mktemp("chaos"))


@pytest.mark.slow  # about 1.5 min: two searches
def test_a_resume_runs_again_a_trial_whose_worker_was_lost_and_leaves_a_bad_value_failed(lab):
    """Item by item: the lost trial ends ERROR by its environment and the bad values on their own; the resume
    says so in a line each, runs the first again from its registered checkpoint (no epoch up to it trained
    again) and leaves the others failed; trials.parquet, Ray's record and the Optuna study agree."""
    outcome = chaos.errored_trials(lab)
    assert outcome.ok, outcome.outcome
    assert outcome.lost == 0


def test_a_trial_whose_node_is_lost_goes_on_from_its_registered_checkpoint(lab):
    """A two-node cluster loses the node under a trial frozen mid-trial: the trial goes on on the head node,
    no epoch up to the checkpoint registered before the loss trained again, nothing lost."""
    outcome = chaos.node_removed(lab)
    assert outcome.ok, outcome.outcome
    assert outcome.lost == 0


@pytest.mark.slow
def test_every_injected_fault_is_survived_with_no_trial_lost(capsys):
    """The whole fault-injection suite (several minutes): ``python -m pytest -m slow``."""
    assert chaos.main([]) == 0, capsys.readouterr().out


# A copy into the storage as on a full disk, in a child process: past 4 KiB every write fails (RLIMIT_FSIZE).
_COPY_PAST_THE_LIMIT = """
import resource, signal, sys
import pyarrow.fs as pafs
from hawor_tune.search.storage_fs import atomic_local_fs

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    pafs.copy_files(sys.argv[1], sys.argv[2], source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=atomic_local_fs())
except OSError as e:
    print(e.errno)
"""


def test_a_file_ray_writes_into_the_storage_is_whole_or_as_it_was(tmp_path):
    """Ray copies its state, results and checkpoints into the experiment folder through this filesystem: a copy
    that fails half-way (here: a file-size limit, as a full disk) leaves the previous file, and no temporary one."""
    import subprocess

    from hawor_tune.search.storage_fs import atomic_local_fs

    source, storage = tmp_path / "staging", tmp_path / "storage"
    source.mkdir()
    (source / "experiment_state.json").write_text('{"trials": 1}')
    atomic_local_fs().copy_file(str(source / "experiment_state.json"), str(tmp_path / "copied.json"))
    assert (tmp_path / "copied.json").read_text() == '{"trials": 1}'
    with atomic_local_fs().open_output_stream(str(tmp_path / "copied.json")) as out:
        out.write(b'{"trials": 2}')
        assert (tmp_path / "copied.json").read_text() == '{"trials": 1}'  # renamed into place when closed
    assert (tmp_path / "copied.json").read_text() == '{"trials": 2}'

    import pyarrow.fs as pafs
    pafs.copy_files(str(source), str(storage), source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=atomic_local_fs())
    (source / "experiment_state.json").write_text('{"trials": [' + "1, " * 4000 + "2]}")  # past the limit
    done = subprocess.run([sys.executable, "-c", _COPY_PAST_THE_LIMIT, str(source), str(storage)],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == str(errno.EFBIG), done.stderr[-2000:]
    assert (storage / "experiment_state.json").read_text() == '{"trials": 1}'
    assert [p.name for p in storage.iterdir()] == ["experiment_state.json"]
