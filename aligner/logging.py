"""Metrics: averaged over micro-batches and ranks, handed by rank 0 to the run's loggers (aligner/loggers.py:
TensorBoard by default, plugins/tensorboard.py), with a progress bar.

A metric that is NaN for a micro-batch or a rank means "no value here" (a mean
over no examples, e.g. ``rewards/chosen`` in an unpaired batch without
desirable rows): it is left out of the averages, and stays NaN only when no
micro-batch on any rank had a value.
"""

from __future__ import annotations

from collections import defaultdict
import torch
import torch.distributed as dist


def reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Average a dict of scalars over all ranks (every rank must pass the same keys)."""
    if not values:
        return {}
    keys = sorted(values)
    vec = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    present = ~vec.isnan()
    sums_counts = torch.stack([vec.nan_to_num(0.0), present.double()])  # (2, K)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums_counts)
    means = sums_counts[0] / sums_counts[1]  # 0/0 = NaN where no rank had a value
    return dict(zip(keys, means.tolist()))


class StepMetrics:
    """Accumulates the metric tensors of one optimizer step's micro-batches."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, metrics: dict[str, torch.Tensor | float]) -> None:
        for key, value in metrics.items():
            value = float(value)
            self.sums[key] += 0.0 if value != value else value  # NaN: no value this micro-batch
            self.counts[key] += 0 if value != value else 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] if self.counts[k] else float("nan") for k in self.sums}


def progress_bar(total: int, initial: int, rank: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=rank != 0, desc="train", unit="step", dynamic_ncols=True)
