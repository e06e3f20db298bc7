import math

import pytest
import torch

from aligner.config import ConfigError, build_config
from aligner.hookspecs import SequenceLogps, StepInputs
from aligner.registry import activate


def reference(pc, pr, rc, rr, beta, tau):
    """(1 − σ(m/τ))·log(1 + e^(−m)) + σ(m/τ)·e^(−m) per pair, in Python floats."""
    out = []
    for a, b, c, d in zip(pc, pr, rc, rr):
        m = beta * ((a - c) - (b - d))
        mix = 1 / (1 + math.exp(-m / tau))
        out.append((1 - mix) * math.log1p(math.exp(-m)) + mix * math.exp(-m))
    return sum(out) / len(out)


@pytest.mark.parametrize("beta, tau", [(0.1, 0.05), (0.3, 1.0)])
def test_discopop_matches_an_independent_computation(beta, tau):
    g = torch.Generator().manual_seed(8)
    pc, pr, rc, rr = (torch.randn(16, generator=g, dtype=torch.float64) for _ in range(4))  # |m| small: both regimes
    plugins = activate(["discopop"])
    cfg = build_config({"discopop": {"beta": beta, "tau": tau}}, plugins.config_sections())
    inputs = StepInputs(SequenceLogps(pc, pr), SequenceLogps(rc, rr), None, torch.ones(16), torch.ones(16))
    out = plugins.call_one("discopop", "aligner_loss", inputs=inputs, config=cfg)
    assert float(out.loss) == pytest.approx(reference(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), beta, tau), abs=1e-9)


def test_discopop_is_half_ln2_plus_half_when_policy_equals_reference():
    plugins = activate(["discopop"])
    x = torch.randn(8, dtype=torch.float64)
    inputs = StepInputs(SequenceLogps(x, x.flip(0)), SequenceLogps(x, x.flip(0)), None, torch.ones(8), torch.ones(8))
    out = plugins.call_one("discopop", "aligner_loss", inputs=inputs, config=build_config({}, plugins.config_sections()))
    assert float(out.loss) == pytest.approx(0.5 * math.log(2) + 0.5, abs=1e-12)


def test_discopop_refuses_a_nonpositive_tau():
    plugins = activate(["discopop"])
    with pytest.raises(ConfigError, match="section 'discopop': discopop.tau must be > 0, got 0"):
        build_config({"discopop": {"tau": 0}}, plugins.config_sections())
