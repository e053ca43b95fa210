from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import write_search_space

from hawor_tune.results import (
    RECORD_FILE,
    ExperimentRecord,
    RecordError,
    StorageError,
    best_trial,
    check_resumable,
    check_storage,
    is_finite_number,
    summarize_trials,
    write_parquet_atomic,
)
from hawor_tune.search_space import load_search_space


def _epochs(trial_id, values, **extra):
    return [{"trial_id": trial_id, "epoch": e, "val/mpjpe": v, "train/loss": 10.0 - e, "lr": 1e-3,
             "time_total_s": 5.0 * e, **extra} for e, v in enumerate(values, start=1)]


META = {
    "a": {"status": "TERMINATED", "params": {"optim.lr": 1e-3}, "checkpoint": "/x/a"},
    "b": {"status": "TERMINATED", "params": {"optim.lr": 1e-2}},
    "c": {"status": "ERROR", "params": {"optim.lr": 1e-4}},
}


def test_summary_best_last_stops_and_params():
    rows = _epochs("a", [50.0, 40.0, 45.0, 42.0]) + _epochs("b", [60.0]) + _epochs("c", [70.0, 65.0])
    by_id = {r["trial_id"]: r for r in summarize_trials(rows, META, metric="val/mpjpe", mode="min",
                                                        max_epochs=4, param_paths=["optim.lr"])}
    a, b, c = by_id["a"], by_id["b"], by_id["c"]
    assert a["best/val/mpjpe"] == 40.0 and a["last/val/mpjpe"] == 42.0 and a["best_epoch"] == 2
    assert a["epochs"] == 4 and not a["stopped_early"] and a["stopped_at_epoch"] is None
    assert a["param/optim.lr"] == 1e-3 and a["checkpoint"] == "/x/a" and a["wall_time_s"] == 20.0
    assert a["best/train/loss"] == 6.0 and a["last/lr"] == 1e-3 and "best/lr" not in a
    assert b["stopped_early"] and b["stopped_at_epoch"] == 1          # finished after 1 of 4 epochs
    assert c["status"] == "ERROR" and not c["stopped_early"]           # an error is not an ASHA stop


def test_mode_max_and_nonfinite_values_are_ignored_for_best():
    rows = _epochs("a", [1.0, math.nan, 3.0, math.inf])
    (a,) = summarize_trials(rows, {"a": META["a"]}, metric="val/mpjpe", mode="max", max_epochs=4,
                            param_paths=[])
    assert a["best/val/mpjpe"] == 3.0 and a["best_epoch"] == 3


def test_diverged_rows_flag_the_trial_and_do_not_count_as_epochs():
    rows = _epochs("a", [50.0, 45.0]) + [{"trial_id": "a", "epoch": 3, "val/mpjpe": math.inf, "diverged": True}]
    (a,) = summarize_trials(rows, {"a": META["a"]}, metric="val/mpjpe", mode="min", max_epochs=8,
                            param_paths=[])
    assert a["diverged"] and a["epochs"] == 2 and not a["stopped_early"]
    assert a["best/val/mpjpe"] == 45.0 and a["last/val/mpjpe"] == 45.0


def test_trial_without_results_still_has_a_row():
    (row,) = summarize_trials([], {"z": {"status": "PENDING", "params": {"optim.lr": 0.1}}}, metric="val/mpjpe",
                              mode="min", max_epochs=3, param_paths=["optim.lr"])
    assert row["epochs"] == 0 and row["best_epoch"] is None and row["param/optim.lr"] == 0.1


@pytest.mark.parametrize("rows", [[], [{"a": 1, "b": "x"}, {"a": 2}]])
def test_write_parquet_atomic_round_trip(tmp_path, rows):
    path = tmp_path / "t.parquet"
    write_parquet_atomic(rows, path, columns=["a", "b"])
    back = pq.read_table(path).to_pylist()
    assert back == [{"a": r.get("a"), "b": r.get("b")} for r in rows]
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def _trial(trial_id, best, best_epoch=1, status="TERMINATED", diverged=False):
    return {"trial_id": trial_id, "status": status, "diverged": diverged, "best/val/mpjpe": best,
            "best_epoch": best_epoch}


