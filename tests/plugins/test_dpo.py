import math

import pytest
import torch

from aligner.config import build_config
from aligner.hookspecs import SequenceLogps, StepInputs
from aligner.registry import activate
from aligner.training.step import total_loss
from aligner_plugins import dpo


def reference_dpo(pc, pr, rc, rr, beta, eps):
    """Written independently from the paper's formula, one example at a time, in float64."""
    out = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        m = beta * ((a - c) - (b - d))
        out.append(-(1 - eps) * math.log(1 / (1 + math.exp(-m))) - eps * math.log(1 / (1 + math.exp(m))))
    return sum(out) / len(out)


@pytest.mark.parametrize("beta, eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_dpo_hook_matches_an_independent_computation(beta, eps):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    plugins = activate(["dpo"])
    cfg = build_config({"dpo": {"beta": beta, "label_smoothing": eps}}, plugins.config_sections())
    inputs = StepInputs(SequenceLogps(pc, pr), SequenceLogps(rc, rr), None, torch.ones(16), torch.ones(16))
    out = plugins.call_one("dpo", "aligner_loss", inputs=inputs, config=cfg)
    assert float(out.loss) == pytest.approx(reference_dpo(pc, pr, rc, rr, beta, eps), abs=1e-9)
    metrics = total_loss(plugins, inputs, cfg)[1]  # rewards/* are the core's, from the DPO-form reward
    assert float(metrics["dpo/loss"]) == pytest.approx(float(out.loss), abs=1e-12)
    assert float(metrics["rewards/margins"]) == pytest.approx(float((beta * ((pc - rc) - (pr - rr))).mean()), abs=1e-9)
    assert float(metrics["rewards/accuracies"]) == float(((pc - rc) > (pr - rr)).double().mean())


def test_dpo_gradient_passes_gradcheck():
    g = torch.Generator().manual_seed(1)
    pc, pr = (torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    rc, rr = (torch.randn(4, generator=g, dtype=torch.float64) for _ in range(2))
    assert torch.autograd.gradcheck(lambda a, b: dpo.dpo_loss(a, b, rc, rr, 0.3, 0.1)[0].mean(), (pc, pr))


def test_dpo_loss_is_ln2_when_policy_equals_reference():
    x = torch.randn(8)
    losses, _, _ = dpo.dpo_loss(x, x.flip(0), x, x.flip(0), 0.1)
    assert torch.allclose(losses, torch.full((8,), math.log(2)))
