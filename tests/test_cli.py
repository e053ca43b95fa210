"""The command-line convention (hawor_tune.cli), for every CLI: a fault in the user's input prints one line and
exits 2; any other exception is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest

import run_best
import run_search
from hawor_tune import config, train
from hawor_tune.cli import format_value, positive_int
from hawor_tune.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")

# Each CLI's main and arguments that reach a config build first.
CLIS = {
    "run_search.py": (run_search.main, ["--space", str(REPO / "search_spaces" / "lr_seq.yaml"),
                                        "--dashboard-port", "0"]),  # 8265 may be another Ray's
    "run_best.py": (run_best.main, ["--config", TINY]),
    "python -m hawor_tune.train": (train.main, ["--config", TINY]),
}


@pytest.fixture
def fault_in_config_build(monkeypatch):
    """Make every config build raise ``error``, deep inside hawor_tune.config.load_config."""
    def install(error: Exception) -> None:
        def check_consistency(cfg: config.ExperimentConfig) -> None:
            raise error
        monkeypatch.setattr(config, "check_consistency", check_consistency)
    return install


@pytest.mark.parametrize("cli", CLIS)
def test_user_fault_is_one_line_and_exit_2(cli, fault_in_config_build, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main, argv = CLIS[cli]
    fault_in_config_build(ConfigError("config key 'optim.lr' must be >= 1e-08, got 0\n(a second line)"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "config key 'optim.lr' must be >= 1e-08" in err[0]


# A plain ValueError is a bug too: the CLIs once caught it, and a bug anywhere became a one-line exit 2.
@pytest.mark.parametrize("bug", [ZeroDivisionError, ValueError])
@pytest.mark.parametrize("cli", CLIS)
def test_bug_keeps_its_traceback(cli, bug, fault_in_config_build, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main, argv = CLIS[cli]
    fault_in_config_build(bug("a bug, not bad input"))
    with pytest.raises(bug, match="a bug"):
        main(argv)
    assert "error:" not in capsys.readouterr().err


@pytest.mark.parametrize("value, text", [(0.000123456, "0.0001235"), (1234567.0, "1.235e+06"), (40.0, "40"),
                                         (math.inf, "inf"), (math.nan, "nan"), (None, ""), (3, "3"), (True, "True"),
                                         ("cpu", "cpu")])
def test_format_value(value, text):
    assert format_value(value) == text


@pytest.mark.parametrize("text, value", [("1", 1), ("12", 12), ("0", None), ("-3", None), ("2.5", None), ("x", None)])
def test_positive_int(text, value):
    if value is None:
        with pytest.raises(argparse.ArgumentTypeError, match=f"must be an integer >= 1, got .*{text}"):
            positive_int(text)
    else:
        assert positive_int(text) == value


# ---- Faults found while preparing a run: one line naming the file or key, exit 2 --------------------------------

@pytest.fixture
def run_config(synthetic_dataset, tmp_path):
    """A config file over the tiny dataset and model, caches and outputs in tmp_path, with ``overrides``."""
    from conftest import TINY_MODEL_OVERRIDES

    def write(**overrides) -> str:
        cfg = synthetic_dataset.config({**TINY_MODEL_OVERRIDES, "data.cache_dir": str(tmp_path / "cache"),
                                        "train.out_dir": str(tmp_path / "run"), "train.epochs": 1,
                                        "train.max_train_batches": 1, "train.max_eval_batches": 1,
                                        **{k.replace("__", "."): v for k, v in overrides.items()}})
        config.save_config(cfg, tmp_path / "config.yaml")
        return str(tmp_path / "config.yaml")
    return write


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1, err
    return err[0]


TRAINING_CLIS = {
    "run_best.py": lambda config, tmp_path: run_best.main(["--config", config, "--out", str(tmp_path / "best")]),
    "python -m hawor_tune.train": lambda config, tmp_path: train.main(["--config", config]),
}


@pytest.mark.parametrize("cli", TRAINING_CLIS)
def test_a_corrupt_mano_file_is_one_line_and_exit_2(cli, run_config, tmp_path, capsys):
    mano_dir = tmp_path / "mano"
    mano_dir.mkdir()
    for name in ("MANO_RIGHT.pkl", "MANO_LEFT.pkl"):
        (mano_dir / name).write_bytes(b"\x80\x02}q\x00(X\n\x00\x00\x00v_template")  # a download cut short
    assert TRAINING_CLIS[cli](run_config(mano__model_dir=str(mano_dir)), tmp_path) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: {mano_dir}/MANO_") and "not a readable MANO pickle" in line
    assert "https://mano.is.tue.mpg.de" in line


def test_a_diverged_pretraining_is_one_line_and_exit_2(run_config, tmp_path, capsys):
    config_file = run_config(pretrain__epochs=1, pretrain__max_train_batches=1, pretrain__batch_size=4,
                             pretrain__frames_sequences=1, pretrain__frames_per_sequence=40,
                             pretrain__mano_params=1e300)  # the first step's loss overflows
    assert train.main(["--config", config_file]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: the hand-branch pretraining diverged") and "pretrain.mano_params (1e+300)" in line


def test_a_flow_fit_that_does_not_fit_the_model_is_one_line_and_exit_2(run_config, tmp_path, capsys):
    import torch

    from hawor_tune.flow_fit import flow_fit_file
    from hawor_tune.model import FlowHead

    config_file = run_config()
    path = flow_fit_file(config.load_config(config_file))
    path.parent.mkdir(parents=True)
    torch.save({"state": FlowHead(2 * 2 * 2, 9).state_dict()}, path)  # a fit for flow_grid 2, not 4
    assert train.main(["--config", config_file]) == 2
    assert _one_error_line(capsys) == (f"error: the flow-head fit {path} has w1 (256, 8); expected w1 (256, 32) "
                                       f"for this model's data.flow_grid=4; delete {path} and it is fitted again")
