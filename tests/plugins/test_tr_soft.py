from pathlib import Path

import pytest

from aligner.config import ConfigError
from aligner.recipes.train import configure, parse_args
from aligner.registry import PluginError, activate
from aligner_plugins import tr_soft


def test_defaults_are_the_papers_and_trls_alpha_and_tau():
    cfg, plugins = configure(parse_args(["--plugins", "dpo,tr_soft"]))
    assert (cfg.section("tr_soft").alpha, cfg.section("tr_soft").every) == (0.6, 512)
    assert plugins.reference_update == "tr_soft"
    assert plugins.required_models(cfg) == {"reference"}


def test_the_tiny_tr_config_updates_within_its_run():
    cfg, plugins = configure(parse_args(["--config", str(Path(__file__).parents[2] / "configs/tiny-cpu-tr.yaml")]))
    assert plugins.reference_update == "tr_soft"
    assert cfg.section("tr_soft").every < cfg.train.max_steps


@pytest.mark.parametrize("key, value, message", [
    ("alpha", "0", r"tr_soft.alpha must be in \(0, 1\] \(the policy's weight in the mix\), got 0"),
    ("alpha", "1.5", r"tr_soft.alpha must be in \(0, 1\]"),
    ("every", "0", r"tr_soft.every must be >= 1 \(optimizer steps between updates\), got 0"),
])
def test_out_of_range_options_are_refused_with_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        configure(parse_args(["--plugins", "dpo,tr_soft", "--set", f"tr_soft.{key}={value}"]))


def test_asking_for_both_trust_region_plugins_is_a_role_conflict():
    with pytest.raises(PluginError, match=r"a run takes at most one reference_update plugin, got tr_soft, tr_hard; "
                                          r"keep one of them in --plugins \(the reference_update plugins are: tr_hard, tr_soft\)"):
        activate(["dpo", "tr_soft", "tr_hard"])


def test_update_counter_goes_through_the_state_dict_hooks():
    plugin = tr_soft.TRSoft()
    plugin.updates = 3
    fresh = tr_soft.TRSoft()
    fresh.aligner_load_state_dict(plugin.aligner_state_dict())
    assert fresh.updates == 3


def test_the_distance_is_measured_only_on_logged_steps():
    cfg, _ = configure(parse_args(["--plugins", "dpo,tr_soft", "--set", "tr_soft.every=4"]))
    plugin = tr_soft.TRSoft()
    # Not an update step and not logged: neither the update nor the distance touches the engines (None here).
    assert plugin.aligner_after_optimizer_step(step=3, engines=None, config=cfg, logged=False) == {"tr/updates": 0.0}
