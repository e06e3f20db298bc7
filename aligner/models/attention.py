"""Causal attention over packed and prefix-shared rows: aligner's transformers attention function, and the kernels
it runs on, one chosen per run at start-up.

:data:`VARLEN` is registered in transformers' ``AttentionInterface`` (and its mask
interface), so a model loaded with ``attn_implementation="aligner_varlen"`` runs

- a packed or prefix-shared batch (the forward got ``cu_seq_lens_q``/``max_length_q``) on the run's
  :class:`Kernel`: causal attention inside each segment, no padding and no L×L mask;
- anything else (padded batches, generation with a KV cache) on transformers' own SDPA with its usual mask.

A segment has ``lq`` queries and ``lk >= lq`` keys, and its causal mask is aligned bottom-right: query j sees
keys 0..j + (lk − lq), and with a sliding window of W (``sliding_window``, Mistral/Qwen2/Gemma layers) only the
last W of those. Packed sequences are segments with lq = lk. A prefix-shared pair
(:class:`aligner.data.batch.PrefixSharedBatch`, the forward got :data:`KV_INDEX`) is two segments: [prompt, chosen]
against itself, and [rejected] (R queries) against the gathered [prompt K/V; rejected K/V] (P + R keys), so the
rejected tokens see the prompt and never the chosen ones.

The kernels, in the order a GPU run tries them (:func:`choose_kernel`):

1. ``flash_attn``: flash-attn 2's ``flash_attn_varlen_func`` (>= 2.6; its causal mask is aligned bottom-right when
   seqlen_q != seqlen_k since 2.1: "Query at position i will only attend to keys between [i + seqlen_k - seqlen_q -
   window_size[0], i + seqlen_k - seqlen_q + window_size[1]]", flash-attn README).
2. ``torch_varlen``: PyTorch's ``torch.nn.attention.varlen.varlen_attn``, which calls
   ``aten::_flash_attention_forward``, the same vendored FlashAttention-2 kernel with the same bottom-right
   alignment (``window_size=(-1, 0)`` is its causal flag; ``(W-1, 0)`` a causal window of W keys). torch >= 2.12
   takes ``enable_gqa``; ``torch_varlen_kv_repeat`` serves torch 2.10/2.11, whose documented signature has no
   GQA, by repeating the K/V heads.
3. ``sdpa_segments``: ``scaled_dot_product_attention`` per segment with an explicit bottom-right mask (SDPA's own
   ``is_causal`` is top-left aligned when lq != lk, which would be wrong). It takes every dtype and device: it
   is the CPU path, and the GPU fallback.

The first two take fp16/bf16 only. Each candidate must pass :func:`self_check` (one small forward and backward
against fp32 SDPA, in the run's dtype and head layout) before it is used; an import or ABI failure, a signature
this code cannot call, or a mismatch moves on to the next, with the reason. A model whose weights the chosen
kernel does not take (the fp32 reference a trust-region plugin moves, in a bf16 run) runs its forward under
autocast to the run's dtype (``aligner/models/loading.py``), and this function casts its fp32 q/k/v to the autocast dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aligner.data.batch import Batch, PackedBatch, PrefixSharedBatch

VARLEN = "aligner_varlen"
#: attention implementations that read ``cu_seq_lens_*`` instead of a mask for packed batches
VARLEN_KERNELS = ("flash_attention_2", "flash_attention_3", VARLEN)
#: forward kwarg of a prefix-shared batch: the gathered key layout (Lk,), row positions of each segment's keys
KV_INDEX = "aligner_kv_index"
HALF = (torch.float16, torch.bfloat16)
#: self_check's tolerance on outputs and gradients against fp32 SDPA (bf16 carries 8 mantissa bits: ~4e-3 relative)
CHECK_ATOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class Kernel:
    """A varlen causal attention kernel.

    ``run(q, k, v, cu_q, cu_k, max_q, max_k, scale, window, dropout)``: q (Tq, H, D), k/v (Tk, Hkv, D) with
    H divisible by Hkv; ``cu_q``/``cu_k`` (S+1,) int32 segment bounds on q's device, ``max_q``/``max_k`` ints;
    ``scale`` the softmax scale (None: 1/sqrt(D)); ``window`` None or the keys each query sees at most (itself
    included); ``dropout`` the attention dropout. Returns (Tq, H, D): causal per segment, aligned bottom-right.

    :param dtypes: the dtypes it takes (None: any).
    """

    name: str
    run: Callable[..., torch.Tensor]
    dtypes: tuple[torch.dtype, ...] | None = None

    def takes(self, dtype: torch.dtype) -> bool:
        return self.dtypes is None or dtype in self.dtypes


def _sdpa_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                   max_q: int, max_k: int, scale: float | None, window: int | None, dropout: float = 0.0) -> torch.Tensor:
    """SDPA on each segment's slice, q (Tq, H, D) -> (Tq, H, D): causal aligned bottom-right, at Σ lq·lk cost and no
    (T, T) mask. The bounds are read on the host (one sync per layer: this is the CPU path and the GPU fallback)."""
    gqa = q.shape[1] != k.shape[1]
    out = []
    for qs, qe, ks, ke in zip(*(b.tolist() for b in (cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]))):
        lq, lk = qe - qs, ke - ks
        if lq == 0:
            continue
        mask = None
        if lq != lk or (window is not None and window < lk):
            i = torch.arange(lq, device=q.device)[:, None] + (lk - lq)  # (lq, 1): each query's own key index
            j = torch.arange(lk, device=q.device)[None]  # (1, lk)
            mask = (j <= i) & ((j > i - window) if window is not None else True)  # (lq, lk)
        seg = [t.transpose(0, 1)[None] for t in (q[qs:qe], k[ks:ke], v[ks:ke])]  # (1, H, l, D)
        o = F.scaled_dot_product_attention(*seg, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                           scale=scale, enable_gqa=gqa)  # (1, H, lq, D)
        out.append(o[0].transpose(0, 1))
    return torch.cat(out)


SDPA_SEGMENTS = Kernel("sdpa_segments", _sdpa_segments)


def _flash_attn_kernel(varlen_func: Callable) -> Kernel:
    def run(q, k, v, cu_q, cu_k, max_q, max_k, scale, window, dropout=0.0):
        return varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout, softmax_scale=scale, causal=True,
                           window_size=(-1, -1) if window is None else (window - 1, 0))

    return Kernel("flash_attn", run, HALF)


def _torch_varlen_kernel(varlen_attn: Callable, gqa: bool) -> Kernel:
    """``varlen_attn`` called with ``scale``/``window_size`` (torch >= 2.10), GQA by ``enable_gqa`` (torch >= 2.12)
    or by repeating the K/V heads."""

    def run(q, k, v, cu_q, cu_k, max_q, max_k, scale, window, dropout=0.0):
        if dropout:
            raise ValueError(f"torch's varlen_attn has no attention dropout (got {dropout}); set the model's "
                             f"attention_dropout to 0")
        extra = {}
        if q.shape[1] != k.shape[1]:
            if gqa:
                extra["enable_gqa"] = True
            else:
                groups = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale,
                           window_size=(-1, 0) if window is None else (window - 1, 0), **extra)

    return Kernel("torch_varlen" if gqa else "torch_varlen_kv_repeat", run, HALF)


#: every kernel a run can name, by name: :data:`SDPA_SEGMENTS` and what :func:`detect_kernels` found
KERNELS: dict[str, Kernel] = {SDPA_SEGMENTS.name: SDPA_SEGMENTS}
_active: Kernel = SDPA_SEGMENTS


def register_kernel(kernel: Kernel) -> Kernel:
    """Make ``kernel`` nameable by :func:`activate` (the detected kernels; a test's stand-in)."""
    KERNELS[kernel.name] = kernel
    return kernel


def activate(name: str) -> Kernel:
    """The kernel every packed or prefix-shared forward of this process runs on, from now on."""
    global _active
    _active = KERNELS[name]
    return _active


def active_kernel() -> Kernel:
    return _active


def detect_kernels() -> tuple[list[Kernel], list[str]]:
    """The GPU kernel candidates this installation offers, in order, and why each missing one is missing.

    flash-attn is imported for real: a wheel built for another torch (the most common flash-attn failure) fails
    here with its ABI error, not in the first layer.
    """
    found, missing = [], []
    try:
        import flash_attn
        from flash_attn import flash_attn_varlen_func

        version = tuple(int(x) for x in flash_attn.__version__.split(".")[:2])
        if version < (2, 6):
            missing.append(f"flash-attn {flash_attn.__version__} is older than 2.6 (no softcap/window arguments)")
        else:
            found.append(_flash_attn_kernel(flash_attn_varlen_func))
    except ModuleNotFoundError as exc:
        missing.append("flash-attn is not installed" if exc.name == "flash_attn" else f"flash-attn does not import: {exc}")
    except Exception as exc:  # noqa: BLE001 - an ABI mismatch raises ImportError/OSError/RuntimeError: all fall back
        missing.append(f"flash-attn does not import: {type(exc).__name__}: {_first_line(exc)}")
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        missing.append(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    else:
        found += [_torch_varlen_kernel(varlen_attn, gqa=True), _torch_varlen_kernel(varlen_attn, gqa=False)]
    for kernel in found:
        register_kernel(kernel)
    return found, missing


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def self_check(kernel: Kernel, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
               device: torch.device, window: int | None = None) -> str | None:
    """Why ``kernel`` cannot serve this run, or None: one small forward and backward in ``dtype`` with the model's
    head layout, on three segments (two packed, lq = lk; one prefix-shared, lq < lk), against fp32 SDPA per segment.
    """
    if not kernel.takes(dtype):
        return f"takes {'/'.join(str(d).removeprefix('torch.') for d in kernel.dtypes)} only, the run is {str(dtype).removeprefix('torch.')}"
    g = torch.Generator().manual_seed(0)
    lq, lk = [5, 9, 3], [5, 9, 7]
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(sum(lq), heads, head_dim, generator=g)
    k, v = (torch.randn(sum(lk), kv_heads, head_dim, generator=g) for _ in range(2))
    grad = torch.randn(sum(lq), heads, head_dim, generator=g)
    scale = 1 / math.sqrt(head_dim)
    ref_in = [t.to(device).detach().requires_grad_() for t in (q, k, v)]
    ref = _sdpa_segments(*ref_in, cu_q, cu_k, max(lq), max(lk), scale, window)
    ref.backward(grad.to(device))
    got_in = [t.to(device, dtype).detach().requires_grad_() for t in (q, k, v)]
    try:
        out = kernel.run(*got_in, cu_q, cu_k, max(lq), max(lk), scale, window)
        out.backward(grad.to(device, dtype))
    except Exception as exc:  # noqa: BLE001 - any failure of the candidate (a TypeError of another signature, a
        return f"{type(exc).__name__}: {_first_line(exc)}"  # kernel refusing the shapes) is a reason to move on
    atol = CHECK_ATOL[dtype]
    for what, a, b in [("output", out, ref)] + [(f"d{n}", x.grad, y.grad) for n, x, y in zip("qkv", got_in, ref_in)]:
        err = (a.float() - b.float()).abs().max().item()
        if not err <= atol:
            return f"{what} differs from fp32 SDPA by {err:.2g} (> {atol:g})"
    return None


def choose_kernel(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, window: int | None,
                  candidates: list[Kernel] | None = None, device: torch.device | None = None) -> tuple[Kernel, list[str]]:
    """The first candidate that passes :func:`self_check`, else :data:`SDPA_SEGMENTS`; and one reason per candidate
    passed over (``candidates``: default :func:`detect_kernels`; ``device``: this rank's GPU, else the CPU)."""
    reasons: list[str] = []
    if candidates is None:
        candidates, reasons = detect_kernels()
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    for kernel in candidates:
        problem = self_check(kernel, dtype, heads, kv_heads, head_dim, device)
        if problem is None and window is not None:
            problem = self_check(kernel, dtype, heads, kv_heads, head_dim, device, window=min(window, 4))
        if problem is None:
            return register_kernel(kernel), reasons
        reasons.append(f"{kernel.name}: {problem}")
    return SDPA_SEGMENTS, reasons


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-function contract: q (1, H, L, D), k/v (1, Hkv, L, D) -> (1, L, H, D), None."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_q, max_q = kwargs.pop("cu_seq_lens_q", None), kwargs.pop("max_length_q", None)
    cu_k, max_k = kwargs.pop("cu_seq_lens_k", cu_q), kwargs.pop("max_length_k", max_q)
    kv_index = kwargs.pop(KV_INDEX, None)
    if cu_q is None:  # not packed: padded batches and generation keep SDPA and transformers' mask
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"{VARLEN}: a packed batch has one row, got query of shape {tuple(query.shape)}")
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{VARLEN}: this model soft-caps its attention logits (softcap={kwargs['softcap']}), which "
                         f"aligner's packed kernels do not compute; set train.packing=false and "
                         f"model.attn_implementation=eager")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (L, H, D), (L, Hkv, D): views, last dim contiguous
    if kv_index is not None:
        k, v = k[kv_index], v[kv_index]  # (Lk, Hkv, D): the prompt's K/V once more, for its rejected segment
    kernel = _active
    if not kernel.takes(q.dtype):  # fp32 weights in a bf16 run: the forward runs under autocast (aligner/models/loading.py)
        if not torch.is_autocast_enabled(q.device.type):
            raise ValueError(f"{VARLEN}: the {kernel.name} kernel takes {kernel.dtypes}, this model's attention runs "
                             f"in {q.dtype} outside autocast")
        q, k, v = (t.to(torch.get_autocast_dtype(q.device.type)) for t in (q, k, v))
    out = kernel.run(q, k, v, cu_q, cu_k, int(max_q), int(max_k), scaling, kwargs.get("sliding_window"), dropout)
    return out[None], None


