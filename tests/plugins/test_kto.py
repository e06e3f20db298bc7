import logging
import math

import pytest
import torch

from aligner.config import build_config
from aligner.hookspecs import DatasetSummary, SequenceLogps, StepInputs
from aligner.registry import activate
from aligner.training.step import total_loss
from aligner_plugins import kto


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def reference_kto(pol_d, ref_d, pol_u, ref_u, kl_pol, kl_ref, beta, w_d, w_u):
    """Written independently from the KTO formula, one completion at a time, in Python floats."""
    shifted = [a - b for a, b in zip(kl_pol.tolist(), kl_ref.tolist())]
    z0 = max(0.0, sum(shifted) / len(shifted))
    losses = [w_d * (1 - sigmoid(beta * ((a - b) - z0))) for a, b in zip(pol_d.tolist(), ref_d.tolist())]
    losses += [w_u * (1 - sigmoid(beta * (z0 - (a - b)))) for a, b in zip(pol_u.tolist(), ref_u.tolist())]
    return sum(losses) / len(losses), z0


def config(plugins, **kto_options):
    return build_config({"kto": kto_options}, plugins.config_sections())


@pytest.mark.parametrize("paired, kl_shift", [(False, 3.0), (False, -3.0), (True, 1.0)])
def test_kto_hook_matches_an_independent_computation(paired, kl_shift):
    g = torch.Generator().manual_seed(0)
    n_d, n_u = (8, 8) if paired else (11, 5)
    pol_d, ref_d = (torch.randn(n_d, generator=g, dtype=torch.float64) * 10 for _ in range(2))
    pol_u, ref_u = (torch.randn(n_u, generator=g, dtype=torch.float64) * 10 for _ in range(2))
    kl_pol = torch.randn(n_d + n_u, generator=g, dtype=torch.float64) * 5 + kl_shift
    kl_ref = torch.randn(n_d + n_u, generator=g, dtype=torch.float64) * 5
    plugins = activate(["kto"])
    cfg = config(plugins, beta=0.3, desirable_weight=1.5, undesirable_weight=0.7)
    inputs = StepInputs(SequenceLogps(pol_d, pol_u), SequenceLogps(ref_d, ref_u), None, torch.ones(n_d), torch.ones(n_u),
                        paired=paired, kl_policy=kl_pol, kl_reference=kl_ref)
    out = plugins.call_one("kto", "aligner_loss", inputs=inputs, config=cfg)
    expected, z0 = reference_kto(pol_d, ref_d, pol_u, ref_u, kl_pol, kl_ref, 0.3, 1.5, 0.7)
    assert float(out.loss) == pytest.approx(expected, abs=1e-6)
    assert float(out.metrics["kto/kl"]) == pytest.approx(z0, abs=1e-9)
    assert (z0 > 0) == (kl_shift > 0)  # the cases cover both sides of the clamp
    metrics = total_loss(plugins, inputs, cfg)[1]  # rewards/* come from the core, with kto.beta
    assert ("rewards/accuracies" in metrics) == paired
    assert float(metrics["rewards/chosen"]) == pytest.approx(float((0.3 * (pol_d - ref_d)).mean()), abs=1e-9)


def test_kto_gradient_passes_gradcheck_and_z0_carries_none():
    g = torch.Generator().manual_seed(1)
    pol_d, pol_u = (torch.randn(3, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    ref_d, ref_u = (torch.randn(3, generator=g, dtype=torch.float64) for _ in range(2))
    kl_ref = torch.randn(6, generator=g, dtype=torch.float64)
    kl_pol = (kl_ref + 2.0).requires_grad_()

    def loss(a, b, k):
        return kto.kto_loss(a, ref_d, b, ref_u, kto.kl_baseline(k, kl_ref), 0.5, 1.2, 0.8)[0].mean()

    assert torch.autograd.gradcheck(lambda a, b: loss(a, b, kl_pol), (pol_d, pol_u))
    loss(pol_d, pol_u, kl_pol).backward()
    assert kl_pol.grad is None  # z₀ is detached


def test_kto_loss_with_zero_log_ratios_is_half_the_weighted_share():
    zeros_d, zeros_u = torch.zeros(6), torch.zeros(2)
    losses, _, _ = kto.kto_loss(zeros_d, zeros_d, zeros_u, zeros_u, torch.tensor(0.0), 0.1, 1.0, 3.0)
    assert float(losses.mean()) == pytest.approx(0.5 * (6 * 1.0 + 2 * 3.0) / 8)


def test_kto_metrics_of_a_batch_without_undesirable_rows_are_nan_not_errors():
    plugins = activate(["kto"])
    x = torch.randn(4)
    inputs = StepInputs(SequenceLogps(x, x[:0]), SequenceLogps(x, x[:0]), None, torch.ones(4), torch.ones(0),
                        paired=False, kl_policy=x, kl_reference=x)
    out = plugins.call_one("kto", "aligner_loss", inputs=inputs, config=config(plugins))
    assert float(out.loss) == pytest.approx(0.5)
    metrics = total_loss(plugins, inputs, config(plugins))[1]
    assert math.isnan(float(metrics["rewards/rejected"])) and not math.isnan(float(metrics["rewards/chosen"]))


def test_unbalanced_data_gets_the_papers_weighting_advice_with_the_numbers(caplog):
    plugins = activate(["kto"])
    summary = DatasetSummary("data.train (x.jsonl)", False, 400, 300, 100)
    with caplog.at_level(logging.WARNING):
        plugins.call_each("aligner_train_data", summary=summary, config=config(plugins))
    assert "has 300 desirable and 100 undesirable completions" in caplog.text
    assert "= 3.000 is outside [1, 4/3]" in caplog.text and "--set kto.undesirable_weight=3" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        plugins.call_each("aligner_train_data", summary=summary, config=config(plugins, undesirable_weight=2.5))
    assert caplog.text == ""  # 300 / (2.5 * 100) = 1.2 is inside the advised range
    assert "kto.desirable_weight=3" in kto.weighting_advice(DatasetSummary("d", False, 400, 100, 300), kto.KTOConfig())


def test_kto_asks_for_unpaired_data_and_the_kl_pairs():
    plugins = activate(["kto"])
    cfg = config(plugins)
    assert plugins.required_inputs(cfg) == {"unpaired", "kl_pairs"}
    assert plugins.required_models(cfg) == {"reference"}
    with pytest.raises(ValueError, match="kto.undesirable_weight must be > 0"):
        kto.KTOConfig(undesirable_weight=0)


def _z0_on_rank(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        policy = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]][rank][: 3 - rank])  # rank 1 holds 2 pairs
        out.put((rank, float(kto.kl_baseline(policy, torch.zeros_like(policy)))))
    finally:
        dist.destroy_process_group()


@pytest.mark.subprocess
def test_z0_is_the_mean_over_every_ranks_mismatched_pairs():
    """Two real gloo processes: each rank's own mean would be 2 and 15; both use (1+2+3+10+20)/5 = 7.2."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_z0_on_rank, args=(r, port, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    assert results == pytest.approx({0: 7.2, 1: 7.2})
    assert float(kto.kl_baseline(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3))) == pytest.approx(2.0)  # one process