@pytest.mark.parametrize(("rows", "mode", "expected"), [
    ([_trial("a", 30.0), _trial("b", 20.0), _trial("c", 25.0)], "min", "b"),
    ([_trial("a", 30.0), _trial("b", 20.0), _trial("c", 25.0)], "max", "a"),
    ([_trial("a", 10.0, status="ERROR"), _trial("b", 20.0)], "min", "b"),              # errored
    ([_trial("a", 10.0, diverged=True), _trial("b", 20.0)], "min", "b"),               # diverged
    ([_trial("a", math.nan), _trial("b", None), _trial("c", 20.0)], "min", "c"),       # no finite value
    ([_trial("a", 20.0, best_epoch=3), _trial("b", 20.0, best_epoch=2)], "min", "b"),  # tie: fewer epochs
    ([_trial("b", 20.0), _trial("a", 20.0)], "min", "a"),                              # then trial id
    ([_trial("a", 20.0, status="INTERRUPTED"), _trial("b", 25.0)], "min", "a"),        # unfinished counts
])
def test_best_trial_rule(rows, mode, expected):
    assert best_trial(rows, "val/mpjpe", mode)["trial_id"] == expected
    assert best_trial(rows[::-1], "val/mpjpe", mode)["trial_id"] == expected  # row order does not matter


def test_best_trial_without_a_usable_trial_and_with_a_bad_mode():
    assert best_trial([_trial("a", 1.0, status="ERROR"), _trial("b", math.inf)], "val/mpjpe", "min") is None
    assert best_trial([], "val/mpjpe", "min") is None
    with pytest.raises(ValueError, match="mode must be 'min' or 'max', got 'minimum'"):
        best_trial([_trial("a", 1.0)], "val/mpjpe", "minimum")


def test_search_summary_and_run_best_choose_the_same_trial(tmp_path, capsys, synthetic_dataset):
    """Trials on which the earlier rules disagreed: the summary took the errored trial (lowest value) and broke
    the a/b tie by row order (a), run_best broke it by epochs (b) and both took the diverged trial's early epochs."""
    import run_search
    from hawor_tune.retrain import choose_best_trial, load_experiment

    rows = (_epochs("a", [30.0, 20.0, 25.0]) + _epochs("b", [20.0]) + _epochs("c", [26.0, math.nan])
            + _epochs("err", [10.0]) + _epochs("div", [15.0])
            + [{"trial_id": "div", "epoch": 2, "val/mpjpe": math.nan, "diverged": True}])
    meta = {t: {"status": "TERMINATED", "params": {"optim.lr": 1e-3}} for t in ("a", "b", "c", "div")}
    meta["err"] = {"status": "ERROR", "params": {"optim.lr": 1e-3}}
    trials = summarize_trials(rows, meta, metric="val/mpjpe", mode="min", max_epochs=3, param_paths=["optim.lr"])
    write_parquet_atomic(rows, tmp_path / "epochs.parquet")
    write_parquet_atomic(trials, tmp_path / "trials.parquet")
    ExperimentRecord.of_search(load_search_space(write_search_space(tmp_path / "space", synthetic_dataset)),
                               "x").save(tmp_path)  # val/mpjpe, min

    run_search.print_summary(tmp_path, "val/mpjpe", "min")
    assert "best trial b: val/mpjpe = 20.000 at epoch 1" in capsys.readouterr().out
    trial, value, epoch = choose_best_trial(load_experiment(experiment=tmp_path))
    assert (trial["trial_id"], value, epoch) == ("b", 20.0, 1)
    assert best_trial(trials, "val/mpjpe", "min")["trial_id"] == "b"


# --- the experiment record (search.json) ---------------------------------------------------------------

def test_record_round_trips_and_keeps_the_base_files_budget(tmp_path, synthetic_dataset):
    path = write_search_space(tmp_path / "space", synthetic_dataset, epochs=3, scheduler={"type": "fifo"})
    space = load_search_space(path, extra_overrides=["train.epochs=2"])  # trials shortened to fit a budget
    record = ExperimentRecord.of_search(space, "x")
    base_batches = synthetic_dataset.config().train.max_train_batches
    assert record.full_budget == {"train.epochs": 3, "train.max_train_batches": base_batches}
    record.save(tmp_path)
    back = ExperimentRecord.load(tmp_path)
    assert back == record and back.space.base_config.train.epochs == 2


