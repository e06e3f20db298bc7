"""Trust-region reference updates on the engines' own storage: θ_ref ← α·θ + (1−α)·θ_ref, no all-gather.

Under ZeRO-3 the policy and the reference engines partition every parameter the
same way, so each rank mixes only its local partitions (``param.ds_tensor``):
the update is exact and costs no communication. θ is the policy's fp32 master
partition (``deepspeed.utils.safe_get_local_fp32_param``), and the reference
partitions must be fp32 too: a bf16 reference loses small-α updates to rounding
(PLATFORM.md measured a 13× error at α = 0.01), so ``aligner/recipes/train.py`` builds
the reference in fp32 whenever a ``reference_update`` plugin is active.

A ZeRO-3 parameter that is *persistent* keeps a full, un-partitioned copy that
a shard update would leave stale. The reference engine is built with
``stage3_param_persistence_threshold: 0`` (``models.frozen_deepspeed_config``),
so it has none; :func:`mix_into_reference` checks that instead of assuming it.

Under ZeRO stages 0–2 the reference holds whole parameters on every rank, and
the same formula runs parameter by parameter.

The moved reference is saved beside each checkpoint, one safetensors file per
rank holding that rank's partitions (:func:`save_reference`), and restored on
resume (:func:`load_reference`).

Under ``model.lora`` the moved reference is the policy engine's frozen
``reference`` adapter (aligner/models/plan.py): each function here then hands over to
:mod:`aligner.reference.lora_trust_region`, whose docstring has the update rule on the
adapters' factors and what it approximates.

These are the engine operations only; the reference-update plugins
(``plugins/reference_update.py``, their shared base) decide when to call them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from aligner.hookspecs import Engines


class TrustRegionError(ValueError):
    """The engines or a saved reference do not fit a trust-region update; the message says what to do."""


def _adapter_reference(engines: Engines) -> bool:
    """Whether the reference is the policy engine's LoRA reference adapter (aligner/models/lora.py)."""
    from aligner.models.lora import REFERENCE_ADAPTER

    return getattr(engines.reference, "adapter", None) == REFERENCE_ADAPTER


