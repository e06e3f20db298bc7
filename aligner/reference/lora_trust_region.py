"""Trust-region updates of a LoRA reference: the reference is the base plus the frozen ``reference`` adapter.

Per adapted layer, with the policy's factors B (out × r), A (r × in), the
reference's B_r (out × R), A_r (R × in) and the common scale s (the reference
adapter's α is scaled with its rank, so s = α/r for both, aligner/models/lora.py):

    θ   = W₀ + s·B·A          θ_ref = W₀ + s·B_r·A_r

The soft update θ_ref ← a·θ + (1−a)·θ_ref (a the policy's weight) changes only
the low-rank part, and the mixture is itself a product of stacked factors:

    a·B·A + (1−a)·B_r·A_r = [a·B, (1−a)·B_r] · [A; A_r] = U·V,   rank ≤ r + R.

:func:`compress` brings U·V back to rank R: QR of both factors (U = Q_u·R_u,
Vᵀ = Q_v·R_v), SVD of the small (r+R) × (r+R) core R_u·R_vᵀ = P·Σ·Qᵀ, then
B_r ← Q_u·P_R·Σ_R^½ and A_r ← Σ_R^½·Q_Rᵀ·Q_vᵀ (the R largest singular values).
This is exact whenever rank(U·V) ≤ R, and otherwise the best rank-R
approximation of U·V in the Frobenius norm (Eckart–Young). What is
approximated: only the singular values past the R-th of each update's mixture
are dropped; the error compounds over updates while the exact reference's rank
(which can grow by r per update) exceeds R. benchmarks/lora_tr_error.py
measures it against the exact dense mixture. The hard update (a = 1) copies
the policy's factors into the first r of R slots and zeroes the rest: exact.

Under ZeRO-3 the four factors of a layer are gathered (they are small),
every rank computes the same result, and rank 0's is the one kept
(``GatheredParameters(modifier_rank=0)`` broadcasts it); under ZeRO 0–2 rank
0's result is broadcast. The ranks' references stay identical.

The moved reference adapter is saved whole (``reference_adapter.safetensors``,
written by rank 0) in every checkpoint and restored on resume.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from aligner.distributed.comm import comm_device
from aligner.models.lora import POLICY_ADAPTER, REFERENCE_ADAPTER, lora_layers

ADAPTER_FILE = "reference_adapter.safetensors"


def compress(U: torch.Tensor, V: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') of rank ``rank`` with B'·A' the best rank-``rank`` approximation of U·V (exact when it fits).

    :param U: (out, k) stacked left factors; :param V: (k, in) stacked right factors. Computed in float64.
    """
    U, V = U.double(), V.double()
    q_u, r_u = torch.linalg.qr(U)  # (out, m), (m, k)
    q_v, r_v = torch.linalg.qr(V.T)  # (in, m'), (m', k)
    p, sigma, qh = torch.linalg.svd(r_u @ r_v.T)  # core (m, m')
    keep = min(rank, sigma.numel())
    root = sigma[:keep].sqrt()
    B = torch.zeros(U.shape[0], rank, dtype=U.dtype)
    A = torch.zeros(rank, V.shape[1], dtype=U.dtype)
    B[:, :keep] = q_u @ (p[:, :keep] * root)
    A[:keep] = (root[:, None] * qh[:keep]) @ q_v.T
    return B, A


