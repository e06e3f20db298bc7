import math

import pytest
import torch

from aligner.config import ConfigError, build_config
from aligner.hookspecs import SequenceLogps, StepInputs
from aligner.registry import activate


def logsig(z):
    return -math.log1p(math.exp(-z)) if z > 0 else z - math.log1p(math.exp(z))


def reference(pc, pr, rc, rr, beta):
    """−log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l) per pair, in Python floats."""
    out = []
    for a, b, c, d in zip(pc, pr, rc, rr):
        rw, rl = beta * (a - c), beta * (b - d)
        out.append(-logsig(rw) - 0.5 * logsig(-rw) - 0.5 * logsig(-rl))
    return sum(out) / len(out)


@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_nca_pair_matches_an_independent_computation(beta):
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(16, generator=g, dtype=torch.float64) * 10 for _ in range(4))
    plugins = activate(["nca_pair"])
    cfg = build_config({"nca_pair": {"beta": beta}}, plugins.config_sections())
    inputs = StepInputs(SequenceLogps(pc, pr), SequenceLogps(rc, rr), None, torch.ones(16), torch.ones(16))
    out = plugins.call_one("nca_pair", "aligner_loss", inputs=inputs, config=cfg)
    assert float(out.loss) == pytest.approx(reference(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), beta), abs=1e-9)


def test_nca_pair_is_two_ln2_when_policy_equals_reference():
    plugins = activate(["nca_pair"])
    x = torch.randn(8, dtype=torch.float64)
    inputs = StepInputs(SequenceLogps(x, x.flip(0)), SequenceLogps(x, x.flip(0)), None, torch.ones(8), torch.ones(8))
    out = plugins.call_one("nca_pair", "aligner_loss", inputs=inputs, config=build_config({}, plugins.config_sections()))
    assert float(out.loss) == pytest.approx(2 * math.log(2), abs=1e-12)


def test_nca_pair_refuses_a_nonpositive_beta():
    plugins = activate(["nca_pair"])
    with pytest.raises(ConfigError, match="section 'nca_pair': nca_pair.beta must be > 0, got -1"):
        build_config({"nca_pair": {"beta": -1}}, plugins.config_sections())
