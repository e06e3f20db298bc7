"""Non-finite loss and gradient checks that every rank agrees on, before the optimizer step.

Every rank runs the same checks with one all-reduce each, so all ranks take the
same branch (skip a micro-batch, or stop) and DeepSpeed's collectives stay in
lock-step.

Where the accumulated gradients are visible (ZeRO-3's gradient partition, or
``.grad`` under ZeRO-0), a non-finite loss shows in them too, so with
``train.on_nonfinite: stop`` one check per optimizer step suffices: the losses
are kept on the device, and only a failed gradient check looks at them, to say
whether a loss was the cause. A loss is checked per micro-batch (a host sync
and an all-reduce each) only where it must be: ``skip`` drops the micro-batch
before its backward, and ZeRO-1/2 or an offloaded optimizer hide the gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from aligner.distributed.comm import comm_device


class NonFiniteError(RuntimeError):
    """Training met a NaN/inf loss or gradient and ``train.on_nonfinite`` is ``stop``."""


def _any_rank(flag: bool) -> bool:
    value = torch.tensor([1.0 if flag else 0.0], device=comm_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def loss_is_finite(loss: torch.Tensor) -> bool:
    """True when the micro-batch loss is finite on every rank (collective)."""
    return not _any_rank(not bool(torch.isfinite(loss.detach()).all()))


def _gradients(engine) -> list[torch.Tensor] | None:
    """The accumulated gradients this rank holds, or None where they are not visible: under ZeRO-3 (optimizer not
    offloaded) the reduced partition in one flat buffer, under ZeRO-0 the parameters' ``.grad``; ZeRO-1/2 and an
    offloaded optimizer keep them where neither is."""
    stage = engine.zero_optimization_stage()
    if stage == 3 and not engine.zero_offload_optimizer():
        return [engine.optimizer.grad_partitions_flat_buffer]
    if stage == 0:
        return [p.grad for p in engine.module.parameters() if p.grad is not None]
    return None


def checks_each_loss(engine, on_nonfinite: str) -> bool:
    """Whether each micro-batch's loss must be checked before its backward (module doc)."""
    return on_nonfinite == "skip" or _gradients(engine) is None


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite, by reductions: no tensor of their size is allocated (a bool
    mask of an 8B model's gradient partition would be 1 byte per element). A NaN or inf anywhere makes the sum
    non-finite; finite gradients cannot sum past 3.4e38, the largest fp32 or bf16 value."""
    sums = [t.sum().float() for t in tensors if t.numel()]
    return not sums or bool(torch.isfinite(torch.stack(sums).sum()))


def step_is_finite(engine, losses: list[torch.Tensor]) -> bool:
    """True when the step's micro-batch ``losses`` and its accumulated gradients are finite on every rank
    (collective, one all-reduce); call at the gradient-accumulation boundary, after ``engine.backward`` and before
    ``engine.step``. Gradients that are not visible (:func:`_gradients`) count as finite: there each loss was
    checked before its backward."""
    tensors = _gradients(engine)
    bad = not all_finite(losses) or (tensors is not None and not all_finite(tensors))
    return not _any_rank(bad)


def ids_on_all_ranks(ids: list[str]) -> list[str]:
    """``ids`` of every rank, in rank order (collective): each rank passes the ids it has to report."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(ids)
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(ids))
    return [i for rank_ids in gathered for i in (rank_ids or [])]
