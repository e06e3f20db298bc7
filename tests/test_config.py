from pathlib import Path

import pytest

from aligner.config import ConfigError, apply_overrides, build_config, read_yaml
from aligner.recipes.train import configure, parse_args

ROOT = Path(__file__).resolve().parents[1]


def test_default_config_file_builds(tmp_path):
    cfg, plugins = configure(parse_args(["--config", str(ROOT / "configs/tiny-cpu.yaml")]))
    assert cfg.model.name_or_path == "embedded:tiny-sort"
    assert cfg.section("dpo").beta == 0.1
    assert plugins.losses == ["dpo"]


def test_set_overrides_parse_numbers_written_like_5e_7():
    cfg, _ = configure(parse_args(["--set", "train.lr=5e-7", "train.max_steps=3", "--set", "dpo.beta=0.2"]))
    assert cfg.train.lr == 5e-7 and cfg.train.max_steps == 3 and cfg.section("dpo").beta == 0.2


def test_unknown_top_level_key_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trian:\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'trian'; the top-level keys are .*train"):
        configure(parse_args(["--config", str(path)]))


def test_unknown_nested_key_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rate'; the keys of 'train' are .*lr"):
        build_config({"train": {"learning_rate": 1}})


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"key 'train.max_steps' expects an integer, got 'many'"):
        build_config(apply_overrides({}, ["train.max_steps=many"]))
    with pytest.raises(ConfigError, match=r"key 'train.lr' expects a number, got 'fast'"):
        build_config({"train": {"lr": "fast"}})


def test_out_of_range_value_is_refused():
    with pytest.raises(ConfigError, match=r"data.on_bad_row must be one of error, skip"):
        build_config({"data": {"on_bad_row": "ignore"}})
    with pytest.raises(ConfigError, match=r"dpo.beta must be > 0"):
        configure(parse_args(["--set", "dpo.beta=-1"]))


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope.yaml does not exist"):
        read_yaml(tmp_path / "nope.yaml")


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML"):
        read_yaml(path)


def test_section_of_an_inactive_installed_plugin_gets_a_targeted_error():
    from aligner.registry import activate, inactive_sections

    with pytest.raises(ConfigError, match=r"section 'dpo' configures plugin 'dpo', which is not active; add it to "
                                          r"--plugins, or remove the section"):
        build_config({"dpo": {"beta": 0.1}}, {}, inactive_sections(activate(["kto"])))


def test_malformed_set_is_refused():
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["train.lr"])
