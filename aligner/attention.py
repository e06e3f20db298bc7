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

A prefix-shared batch (:class:`aligner.data.batch.PrefixSharedBatch`, the forward got
:data:`KV_INDEX`) holds, per pair, a [prompt, chosen] segment attending causally to
itself and a [rejected] segment attending to [prompt K/V; rejected K/V] with the
causal mask aligned bottom-right (query j of R sees keys 0..P+j). Two exact ways,
:func:`prefix_shared_attention`:

- CPU: SDPA per segment, the rejected queries against the gathered [prompt; rejected]
  keys with an explicit bottom-right mask (SDPA's ``is_causal`` is top-left aligned
  when query and key lengths differ, which would be wrong);
- GPU: the queries are gathered like the keys, so each segment is an ordinary
  equal-length causal sequence ([prompt, rejected] recomputes only the prompt's
  attention rows, never its MLPs or projections), run by flash-attn's
  ``flash_attn_varlen_func`` when installed, else PyTorch's ``varlen_attn``; the
  prompt's extra rows are dropped. Its CPU twin (per-sequence SDPA on the same
  gathered layout) is tested against the CPU form (tests/test_prefix_sharing.py).
"""

from __future__ import annotations

import importlib.util
import inspect

import torch
import torch.nn.functional as F

VARLEN = "aligner_varlen"
#: attention implementations that read ``cu_seq_lens_*`` instead of a mask for packed batches
VARLEN_KERNELS = ("flash_attention_2", "flash_attention_3", VARLEN)
#: forward kwargs of a prefix-shared batch: key gather index (Lk,) and each row token's place in it (L,)
KV_INDEX, Q_KEEP = "aligner_kv_index", "aligner_q_keep"


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-function contract: q (1, H, L, D), k/v (1, Hkv, L, D) -> (1, L, H, D), None."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seqlens = kwargs.pop("cu_seq_lens_q", None)
    max_seqlen = kwargs.pop("max_length_q", None)
    cu_kv, max_kv = kwargs.pop("cu_seq_lens_k", None), kwargs.pop("max_length_k", None)
    kv_index, q_keep = kwargs.pop(KV_INDEX, None), kwargs.pop(Q_KEEP, None)
    if cu_seqlens is None:  # not packed: padded batches and generation keep SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"{VARLEN}: a packed batch has one row, got query of shape {tuple(query.shape)}")
    if kv_index is not None:
        return prefix_shared_attention(query, key, value, cu_seqlens, cu_kv, kv_index, q_keep, int(max_kv),
                                       scaling, dropout), None
    if not query.is_cuda:
        return _per_sequence_sdpa(query, key, value, cu_seqlens.tolist(), scaling, dropout), None
    return _cuda_varlen(query, key, value, cu_seqlens, int(max_seqlen), scaling), None


def _cuda_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                 max_seqlen: int, scaling: float | None) -> torch.Tensor:
    """Causal attention inside each sequence on GPU, q (1, H, L, D) -> (1, L, H, D): flash-attn's varlen kernel when
    installed, else PyTorch's ``varlen_attn`` (query and key bounds equal, so causal alignment cannot differ)."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (L, H, D), (L, Hkv, D)
    if importlib.util.find_spec("flash_attn") is not None:
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                      softmax_scale=scaling, causal=True)[None]
    from torch.nn.attention.varlen import varlen_attn

    extra = {}
    if q.shape[1] != k.shape[1] and "enable_gqa" in inspect.signature(varlen_attn).parameters:
        extra["enable_gqa"] = True
    out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scaling,
                      window_size=(-1, 0), **extra)  # (L, H, D)
    return out[None]


