import math

import pytest
import torch

from aligner.config import ConfigError, build_config
from aligner.hookspecs import SequenceLogps, StepInputs
from aligner.registry import activate


def reference(pc, pr, rc, rr, nc, nr, beta):
    """−log σ(β·(ρ_w/|y_w| − ρ_l/|y_l|)) per pair, in Python floats."""
    out = []
    for a, b, c, d, n_c, n_r in zip(pc, pr, rc, rr, nc, nr):
        z = beta * ((a - c) / n_c - (b - d) / n_r)
        out.append(math.log1p(math.exp(-z)))
    return sum(out) / len(out)


@pytest.mark.parametrize("beta", [0.1, 3.0])
def test_sigmoid_norm_matches_an_independent_computation(beta):
    g = torch.Generator().manual_seed(11)
    pc, pr, rc, rr = (torch.randn(16, generator=g, dtype=torch.float64) * 10 for _ in range(4))
    nc, nr = (torch.randint(1, 30, (16,), generator=g).double() for _ in range(2))
    plugins = activate(["sigmoid_norm"])
    cfg = build_config({"sigmoid_norm": {"beta": beta}}, plugins.config_sections())
    inputs = StepInputs(SequenceLogps(pc, pr), SequenceLogps(rc, rr), None, nc, nr)
    out = plugins.call_one("sigmoid_norm", "aligner_loss", inputs=inputs, config=cfg)
    args = [t.tolist() for t in (pc, pr, rc, rr, nc, nr)]
    assert float(out.loss) == pytest.approx(reference(*args, beta), abs=1e-9)


def test_sigmoid_norm_needs_a_reference_unlike_simpo():
    plugins = activate(["sigmoid_norm"])
    cfg = build_config({}, plugins.config_sections())
    assert plugins.required_models(cfg) == {"reference"}


def test_sigmoid_norm_is_ln2_when_policy_equals_reference():
    plugins = activate(["sigmoid_norm"])
    x = torch.randn(8, dtype=torch.float64)
    n = torch.arange(1, 9, dtype=torch.float64)
    inputs = StepInputs(SequenceLogps(x, x.flip(0)), SequenceLogps(x, x.flip(0)), None, n, n.flip(0))
    out = plugins.call_one("sigmoid_norm", "aligner_loss", inputs=inputs, config=build_config({}, plugins.config_sections()))
    assert float(out.loss) == pytest.approx(math.log(2), abs=1e-12)


def test_sigmoid_norm_refuses_a_nonpositive_beta():
    plugins = activate(["sigmoid_norm"])
    with pytest.raises(ConfigError, match="section 'sigmoid_norm': sigmoid_norm.beta must be > 0, got 0"):
        build_config({"sigmoid_norm": {"beta": 0}}, plugins.config_sections())
