from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from functools import reduce
from pathlib import Path

import pytest
from conftest import EVERY_TYPE, write_space

from hawor_tune import search_space
from hawor_tune.config import LossConfig
from hawor_tune.search_space import ParamSpec, SearchSpace, SearchSpaceError, load_search_space

REPO = Path(__file__).resolve().parents[1]

def get(cfg, dotted):
    return reduce(getattr, dotted.split("."), cfg)


def assert_names(err: pytest.ExceptionInfo, path: Path, key: str, fix: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: "), msg
    assert key in msg and fix in msg, msg


# --- the shipped spaces -----------------------------------------------------------------------------

@pytest.mark.skipif(not (REPO / "configs" / "tiny.yaml").is_file(), reason="configs/tiny.yaml not written yet")
@pytest.mark.parametrize("name", ["loss_weights.yaml", "lr_seq.yaml", "full.yaml", "hand_camera.yaml"])
def test_shipped_spaces_load_and_start_from_the_base_config(name):
    space = load_search_space(REPO / "search_spaces" / name)
    cfg = space.trial_config()
    assert space.base == REPO / "configs" / "tiny.yaml"
    # hand_camera.yaml is the multi-objective example: hands and camera at once, every trial run in full
    multi = name == "hand_camera.yaml"
    # The loss weights are judged by the world-aware objective; lr_seq's parameters by the pose alone.
    metric = {"loss_weights.yaml": "val/objective", "full.yaml": "val/objective"}.get(name, "val/mpjpe")
    assert (space.metric, space.mode, space.search_algorithm, space.scheduler_type) == \
        (metric, "min", "optuna", "fifo" if multi else "asha")
    assert bool(cfg.train.objective) == (metric == "val/objective")
    assert space.objectives[1:] == ((("val/cam_trans_error", "min"),) if multi else ())
    assert space.max_epochs == cfg.train.epochs
    assert (space.resources_cpu, space.resources_gpu, space.max_concurrent) == (1.0, 0.0, 2)
    # The tiny profile's own values lie inside every shipped range, so Optuna starts from them.
    assert space.default_point() == {key: get(cfg, key) for key in space.params}


@pytest.mark.skipif(not (REPO / "configs" / "tiny.yaml").is_file(), reason="configs/tiny.yaml not written yet")
def test_full_space_is_the_union_of_the_other_two():
    spaces = {n: load_search_space(REPO / "search_spaces" / f"{n}.yaml") for n in ("loss_weights", "lr_seq", "full")}
    # The default space searches every weight its objective (pose, world placement, smoothness, fingers) can reward but
    # the betas' and the 2D keypoints' (kept at HaMeR's ratios); full.yaml adds those two and lr_seq's.
    every_term = {f"loss.{f.name}" for f in dataclasses.fields(LossConfig)}
    assert set(spaces["loss_weights"].params) == every_term - {"loss.betas", "loss.keypoint_2d"}
    assert set(spaces["full"].params) == every_term | set(spaces["lr_seq"].params)
    assert spaces["full"].trial_config().train.objective == spaces["loss_weights"].trial_config().train.objective
    for name in (*spaces["loss_weights"].params, *spaces["lr_seq"].params):
        assert spaces["full"].params[name] == {**spaces["loss_weights"].params, **spaces["lr_seq"].params}[name]
    assert spaces["loss_weights"].num_samples == 8  # the issue asks for at least 8; sized to fit 10 minutes


def test_the_objective_needs_a_declared_weighting_of_reported_metrics(tmp_path):
    with pytest.raises(SearchSpaceError, match="val/objective is the weighted objective"):
        load_search_space(write_space(tmp_path, metric="val/objective"))
    with pytest.raises(SearchSpaceError, match="'wiggle' is not a reported validation metric"):
        load_search_space(write_space(tmp_path, metric="val/objective", overrides={"train.objective": {"wiggle": 1.0}}))
    with pytest.raises(SearchSpaceError, match="its mode is min"):
        load_search_space(write_space(tmp_path, metric="val/objective", mode="max",
                                      overrides={"train.objective": {"mpjpe": 1.0}}))
    space = load_search_space(write_space(tmp_path, metric="val/objective",
                                          overrides={"train.objective": {"mpjpe": 1.0, "accel_error": 0.5}}))
    assert space.trial_config().train.objective == {"mpjpe": 1.0, "accel_error": 0.5}


# --- defaults and field values ------------------------------------------------------------------------

def test_optional_sections_take_their_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_space(tmp_path)
    space = load_search_space(path)
    assert space.path == path and space.base == tmp_path / "base.yaml"
    assert space.overrides == {}
    assert (space.num_samples, space.max_concurrent, space.search_algorithm, space.search_seed) == (4, 1, "optuna", 0)
    assert (space.scheduler_type, space.max_epochs, space.grace_period, space.reduction_factor) == ("asha", 6, 1, 3)
    assert space.search_stopped_as == "complete"
    assert space.tpe_startup_trials == 2  # 4 trials: the floor of 2 (a third of them is 1)
    assert (space.resources_cpu, space.resources_gpu) == (1.0, 0.0)
    assert space.params == {"optim.lr": ParamSpec("optim.lr", "loguniform", low=1e-4, high=1e-2)}


def test_fifo_keeps_no_asha_settings(tmp_path):
    space = load_search_space(write_space(tmp_path, "scheduler: {type: fifo}"))
    assert (space.scheduler_type, space.max_epochs, space.grace_period, space.reduction_factor) == ("fifo", 6, None, None)


def test_exponent_without_a_dot_is_read_as_a_number(tmp_path):
    # YAML 1.1 reads 1e-5 as a string; the config accepts it for float fields, so does the space.
    path = tmp_path / "space.yaml"
    write_space(tmp_path)
    path.write_text(path.read_text().replace("low: 0.0001", "low: 1e-5"))
    assert load_search_space(path).params["optim.lr"].low == 1e-5


def test_relative_config_paths_resolve_against_the_loading_directory(tmp_path, monkeypatch):
    # Ray workers run in their trial folder; the data root must still mean what it meant at load time.
    monkeypatch.chdir(tmp_path)
    space = load_search_space(write_space(tmp_path))
    monkeypatch.chdir(tmp_path.parent)
    assert space.trial_config().data.root == str(tmp_path / "data" / "x")


# --- invalid files ------------------------------------------------------------------------------------

INVALID = [
    # (snippet replacing top-level keys of VALID, fragment naming the key, fragment of the fix)
    ("colour: red", "colour: unknown key", "allowed keys are base, overrides"),
    ("base: missing.yaml", "base:", "does not exist"),
    ("base: 3", "base:", "relative to this file"),
    ("overrides: {train.epochs: 0}", "overrides: config key 'train.epochs'", "must be >= 1"),
    ("overrides: {train.epoch: 3}", "overrides.train.epoch:", "use dotted keys"),
    ("overrides: {train: {epochs: 3}}", "overrides.train:", "is a section"),
    ("overrides: [train.epochs=3]", "overrides:", "must be a mapping of dotted config keys"),
    ("metric: val/mpjpe_total", "metric:", "use one of val/mpjpe"),
    ("metric: 3", "metric:", "use one of val/mpjpe"),
    ("mode: best", "mode:", "must be min or max"),
    ("metric: [val/mpjpe, val/cam_trans_error]", "mode:", "both as lists of the same length"),
    ("{metric: val/mpjpe, mode: [min, min]}", "mode:", "mode is a list and metric is not"),
    ("{metric: [val/mpjpe, val/cam_trans_error], mode: [min]}", "mode:", "one min or max per metric"),
    ("{metric: [val/mpjpe, val/oops], mode: [min, min]}", "metric[1]:", "use one of val/mpjpe"),
    ("{metric: [val/mpjpe, val/mpjpe], mode: [min, min]}", "metric:", "list each objective once"),
    ("{metric: [val/mpjpe, val/cam_trans_error], mode: [min, best]}", "mode[1]:", "must be min or max"),
    ("{metric: [], mode: []}", "metric:", "an empty list"),
    ("{metric: [val/mpjpe, val/cam_trans_error], mode: [min, min], scheduler: {type: asha}}", "scheduler.type:",
     "asha ranks trials by one metric"),
    ("num_samples: 0", "num_samples:", "integer >= 1"),
    ("num_samples: '8'", "num_samples:", "integer >= 1"),
    ("num_samples: 2.5", "num_samples:", "integer >= 1"),
    ("max_concurrent: 0", "max_concurrent:", "integer >= 1"),
    ("search: {algorithm: tpe}", "search.algorithm:", "optuna, random"),
    ("search: {seed: -1}", "search.seed:", "integer >= 0"),
    ("search: {sampler: tpe}", "search.sampler: unknown key",
     "allowed keys are algorithm, seed, stopped_as, startup_trials"),
    ("search: {startup_trials: -1}", "search.startup_trials:", "integer >= 0"),
    ("search: {startup_trials: 2.5}", "search.startup_trials:", "integer >= 0"),
    ("search: {algorithm: random, startup_trials: 4}", "search.startup_trials:", "4: only algorithm optuna"),
    ("search: {stopped_as: pruneed}", "search.stopped_as:", "must be one of complete, pruned, got 'pruneed'"),
    ("search: {algorithm: random, stopped_as: pruned}", "search.stopped_as:", "'pruned': only algorithm optuna"),
    ("search: optuna", "search:", "must be a mapping"),
    ("scheduler: {type: hyperband}", "scheduler.type:", "asha, fifo"),
    ("scheduler: {max_epochs: 7}", "scheduler.max_epochs:", "raise train.epochs in overrides"),
    ("scheduler: {max_epochs: 0}", "scheduler.max_epochs:", "integer >= 1"),
    ("scheduler: {max_epochs: 4, grace_period: 5}", "scheduler.grace_period:", "1..4"),
    ("scheduler: {grace_period: 0}", "scheduler.grace_period:", "integer >= 1"),
    ("scheduler: {reduction_factor: 1.5}", "scheduler.reduction_factor:", "number >= 2"),
    ("scheduler: {type: fifo, reduction_factor: 3}", "scheduler.reduction_factor:", "only the asha"),
    ("scheduler: {type: fifo, max_epochs: 3}", "scheduler.max_epochs:", "remove max_epochs"),
    ("resources: {cpu: -1}", "resources.cpu:", "number >= 0"),
    ("resources: {gpu: -0.5}", "resources.gpu:", "number >= 0"),
    ("resources: {cpu: true}", "resources.cpu:", "number >= 0"),
    ("resources: {memory: 4}", "resources.memory: unknown key", "allowed keys are cpu, gpu"),
    ("params: {}", "params:", "must map dotted config keys"),
    ("params: {optim.learning_rate: {type: uniform, low: 0.1, high: 0.2}}", "params.optim.learning_rate:",
     "allowed: backbone_lr_scale, beta1, beta2"),
    ("params: {optim: {type: uniform, low: 0.1, high: 0.2}}", "params.optim:", "is a section"),
    ("params: {train.epochs: {type: randint, low: 2, high: 6}}", "params.train.epochs:", "fix it in overrides"),
    ("params: {train.threads: {type: randint, low: 1, high: 2}}", "params.train.threads:", "CPU resources"),
    ("params: {train.out_dir: {type: choice, values: [a, b]}}", "params.train.out_dir:", "own Tune trial folder"),
    ("params: {optim.lr: {type: normal, low: 0.1, high: 0.2}}", "params.optim.lr:",
     "type among uniform, loguniform, quniform, randint, choice"),
    ("params: {optim.lr: 0.001}", "params.optim.lr:", "type among uniform"),
    ("params: {data.seq_len: {type: uniform, low: 4, high: 16}}", "params.data.seq_len:",
     "use randint or quniform or choice"),
    ("params: {optim.lr: {type: randint, low: 1, high: 2}}", "params.optim.lr:", "use uniform or loguniform"),
    ("params: {train.device: {type: uniform, low: 0, high: 1}}", "params.train.device:", "use choice"),
    ("params: {data.generate: {type: randint, low: 0, high: 1}}", "params.data.generate:", "use choice"),
    ("params: {model.backbone_kwargs: {type: choice, values: [a, b]}}", "params.model.backbone_kwargs:",
     "fix it in overrides instead"),
    ("params: {optim.lr: {type: loguniform, low: 0.0, high: 0.01}}", "params.optim.lr:",
     "loguniform needs low > 0, got low=0.0; use uniform"),
    ("params: {optim.weight_decay: {type: uniform, low: 0.1, high: 0.1}}", "params.optim.weight_decay:",
     "needs low < high"),
    ("params: {optim.lr: {type: uniform, low: abc, high: 0.1}}", "params.optim.lr:", "low to be a number"),
    ("params: {data.seq_len: {type: randint, low: 2.5, high: 8}}", "params.data.seq_len:", "low to be an integer"),
    ("params: {optim.lr: {type: uniform, low: 0.001}}", "params.optim.lr:", "high is missing"),
    ("params: {optim.lr: {type: uniform, low: 0.001, high: 0.01, q: 0.001}}", "params.optim.lr.q:",
     "it takes low, high"),
    ("params: {optim.warmup_epochs: {type: quniform, low: 0.0, high: 2.0, q: 0}}", "params.optim.warmup_epochs:",
     "q > 0"),
    ("params: {optim.warmup_epochs: {type: quniform, low: 0.0, high: 1.0, q: 0.3}}", "params.optim.warmup_epochs:",
     "multiples of q"),
    ("params: {optim.warmup_epochs: {type: quniform, low: 0.25, high: 2.0, q: 0.5}}", "params.optim.warmup_epochs:",
     "multiples of q"),
    ("params: {data.seq_len: {type: quniform, low: 4, high: 16, q: 2.5}}", "params.data.seq_len:",
     "q to be an integer"),
    ("params: {optim.lr: {type: uniform, low: 0.5, high: 2.0}}", "params.optim.lr:", "allowed range [1e-08, 1.0]"),
    ("params: {data.seq_len: {type: randint, low: 0, high: 16}}", "params.data.seq_len:", "allowed range [1, 256]"),
    ("params: {data.seq_len: {type: choice, values: []}}", "params.data.seq_len:", "non-empty list"),
    ("params: {data.seq_len: {type: choice, values: 8}}", "params.data.seq_len:", "non-empty list"),
    ("params: {data.seq_len: {type: choice, values: [8]}}", "params.data.seq_len:", "fix a single value in overrides"),
    ("params: {data.seq_len: {type: choice, values: [[4], [8]]}}", "params.data.seq_len:",
     "numbers, strings or booleans"),
    ("params: {data.seq_len: {type: choice, values: [8, 0]}}", "params.data.seq_len:",
     "does not build with 0: config key 'data.seq_len' must be >= 1"),
    ("params: {data.seq_len: {type: choice, values: [8, 512]}}", "params.data.seq_len:", "does not build with 512"),
    ("params: {train.device: {type: choice, values: [cpu, tpu]}}", "params.train.device:",
     "does not build with 'tpu'"),
    ("params: {model.dropout: {type: choice, values: [0, 0.0]}}", "params.model.dropout:", "list each once"),
    ("overrides: {optim.lr: 0.01}", "params.optim.lr:", "also fixed in overrides"),
]


@pytest.mark.parametrize("snippet,key,fix", INVALID, ids=[case[0][:60] for case in INVALID])
def test_invalid_space_names_file_key_and_fix(tmp_path, snippet, key, fix):
    path = write_space(tmp_path, snippet)
    with pytest.raises(SearchSpaceError) as err:
        load_search_space(path)
    assert_names(err, path, key, fix)


@pytest.mark.parametrize("key", ["base", "metric", "mode", "num_samples", "params"])
def test_missing_required_key(tmp_path, key):
    path = write_space(tmp_path, drop=(key,))
    with pytest.raises(SearchSpaceError) as err:
        load_search_space(path)
    assert_names(err, path, f"{key}: missing", "every search space sets base, metric")


@pytest.mark.parametrize("text,fix", [("params: [a: 1", "not valid YAML"), ("- 1\n- 2\n", "must be a mapping")])
def test_unreadable_files(tmp_path, text, fix):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(SearchSpaceError) as err:
        load_search_space(path)
    assert_names(err, path, "", fix)
    with pytest.raises(SearchSpaceError, match="no such file"):
        load_search_space(tmp_path / "absent.yaml")


@pytest.mark.parametrize("sets,key,fix", [
    (["train.epochs=0"], "--set:", "config key 'train.epochs' must be >= 1"),
    (["train.epoch=3"], "--set train.epoch=3:", "unknown config key 'train.epoch'"),
    (["optim.beta1"], "--set optim.beta1:", "must look like key=value"),
    (["optim.lr=0.01"], "params.optim.lr:", "also fixed in overrides (or --set)"),
])
def test_invalid_extra_overrides(tmp_path, sets, key, fix):
    path = write_space(tmp_path)
    with pytest.raises(SearchSpaceError) as err:
        load_search_space(path, extra_overrides=sets)
    assert_names(err, path, key, fix)


def test_extra_overrides_go_on_top_and_set_the_epoch_budget(tmp_path):
    path = write_space(tmp_path, "overrides: {optim.weight_decay: 0.01, data.stride: 2}")
    space = load_search_space(path, extra_overrides=["optim.weight_decay=0.02", "train.epochs=3"])
    assert space.overrides == {"optim.weight_decay": 0.02, "data.stride": 2, "train.epochs": 3}
    assert space.max_epochs == 3  # left out of the file: the trials' train.epochs
    cfg = space.trial_config()
    assert (cfg.optim.weight_decay, cfg.data.stride, cfg.train.epochs) == (0.02, 2, 3)
    # An explicit max_epochs beyond the --set epochs is refused.
    path = write_space(tmp_path, "scheduler: {max_epochs: 6}")
    with pytest.raises(SearchSpaceError) as err:
        load_search_space(path, extra_overrides=["train.epochs=3"])
    assert_names(err, path, "scheduler.max_epochs:", "exceeds the trials' train.epochs (3)")


# --- trial configs and the first point -------------------------------------------------------------

def test_trial_config_snaps_quantisation_noise_into_the_space(tmp_path):
    space = load_search_space(write_space(tmp_path, params={
        "model.dropout": {"type": "quniform", "low": 0.0, "high": 0.7, "q": 0.1},
        "data.seq_len": {"type": "choice", "values": [4, 8]}}))
    # What a multiple-of-q sampler such as tune.quniform produces; the first lies above high=0.7.
    assert (7 * 0.1, 3 * 0.1) == (0.7000000000000001, 0.30000000000000004)
    cfg = space.trial_config({"model.dropout": 7 * 0.1, "data.seq_len": 4})
    assert (cfg.model.dropout, cfg.data.seq_len, cfg.train.epochs) == (0.7, 4, 6)
    assert space.trial_config({"model.dropout": 3 * 0.1}).model.dropout == 0.3


@pytest.mark.parametrize("params,fix", [
    ({"optim.beta1": 0.5}, "params.optim.beta1: not searched in this space"),
    ({"optim.lr": 0.5}, "params.optim.lr: 0.5 is outside the space; loguniform takes a number in [0.0001, 0.01]"),
    ({"optim.lr": "fast"}, "params.optim.lr: 'fast' is outside the space"),
    ({"data.seq_len": 16}, "params.data.seq_len: 16 is not one of the choices [4, 8]"),
])
def test_trial_config_refuses_points_outside_the_space(tmp_path, params, fix):
    space = load_search_space(write_space(tmp_path, params={
        "optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        "data.seq_len": {"type": "choice", "values": [4, 8]}}))
    with pytest.raises(SearchSpaceError, match="^" + str(space.path).replace(".", r"\.")) as err:
        space.trial_config(params)
    assert fix in str(err.value)


def test_default_point_is_the_base_config_moved_into_the_space(tmp_path):
    # The base holds lr 1e-3, warmup 0.5, seq_len 8, device cpu, weight_decay 1e-4, stride 4.
    space = load_search_space(write_space(tmp_path, params={
        "optim.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-4},             # clipped down
        "optim.warmup_epochs": {"type": "quniform", "low": 1.0, "high": 3.0, "q": 1.0},  # clipped up
        "optim.weight_decay": {"type": "uniform", "low": 0.0, "high": 0.1},       # inside: kept
        "data.stride": {"type": "quniform", "low": 3, "high": 9, "q": 3},           # rounded to the grid
        "data.seq_len": {"type": "choice", "values": [4, 10, 16]},                # nearest choice
        "train.device": {"type": "choice", "values": ["auto", "mps"]},            # not numbers: first
    }))
    assert space.default_point() == {"optim.lr": 1e-4, "optim.warmup_epochs": 1.0, "optim.weight_decay": 1e-4,
                                     "data.stride": 3, "data.seq_len": 10, "train.device": "auto"}
    cfg = space.trial_config(space.default_point())
    assert (cfg.optim.lr, cfg.data.seq_len) == (1e-4, 10)


def test_trial_config_applies_overrides_last_and_needs_no_files(tmp_path):
    # Ray workers (another node, another working directory) and a later retrain get the space, not its files.
    import json
    import pickle

    space = load_search_space(write_space(tmp_path, "overrides: {optim.beta1: 0.8}", params=EVERY_TYPE))
    (tmp_path / "base.yaml").unlink()
    point = {"optim.lr": 2e-3, "data.seq_len": 12, "train.device": "auto"}
    copies = [pickle.loads(pickle.dumps(space)),
              search_space.SearchSpace.from_dict(json.loads(json.dumps(space.to_dict())))]
    for copy in copies:
        assert copy == space
        cfg = copy.trial_config(point, {"train.epochs": 2, "optim.lr": 5e-3})
        assert (cfg.optim.lr, cfg.data.seq_len, cfg.train.device) == (5e-3, 12, "auto")   # overrides win
        assert (cfg.optim.beta1, cfg.train.epochs, cfg.optim.beta2) == (0.8, 2, 0.999)  # space, override, base


# --- the metric list and import hygiene -------------------------------------------------------------

def test_module_loads_a_space_without_torch_ray_or_optuna():
    # The search's driver checks the space before it needs torch: the metric names come from
    # hawor_tune.epoch_metrics, not from the trainer (whose torch, timm and torchvision imports take seconds).
    code = ("import sys\nfor m in ('torch', 'ray', 'optuna', 'timm'): sys.modules[m] = None\n"
            "from hawor_tune.search_space import load_search_space\n"
            "assert load_search_space('search_spaces/loss_weights.yaml').metric == 'val/objective'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_multi_objective_space_runs_fifo_and_round_trips(tmp_path):
    space = load_search_space(write_space(tmp_path, "{metric: [val/mpjpe, val/cam_trans_error], mode: [min, max]}"))
    assert space.is_multi_objective and space.scheduler_type == "fifo"
    assert space.objectives == (("val/mpjpe", "min"), ("val/cam_trans_error", "max"))
    assert (space.metric, space.mode) == ("val/mpjpe", "min")  # the first objective ranks checkpoints
    again = SearchSpace.from_dict(json.loads(json.dumps(space.to_dict())))
    assert again.objectives == space.objectives
    single = load_search_space(write_space(tmp_path))
    assert not single.is_multi_objective and single.objectives == (("val/mpjpe", "min"),)
    old = {k: v for k, v in single.to_dict().items() if k not in ("metrics", "modes")}  # a record before lists
    assert SearchSpace.from_dict(old).objectives == (("val/mpjpe", "min"),)


def test_constraints_name_reported_metrics_with_positive_bounds(tmp_path):
    with pytest.raises(SearchSpaceError, match="train.constraints': 'wiggle' is not a reported validation metric"):
        load_search_space(write_space(tmp_path, overrides={"train.constraints": {"wiggle": 1.0}}))
    with pytest.raises(SearchSpaceError, match="train.constraints.accel_error' must be a finite fraction"):
        load_search_space(write_space(tmp_path, overrides={"train.constraints": {"accel_error": 0}}))
    space = load_search_space(write_space(tmp_path, overrides={"train.constraints": {"accel_error": 1.0}}))
    assert space.constraints == ("constraint/accel_error",)