def prefix_shared_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_q: torch.Tensor,
                            cu_kv: torch.Tensor, kv_index: torch.Tensor, q_keep: torch.Tensor, max_kv: int,
                            scaling: float | None, dropout: float = 0.0,
                            equal_length: bool | None = None) -> torch.Tensor:
    """Attention of a prefix-shared row, q (1, H, L, D), k/v (1, Hkv, L, D) -> (1, L, H, D) (module doc).

    :param cu_q: (2B+1,) the query segments' bounds in the row; ``cu_kv`` (2B+1,) their key segments' bounds in
        the gathered layout ``kv_index`` (Lk,); ``q_keep`` (L,): each row token's place in that layout.
    :param equal_length: gather the queries too and run equal-length causal segments (the GPU form; its CPU twin
        runs per-sequence SDPA); default: on GPU only. Otherwise each segment's queries attend to its keys with a
        bottom-right causal mask.
    """
    k, v = key[:, :, kv_index], value[:, :, kv_index]  # (1, Hkv, Lk, D): the prompt's K/V once per segment
    equal_length = query.is_cuda if equal_length is None else equal_length
    if not equal_length:
        return _bottom_right_sdpa(query, k, v, cu_q.tolist(), cu_kv.tolist(), scaling, dropout)
    q = query[:, :, kv_index]  # (1, H, Lk, D)
    if q.is_cuda:
        out = _cuda_varlen(q, k, v, cu_kv, max_kv, scaling)  # (1, Lk, H, D)
    else:
        out = _per_sequence_sdpa(q, k, v, cu_kv.tolist(), scaling, dropout)
    return out[:, q_keep]  # (1, L, H, D)


def _bottom_right_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_bounds: list[int],
                       kv_bounds: list[int], scaling: float | None, dropout: float) -> torch.Tensor:
    """SDPA per segment, query i of lq against keys 0..i + (lk - lq): causal aligned bottom-right. -> (1, L, H, D)."""
    gqa = query.shape[1] != key.shape[1]
    out = []
    for qs, qe, ks, ke in zip(q_bounds[:-1], q_bounds[1:], kv_bounds[:-1], kv_bounds[1:]):
        lq, lk = qe - qs, ke - ks
        if lq == 0:
            continue
        mask = None if lq == lk else torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril(lk - lq)
        out.append(F.scaled_dot_product_attention(query[:, :, qs:qe], key[:, :, ks:ke], value[:, :, ks:ke],
                                                  attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                                  scale=scaling, enable_gqa=gqa))  # (1, H, lq, D)
    return torch.cat(out, dim=2).transpose(1, 2)


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


def attn_implementation(requested: str, packing: bool, prefix_sharing: bool = False) -> str:
    """``auto``: this module's function for prefix-shared runs (flash-attn or PyTorch's varlen kernel inside it on
    GPU); flash-attn's kernel when installed on GPU; this module's varlen function for packed runs (PyTorch's
    varlen kernel on GPU, per-sequence SDPA on CPU); else SDPA."""
    if requested == "varlen":
        return register()
    if requested != "auto":
        return requested
    if packing and prefix_sharing:
        return register()
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    if packing:
        return register()
    return "sdpa"


def has_varlen_kernel() -> bool:
    """Whether this machine can run packed batches on GPU: flash-attn installed, or PyTorch's ``varlen_attn``."""
    return importlib.util.find_spec("flash_attn") is not None or importlib.util.find_spec("torch.nn.attention.varlen") is not None


def varlen_kwargs(model, batch) -> dict:
    """The ``cu_seq_lens``/``max_length`` forward kwargs of a packed batch (:class:`aligner.data.batch.PackedBatch`),
    for models whose attention reads them."""
    config = getattr(getattr(model, "module", model), "config", None)
    if getattr(config, "_attn_implementation", None) not in VARLEN_KERNELS:
        return {}
    cu = batch.cu_seqlens.to(batch.input_ids.device)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": batch.max_seqlen, "max_length_k": batch.max_seqlen}


def prefix_shared_kwargs(model, batch) -> dict:
    """The forward kwargs of a prefix-shared batch (:class:`aligner.data.batch.PrefixSharedBatch`): segment bounds
    and the gather indices :func:`prefix_shared_attention` reads. Only this module's attention reads them."""
    config = getattr(getattr(model, "module", model), "config", None)
    if getattr(config, "_attn_implementation", None) != VARLEN:
        raise ValueError(f"a prefix-shared batch needs attn_implementation {VARLEN!r} (model.attn_implementation: auto "
                         f"or varlen), this model runs {getattr(config, '_attn_implementation', None)!r}; set "
                         f"train.prefix_sharing=false for it")
    device = batch.input_ids.device
    return {"cu_seq_lens_q": batch.cu_seqlens.to(device), "cu_seq_lens_k": batch.kv_cu_seqlens.to(device),
            "max_length_q": batch.max_seqlen, "max_length_k": batch.max_kv_seqlen,
            KV_INDEX: batch.kv_index.to(device), Q_KEEP: batch.q_keep.to(device)}