@pytest.mark.parametrize(("content", "fix"), [
    ("{", "not valid JSON"),
    # what hawor-tune wrote before the record had a version
    (json.dumps({"metric": "val/mpjpe", "mode": "min", "params": ["optim.lr"], "base_config": {}}),
     "written by an earlier hawor-tune"),
    (json.dumps({"version": 99, "name": "x"}), "record version 99, this hawor-tune reads 2; upgrade hawor-tune"),
    (json.dumps({"version": 2, "name": "x"}), "malformed search record (KeyError"),
])
def test_record_that_cannot_be_read_says_why(tmp_path, content, fix):
    (tmp_path / RECORD_FILE).write_text(content)
    with pytest.raises(RecordError, match=str(tmp_path)) as err:
        ExperimentRecord.load(tmp_path)
    assert fix in str(err.value)


def _unwritable(tmp_path, kind):
    """A storage value a search cannot write in, of one kind."""
    if kind == "proc":
        return "/proc/hawor-tune-results"
    if kind == "file":
        (tmp_path / "taken").write_text("x")
        return str(tmp_path / "taken")
    if kind == "under a file":
        (tmp_path / "taken").write_text("x")
        return str(tmp_path / "taken" / "results")
    if kind == "read-only":
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return str(folder / "results")
    return "s3://bucket/results"


UNWRITABLE = ["proc", "file", "under a file",
              pytest.param("read-only", marks=pytest.mark.skipif(os.geteuid() == 0,
                                                                  reason="root writes in a mode-555 folder")),
              "uri"]


@pytest.mark.parametrize("kind", UNWRITABLE)
def test_check_storage_refuses_what_a_search_cannot_write(tmp_path, kind):
    value = _unwritable(tmp_path, kind)
    with pytest.raises(StorageError) as err:
        check_storage(value, label="--storage")
    message = str(err.value)
    assert message.startswith(f"--storage {value}: ") and "folder this user can write" in message
    assert "\n" not in message


def test_check_storage_makes_the_folder_and_leaves_nothing_in_it(tmp_path):
    path = check_storage(tmp_path / "a" / "b")
    assert path == (tmp_path / "a" / "b").resolve() and path.is_dir() and not any(path.iterdir())


def test_check_resumable_names_the_experiments_there(tmp_path):
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / RECORD_FILE).write_text("{}")
    (tmp_path / "stray").mkdir()
    assert check_resumable(tmp_path, "done") == tmp_path / "done"
    with pytest.raises(StorageError, match=r"nothing to resume at .*missing \(no such folder\); experiments there: done"):
        check_resumable(tmp_path, "missing")
    with pytest.raises(StorageError, match=f"stray \\(no {RECORD_FILE}: not a search's folder\\)"):
        check_resumable(tmp_path, "stray")


# --- multi-objective: the Pareto front -----------------------------------------------------------------

OBJECTIVES = [("val/mpjpe", "min"), ("val/cam_trans_error", "min")]


@pytest.mark.parametrize("points,expected", [
    # (mpjpe, cam) per trial: a and b trade off, c is dominated by a, d equals a
    ({"a": (40, 10), "b": (50, 5), "c": (45, 12), "d": (40, 10)}, {"a", "b", "d"}),
    ({"a": (40, 10), "b": (40, 11)}, {"a"}),  # as good in one, worse in the other: dominated
])
def test_pareto_column_marks_the_non_dominated_trials(points, expected):
    epochs = [{"trial_id": t, "epoch": 1, "val/mpjpe": float(m), "val/cam_trans_error": float(c)}
              for t, (m, c) in points.items()]
    meta = {t: {"status": "TERMINATED"} for t in points}
    rows = summarize_trials(epochs, meta, metric="val/mpjpe", mode="min", max_epochs=1, param_paths=[],
                            objectives=OBJECTIVES)
    assert {r["trial_id"] for r in rows if r["pareto"]} == expected