def varlen_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """No mask for a batch without padding (the kernel is causal per segment); SDPA's mask otherwise."""
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
    """The transformers attention implementation the models load with: ``auto`` and ``varlen`` are this module's
    function for packed runs (the kernel inside it chosen at start-up), SDPA for padded ones; a name given by the
    user is used as it is."""
    if requested == "varlen" or (requested == "auto" and packing):
        return register()
    return "sdpa" if requested == "auto" else requested


def takes(attn_implementation: str, dtype: torch.dtype) -> bool:
    """Whether a model loaded with ``attn_implementation`` can run its attention with ``dtype`` weights: this
    module's function on the active kernel, transformers' flash-attn integrations (fp16/bf16), the rest (any)."""
    if attn_implementation == VARLEN:
        return _active.takes(dtype)
    return not attn_implementation.startswith("flash_attention") or dtype in HALF


def _model_of(model):
    return getattr(getattr(model, "module", model), "config", None)


def _no_mask(device: torch.device) -> dict:
    """A 4-D placeholder mask for this module's function: transformers returns a 4-D mask as it is
    (``masking_utils._preprocess_mask_arguments``), which skips its packed-sequence detection (a host sync per
    forward); the function reads the segment bounds and never this mask."""
    return {"attention_mask": torch.empty(1, 1, 0, 0, dtype=torch.bool, device=device)}


