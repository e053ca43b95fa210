"""The recorded-grid replay (benchmarks/replay.py): unit-cube coordinates, the quasi-random grid,
nearest-configuration lookup, a replayed search through Ray Tune, and the anytime curve, each against values
worked out by hand."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from conftest import write_space

from hawor_tune.results import write_parquet_atomic
from hawor_tune.search_space import ParamSpec, load_search_space

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # replay.py, beside bench_search.py
from replay import (  # noqa: E402
    RecordedGrid,
    ReplayedEpoch,
    anytime_curve,
    denormalise,
    epochs_to_reach,
    normalise,
    quasi_random_grid,
    replay_search,
)

PARAMS = {"optim.lr": {"type": "loguniform", "low": 1.0e-4, "high": 1.0e-2},
          "data.seq_len": {"type": "choice", "values": [4, 8, 16]}}


@pytest.mark.parametrize(("spec", "value", "u"), [
    (ParamSpec("optim.lr", "loguniform", 1e-4, 1e-2), 1e-3, 0.5),
    (ParamSpec("optim.lr", "loguniform", 1e-4, 1e-2), 1e-2, 1.0),
    (ParamSpec("data.seq_len", "choice", values=(4, 8, 16)), 8, 0.5),
    (ParamSpec("data.seq_len", "choice", values=(4, 8, 16)), 16, 1.0),
    (ParamSpec("optim.warmup_epochs", "quniform", 0.0, 2.0, 0.25), 1.5, 0.75),
    (ParamSpec("optim.weight_decay", "uniform", 0.0, 0.1), 0.025, 0.25),
])
def test_normalise_puts_a_value_in_the_unit_cube_and_denormalise_takes_it_back(spec, value, u):
    assert normalise(spec, value) == pytest.approx(u)
    assert denormalise(spec, u) == pytest.approx(value)


def test_the_quasi_random_grid_starts_at_the_base_point_and_holds_distinct_valid_points(tmp_path):
    space = load_search_space(write_space(tmp_path, params=PARAMS))
    grid = quasi_random_grid(space, 8, seed=0)
    assert grid[0] == {"optim.lr": 1.0e-3, "data.seq_len": 8}  # conftest's base config
    assert len(grid) == 8 and all(grid.count(p) == 1 for p in grid)
    for point in grid:
        space.trial_config(point)  # raises for a point outside the space
    assert {p["data.seq_len"] for p in grid} == {4, 8, 16}


# A hand-made recording: three configurations trained 6 epochs, one cut at 2 (not a full-budget trial).
# val/mpjpe = 40 + 10 |log10(lr) + 3| + 6 / epoch; every epoch costs seq_len seconds.
RECORDED = {"t_low": (1e-4, 8), "t_mid": (1e-3, 8), "t_high": (1e-2, 16), "t_cut": (3e-3, 4)}


def _value(lr: float, epoch: int) -> float:
    return 40 + 10 * abs(math.log10(lr) + 3) + 6 / epoch


@pytest.fixture
def recorded(tmp_path) -> tuple[object, Path]:
    space = load_search_space(write_space(tmp_path, params=PARAMS))
    folder = tmp_path / "grid"
    folder.mkdir()
    epochs, trials = [], []
    for trial_id, (lr, seq_len) in RECORDED.items():
        last = 2 if trial_id == "t_cut" else 6
        epochs += [{"trial_id": trial_id, "epoch": e, "val/mpjpe": _value(lr, e), "time/epoch_s": float(seq_len)}
                   for e in range(1, last + 1)]
        trials.append({"trial_id": trial_id, "param/optim.lr": lr, "param/data.seq_len": seq_len})
    write_parquet_atomic(epochs, folder / "epochs.parquet")
    write_parquet_atomic(trials, folder / "trials.parquet")
    return space, folder


def test_a_recorded_grid_keeps_the_full_budget_trials_and_finds_the_nearest(recorded):
    space, folder = recorded
    grid = RecordedGrid(folder, space, epochs=6)
    assert [t.trial_id for t in grid.trials] == ["t_low", "t_mid", "t_high"]  # t_cut ran 2 of 6 epochs
    # lr 3e-3 is at 0.74 of the log range: 0.24 from t_mid (same clip length: distance^2 0.057), 0.26 from
    # t_high, whose 16 frames lie half the unit further (0.068 + 0.25); lr 6e-3 at 16 frames is t_high's.
    assert grid.nearest({"optim.lr": 3e-3, "data.seq_len": 8}).trial_id == "t_mid"
    assert grid.nearest({"optim.lr": 6e-3, "data.seq_len": 16}).trial_id == "t_high"
    assert grid.nearest({"optim.lr": 1e-4, "data.seq_len": 4}).trial_id == "t_low"
    assert grid.final_values("val/mpjpe") == pytest.approx([_value(1e-4, 6), _value(1e-3, 6), _value(1e-2, 6)])
    with pytest.raises(ValueError, match="no trial ran all 7 epochs"):
        RecordedGrid(folder, space, epochs=7)


def test_a_replayed_search_reports_the_nearest_recorded_epochs_through_tune(recorded, tmp_path):
    import dataclasses

    import ray

    space, folder = recorded
    grid = RecordedGrid(folder, space, epochs=6)
    fifo = dataclasses.replace(space, search_algorithm="random", scheduler_type="fifo", grace_period=None,
                               reduction_factor=None, num_samples=3, max_concurrent=1)
    asha = dataclasses.replace(fifo, scheduler_type="asha", grace_period=1, reduction_factor=3)
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        full = replay_search(fifo, grid, storage=tmp_path / "r", name="fifo")
        cut = replay_search(asha, grid, storage=tmp_path / "r", name="asha")
    finally:
        ray.shutdown()
    assert len(full) == 3 * 6  # nobody stops a trial
    by_id = {t.trial_id: t for t in grid.trials}
    for e in full:  # every report is the recorded epoch of the trial it stands for
        lr, seq_len = RECORDED[e.replayed_trial]
        assert e.value == pytest.approx(_value(lr, e.epoch)) and e.cost_s == seq_len
        assert e.replayed_trial in by_id
    assert full[0].replayed_trial == "t_mid"  # the first point is the base config's (lr 1e-3, 8 frames)
    assert len(cut) < len(full)  # the same searcher and seed, but ASHA stopped some trials early


def test_the_anytime_curve_is_the_best_so_far_and_its_epochs_to_a_target():
    reported = [ReplayedEpoch("x", 1, 50.0, 10.0, "r"), ReplayedEpoch("x", 2, 45.0, 10.0, "r"),
                ReplayedEpoch("y", 1, 47.0, 20.0, "s"), ReplayedEpoch("y", 2, 41.0, 20.0, "s")]
    curve = anytime_curve(reported, "min")
    assert curve == [(1, 10.0, 50.0), (2, 20.0, 45.0), (3, 40.0, 45.0), (4, 60.0, 41.0)]
    assert epochs_to_reach(curve, 45.0, "min") == 2
    assert epochs_to_reach(curve, 40.0, "min") == math.inf
    assert anytime_curve(reported, "max")[-1] == (4, 60.0, 50.0)
    assert epochs_to_reach(anytime_curve(reported, "max"), 48.0, "max") == 1