def test_pareto_uses_each_objectives_mode_and_skips_errored_diverged_and_nan():
    epochs = [{"trial_id": "a", "epoch": 1, "val/mpjpe": 40.0, "val/pa_mpjpe": 5.0},
              {"trial_id": "a", "epoch": 2, "val/mpjpe": 45.0, "val/pa_mpjpe": 9.0},   # max mode: best is 9
              {"trial_id": "b", "epoch": 1, "val/mpjpe": 42.0, "val/pa_mpjpe": 8.0},   # dominated by a
              {"trial_id": "c", "epoch": 1, "val/mpjpe": 1.0, "val/pa_mpjpe": 99.0},   # errored
              {"trial_id": "d", "epoch": 1, "val/mpjpe": 1.0, "val/pa_mpjpe": math.nan},
              {"trial_id": "e", "epoch": 1, "val/mpjpe": 1.0, "val/pa_mpjpe": 99.0, "diverged": True}]
    meta = {t: {"status": "ERROR" if t == "c" else "TERMINATED"} for t in "abcde"}
    rows = {r["trial_id"]: r for r in summarize_trials(
        epochs, meta, metric="val/mpjpe", mode="min", max_epochs=2, param_paths=[],
        objectives=[("val/mpjpe", "min"), ("val/pa_mpjpe", "max")])}
    assert rows["a"]["best/val/pa_mpjpe"] == 9.0
    assert {t for t, r in rows.items() if r["pareto"]} == {"a"}


def test_a_single_objective_search_has_no_pareto_column():
    rows = summarize_trials(_epochs("a", [3.0]), META, metric="val/mpjpe", mode="min", max_epochs=1, param_paths=[])
    assert "pareto" not in rows[0]


_READ_AND_EXIT = """
import sys
from hawor_tune.results import read_rows, write_parquet_atomic
write_parquet_atomic([{"trial_id": "t", "epoch": e, "val/mpjpe": 30.0 - e} for e in range(1, 5)], sys.argv[1])
print(len(read_rows(sys.argv[1])))
"""


def test_a_process_that_read_results_exits_cleanly(tmp_path):
    # With pyarrow's thread pool, a process that had read a parquet file sometimes aborted at exit ("terminate
    # called without an active exception", status 134) after every line had been printed: in 2-4 of 6 runs.
    for _ in range(6):
        out = subprocess.run([sys.executable, "-c", _READ_AND_EXIT, str(tmp_path / "e.parquet")],
                             capture_output=True, text=True)
        assert (out.returncode, out.stdout.strip()) == (0, "4"), out.stderr[-2000:]


@pytest.mark.parametrize("value, finite", [(1, True), (2.5, True), (np.float32(3.0), True), (np.int64(4), True),
                                           (math.inf, False), (math.nan, False), (np.float32("nan"), False),
                                           (True, False), (np.bool_(True), False), (None, False), ("1.0", False)])
def test_is_finite_number(value, finite):
    assert is_finite_number(value) is finite


def test_a_trial_meets_its_constraints_at_its_best_epoch():
    # a: best at epoch 2, where its constraint holds (later epochs break it); b: best at epoch 1, broken there
    rows = (_epochs("a", [50.0, 40.0, 45.0]) + _epochs("b", [30.0, 35.0]))
    for r, c in zip(rows, [0.2, -0.1, 0.3, 0.05, -0.5]):
        r["constraint/accel_error"] = c
    by_id = {r["trial_id"]: r for r in summarize_trials(rows, {k: META[k] for k in "ab"}, metric="val/mpjpe",
                                                        mode="min", max_epochs=3, param_paths=[])}
    assert by_id["a"]["feasible"] is True and by_id["b"]["feasible"] is False
    (plain,) = summarize_trials(_epochs("a", [1.0]), {"a": META["a"]}, metric="val/mpjpe", mode="min",
                                max_epochs=1, param_paths=[])
    assert plain["feasible"] is None  # no constraints declared


@pytest.mark.parametrize(("feasible", "expected"), [
    ({"a": True, "b": False, "c": True}, "c"),    # b is better but breaks a constraint
    ({"a": False, "b": False, "c": False}, "b"),  # none meets them: the best of all
    ({"a": None, "b": None, "c": None}, "b"),     # no constraints
])
def test_best_trial_prefers_trials_that_meet_the_constraints(feasible, expected):
    rows = [{**_trial(k, v), "feasible": feasible[k]} for k, v in (("a", 30.0), ("b", 20.0), ("c", 25.0))]
    assert best_trial(rows, "val/mpjpe", "min")["trial_id"] == expected