def model_inputs(model, batch: Batch) -> dict:
    """The forward kwargs of ``batch`` for ``model``: its layout's (tokens, and positions or a mask), plus what
    this model's attention reads of the batch's segments (:meth:`Batch.segments`: packed or prefix-shared)."""
    segments = batch.segments()
    if isinstance(segments, PrefixSharedBatch):
        return {**batch.model_inputs(), **prefix_shared_kwargs(model, segments)}
    if isinstance(segments, PackedBatch):
        return {**batch.model_inputs(), **varlen_kwargs(model, segments)}
    return batch.model_inputs()


def varlen_kwargs(model, batch) -> dict:
    """The ``cu_seq_lens``/``max_length`` forward kwargs of a packed batch (:class:`aligner.data.batch.PackedBatch`),
    for models whose attention reads them."""
    impl = getattr(_model_of(model), "_attn_implementation", None)
    if impl not in VARLEN_KERNELS:
        return {}
    device = batch.input_ids.device
    cu = batch.cu_seqlens.to(device)
    out = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": batch.max_seqlen, "max_length_k": batch.max_seqlen}
    return out | (_no_mask(device) if impl == VARLEN else {})


def prefix_shared_kwargs(model, batch) -> dict:
    """The forward kwargs of a prefix-shared batch (:class:`aligner.data.batch.PrefixSharedBatch`): query segment
    bounds in the row, key segment bounds in the gathered layout, and that layout. Only this module's function
    reads them."""
    impl = getattr(_model_of(model), "_attn_implementation", None)
    if impl != VARLEN:
        raise ValueError(f"a prefix-shared batch needs attn_implementation {VARLEN!r} (model.attn_implementation: auto "
                         f"or varlen), this model runs {impl!r}; set train.prefix_sharing=false for it")
    device = batch.input_ids.device
    return {"cu_seq_lens_q": batch.cu_seqlens.to(device), "cu_seq_lens_k": batch.kv_cu_seqlens.to(device),
            "max_length_q": batch.max_seqlen, "max_length_k": batch.max_kv_seqlen,
            KV_INDEX: batch.kv_index.to(device), **_no_mask(device)}
