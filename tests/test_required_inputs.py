import pytest

from aligner.config import build_config
from aligner.registry import PluginError, activate


def test_only_the_inputs_a_plugin_asked_for_are_required():
    plugins = activate(["dpo"])
    assert plugins.required_inputs(build_config({}, plugins.config_sections())) == set()


def test_a_plugin_asking_for_an_unknown_input_is_named_with_what_exists():
    plugins = activate(["dpo", "plugin_fixtures.inputs:wants_logits"])
    with pytest.raises(PluginError, match=r"plugin 'wants_logits' asked for unknown inputs \['logits'\]; aligner provides unpaired, kl_pairs"):
        plugins.required_inputs(build_config({}, plugins.config_sections()))
