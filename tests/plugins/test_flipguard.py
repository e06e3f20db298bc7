"""FlipGuard's flip test and focal constraint against an independent reading of the paper's equations."""

import math

import pytest
import torch

from aligner.config import ConfigError, build_config
from aligner.evaluation.regression import generation_flips, preference_flips
from aligner.hookspecs import SequenceLogps, StepInputs
from aligner_plugins import flipguard


def config(**options):
    return build_config({"flipguard": options}, {"flipguard": flipguard.FlipGuardConfig})


def inputs(pc, pr, ac, ar, tokens) -> StepInputs:
    return StepInputs(policy=SequenceLogps(pc, pr), reference=None, anchor=SequenceLogps(ac, ar),
                      chosen_tokens=tokens, rejected_tokens=tokens)


def reference_constraint(pc, pr, ac, ar, tokens, beta, eps, gamma, target):
    """Per example, in plain floats: r_pre − r_θ = β(log π_pre − log π_θ) (reference cancels); flip if > ε;
    C = γ/B · Σ flip·(−log π_θ(y_w)/|y_w|)."""
    flips, gaps, total = [], [], 0.0
    for i in range(len(pc)):
        r_pre, r_theta = beta * ac[i], beta * pc[i]  # the β·log π_ref terms cancel in the difference
        if target == "margin":
            r_pre, r_theta = beta * (ac[i] - ar[i]), beta * (pc[i] - pr[i])
        gap = r_pre - r_theta
        gaps.append(gap)
        flips.append(gap > eps)
        if gap > eps:
            total += -pc[i] / tokens[i]
    return gamma * total / len(pc), sum(flips) / len(pc), sum(gaps) / len(gaps)


@pytest.mark.parametrize("target", ["chosen", "margin"])
def test_flip_test_and_constraint_match_an_independent_implementation(target):
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        b = 16
        pc, pr, ac, ar = (-torch.rand(b, generator=g, dtype=torch.float64) * 20 for _ in range(4))
        tokens = torch.randint(1, 12, (b,), generator=g)
        beta, eps, gamma = 0.05 + 0.2 * trial / 20, 0.01 * (trial + 1), 0.5 + trial / 10
        cfg = config(beta=beta, epsilon=eps, gamma=gamma, target=target)
        out = flipguard.aligner_constraint(inputs(pc, pr, ac, ar, tokens), cfg)
        want, rate, gap = reference_constraint(pc.tolist(), pr.tolist(), ac.tolist(), ar.tolist(), tokens.tolist(),
                                               beta, eps, gamma, target)
        assert 0 < rate < 1  # both branches exercised
        assert math.isclose(float(out.loss), want, rel_tol=1e-12)
        assert math.isclose(float(out.metrics["flipguard/flip_rate"]), rate)
        assert math.isclose(float(out.metrics["flipguard/reward_gap"]), gap, rel_tol=1e-12)
        assert math.isclose(float(out.metrics["flipguard/constraint"]), want, rel_tol=1e-12)
        kl = (sum((ac - pc).tolist()) + sum((ar - pr).tolist())) / (2 * b)
        assert math.isclose(float(out.metrics["anchor/kl_estimate"]), kl, rel_tol=1e-12)


def test_constraint_is_zero_without_flips():
    g = torch.Generator().manual_seed(1)
    anchor = -torch.rand(8, generator=g, dtype=torch.float64) * 10
    policy = (anchor + torch.rand(8, generator=g, dtype=torch.float64) * 1e-3).requires_grad_()  # gap < ε
    out = flipguard.aligner_constraint(inputs(policy, anchor.clone(), anchor, anchor, torch.full((8,), 5)), config())
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and float(out.metrics["flipguard/flip_rate"]) == 0.0
    assert torch.count_nonzero(policy.grad) == 0


def test_gradient_pulls_only_flipped_examples_toward_the_anchor():
    anchor = torch.tensor([-5.0, -5.0, -5.0, -5.0], dtype=torch.float64)
    start = torch.tensor([-9.0, -5.0, -7.0, -4.0], dtype=torch.float64)  # flipped: 0 and 2 (β·gap = 0.4, 0.2 > 0.01)
    tokens = torch.tensor([4, 4, 2, 4])
    cfg = config()

    def constraint(pc):
        return flipguard.aligner_constraint(inputs(pc, pc.detach(), anchor, anchor, tokens), cfg).loss

    policy = start.clone().requires_grad_()
    constraint(policy).backward()
    # dC/d log π_θ(y_w) = −γ/(B·|y_w|) on flipped examples, 0 elsewhere.
    assert torch.allclose(policy.grad, torch.tensor([-1 / 16, 0.0, -1 / 8, 0.0], dtype=torch.float64))
    assert torch.autograd.gradcheck(constraint, (start.clone().requires_grad_(),))
    stepped = start - 1.0 * policy.grad  # gradient descent raises the flipped log-probs toward the anchor's
    assert ((anchor - stepped)[[0, 2]] < (anchor - start)[[0, 2]]).all() and torch.equal(stepped[[1, 3]], start[[1, 3]])


def test_regression_metrics_match_a_direct_count():
    g = torch.Generator().manual_seed(2)
    model, anchor = torch.randn(200, generator=g), torch.randn(200, generator=g)
    out = preference_flips(model, anchor)
    pairs = list(zip(model.tolist(), anchor.tolist()))
    assert out["negative_flip_rate"] == sum(a > 0 and m <= 0 for m, a in pairs) / 200
    assert out["positive_flip_rate"] == sum(a <= 0 and m > 0 for m, a in pairs) / 200
    assert out["policy_accuracy"] == sum(m > 0 for m, _ in pairs) / 200
    assert out["anchor_accuracy"] == sum(a > 0 for _, a in pairs) / 200
    assert preference_flips(anchor, anchor)["negative_flip_rate"] == 0.0
    gen = generation_flips(torch.tensor([1.0, 0.5, 0.0]), torch.tensor([0.5, 0.5, 1.0]))
    assert gen["negative_flip_rate"] == 1 / 3 and gen["positive_flip_rate"] == 1 / 3


@pytest.mark.parametrize("options, message", [
    ({"epsilon": 0}, "flipguard.epsilon must be > 0"),
    ({"epsilon": -0.5}, "flipguard.epsilon must be > 0"),
    ({"gamma": -1}, "flipguard.gamma must be >= 0"),
    ({"target": "rejected"}, "flipguard.target must be one of chosen, margin"),
    ({"constraint": "token_kl"}, "token_kl needs the anchor's logits every step and is not implemented"),
    ({"anchor_path": "/nonexistent/pre-aligned"}, "flipguard.anchor_path: /nonexistent/pre-aligned is not a model folder"),
])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(ConfigError, match="section 'flipguard'") as info:
        config(**options)
    assert message in str(info.value)
