"""The compact live table of a search (hawor_tune.console), driven through Tune's callback hooks with fake trials."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

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
