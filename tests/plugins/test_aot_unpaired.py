import math

import pytest
import torch

from aligner.config import ConfigError, build_config
from aligner.hookspecs import SequenceLogps, StepInputs
from aligner.registry import activate


def logsig(z):
    return -math.log1p(math.exp(-z)) if z > 0 else z - math.log1p(math.exp(z))


def reference(pc, pr, rc, rr, beta, eps):
    """Sort the chosen and the rejected log-ratios separately (Python's sorted), match by rank."""
    w = sorted(a - c for a, c in zip(pc, rc))
    lo = sorted(b - d for b, d in zip(pr, rr))
    out = [-(1 - eps) * logsig(beta * (x - y)) - eps * logsig(-beta * (x - y)) for x, y in zip(w, lo)]
    return sum(out) / len(out)


@pytest.mark.parametrize("beta, eps", [(0.1, 0.0), (0.5, 0.2)])
def test_aot_unpaired_matches_an_independent_computation(beta, eps):
    g = torch.Generator().manual_seed(10)
    pc, pr, rc, rr = (torch.randn(16, generator=g, dtype=torch.float64) * 10 for _ in range(4))
    plugins = activate(["aot_unpaired"])
    cfg = build_config({"aot_unpaired": {"beta": beta, "label_smoothing": eps}}, plugins.config_sections())
    inputs = StepInputs(SequenceLogps(pc, pr), SequenceLogps(rc, rr), None, torch.ones(16), torch.ones(16))
    out = plugins.call_one("aot_unpaired", "aligner_loss", inputs=inputs, config=cfg)
    assert float(out.loss) == pytest.approx(reference(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), beta, eps), abs=1e-9)


def test_aot_unpaired_is_ln2_when_policy_equals_reference():
    plugins = activate(["aot_unpaired"])
    x = torch.randn(8, dtype=torch.float64)
    inputs = StepInputs(SequenceLogps(x, x.flip(0)), SequenceLogps(x, x.flip(0)), None, torch.ones(8), torch.ones(8))
    out = plugins.call_one("aot_unpaired", "aligner_loss", inputs=inputs, config=build_config({}, plugins.config_sections()))
    assert float(out.loss) == pytest.approx(math.log(2), abs=1e-12)


def test_aot_unpaired_refuses_a_negative_label_smoothing():
    plugins = activate(["aot_unpaired"])
    with pytest.raises(ConfigError, match=r"aot_unpaired.label_smoothing must be in \[0, 0.5\), got -0.1"):
        build_config({"aot_unpaired": {"label_smoothing": -0.1}}, plugins.config_sections())
