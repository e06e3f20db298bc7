import pytest

from aligner.config import ConfigError
from aligner.recipes.train import configure, parse_args
from aligner_plugins import tr_hard


def test_default_tau_is_512_and_it_moves_the_reference():
    cfg, plugins = configure(parse_args(["--plugins", "dpo,tr_hard"]))
    assert cfg.section("tr_hard").every == 512
    assert plugins.reference_update == "tr_hard"
    assert plugins.required_models(cfg) == {"reference"}


def test_tau_below_one_is_refused_with_the_key():
    with pytest.raises(ConfigError, match=r"tr_hard.every must be >= 1 \(optimizer steps between updates\), got 0"):
        configure(parse_args(["--plugins", "dpo,tr_hard", "--set", "tr_hard.every=0"]))


def test_update_counter_goes_through_the_state_dict_hooks():
    plugin = tr_hard.TRHard()
    plugin.updates = 2
    fresh = tr_hard.TRHard()
    fresh.aligner_load_state_dict(plugin.aligner_state_dict())
    assert fresh.updates == 2
