"""Each collective aligner issues, run on 2 spawned ranks under one backend (tests/test_collective_devices.py)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist


def sites() -> dict:
    """Name -> a call of one of aligner's collectives (every rank calls it)."""
    from aligner.data import embedded
    from aligner.hookspecs import Engines
    from aligner.reference import lora_trust_region
    from aligner.training import nonfinite
    from aligner.training.logging import reduce_mean
    from aligner.training.perf import PerfMeter
    from aligner.training.preempt import StopWatch
    from aligner_plugins.kto import kl_baseline

    linear = torch.nn.Linear(3, 3)
    for p in linear.parameters():
        p.ds_tensor = p.data  # a ZeRO-3 partition, as base_norm_squared reads it
    meter = PerfMeter(Engines(policy=embedded.build_model(16, hidden_size=8, num_layers=1)), "float32")
    return {
        "nonfinite.loss_is_finite": lambda: nonfinite.loss_is_finite(torch.tensor(1.0)),
        "logging.reduce_mean": lambda: reduce_mean({"a": torch.tensor(1.0), "b": 2.0}),
        "perf.step_metrics": lambda: meter.step_metrics(1.0),
        "preempt.decide": lambda: StopWatch(dist.get_rank()).decide(),
        "lora_trust_region.base_norm_squared": lambda: lora_trust_region.base_norm_squared(types.SimpleNamespace(module=linear)),
        "kto.kl_baseline": lambda: kl_baseline(torch.ones(2), torch.zeros(2)),
    }


def run(rank: int, port: int, out: str) -> None:
    results = {}
    for backend in ("gloo", "cuda:gloo"):
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        for name, call in sites().items():
            try:
                call()
                results[f"{backend} {name}"] = "ok"
            except Exception as exc:  # noqa: BLE001 - the outcome is what the test reads
                results[f"{backend} {name}"] = f"{type(exc).__name__}: {exc}"
        dist.destroy_process_group()
        port += 1
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    run(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
