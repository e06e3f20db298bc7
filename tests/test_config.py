from pathlib import Path

import pytest

from aligner.config import ConfigError, apply_overrides, build_config, read_yaml
from aligner.recipes.train import configure, parse_args
from aligner.registry import activate

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


def test_an_option_range_is_checked_in_one_wording_and_nan_lies_in_no_range():
    from aligner.hookspecs import check_interval

    check_interval("x.beta", 0.1, "(0, inf)")
    check_interval("x.label_smoothing", 0, "[0, 0.5)")
    check_interval("x.alpha", 1, "(0, 1]")
    for value, interval, message in [(0, "(0, inf)", "x.k must be > 0, got 0"), (-1, "[0, inf)", "x.k must be >= 0, got -1"),
                                     (0.5, "[0, 0.5)", r"x.k must be in \[0, 0.5\), got 0.5"),
                                     (0, "(0, 1]", r"x.k must be in \(0, 1\] \(a share\), got 0"),
                                     (float("nan"), "(0, inf)", "x.k must be > 0, got nan")]:
        with pytest.raises(ValueError, match=message):
            check_interval("x.k", value, interval, "a share" if interval == "(0, 1]" else "")


@pytest.mark.parametrize("plugin", ["dpo", "ipo", "hinge", "simpo", "kto", "robust", "exo_pair", "bco_pair", "nca_pair",
                                    "apo_zero", "apo_down", "sppo_hard", "sigmoid_norm", "discopop", "aot", "flipguard"])
def test_every_built_in_beta_refuses_nan(plugin):
    """NaN passed ``beta <= 0`` in each plugin's own copy of the check; the one check refuses it."""
    plugins = activate([plugin] if plugin != "flipguard" else ["dpo", plugin])
    with pytest.raises(ConfigError, match=rf"{plugin}.beta must be > 0, got nan"):
        build_config({plugin: {"beta": float("nan")}}, plugins.config_sections())


@pytest.mark.parametrize("item, message", [
    ("nosection.x=1", "--set nosection.x=1: unknown key 'nosection'; the top-level keys are"),
    ("kto.beta=1", "--set kto.beta=1: section 'kto' configures plugin 'kto', which is not active; add it to --plugins, "
                   "or drop that --set"),
    ("train.lrr=1", "--set train.lrr=1: unknown key 'train.lrr'; the keys of 'train' are"),
])
def test_a_wrong_key_given_by_set_is_reported_against_that_set_item_not_the_config_file(tmp_path, item, message):
    config = tmp_path / "c.yaml"
    config.write_text("plugins: [dpo]\n")
    with pytest.raises(ConfigError) as info:
        configure(parse_args(["--config", str(config), "--set", item]))
    assert str(info.value).startswith(message), str(info.value)
    assert "c.yaml" not in str(info.value)
