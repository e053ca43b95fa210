from __future__ import annotations

import subprocess
import sys
from functools import reduce
from pathlib import Path

import numpy as np
import pytest
from conftest import EVERY_TYPE, write_space

from hawor_tune.search_space import SearchSpace, load_search_space
from hawor_tune.tune_space import optuna_distributions, tune_param_space

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def space(tmp_path) -> SearchSpace:
    """A checked space with one parameter of every type and field kind."""
    return load_search_space(write_space(tmp_path, params=EVERY_TYPE))


def test_optuna_distributions(space):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    dists = optuna_distributions(space.params)
    assert dists == {
        "optim.lr": FloatDistribution(1e-4, 1e-2, log=True),
        "optim.weight_decay": FloatDistribution(0.0, 0.1),
        "optim.warmup_epochs": FloatDistribution(0.0, 2.0, step=0.5),
        "data.seq_len": IntDistribution(4, 16, step=4),
        "model.temporal_layers": IntDistribution(0, 3),
        "data.stride": IntDistribution(1, 8),  # randint's high is inclusive
        "train.device": CategoricalDistribution(["cpu", "auto"]),
        "model.dropout": CategoricalDistribution([0.0, 0.5]),  # as the float field holds them
    }
    assert [type(v) for v in dists["model.dropout"].choices] == [float, float]


def test_tune_space_converts_to_the_same_optuna_distributions(space):
    # Ray's own converter is an independent reading of the Tune objects' bounds.
    from ray.tune.search.optuna import OptunaSearch

    converted = OptunaSearch.convert_search_space(tune_param_space(space.params))
    assert converted == optuna_distributions(space.params)


def test_tune_samples_cover_the_inclusive_bounds(space):
    rng = np.random.default_rng(0)
    samples = {key: domain.sample(size=2000, random_state=rng) for key, domain in
               tune_param_space(space.params).items()}
    assert set(samples["data.stride"]) == set(range(1, 9))
    assert set(samples["data.seq_len"]) == {4, 8, 12, 16}
    assert set(samples["model.temporal_layers"]) == {0, 1, 2, 3}
    assert set(samples["train.device"]) == {"cpu", "auto"}
    assert set(samples["model.dropout"]) == {0.0, 0.5}
    warmup = np.array(samples["optim.warmup_epochs"])
    assert np.allclose(warmup * 2, np.round(warmup * 2)) and set(np.round(warmup * 2)) == {0, 1, 2, 3, 4}
    wd = np.array(samples["optim.weight_decay"])
    assert wd.min() >= 0.0 and wd.max() <= 0.1 and wd.max() > 0.09
    lr = np.array(samples["optim.lr"])
    assert lr.min() >= 1e-4 and lr.max() <= 1e-2
    # Log-uniform: half the mass below the geometric mean 1e-3 (uniform would put 9% there).
    assert 0.45 < np.mean(lr < 1e-3) < 0.55
    for i in range(0, 2000, 400):
        cfg = space.trial_config({key: values[i] for key, values in samples.items()})
        for key, values in samples.items():
            assert reduce(getattr, key.split("."), cfg) == pytest.approx(values[i])


def test_module_imports_without_torch_ray_or_optuna():
    code = ("import sys\nfor m in ('torch', 'ray', 'optuna'): sys.modules[m] = None\n"
            "import hawor_tune.tune_space")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
