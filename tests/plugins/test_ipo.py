import pytest
import torch

from aligner.config import build_config
from aligner.hookspecs import SequenceLogps, StepInputs
from aligner.registry import activate
from aligner.training.step import total_loss
from aligner_plugins import ipo


def reference_ipo(pc, pr, rc, rr, nc, nr, beta):
    """Written independently from the IPO formula, one pair at a time, in Python floats."""
    out = []
    for a, b, c, d, n_c, n_r in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), nc.tolist(), nr.tolist()):
        h = (a / n_c - c / n_c) - (b / n_r - d / n_r)
        out.append((h - 1 / (2 * beta)) ** 2)
    return sum(out) / len(out)


def random_inputs(seed, n=16):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (torch.randn(n, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    nc, nr = (torch.randint(1, 30, (n,), generator=g).double() for _ in range(2))
    return pc, pr, rc, rr, nc, nr


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_ipo_hook_matches_an_independent_computation(beta):
    pc, pr, rc, rr, nc, nr = random_inputs(0)
    plugins = activate(["ipo"])
    cfg = build_config({"ipo": {"beta": beta}}, plugins.config_sections())
    inputs = StepInputs(SequenceLogps(pc, pr), SequenceLogps(rc, rr), None, nc, nr)
    out = plugins.call_one("ipo", "aligner_loss", inputs=inputs, config=cfg)
    assert float(out.loss) == pytest.approx(reference_ipo(pc, pr, rc, rr, nc, nr, beta), abs=1e-6)
    margins = beta * ((pc - rc) / nc - (pr - rr) / nr)  # the averaged form, under ipo/
    assert float(out.metrics["ipo/rewards/margins"]) == pytest.approx(float(margins.mean()), abs=1e-6)
    assert float(out.metrics["ipo/rewards/accuracies"]) == float((margins > 0).double().mean())
    # rewards/* are what TRL 1.16 logs for IPO too: the summed log-ratio times β, logged by the core.
    metrics = total_loss(plugins, inputs, cfg)[1]
    summed = [beta * ((a - c) - (b - d)) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    assert float(metrics["rewards/margins"]) == pytest.approx(sum(summed) / len(summed), abs=1e-6)
    assert float(metrics["rewards/chosen"]) == pytest.approx(float((beta * (pc - rc)).mean()), abs=1e-6)
    assert float(metrics["rewards/margins"]) != pytest.approx(float(margins.mean()), abs=1e-3)


def test_ipo_gradient_passes_gradcheck():
    pc, pr, rc, rr, nc, nr = random_inputs(1, n=4)
    pc, pr = pc.requires_grad_(), pr.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ipo.ipo_loss(a, b, rc, rr, nc, nr, 0.3)[0].mean(), (pc, pr))


def test_ipo_loss_is_the_squared_target_when_policy_equals_reference():
    x, n = torch.randn(8), torch.full((8,), 5.0)
    losses, _, _ = ipo.ipo_loss(x, x.flip(0), x, x.flip(0), n, n, 0.1)
    assert torch.allclose(losses, torch.full((8,), (1 / (2 * 0.1)) ** 2))


def test_ipo_rejects_a_nonpositive_beta():
    with pytest.raises(ValueError, match="ipo.beta must be > 0"):
        ipo.IPOConfig(beta=0)
