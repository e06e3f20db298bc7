import pytest
import torch

from aligner import registry
from aligner.hookspecs import LossOutput, SequenceLogps, StepInputs
from aligner.registry import PluginError, PluginHookError, activate


def test_builtin_dpo_is_found_through_the_entry_point_group():
    available = registry.available_plugins()
    assert "dpo" in available
    assert available["dpo"].target == "aligner_plugins.dpo"
    assert available["dpo"].distribution.startswith("aligner-")


def test_list_plugins_table_shows_role_package_and_summary():
    table = registry.list_plugins_table()
    line = next(line for line in table.splitlines() if line.startswith("dpo"))
    assert "loss" in line and "aligner-" in line and "DPO" in line


def test_no_loss_given_adds_the_default_dpo():
    active = activate(["plugin_fixtures.extra:chosen_nll"])
    assert active.losses == ["dpo"]
    assert active.names("constraint") == ["chosen_nll"]


def test_unknown_plugin_error_lists_the_available_ones():
    with pytest.raises(PluginError, match=r"unknown plugin 'nope'(.|\n)*available plugins:(.|\n)*dpo +loss"):
        activate(["nope"])


def test_several_losses_activate_in_plugins_order():
    active = activate(["ipo", "plugin_fixtures.extra:second_loss", "dpo"])
    assert active.losses == ["ipo", "second_loss", "dpo"]


def test_two_reference_updates_is_a_role_conflict():
    with pytest.raises(PluginError, match=r"at most one reference_update plugin, got tr_soft, tr_hard; keep one of them"
                                          r".*the reference_update plugins are: tr_hard, tr_soft"):
        activate(["dpo", "tr_soft", "tr_hard"])


def test_duplicate_name_is_refused():
    with pytest.raises(PluginError, match="listed twice"):
        activate(["dpo", "dpo"])


def test_module_attr_plugin_that_is_not_installed_loads():
    active = activate(["dpo", "plugin_fixtures.extra:chosen_nll"])
    assert active.infos["chosen_nll"].role == "constraint"
    assert "chosen_nll" in active.config_sections()


def test_a_class_instead_of_an_instance_gets_a_clear_error():
    with pytest.raises(PluginError, match="is a class; register a module or an instance"):
        activate(["plugin_fixtures.extra:ChosenNLL"])


def test_plugin_for_another_api_major_version_is_refused():
    with pytest.raises(PluginError, match="plugin API 0.3, this aligner has 1"):
        activate(["plugin_fixtures.extra:old_api"])


def test_missing_module_names_the_plugin():
    with pytest.raises(PluginError, match="plugin 'no_such_pkg.mod:x': cannot import module 'no_such_pkg.mod'"):
        activate(["no_such_pkg.mod:x"])


def test_a_hook_that_raises_is_reported_with_plugin_and_hook_names():
    active = activate(["dpo", "plugin_fixtures.extra:broken"])
    z = torch.zeros(2)
    inputs = StepInputs(SequenceLogps(z, z), SequenceLogps(z, z), None, z, z)
    with pytest.raises(PluginHookError, match="plugin 'broken' failed in hook aligner_constraint: RuntimeError: boom"):
        active.call_each("aligner_constraint", inputs=inputs, config=None)


def test_required_models_is_the_union_over_plugins():
    active = activate(["dpo", "plugin_fixtures.extra:chosen_nll"])
    assert active.required_models(None) == {"reference"}
    assert isinstance(LossOutput(torch.zeros(())).metrics, dict)


def test_call_each_runs_tryfirst_then_plugins_order_then_trylast():
    from plugin_fixtures import extra

    names = ["last_probe", "plain_a", "first_probe", "plain_b"]
    active = activate(["dpo", *(f"plugin_fixtures.extra:{n}" for n in names)])
    extra.order_calls.clear()
    called = [name for name, _ in active.call_each("aligner_constraint", inputs=None, config=None)]
    assert called == extra.order_calls == ["first_probe", "plain_a", "plain_b", "last_probe"]


@pytest.mark.parametrize("target, name", [("rss_probe:probe", "rss_probe"), ("profile_plugin:profiler", "profiler")])
def test_benchmark_measuring_plugins_activate_and_add_no_loss_term(monkeypatch, target, name):
    """benchmarks/scale_cpu.py, scale_8b.sh, lora_8b.sh and profile_step.py load these by target: they must pass the
    activation checks (a constraint's required hook) and add nothing to the loss."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    active = activate(["dpo", target])
    assert active.names("constraint") == [name]
    logps = SequenceLogps(chosen=torch.zeros(2), rejected=torch.zeros(2))
    inputs = StepInputs(policy=logps, reference=logps, anchor=None, chosen_tokens=torch.ones(2),
                        rejected_tokens=torch.ones(2), example_ids=["a", "b"])
    assert [out for _, out in active.call_each("aligner_constraint", inputs=inputs, config=None)] == [None]
