import math

import pytest
import torch

from aligner.config import ConfigError, build_config
from aligner.hookspecs import SequenceLogps, StepInputs
from aligner.registry import activate


def logsig(z):
    return -math.log1p(math.exp(-z)) if z > 0 else z - math.log1p(math.exp(z))


def reference(pc, pr, rc, rr, beta, eps):
    """Sort the policy's and the reference's margins separately (Python's sorted), match by rank."""
    u = sorted(a - b for a, b in zip(pc, pr))
    v = sorted(c - d for c, d in zip(rc, rr))
    out = [-(1 - eps) * logsig(beta * (x - y)) - eps * logsig(-beta * (x - y)) for x, y in zip(u, v)]
    return sum(out) / len(out)


@pytest.mark.parametrize("beta, eps", [(0.1, 0.0), (0.5, 0.2)])
def test_aot_matches_an_independent_computation(beta, eps):
    g = torch.Generator().manual_seed(9)
    pc, pr, rc, rr = (torch.randn(16, generator=g, dtype=torch.float64) * 10 for _ in range(4))
    plugins = activate(["aot"])
    cfg = build_config({"aot": {"beta": beta, "label_smoothing": eps}}, plugins.config_sections())
    inputs = StepInputs(SequenceLogps(pc, pr), SequenceLogps(rc, rr), None, torch.ones(16), torch.ones(16))
    out = plugins.call_one("aot", "aligner_loss", inputs=inputs, config=cfg)
    expected = reference(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), beta, eps)
    assert float(out.loss) == pytest.approx(expected, abs=1e-9)
    unsorted = [-logsig(beta * ((a - b) - (c - d))) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    assert eps or abs(expected - sum(unsorted) / 16) > 1e-3  # the sort matters: not DPO on the same pairs


def test_aot_is_ln2_when_policy_equals_reference():
    plugins = activate(["aot"])
    x = torch.randn(8, dtype=torch.float64)
    inputs = StepInputs(SequenceLogps(x, x.flip(0)), SequenceLogps(x, x.flip(0)), None, torch.ones(8), torch.ones(8))
    out = plugins.call_one("aot", "aligner_loss", inputs=inputs, config=build_config({}, plugins.config_sections()))
    assert float(out.loss) == pytest.approx(math.log(2), abs=1e-12)


def test_aot_refuses_a_label_smoothing_of_one_half():
    plugins = activate(["aot"])
    with pytest.raises(ConfigError, match=r"aot.label_smoothing must be in \[0, 0.5\), got 0.5"):
        build_config({"aot": {"label_smoothing": 0.5}}, plugins.config_sections())
