import pytest
import torch

from aligner.config import build_config
from aligner.hookspecs import SequenceLogps, StepInputs
from aligner.registry import activate
from aligner.training.step import total_loss
from aligner_plugins import hinge


def reference_hinge(pc, pr, rc, rr, beta):
    """Written independently from TRL's hinge formula, one pair at a time, in Python floats."""
    out = [max(0.0, 1 - beta * ((a - c) - (b - d))) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    return sum(out) / len(out)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_hinge_hook_matches_an_independent_computation(beta):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(32, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    plugins = activate(["hinge"])
    cfg = build_config({"hinge": {"beta": beta}}, plugins.config_sections())
    inputs = StepInputs(SequenceLogps(pc, pr), SequenceLogps(rc, rr), None, torch.ones(32), torch.ones(32))
    out = plugins.call_one("hinge", "aligner_loss", inputs=inputs, config=cfg)
    expected = reference_hinge(pc, pr, rc, rr, beta)
    assert 0 < expected < 1 + beta * 20  # the random case has pairs on both sides of the hinge
    assert float(out.loss) == pytest.approx(expected, abs=1e-6)
    assert float(total_loss(plugins, inputs, cfg)[1]["rewards/chosen"]) == pytest.approx(float((beta * (pc - rc)).mean()), abs=1e-6)


def test_hinge_gradient_passes_gradcheck():
    # Margins kept away from the kink at 1, where relu has no derivative.
    pc = torch.tensor([3.0, -2.0, 0.5, 12.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([1.0, 1.0, -1.0, 0.0], dtype=torch.float64, requires_grad=True)
    rc, rr = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: hinge.hinge_loss(a, b, rc, rr, 0.1)[0].mean(), (pc, pr))


def test_hinge_loss_is_one_when_policy_equals_reference():
    x = torch.randn(8)
    losses, _, _ = hinge.hinge_loss(x, x.flip(0), x, x.flip(0), 0.1)
    assert torch.equal(losses, torch.ones(8))
