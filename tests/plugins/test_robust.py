import math

import pytest
import torch

from aligner.config import ConfigError, build_config
from aligner.hookspecs import SequenceLogps, StepInputs
from aligner.registry import activate


def logsig(z):
    return -math.log1p(math.exp(-z)) if z > 0 else z - math.log1p(math.exp(z))


def reference(pc, pr, rc, rr, beta, eps):
    """Chowdhury et al.'s unbiased loss [−(1−ε)·log σ(m) + ε·log σ(−m)]/(1−2ε), in Python floats."""
    out = []
    for a, b, c, d in zip(pc, pr, rc, rr):
        m = beta * ((a - c) - (b - d))
        out.append((-(1 - eps) * logsig(m) + eps * logsig(-m)) / (1 - 2 * eps))
    return sum(out) / len(out)


def inputs_of(seed):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (torch.randn(16, generator=g, dtype=torch.float64) * 10 for _ in range(4))
    return StepInputs(SequenceLogps(pc, pr), SequenceLogps(rc, rr), None, torch.ones(16), torch.ones(16))


@pytest.mark.parametrize("beta, eps", [(0.1, 0.0), (0.1, 0.1), (0.5, 0.3)])
def test_robust_matches_an_independent_computation(beta, eps):
    inputs = inputs_of(5)
    plugins = activate(["robust"])
    cfg = build_config({"robust": {"beta": beta, "label_smoothing": eps}}, plugins.config_sections())
    out = plugins.call_one("robust", "aligner_loss", inputs=inputs, config=cfg)
    args = [t.tolist() for t in (inputs.policy.chosen, inputs.policy.rejected, inputs.reference.chosen, inputs.reference.rejected)]
    assert float(out.loss) == pytest.approx(reference(*args, beta, eps), abs=1e-9)


def test_robust_differs_from_dpos_conservative_label_smoothing():
    inputs = inputs_of(6)
    plugins = activate(["robust", "dpo"])
    cfg = build_config({"robust": {"label_smoothing": 0.1}, "dpo": {"label_smoothing": 0.1}}, plugins.config_sections())
    robust = float(plugins.call_one("robust", "aligner_loss", inputs=inputs, config=cfg).loss)
    cdpo = float(plugins.call_one("dpo", "aligner_loss", inputs=inputs, config=cfg).loss)
    assert abs(robust - cdpo) > 1e-3


@pytest.mark.parametrize("eps", [0.0, 0.2, 0.45])
def test_robust_is_ln2_for_every_epsilon_when_policy_equals_reference(eps):
    plugins = activate(["robust"])
    x = torch.randn(8, dtype=torch.float64)
    inputs = StepInputs(SequenceLogps(x, x.flip(0)), SequenceLogps(x, x.flip(0)), None, torch.ones(8), torch.ones(8))
    cfg = build_config({"robust": {"label_smoothing": eps}}, plugins.config_sections())
    assert float(plugins.call_one("robust", "aligner_loss", inputs=inputs, config=cfg).loss) == pytest.approx(math.log(2))


def test_robust_refuses_a_label_smoothing_of_one_half():
    plugins = activate(["robust"])
    with pytest.raises(ConfigError, match=r"robust.label_smoothing must be in \[0, 0.5\), got 0.5"):
        build_config({"robust": {"label_smoothing": 0.5}}, plugins.config_sections())
