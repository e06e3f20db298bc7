import pytest
import torch

from aligner.config import ConfigError, build_config
from aligner.hookspecs import SequenceLogps, StepInputs
from aligner.registry import activate


def reference(pc, pr, rc, rr, beta):
    """(ρ_w − 1/(2β))² + (ρ_l + 1/(2β))² per pair, on unscaled log-ratios, in Python floats."""
    out = [((a - c) - 1 / (2 * beta)) ** 2 + ((b - d) + 1 / (2 * beta)) ** 2 for a, b, c, d in zip(pc, pr, rc, rr)]
    return sum(out) / len(out)


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_sppo_hard_matches_an_independent_computation(beta):
    g = torch.Generator().manual_seed(2)
    pc, pr, rc, rr = (torch.randn(16, generator=g, dtype=torch.float64) * 10 for _ in range(4))
    plugins = activate(["sppo_hard"])
    cfg = build_config({"sppo_hard": {"beta": beta}}, plugins.config_sections())
    inputs = StepInputs(SequenceLogps(pc, pr), SequenceLogps(rc, rr), None, torch.ones(16), torch.ones(16))
    out = plugins.call_one("sppo_hard", "aligner_loss", inputs=inputs, config=cfg)
    assert float(out.loss) == pytest.approx(reference(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), beta), rel=1e-12)


def test_sppo_hard_is_one_over_two_beta_squared_when_policy_equals_reference():
    plugins = activate(["sppo_hard"])
    x = torch.randn(8, dtype=torch.float64)
    inputs = StepInputs(SequenceLogps(x, x.flip(0)), SequenceLogps(x, x.flip(0)), None, torch.ones(8), torch.ones(8))
    out = plugins.call_one("sppo_hard", "aligner_loss", inputs=inputs, config=build_config({}, plugins.config_sections()))
    assert float(out.loss) == pytest.approx(1 / (2 * 0.1 ** 2), rel=1e-12)  # 50


def test_sppo_hard_refuses_a_nonpositive_beta():
    plugins = activate(["sppo_hard"])
    with pytest.raises(ConfigError, match="section 'sppo_hard': sppo_hard.beta must be > 0, got 0"):
        build_config({"sppo_hard": {"beta": 0}}, plugins.config_sections())
