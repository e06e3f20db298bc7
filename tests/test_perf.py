"""perf/* metrics: peak memory, useful-FLOP accounting."""

import math

import torch

from aligner.data import Example, collate_pairs, pack_pairs
from aligner.hookspecs import Engines
from aligner.training import perf


def test_peak_mem_is_the_host_rss_on_cpu_and_flops_count_real_tokens_only(random_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(random_model_dir)
    assert 0.05 < perf.peak_mem_gib() < 64  # GiB of this process's peak RSS
    n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    assert perf.matmul_params(model) == n
    examples = [Example("a", [5, 6], [7, 8, 9], [10]), Example("b", [5], [11], [12, 13, 14, 15])]
    lengths = torch.tensor([5, 2, 3, 5], dtype=torch.float64)
    cfg = model.config
    for n_frozen, engines in ((1, Engines(policy=model, reference=model, anchor=model)), (0, Engines(policy=model))):
        for batch in (collate_pairs(examples, 0), pack_pairs(examples)):  # padding adds no useful FLOPs
            meter = perf.PerfMeter(engines, "float32")
            meter.count(batch)
            want = (6 + 2 * n_frozen) * float((n * lengths + cfg.num_hidden_layers * cfg.hidden_size * lengths**2).sum())
            assert meter.tokens == 15 and math.isclose(meter.flops, want)
    out = meter.step_metrics(elapsed=0.5)
    assert out["perf/tokens_per_s"] == 30 and out["perf/step_time_s"] == 0.5 and out["perf/peak_mem_gib"] > 0
    assert out["perf/cpu_s"] > 0
    assert "perf/mfu" not in out  # CPU: no peak FLOP/s to divide by
