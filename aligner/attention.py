"""Packed (variable-length) causal attention through PyTorch's ``varlen_attn``, as a transformers attention function.

Registered under the name :data:`VARLEN` in transformers' ``AttentionInterface``
(and its mask interface), so a model loaded with
``attn_implementation="aligner_varlen"`` runs:

- a packed batch (the forward got ``cu_seq_lens_q``/``max_length_q``): on GPU,
  ``torch.nn.attention.varlen.varlen_attn(q, k, v, cu, cu, max, max,
  window_size=(-1, 0))`` — causal attention inside each sequence, no padding and
  no L×L mask; on CPU (no varlen kernel) its twin, causal SDPA on each
  sequence's slice of the row, bounds from ``cu_seqlens``: the same result as
  SDPA with a block-diagonal causal mask, at Σ len_i² cost instead of L²;
- anything else (padded batches, generation with a KV cache): transformers'
  own SDPA with its usual mask.

flash-attn's ``flash_attention_2`` needs none of this: transformers already
routes packed batches to its varlen kernel. :func:`attn_implementation` picks
flash-attn when installed, else this function for packed runs on GPU, else SDPA.
"""

from __future__ import annotations

import importlib.util
import inspect

import torch
import torch.nn.functional as F

VARLEN = "aligner_varlen"
#: attention implementations that read ``cu_seq_lens_*`` instead of a mask for packed batches
VARLEN_KERNELS = ("flash_attention_2", "flash_attention_3", VARLEN)


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-function contract: q (1, H, L, D), k/v (1, Hkv, L, D) -> (1, L, H, D), None."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seqlens = kwargs.pop("cu_seq_lens_q", None)
    max_seqlen = kwargs.pop("max_length_q", None)
    for key_name in ("cu_seq_lens_k", "max_length_k"):
        kwargs.pop(key_name, None)
    if cu_seqlens is None:  # not packed: padded batches and generation keep SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"{VARLEN}: a packed batch has one row, got query of shape {tuple(query.shape)}")
    if not query.is_cuda:
        return _per_sequence_sdpa(query, key, value, cu_seqlens.tolist(), scaling, dropout), None
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (L, H, D), (L, Hkv, D)
    extra = {}
    if q.shape[1] != k.shape[1] and "enable_gqa" in inspect.signature(varlen_attn).parameters:
        extra["enable_gqa"] = True
    out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, int(max_seqlen), int(max_seqlen), scale=scaling,
                      window_size=(-1, 0), **extra)  # (L, H, D)
    return out[None], None


def _per_sequence_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int],
                       scaling: float | None, dropout: float) -> torch.Tensor:
    """CPU twin of ``varlen_attn``: causal SDPA on each sequence's own slice, q (1, H, L, D) -> (1, L, H, D).

    The same attention as SDPA over the whole row with a block-diagonal causal
    mask, without computing the L×L blocks that mask would zero: the cost is
    Σ len_i² instead of L², and no (L, L) mask is built.
    """
    gqa = query.shape[1] != key.shape[1]
    out = [F.scaled_dot_product_attention(query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                          dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
           for start, end in zip(bounds[:-1], bounds[1:]) if end > start]  # each (1, H, len, D)
    return torch.cat(out, dim=2).transpose(1, 2)


def varlen_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """No mask for a batch without padding (the kernel is causal per sequence); SDPA's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Register :func:`varlen_attention_forward` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, varlen_mask)
    return VARLEN


def attn_implementation(requested: str, packing: bool) -> str:
    """``auto``: flash-attn's kernel when installed on GPU, else this module's varlen function for packed runs
    (PyTorch's varlen kernel on GPU, per-sequence SDPA on CPU), else SDPA."""
    if requested == "varlen":
        return register()
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    if packing:
        return register()
    return "sdpa"


def varlen_kwargs(model, batch) -> dict:
    """The ``cu_seq_lens``/``max_length`` forward kwargs of a packed batch (:class:`aligner.data.batch.PackedBatch`),
    for models whose attention reads them."""
    config = getattr(getattr(model, "module", model), "config", None)
    if getattr(config, "_attn_implementation", None) not in VARLEN_KERNELS:
        return {}
    cu = batch.cu_seqlens.to(batch.input_ids.device)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": batch.max_seqlen, "max_length_k": batch.max_seqlen}
