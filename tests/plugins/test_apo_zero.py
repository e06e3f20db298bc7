import math

import pytest
import torch

from aligner.config import ConfigError, build_config
from aligner.hookspecs import SequenceLogps, StepInputs
from aligner.registry import activate


def sig(z):
    return 1 / (1 + math.exp(-z))


def reference(pc, pr, rc, rr, beta):
    """(1 − σ(r_w)) + σ(r_l) per pair, in Python floats."""
    out = [(1 - sig(beta * (a - c))) + sig(beta * (b - d)) for a, b, c, d in zip(pc, pr, rc, rr)]
    return sum(out) / len(out)


@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_apo_zero_matches_an_independent_computation(beta):
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (torch.randn(16, generator=g, dtype=torch.float64) * 10 for _ in range(4))
    plugins = activate(["apo_zero"])
    cfg = build_config({"apo_zero": {"beta": beta}}, plugins.config_sections())
    inputs = StepInputs(SequenceLogps(pc, pr), SequenceLogps(rc, rr), None, torch.ones(16), torch.ones(16))
    out = plugins.call_one("apo_zero", "aligner_loss", inputs=inputs, config=cfg)
    assert float(out.loss) == pytest.approx(reference(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), beta), abs=1e-9)


def test_apo_zero_is_one_when_policy_equals_reference():
    plugins = activate(["apo_zero"])
    x = torch.randn(8, dtype=torch.float64)
    inputs = StepInputs(SequenceLogps(x, x.flip(0)), SequenceLogps(x, x.flip(0)), None, torch.ones(8), torch.ones(8))
    out = plugins.call_one("apo_zero", "aligner_loss", inputs=inputs, config=build_config({}, plugins.config_sections()))
    assert float(out.loss) == pytest.approx(1.0, abs=1e-12)


def test_apo_zero_refuses_a_nonpositive_beta():
    plugins = activate(["apo_zero"])
    with pytest.raises(ConfigError, match="section 'apo_zero': apo_zero.beta must be > 0, got 0"):
        build_config({"apo_zero": {"beta": 0}}, plugins.config_sections())