def _partitioned(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_tensor")


def _named_pairs(engines: Engines) -> list[tuple[str, torch.nn.Parameter, torch.nn.Parameter]]:
    """(name, policy parameter, reference parameter), zipped by name; the two models must match exactly."""
    if engines.reference is None:
        raise TrustRegionError("a reference update needs the reference engine, but the run built none")
    if engines.reference is engines.anchor:
        raise TrustRegionError("the reference and the anchor share one engine; moving the reference would move the anchor")
    policy = dict(engines.policy.module.named_parameters())
    reference = dict(engines.reference.module.named_parameters())
    if policy.keys() != reference.keys():
        only_p, only_r = sorted(policy.keys() - reference.keys()), sorted(reference.keys() - policy.keys())
        raise TrustRegionError(
            f"the policy and the reference are different models (parameters only in the policy: {only_p[:3]}, "
            f"only in the reference: {only_r[:3]}); a trust-region update needs model.reference_path to be the "
            f"same architecture as the policy"
        )
    return [(name, p, reference[name]) for name, p in policy.items()]


def _reference_storage(name: str, ref: torch.nn.Parameter) -> torch.Tensor:
    """The tensor that holds this rank's copy of a reference parameter: its partition, or the whole parameter."""
    if _partitioned(ref):
        if getattr(ref, "ds_persist", False):
            raise TrustRegionError(
                f"reference parameter {name} is a persistent ZeRO-3 parameter: its full copy would go stale after a "
                f"shard update. The reference engine must use stage3_param_persistence_threshold 0 "
                f"(models.frozen_deepspeed_config does)"
            )
        storage = ref.ds_tensor
    else:
        storage = ref.data
    if storage.dtype != torch.float32:
        raise TrustRegionError(
            f"reference parameter {name} is {storage.dtype}; a reference update needs an fp32 reference "
            f"(bf16 loses small-α updates to rounding). Build the reference with "
            f"aligner.models.loading.build_frozen_engine(..., fp32=True)"
        )
    return storage


def _policy_master(name: str, param: torch.nn.Parameter, like: torch.Tensor) -> torch.Tensor:
    """The policy's true (fp32) weights for what ``like`` holds: the master partition under ZeRO-3."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param

    if _partitioned(param):
        master = safe_get_local_fp32_param(param) if param.requires_grad else None
        master = param.ds_tensor if master is None else master
    elif param.dtype == torch.float32:
        master = param.data  # fp32 stages 0-2: the optimizer writes the weights back into the parameter
    else:
        master = safe_get_full_fp32_param(param)  # bf16 stages 1-2: the optimizer's fp32 copy (a collective)
        master = param.data if master is None else master
    if master.numel() != like.numel():
        raise TrustRegionError(
            f"parameter {name}: the policy holds {master.numel()} elements on this rank and the reference "
            f"{like.numel()}; both engines must use the same ZeRO stage and world size"
        )
    return master.reshape(like.shape).to(device=like.device, dtype=torch.float32)


def _check_offload(engines: Engines) -> None:
    offload = engines.reference.zero_offload_param()
    if offload is not None and str(getattr(offload.device, "value", offload.device)) == "nvme":
        raise TrustRegionError(
            "the reference's parameters are offloaded to NVMe, where a shard update cannot reach them; "
            "use offload_param device 'cpu' (or none) with a reference-update plugin"
        )


@torch.no_grad()
def mix_into_reference(engines: Engines, alpha: float) -> None:
    """θ_ref ← α·θ + (1−α)·θ_ref on every parameter, on each rank's local storage only (a collective-free call
    under ZeRO-3; under bf16 ZeRO stages 1–2 reading the fp32 master gathers it)."""
    if not 0.0 < alpha <= 1.0:
        raise TrustRegionError(f"alpha must be in (0, 1], got {alpha}")
    if _adapter_reference(engines):
        from aligner.reference.lora_trust_region import mix_adapters

        return mix_adapters(engines.policy, alpha)
    _check_offload(engines)
    for name, pol, ref in _named_pairs(engines):
        storage = _reference_storage(name, ref)
        master = _policy_master(name, pol, storage)
        if alpha == 1.0:
            storage.copy_(master)
        else:
            storage.mul_(1.0 - alpha).add_(master, alpha=alpha)


@torch.no_grad()
def relative_distance(engines: Engines) -> float:
    """‖θ_ref − θ‖ / ‖θ‖ over all parameters (fp32), from local storage; summed across ranks under ZeRO-3."""
    from aligner.distributed.comm import comm_device

    if _adapter_reference(engines):  # LoRA: the numerator from the factors, over the base's norm ‖θ₀‖
        from aligner.reference.lora_trust_region import adapter_distance, base_norm_squared

        diff, _ = adapter_distance(engines.policy)
        return float(max(diff, 0.0) ** 0.5 / max(base_norm_squared(engines.policy), 1e-60) ** 0.5)
    sums = torch.zeros(2, dtype=torch.float64, device=comm_device())
    partitioned = False
    for name, pol, ref in _named_pairs(engines):
        storage = _reference_storage(name, ref)
        master = _policy_master(name, pol, storage)
        partitioned |= _partitioned(ref)
        sums[0] += (storage - master).double().square().sum().to(sums.device)
        sums[1] += master.double().square().sum().to(sums.device)
    if partitioned and dist.is_initialized():
        dist.all_reduce(sums)  # the partitions are disjoint: the sums add up to the whole model's
    return (sums[0].sqrt() / sums[1].sqrt().clamp(min=1e-30)).item()


def reference_file(directory: Path, rank: int) -> Path:
    return directory / f"reference_rank{rank:05d}.safetensors"


def save_reference(directory: Path, engines: Engines) -> Path:
    """Write this rank's reference storage (partitions under ZeRO-3) to ``directory/reference_rank<r>.safetensors``."""
    from safetensors.torch import save_file

    if _adapter_reference(engines):
        from aligner.reference.lora_trust_region import save_adapter

        return save_adapter(directory, engines.policy)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    tensors = {name: _reference_storage(name, ref).detach().to("cpu", copy=True).contiguous()
               for name, _, ref in _named_pairs(engines)}
    directory.mkdir(parents=True, exist_ok=True)
    path = reference_file(directory, rank)
    save_file(tensors, str(path), metadata={"world_size": str(world), "rank": str(rank)})
    return path


@torch.no_grad()
def load_reference(directory: Path, engines: Engines) -> Path:
    """Restore what :func:`save_reference` wrote into the reference engine; refuse a checkpoint that does not fit."""
    from safetensors import safe_open

    if _adapter_reference(engines):
        from aligner.reference.lora_trust_region import load_adapter

        return load_adapter(directory, engines.policy, TrustRegionError)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    path = reference_file(directory, rank)
    if not path.is_file():
        raise TrustRegionError(
            f"{path} is missing: this checkpoint holds no moved reference for rank {rank}; resume with the "
            f"plugins and the number of ranks ({world} now) of the run that wrote it"
        )
    with safe_open(str(path), framework="pt") as f:
        saved_world = int((f.metadata() or {}).get("world_size", -1))
        if saved_world != world:
            raise TrustRegionError(
                f"{path} was written by a run with {saved_world} ranks and this run has {world}; the reference's "
                f"partitions only fit the same number of ranks: resume with {saved_world} ranks"
            )
        pairs = _named_pairs(engines)
        missing = sorted({name for name, _, _ in pairs} - set(f.keys()))
        if missing:
            raise TrustRegionError(f"{path} has no tensor for reference parameters {missing[:3]}: it was written for another model")
        for name, _, ref in pairs:
            storage = _reference_storage(name, ref)
            saved = f.get_tensor(name)
            if saved.shape != storage.shape:
                raise TrustRegionError(
                    f"{path}: reference parameter {name} was saved with shape {tuple(saved.shape)}, this run's is "
                    f"{tuple(storage.shape)}; resume with the model and ZeRO stage of the run that wrote it"
                )
            storage.copy_(saved)
    return path
