"""The compact live table of a search (hawor_tune.console), driven through Tune's callback hooks with fake trials."""

from __future__ import annotations

import io
import math
import random
from types import SimpleNamespace

import pytest

from hawor_tune.console import LiveConsole, short_names


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _trial(trial_id: str, status: str = "RUNNING", **config: float) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, status=status, config=config)


def _console(tty: bool, **kw) -> tuple[LiveConsole, io.StringIO, _Clock]:
    out, clock = io.StringIO(), _Clock()
    console = LiveConsole(objectives=[("val/mpjpe", "min")], max_epochs=4, stream=out, tty=tty, clock=clock,
                          param_paths=["optim.lr", "loss.keypoint_2d"], **kw)
    return console, out, clock


def test_short_names_keep_the_full_path_only_where_last_parts_collide():
    assert short_names(["optim.lr", "loss.temporal", "model.temporal"]) == \
        {"optim.lr": "lr", "loss.temporal": "loss.temporal", "model.temporal": "model.temporal"}


def test_one_row_per_trial_with_now_best_asha_stop_and_short_params():
    console, out, clock = _console(tty=False)
    a, b, c = _trial("a", **{"optim.lr": 1e-3, "loss.keypoint_2d": 0.5}), _trial("b"), _trial("c")
    for epoch, value in ((1, 50.0), (2, 40.0), (3, 45.0)):
        console.on_trial_result(0, [], a, {"training_iteration": epoch, "val/mpjpe": value, "val/joint_00": 1.0})
    console.on_trial_result(0, [], b, {"training_iteration": 1, "val/mpjpe": 60.0})
    console.on_trial_complete(0, [], b)  # after 1 of 4 epochs: ASHA stopped it
    console.on_trial_result(0, [], c, {"training_iteration": 2, "diverged": True, "val/mpjpe": math.inf})
    console.on_trial_complete(0, [], c)
    b.status = c.status = "TERMINATED"
    console.on_experiment_end([a, b, c])
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("3 trials: 1 DIVERGED, 1 RUNNING, 1 TERMINATED; best val/mpjpe 40 (trial a)")
    assert lines[1].split() == ["trial", "status", "epoch", "val/mpjpe", "best", "asha", "stop", "lr", "keypoint_2d"]
    assert lines[2].split() == ["a", "RUNNING", "3/4", "45", "40", "0.001", "0.5"]
    assert lines[3].split() == ["b", "TERMINATED", "1/4", "60", "60", "1"]
    assert lines[4].split()[:4] == ["c", "DIVERGED", "2/4", "inf"]
    assert len(lines) == 5  # one row per trial: no per-joint metrics


def _blocks(out: io.StringIO) -> int:
    return sum(line.startswith("trial ") for line in out.getvalue().splitlines())


def test_a_log_gets_a_block_per_interval_only_when_a_row_changed():
    console, out, clock = _console(tty=False, interval_s=30)
    a = _trial("a")
    console.on_step_end(0, [a])
    clock.t = 10
    console.on_trial_result(0, [], a, {"training_iteration": 1, "val/mpjpe": 50.0})
    console.on_step_end(0, [a])  # changed, but within the interval
    assert _blocks(out) == 1
    clock.t = 40
    console.on_step_end(0, [a])
    clock.t = 80
    console.on_step_end(0, [a])  # nothing changed
    assert _blocks(out) == 2
    assert "\x1b[" not in out.getvalue()


def test_a_terminal_redraws_the_block_in_place():
    console, out, clock = _console(tty=True)
    trials = [_trial("a"), _trial("b")]
    console.on_step_end(0, trials)
    clock.t = 2
    console.on_step_end(0, trials)
    text = out.getvalue()
    assert text.count("\x1b[4F\x1b[J") == 1  # up over the header line, the column names and two rows
    assert text.split("\x1b[4F\x1b[J")[1].count("\n") == 4


def test_the_header_names_no_trial_that_diverged_or_errored():
    # The reproduction of issue 34: a at 30 mm then diverged, b at 40 mm then errored. Neither can be
    # retrained (run_best.py's best_trial skips both), so the header names no best trial.
    console, out, clock = _console(tty=False)
    a, b = _trial("a"), _trial("b")
    console.on_trial_result(0, [], a, {"training_iteration": 1, "val/mpjpe": 30.0})
    console.on_trial_result(0, [], a, {"training_iteration": 2, "diverged": True, "val/mpjpe": math.inf})
    console.on_trial_complete(0, [], a)
    console.on_trial_result(0, [], b, {"training_iteration": 1, "val/mpjpe": 40.0})
    console.on_trial_error(0, [], b)
    a.status, b.status = "TERMINATED", "ERROR"
    console.on_experiment_end([a, b])
    lines = out.getvalue().splitlines()
    assert console.best([a, b]) is None
    assert lines[0].endswith("2 trials: 1 DIVERGED, 1 ERROR; no best val/mpjpe yet (errored and diverged trials "
                             "do not count)")
    assert lines[2].split() == ["a", "DIVERGED", "2/4", "inf", "30"]  # its best before it diverged, shown
    assert lines[3].split() == ["b", "ERROR", "1/4", "40", "40"]


