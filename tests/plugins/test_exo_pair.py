import math

import pytest
import torch

from aligner.config import ConfigError, build_config
from aligner.hookspecs import SequenceLogps, StepInputs
from aligner.registry import activate


def reference(pc, pr, rc, rr, beta, eps):
    """KL((q_w, q_l) ‖ (1−ε, ε)) with q_w = σ(m), q_l = 1 − q_w, per pair, in Python floats."""
    out = []
    for a, b, c, d in zip(pc, pr, rc, rr):
        m = beta * ((a - c) - (b - d))
        q_w = 1 / (1 + math.exp(-m))
        q_l = 1 - q_w
        out.append(q_w * math.log(q_w / (1 - eps)) + q_l * math.log(q_l / eps))
    return sum(out) / len(out)


@pytest.mark.parametrize("beta, eps", [(0.1, 1e-3), (0.3, 0.1)])
def test_exo_pair_matches_an_independent_computation(beta, eps):
    g = torch.Generator().manual_seed(7)
    pc, pr, rc, rr = (torch.randn(16, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    plugins = activate(["exo_pair"])
    cfg = build_config({"exo_pair": {"beta": beta, "epsilon": eps}}, plugins.config_sections())
    inputs = StepInputs(SequenceLogps(pc, pr), SequenceLogps(rc, rr), None, torch.ones(16), torch.ones(16))
    out = plugins.call_one("exo_pair", "aligner_loss", inputs=inputs, config=cfg)
    assert float(out.loss) == pytest.approx(reference(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), beta, eps), abs=1e-9)


def test_exo_pair_step_one_value_when_policy_equals_reference():
    plugins = activate(["exo_pair"])
    x = torch.randn(8, dtype=torch.float64)
    inputs = StepInputs(SequenceLogps(x, x.flip(0)), SequenceLogps(x, x.flip(0)), None, torch.ones(8), torch.ones(8))
    out = plugins.call_one("exo_pair", "aligner_loss", inputs=inputs, config=build_config({}, plugins.config_sections()))
    eps = 1e-3
    assert float(out.loss) == pytest.approx(-math.log(2) - 0.5 * math.log(eps * (1 - eps)), abs=1e-12)  # 2.7612


def test_exo_pair_refuses_an_epsilon_of_zero():
    plugins = activate(["exo_pair"])
    with pytest.raises(ConfigError, match=r"exo_pair.epsilon must be in \(0, 0.5\) \(the loss is infinite at 0\), got 0"):
        build_config({"exo_pair": {"epsilon": 0}}, plugins.config_sections())
