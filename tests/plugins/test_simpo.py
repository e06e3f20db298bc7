import math

import pytest
import torch

from aligner.config import build_config
from aligner.hookspecs import SequenceLogps, StepInputs
from aligner.registry import activate
from aligner_plugins import simpo


def reference_simpo(pc, pr, nc, nr, beta, gamma):
    """Written independently from the SimPO objective, one pair at a time, in Python floats."""
    out = []
    for a, b, n_c, n_r in zip(pc.tolist(), pr.tolist(), nc.tolist(), nr.tolist()):
        z = beta / n_c * a - beta / n_r * b - gamma
        out.append(math.log1p(math.exp(-z)))  # -log σ(z)
    return sum(out) / len(out)


@pytest.mark.parametrize("beta, gamma", [(2.0, 0.5), (2.5, 1.0), (0.5, 0.0)])
def test_simpo_hook_matches_an_independent_computation(beta, gamma):
    g = torch.Generator().manual_seed(0)
    pc, pr = (-torch.rand(16, generator=g, dtype=torch.float64) * 40 for _ in range(2))
    nc, nr = (torch.randint(1, 30, (16,), generator=g).double() for _ in range(2))
    plugins = activate(["simpo"])
    cfg = build_config({"simpo": {"beta": beta, "gamma": gamma}}, plugins.config_sections())
    out = plugins.call_one("simpo", "aligner_loss", inputs=StepInputs(SequenceLogps(pc, pr), None, None, nc, nr), config=cfg)
    assert float(out.loss) == pytest.approx(reference_simpo(pc, pr, nc, nr, beta, gamma), abs=1e-6)
    assert float(out.metrics["rewards/chosen"]) == pytest.approx(float((beta * pc / nc).mean()), abs=1e-6)


def test_simpo_gradient_passes_gradcheck():
    g = torch.Generator().manual_seed(1)
    pc, pr = (-torch.rand(4, generator=g, dtype=torch.float64).mul(10).requires_grad_() for _ in range(2))
    nc, nr = torch.tensor([3.0, 5, 1, 7], dtype=torch.float64), torch.tensor([2.0, 4, 6, 1], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: simpo.simpo_loss(a, b, nc, nr, 2.0, 0.5)[0].mean(), (pc, pr))


def test_simpo_asks_for_no_reference_model():
    plugins = activate(["simpo"])
    cfg = build_config({}, plugins.config_sections())
    assert plugins.required_models(cfg) == set()
