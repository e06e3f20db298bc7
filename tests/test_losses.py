"""Several losses in one run (aligner/training/losses.py) and the metrics the core logs once (aligner/training/rewards.py)."""

import pytest
import torch

from aligner.config import ConfigError, build_config
from aligner.hookspecs import SequenceLogps, StepInputs
from aligner.registry import activate
from aligner.training.rewards import DEFAULT_REWARD_BETA
from aligner.training.step import total_loss


def random_inputs(seed, n=16, reference=True):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (torch.randn(n, generator=g, dtype=torch.float64) * 10 for _ in range(4))
    nc, nr = (torch.randint(1, 20, (n,), generator=g).double() for _ in range(2))
    return StepInputs(SequenceLogps(pc, pr), SequenceLogps(rc, rr) if reference else None, None, nc, nr)


def test_train_loss_is_the_weighted_sum_of_the_terms_and_each_term_is_logged_under_its_name():
    plugins = activate(["dpo", "bco_pair", "sft", "plugin_fixtures.extra:chosen_nll"])  # MPO + a constraint
    cfg = build_config({"dpo": {"weight": 0.8}, "bco_pair": {"weight": 0.2}}, plugins.config_sections())
    inputs = random_inputs(0)
    loss, metrics = total_loss(plugins, inputs, cfg)
    terms = {n: float(plugins.call_one(n, "aligner_loss", inputs=inputs, config=cfg).loss) for n in ("dpo", "bco_pair", "sft")}
    constraint = float(plugins.call_one("chosen_nll", "aligner_constraint", inputs=inputs, config=cfg).loss)
    assert constraint != 0 and len(set(terms.values())) == 3
    expected = 0.8 * terms["dpo"] + 0.2 * terms["bco_pair"] + 1.0 * terms["sft"] + constraint
    assert float(loss) == pytest.approx(expected, abs=1e-9) and float(metrics["train/loss"]) == float(loss)
    for name, value in terms.items():
        assert float(metrics[f"{name}/loss"]) == pytest.approx(value, abs=1e-12)  # unweighted


def test_a_weight_of_zero_drops_a_term_from_the_total_but_still_logs_it():
    plugins = activate(["dpo", "sppo_hard"])
    cfg = build_config({"sppo_hard": {"weight": 0}}, plugins.config_sections())
    inputs = random_inputs(1)
    loss, metrics = total_loss(plugins, inputs, cfg)
    assert float(loss) == pytest.approx(float(metrics["dpo/loss"]), abs=1e-12) and float(metrics["sppo_hard/loss"]) > 0


@pytest.mark.parametrize("bad", [-0.5, "inf"])
def test_a_negative_or_infinite_weight_is_refused_with_the_section_named(bad):
    plugins = activate(["dpo", "bco_pair"])
    with pytest.raises(ConfigError, match=r"section 'bco_pair': weight must be a finite number >= 0"):
        build_config({"bco_pair": {"weight": bad}}, plugins.config_sections())


def test_rewards_are_the_summed_dpo_form_with_the_first_losss_beta():
    plugins = activate(["sft", "ipo", "dpo"])  # sft has no beta: ipo's β is the first one
    cfg = build_config({"ipo": {"beta": 0.3}, "dpo": {"beta": 0.05}}, plugins.config_sections())
    inputs = random_inputs(2)
    metrics = total_loss(plugins, inputs, cfg)[1]
    chosen = 0.3 * (inputs.policy.chosen - inputs.reference.chosen)
    rejected = 0.3 * (inputs.policy.rejected - inputs.reference.rejected)
    assert float(metrics["rewards/chosen"]) == pytest.approx(float(chosen.mean()), abs=1e-12)
    assert float(metrics["rewards/margins"]) == pytest.approx(float((chosen - rejected).mean()), abs=1e-12)
    assert float(metrics["rewards/accuracies"]) == float((chosen > rejected).double().mean())


def test_rewards_use_trls_default_beta_when_no_loss_has_one():
    plugins = activate(["sft", "plugin_fixtures.extra:second_loss"])
    cfg = build_config({}, plugins.config_sections())
    inputs = random_inputs(3)
    metrics = total_loss(plugins, inputs, cfg)[1]
    expected = DEFAULT_REWARD_BETA * (inputs.policy.chosen - inputs.reference.chosen).mean()
    assert DEFAULT_REWARD_BETA == 0.1 and float(metrics["rewards/chosen"]) == pytest.approx(float(expected), abs=1e-12)


def test_a_reference_free_run_keeps_its_losss_own_rewards_and_a_reference_replaces_them():
    simpo_only = activate(["simpo"])
    cfg = build_config({}, simpo_only.config_sections())
    inputs = random_inputs(4, reference=False)
    metrics = total_loss(simpo_only, inputs, cfg)[1]
    own = 2.0 * inputs.policy.chosen / inputs.chosen_tokens
    assert float(metrics["rewards/chosen"]) == pytest.approx(float(own.mean()), abs=1e-12)
    assert not any(k.startswith("flips/") for k in metrics)
    mixed = activate(["simpo", "dpo"])
    with_ref = random_inputs(4)
    metrics = total_loss(mixed, with_ref, build_config({}, mixed.config_sections()))[1]
    dpo_form = 2.0 * (with_ref.policy.chosen - with_ref.reference.chosen)  # β of simpo, the first loss with one
    assert float(metrics["rewards/chosen"]) == pytest.approx(float(dpo_form.mean()), abs=1e-12)


def test_flip_transitions_are_the_shares_of_the_four_sign_changes_against_the_reference():
    policy = SequenceLogps(torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0]), torch.zeros(5))  # correct: T T F F T
    reference = SequenceLogps(torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0]), torch.zeros(5))  # correct: T F T F T
    plugins = activate(["dpo"])
    inputs = StepInputs(policy, reference, None, torch.ones(5), torch.ones(5))
    metrics = total_loss(plugins, inputs, build_config({}, plugins.config_sections()))[1]
    assert {k: float(v) for k, v in metrics.items() if k.startswith("flips/")} == {
        "flips/correct->correct": pytest.approx(2 / 5), "flips/correct->incorrect": pytest.approx(1 / 5),
        "flips/incorrect->correct": pytest.approx(1 / 5), "flips/incorrect->incorrect": pytest.approx(1 / 5)}

