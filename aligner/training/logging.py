"""Metrics: averaged over micro-batches and ranks, handed by rank 0 to the run's loggers (aligner/training/loggers.py:
TensorBoard by default, plugins/tensorboard.py), with a progress bar.

A metric that is NaN for a micro-batch or a rank means "no value here" (a mean
over no examples, e.g. ``rewards/chosen`` in an unpaired batch without
desirable rows): it is left out of the averages, and stays NaN only when no
micro-batch on any rank had a value.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from aligner.distributed.comm import comm_device


def reduce_mean(values: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """Average a dict of scalars (floats, or 0-d tensors on any device) over all ranks (every rank must pass the
    same keys): one all-reduce on the backend's device and one read back to the host for all of them."""
    if not values:
        return {}
    keys = sorted(values)
    device = comm_device()
    vec = torch.stack([torch.as_tensor(values[k], dtype=torch.float64).to(device) for k in keys])  # (K,)
    present = ~vec.isnan()
    sums_counts = torch.stack([vec.nan_to_num(0.0), present.double()])  # (2, K)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums_counts)
    means = sums_counts[0] / sums_counts[1]  # 0/0 = NaN where no rank had a value
    return dict(zip(keys, means.tolist()))


class StepMetrics:
    """Accumulates the metric values of one optimizer step's micro-batches where they are (on the GPU: no host
    sync per metric and micro-batch); a NaN is "no value this micro-batch"."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, metrics: dict[str, torch.Tensor | float]) -> None:
        for key, value in metrics.items():
            value = torch.as_tensor(value).detach().double()
            present = ~value.isnan()
            self.sums[key] = self.sums.get(key, 0.0) + value.nan_to_num(0.0)
            self.counts[key] = self.counts.get(key, 0) + present.double()

    def means(self) -> dict[str, torch.Tensor]:
        """Per key, the mean over the micro-batches that had a value (NaN where none had): 0-d tensors."""
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


def progress_bar(total: int, initial: int, rank: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=rank != 0, desc="train", unit="step", dynamic_ncols=True)