def mixed_factors(B: torch.Tensor, A: torch.Tensor, B_r: torch.Tensor, A_r: torch.Tensor,
                  alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's new factors for θ_ref ← α·θ + (1−α)·θ_ref (shapes of B_r, A_r; see the module docstring)."""
    rank = B_r.shape[1]
    if alpha == 1.0:  # the hard update: a copy, padded with zeros
        new_B, new_A = torch.zeros_like(B_r, dtype=torch.float64), torch.zeros_like(A_r, dtype=torch.float64)
        new_B[:, :B.shape[1]], new_A[:A.shape[0]] = B.double(), A.double()
        return new_B, new_A
    return compress(torch.cat([alpha * B.double(), (1 - alpha) * B_r.double()], 1),
                    torch.cat([A.double(), A_r.double()], 0), rank)


def _factors(layer) -> tuple[torch.nn.Parameter, ...]:
    return (layer.lora_B[POLICY_ADAPTER].weight, layer.lora_A[POLICY_ADAPTER].weight,
            layer.lora_B[REFERENCE_ADAPTER].weight, layer.lora_A[REFERENCE_ADAPTER].weight)


def _layers(engine) -> list[tuple[str, torch.nn.Module]]:
    names = {id(m): n for n, m in engine.module.named_modules()}
    return [(names[id(layer)], layer) for layer in lora_layers(engine) if REFERENCE_ADAPTER in layer.lora_A]


@contextmanager
def _gathered(params: tuple[torch.nn.Parameter, ...], modify: bool) -> Iterator[None]:
    """The full values of ``params`` on every rank; with ``modify``, rank 0's changes are kept on every rank."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=0 if modify else None):
            yield
        return
    yield
    if modify and dist.is_initialized() and dist.get_world_size() > 1:
        for p in params:
            dist.broadcast(p.data, 0)


@torch.no_grad()
def mix_adapters(engine, alpha: float) -> None:
    """θ_ref ← α·θ + (1−α)·θ_ref on every adapted layer of the policy engine (collective)."""
    for _, layer in _layers(engine):
        B, A, B_r, A_r = _factors(layer)
        with _gathered((B, A, B_r, A_r), modify=True):
            new_B, new_A = mixed_factors(B.data, A.data, B_r.data, A_r.data, alpha)
            B_r.data.copy_(new_B.to(B_r.dtype))
            A_r.data.copy_(new_A.to(A_r.dtype))


@torch.no_grad()
def adapter_distance(engine) -> tuple[float, float]:
    """(Σ‖θ_ref − θ‖², Σ‖s·B·A‖²) over the adapted layers, from the factors: ‖s·(BA − B_rA_r)‖² =
    s²·tr((UᵀU)(VVᵀ)) with U = [B, −B_r], V = [A; A_r], so no (out × in) matrix is formed. Collective."""
    diff = delta = 0.0
    for _, layer in _layers(engine):
        B, A, B_r, A_r = _factors(layer)
        scale = float(layer.scaling[POLICY_ADAPTER])
        with _gathered((B, A, B_r, A_r), modify=False):
            U = torch.cat([B.data.double(), -B_r.data.double()], 1)
            V = torch.cat([A.data.double(), A_r.data.double()], 0)
            diff += scale**2 * float(torch.trace((U.T @ U) @ (V @ V.T)))
            Bd, Ad = B.data.double(), A.data.double()
            delta += scale**2 * float(torch.trace((Bd.T @ Bd) @ (Ad @ Ad.T)))
    return diff, delta


@torch.no_grad()
def base_norm_squared(engine) -> float:
    """‖θ₀‖² over the base's weights (every parameter outside the adapters), from local storage; summed over
    ranks under ZeRO-3. Collective."""
    total = torch.zeros(1, dtype=torch.float64, device=comm_device())
    partitioned = False
    for name, p in engine.module.named_parameters():
        if ".lora_" in name:
            continue
        storage = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
        partitioned |= hasattr(p, "ds_tensor")
        total += storage.detach().double().square().sum().to(total.device)
    if partitioned and dist.is_initialized():
        dist.all_reduce(total)
    return total.item()


def save_adapter(directory: Path, engine) -> Path:
    """Write the whole reference adapter to ``directory/reference_adapter.safetensors`` (rank 0). Collective."""
    from safetensors.torch import save_file

    tensors = {}
    for name, layer in _layers(engine):
        B_r, A_r = _factors(layer)[2:]
        with _gathered((B_r, A_r), modify=False):
            tensors[f"{name}.B"] = B_r.data.detach().to("cpu", copy=True).contiguous()
            tensors[f"{name}.A"] = A_r.data.detach().to("cpu", copy=True).contiguous()
    path = directory / ADAPTER_FILE
    if not dist.is_initialized() or dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path))
    return path


@torch.no_grad()
def load_adapter(directory: Path, engine, error: type[Exception]) -> Path:
    """Restore what :func:`save_adapter` wrote; ``error`` is raised (on every rank) when it does not fit."""
    from safetensors.torch import load_file

    path = directory / ADAPTER_FILE
    if not path.is_file():
        raise error(f"{path} is missing: this checkpoint holds no moved LoRA reference adapter; resume with the "
                    f"model.lora section and plugins of the run that wrote it")
    saved = load_file(str(path))
    for name, layer in _layers(engine):
        B_r, A_r = _factors(layer)[2:]
        with _gathered((B_r, A_r), modify=True):
            for key, param in ((f"{name}.B", B_r), (f"{name}.A", A_r)):
                if key not in saved or saved[key].shape != param.data.shape:
                    raise error(f"{path}: {key} is missing or has another shape than this run's "
                                f"{tuple(param.data.shape)}; resume with the model.lora section of the run that wrote it")
                param.data.copy_(saved[key])
    return path
