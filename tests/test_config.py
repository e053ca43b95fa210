from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from hawor_tune.config import (
    ConfigError,
    ExperimentConfig,
    LossConfig,
    config_from_dict,
    load_config,
    save_config,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["tiny.yaml", "arctic.yaml"])
def test_shipped_configs_load_and_round_trip(tmp_path, name):
    cfg = load_config(REPO / "configs" / name)
    out = tmp_path / "resolved.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert config_from_dict(cfg.to_dict()) == cfg


def test_gpu_profile_refuses_to_start_without_its_backbone_weights():
    with pytest.raises(ConfigError, match="model.pretrained_path.*require_pretrained"):
        load_config(REPO / "configs" / "arctic.yaml", ["model.pretrained_path="])
    assert load_config(REPO / "configs" / "tiny.yaml", ["model.pretrained_path="]).model.pretrained_path == ""


def test_defaults_without_file_are_valid():
    assert isinstance(load_config(None), ExperimentConfig)


def test_base_file_merge_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(
        {"optim": {"lr": 0.01, "weight_decay": 0.5}, "model": {"backbone_kwargs": {"depth": 6, "x": 1}}}))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump(
        {"base": "base.yaml", "optim": {"lr": 0.02}, "model": {"backbone_kwargs": {"depth": 2}}}))
    cfg = load_config(tmp_path / "child.yaml", ["optim.lr=3e-4", "data.seq_len=16", "train.device=cpu"])
    assert cfg.optim.lr == pytest.approx(3e-4)       # override beats child beats base
    assert cfg.optim.weight_decay == 0.5             # inherited from the base
    assert cfg.model.backbone_kwargs == {"depth": 2}  # a mapping value is replaced, not merged
    assert cfg.data.seq_len == 16 and isinstance(cfg.data.seq_len, int)
    assert cfg.train.device == "cpu"


def test_mapping_overrides_and_int_to_float():
    cfg = load_config(None, {"optim.lr": 1, "loss.camera": 0})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.loss.camera == 0.0


def test_relative_paths_are_made_absolute(tmp_path):
    cfg = load_config(None, ["data.root=some/where"], base_dir=tmp_path)
    assert cfg.data.root == str((tmp_path / "some/where").resolve())
    assert cfg.mano.model_dir == ""  # empty means "not set" and stays empty


@pytest.mark.parametrize("override, fragments", [
    ("optim.lrr=1", ["optim.lrr", "lrr", "allowed", "lr"]),
    ("nosuch.x=1", ["nosuch.x", "allowed"]),
    ("optim.lr=-1", ["optim.lr", "-1", ">= 1e-08"]),
    ("optim.lr=fast", ["optim.lr", "fast", "number"]),
    ("data.seq_len=2.5", ["data.seq_len", "2.5", "integer"]),
    ("data.seq_len=0", ["data.seq_len", ">= 1"]),
    ("train.device=tpu", ["train.device", "tpu", "cpu"]),
    ("data.generate=maybe", ["data.generate", "maybe", "true or false"]),
    ("optim=1", ["optim", "section"]),
    ("optim.lr.x=1", ["optim.lr", "value, not a section"]),
    ("loss.camera=.nan", ["loss.camera", "finite"]),
    ("no_equals_sign", ["key=value"]),
    ("model.temporal_heads=3", ["model.temporal_dim", "divisible", "model.temporal_heads"]),
    ("model.infiller=gru", ["model.infiller", "gru", "lstm", "hawor"]),
    ("data.eval_hop=8", ["data.eval_hop", "8", "data.seq_len", "0 < eval_hop < seq_len"]),
    ("model.infiller_path=infiller.pt", ["model.infiller_path", "infiller.pt", "model.infiller: hawor"]),
])
def test_bad_overrides_name_key_value_and_allowed(override, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for fragment in fragments:
        assert fragment in str(err.value)


def test_held_out_subjects_leave_one_to_train_on():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.synthetic.subjects=6", "data.synthetic.held_out=3"])
    assert str(err.value) == ("config key 'data.synthetic.held_out' is 3 but data.synthetic.subjects is 6: val and "
                              "test take 2 x held_out subjects and training needs one more (held_out <= 2)")
    assert load_config(None, ["data.synthetic.subjects=5", "data.synthetic.held_out=2"]).data.synthetic.held_out == 2


@pytest.mark.parametrize("content, fragments", [
    ({"optim": {"lr": 0.1, "momentum": 0.9}}, ["optim.momentum", "allowed"]),
    ({"model": {"temporal_layers": "six"}}, ["model.temporal_layers", "six"]),
    ({"data": {"synthetic": {"subjects": 1}}}, ["data.synthetic.subjects", ">= 3"]),
    ({"data": 5}, ["data", "mapping"]),
    ([1, 2], ["mapping"]),
])
def test_bad_yaml_files(tmp_path, content, fragments):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_missing_file_and_base_cycle(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_invalid_yaml_syntax(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("optim: {lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_all_zero_loss_weights_are_rejected():
    zeros = {f"loss.{f.name}": 0 for f in dataclasses.fields(LossConfig)}
    with pytest.raises(ConfigError, match="at least one of loss"):
        load_config(None, zeros)


# ---- docs/configuration.md, generated from the field docs ----------------------------------------------------

def test_the_committed_configuration_reference_is_current():
    from hawor_tune.config_reference import configuration_markdown

    assert (REPO / "docs" / "configuration.md").read_text() == configuration_markdown(), (
        "docs/configuration.md is stale: run python -m hawor_tune.config_reference")


def _leaves(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and key != "backbone_kwargs":
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def test_the_reference_has_a_row_for_every_key_with_its_default_and_bounds():
    from hawor_tune.config_reference import configuration_markdown

    text = configuration_markdown()
    rows = {line.split(" | ")[0][3:-1]: line for line in text.splitlines() if line.startswith("| `")}
    keys = _leaves(ExperimentConfig().to_dict())
    assert set(keys) <= set(rows) and len(keys) > 80
    assert rows["optim.lr"] == ("| `optim.lr` | float | `0.0003` | 1e-08 to 1 | fine-tuning the hand-pretrained start "
                                "(pretrain.lr trains it) |")
    assert rows["train.device"].startswith("| `train.device` | str | `auto` | `auto`, `cpu`, `cuda`, `mps` |")
    assert rows["data.cache_dir"].startswith("| `data.cache_dir` | str | `''` |  | ")
    assert "&lt;root>/../cache" in rows["data.cache_dir"]  # not an HTML tag


def test_the_generator_writes_the_page_and_checks_it(tmp_path, monkeypatch, capsys):
    from hawor_tune import config_reference

    page = tmp_path / "configuration.md"
    monkeypatch.setattr(config_reference, "DOC_FILE", page)
    assert config_reference.main(["--check"]) == 1 and not page.exists()
    assert config_reference.main([]) == 0 and page.read_text() == config_reference.configuration_markdown()
    assert config_reference.main(["--check"]) == 0
    page.write_text(page.read_text().replace("AdamW", "Adam"))
    assert config_reference.main(["--check"]) == 1
    assert "configuration.md is stale: run python -m hawor_tune.config_reference" in capsys.readouterr().err
