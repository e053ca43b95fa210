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
    "run_search.py": (run_search.main, ["--space", str(REPO / "search_spaces" / "lr_seq.yaml")]),
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
