"""Non-finite loss and gradient checks that every rank agrees on, before the optimizer step.

Every rank runs the same checks with one all-reduce each, so all ranks take the
same branch (skip a micro-batch, or stop) and DeepSpeed's collectives stay in
lock-step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class NonFiniteError(RuntimeError):
    """Training met a NaN/inf loss or gradient and ``train.on_nonfinite`` is ``stop``."""


def _any_rank(flag: bool) -> bool:
    value = torch.tensor([1.0 if flag else 0.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def loss_is_finite(loss: torch.Tensor) -> bool:
    """True when the micro-batch loss is finite on every rank (collective)."""
    return not _any_rank(not bool(torch.isfinite(loss.detach()).all()))


def grads_are_finite(engine) -> bool:
    """True when the accumulated gradients are finite on every rank (collective); call at the
    gradient-accumulation boundary, after ``engine.backward`` and before ``engine.step``.

    Under ZeRO-3 (optimizer not offloaded) the reduced gradient partition of each rank
    lives in one flat buffer; otherwise the parameters' ``.grad`` are checked (ZeRO-0).
    ZeRO-1/2 and an offloaded optimizer keep their gradients where neither is visible:
    there only the loss is checked.
    """
    flat = getattr(engine.optimizer, "grad_partitions_flat_buffer", None)
    tensors = [flat] if flat is not None else [p.grad for p in engine.module.parameters() if p.grad is not None]
    local_bad = any(not bool(torch.isfinite(t).all()) for t in tensors)
    return not _any_rank(local_bad)


def ids_on_all_ranks(ids: list[str]) -> list[str]:
    """``ids`` of every rank, in rank order (collective): each rank passes the ids it has to report."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(ids)
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(ids))
    return [i for rank_ids in gathered for i in (rank_ids or [])]
