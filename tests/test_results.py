from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest

from hawor_tune.results import summarize_trials, write_parquet_atomic


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