def test_a_tie_goes_to_the_trial_that_reached_it_in_fewer_epochs():
    console, out, clock = _console(tty=False)
    a, b = _trial("a"), _trial("b")
    for epoch, value in ((1, 30.0), (2, 25.0), (3, 20.0)):
        console.on_trial_result(0, [], a, {"training_iteration": epoch, "val/mpjpe": value})
    console.on_trial_result(0, [], b, {"training_iteration": 1, "val/mpjpe": 20.0})
    console.on_experiment_end([a, b])
    assert out.getvalue().splitlines()[0].endswith("; best val/mpjpe 20 (trial b)")


# ---- The console and run_best.py name the same trial ---------------------------------------------------------

def _random_search(rng: random.Random, n_trials: int, objectives: list[tuple[str, str]]):
    """Hook calls of a made-up search: values from a small set (so ties happen), trials that ASHA stops, that
    diverge, error, or are still running; each call as (hook name, trial, result)."""
    events = []
    for i in range(n_trials):
        trial = _trial(f"t{i}")
        end = rng.choice(["complete", "stopped", "diverge", "error", "running"])
        epochs = 3 if end == "complete" else rng.randint(1, 3)
        for epoch in range(1, epochs + 1):
            if end == "diverge" and epoch == epochs:
                events.append(("result", trial, {"training_iteration": epoch, "diverged": True,
                                                 **{m: math.inf for m, _ in objectives}}))
            else:
                events.append(("result", trial, {"training_iteration": epoch,
                                                 **{m: rng.choice([20.0, 25.0, 30.0]) for m, _ in objectives}}))
        if end in ("complete", "stopped", "diverge"):
            events.append(("complete", trial, None))
        elif end == "error":
            events.append(("error", trial, None))
    order = sorted(range(len(events)), key=lambda k: (rng.random(), k))  # trials interleave, epochs stay in order
    by_trial: dict[str, list] = {}
    for event in events:
        by_trial.setdefault(event[1].trial_id, []).append(event)
    return [by_trial[events[k][1].trial_id].pop(0) for k in order]


@pytest.mark.parametrize("metrics", [["val/mpjpe"], ["val/mpjpe", "val/cam_trans_error"]])
def test_the_console_and_run_best_always_name_the_same_trial(tmp_path, synthetic_dataset, metrics):
    from conftest import write_search_space

    from hawor_tune.results import ExperimentRecord
    from hawor_tune.retrain import SelectionError, choose_best_trial, load_experiment
    from hawor_tune.search import ParquetExporter
    from hawor_tune.search_space import load_search_space

    objectives = [(m, "min") for m in metrics]
    extra = {"metric": metrics, "mode": ["min"] * len(metrics), "scheduler": {"type": "fifo"}} if len(metrics) > 1 else {}
    space = load_search_space(write_search_space(tmp_path / "space", synthetic_dataset, epochs=3, **extra))
    rng = random.Random(0)
    for search in range(12):
        folder = tmp_path / f"search{search}"
        ExperimentRecord("x", space, full_budget={}).save(folder)
        exporter = ParquetExporter(folder, metric=metrics[0], mode="min", max_epochs=3, param_paths=[],
                                   objectives=objectives)
        exporter.setup()
        console = LiveConsole(objectives=objectives, max_epochs=3, param_paths=[], stream=io.StringIO(), tty=False)
        trials: list = []
        for hook, trial, result in _random_search(rng, 4, objectives):
            if trial not in trials:
                trials.append(trial)
            for callback in (exporter, console):
                if hook == "result":
                    callback.on_trial_result(0, trials, trial, result)
                else:
                    getattr(callback, f"on_trial_{hook}")(0, trials, trial)
            trial.status = {"complete": "TERMINATED", "error": "ERROR"}.get(hook, trial.status)
            try:
                chosen = choose_best_trial(load_experiment(experiment=folder))[0]["trial_id"]
            except SelectionError:
                chosen = None
            best = console.best(trials)
            assert (best and best["trial_id"]) == chosen, f"search {search}, after {hook} of {trial.trial_id}"
            console.show(trials)
            header = console.stream.getvalue().splitlines()[-len(trials) - 2]
            assert header.endswith(f"(trial {chosen})" if chosen else "do not count)")


def test_constraints_give_a_met_column_a_count_and_the_best_trial_that_meets_them():
    console, out, clock = _console(tty=False, constraints=["constraint/accel_error"])
    a, b = _trial("a"), _trial("b")
    console.on_trial_result(0, [], a, {"training_iteration": 1, "val/mpjpe": 30.0, "constraint/accel_error": 0.4})
    console.on_trial_result(0, [], b, {"training_iteration": 1, "val/mpjpe": 40.0, "constraint/accel_error": -0.1})
    console.on_experiment_end([a, b])
    lines = out.getvalue().splitlines()
    # a scores better but breaks the constraint: b is the trial run_best.py would retrain
    assert lines[0].endswith("2 trials: 2 RUNNING; 1 meet the constraints; best val/mpjpe 40 (trial b)")
    assert lines[1].split()[-3:] == ["met", "lr", "keypoint_2d"]
    assert lines[2].split()[-1] == "no" and lines[3].split()[-1] == "yes"
