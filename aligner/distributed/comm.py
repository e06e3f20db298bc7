"""Where the tensors of aligner's own collectives live: on the device of the backend they go through.

NCCL serves only CUDA tensors: a CPU tensor handed to ``all_reduce`` on an NCCL
group raises "No backend type associated with device type cpu". gloo on CPU
serves CPU tensors. Every collective that aligner issues (the non-finite
checks, the metric reductions, the preemption flags, the LoRA trust-region
norms) builds its tensors with ``device=comm_device()`` and reads them back
with ``.tolist()`` / ``.item()``, so one rule decides for all of them.

A process group initialised as ``cuda:gloo`` (gloo registered for the CUDA
device only) refuses CPU tensors exactly as NCCL does; the tests use it on CPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def backend_device_type(group: dist.ProcessGroup | None = None) -> str:
    """The device type (``"cpu"``, ``"cuda"``) that ``group``'s backend takes tensors on.

    ``dist.get_backend_config`` reads ``"cuda:nccl"`` for NCCL, ``"cpu:gloo,cuda:gloo"`` for plain gloo,
    ``"cuda:gloo"`` for gloo bound to CUDA. Where the CPU is served it is preferred (the values start on the
    host, as torch's own object collectives do); otherwise the first device type named.
    """
    if not dist.is_initialized():
        return "cpu"
    config = dist.get_backend_config(group)
    types = [part.split(":")[0] for part in config.split(",") if ":" in part]
    if not types or "cpu" in types:
        return "cpu"
    return types[0]


def comm_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device for tensors passed to a collective on ``group``: the CPU, or this rank's current GPU."""
    kind = backend_device_type(group)
    if kind == "cpu":
        return torch.device("cpu")
    module = getattr(torch, kind)
    return torch.device(kind, module.current_device())
