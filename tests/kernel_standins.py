"""Stand-ins, in tests only, for the GPU attention kernels that cannot run on a CPU.

Each enforces the documented preconditions of the kernel it stands for, then computes the same math (softmax
attention per segment, causal aligned bottom-right, in fp32, by explicit matrices: not the SDPA code it is compared
with), and returns the kernel's output dtype. They are the project's one allowed stand-in (the brief: "a function
that enforces the kernel's documented preconditions and computes the same math; name it as such").

- :func:`flash_attn_varlen_func_standin`: flash-attn 2's ``flash_attn_varlen_func`` (flash_attn_interface.py and
  csrc/flash_attn/flash_api.cpp ``mha_varlen_fwd``): fp16/bf16 only, q/k/v of one dtype with a contiguous last
  dimension, int32 contiguous ``cu_seqlens`` on q's device, int ``max_seqlen``, Hq divisible by Hkv, head dim <= 256,
  a bool ``causal``, totals equal to ``cu_seqlens[-1]``; causal bottom-right since 2.1; ``window_size`` (left, right).
- ``varlen_attn`` of each torch signature family (``torch.nn.attention.varlen``, documented per release):
  :func:`varlen_attn_2_9` (``is_causal``, no scale, no window, equal head counts), :func:`varlen_attn_2_10`
  (keyword ``scale``, ``window_size``; equal head counts), :func:`varlen_attn_2_12` (adds ``enable_gqa``; the
  signature of 2.12-2.14). All call FlashAttention-2 through ``aten::_flash_attention_forward``: fp16/bf16 only.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from aligner.models import attention

HALF = (torch.float16, torch.bfloat16)


def segment_attention(q, k, v, cu_q, cu_k, scale, left: int, right: int):
    """Reference math: per segment, query i of lq sees keys j of lk with i + (lk - lq) - left <= j <= i + (lk - lq)
    + right (-1: unbounded), GQA by repeating K/V heads; fp32 matrices. (Tq, H, D) fp32."""
    out = []
    bounds = zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist())
    for qs, qe, ks, ke in bounds:
        lq, lk = qe - qs, ke - ks
        if lq == 0:
            continue
        groups = q.shape[1] // k.shape[1]
        qq = q[qs:qe].float()
        kk, vv = (t[ks:ke].float().repeat_interleave(groups, dim=1) for t in (k, v))
        scores = torch.einsum("qhd,khd->hqk", qq, kk) * scale  # (H, lq, lk)
        i = torch.arange(lq)[:, None] + (lk - lq)
        j = torch.arange(lk)[None]
        allowed = torch.ones(lq, lk, dtype=torch.bool)
        if right >= 0:
            allowed &= j <= i + right
        if left >= 0:
            allowed &= j >= i - left
        scores = scores.masked_fill(~allowed, float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv))
    return torch.cat(out)


def _check_common(q, k, v, cu_q, cu_k, max_q, max_k, what: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in HALF:
            raise RuntimeError(f"{what}: FlashAttention only support fp16 and bf16 data type ({name} is {t.dtype})")
        if t.stride(-1) != 1:
            raise RuntimeError(f"{what}: Input tensor must have contiguous last dimension ({name})")
    if not (q.dtype == k.dtype == v.dtype):
        raise RuntimeError(f"{what}: query and key/value must have the same dtype")
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if cu.dtype != torch.int32 or not cu.is_contiguous() or cu.device != q.device:
            raise RuntimeError(f"{what}: {name} must be int32, contiguous, on q's device (got {cu.dtype} on {cu.device})")
    for name, m in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if not isinstance(m, int) or isinstance(m, bool):
            raise TypeError(f"{what}: {name} must be an int, got {type(m).__name__}")
    if q.shape[-1] > 256 or q.shape[-1] != k.shape[-1]:
        raise RuntimeError(f"{what}: head dimension must be <= 256 and equal for q and k")
    if q.shape[1] % k.shape[1]:
        raise RuntimeError(f"{what}: Number of heads in key/value must divide number of heads in query")
    if q.shape[0] != int(cu_q[-1]) or k.shape[0] != int(cu_k[-1]) or v.shape[0] != k.shape[0]:
        raise RuntimeError(f"{what}: total tokens must equal cu_seqlens[-1]")
    if max_q < int(cu_q.diff().max()) or max_k < int(cu_k.diff().max()):
        raise RuntimeError(f"{what}: max_seqlen below the longest segment")


def flash_attn_varlen_func_standin(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                   softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                   alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
    """Stand-in for flash-attn 2.6+'s ``flash_attn_varlen_func`` (module doc)."""
    _check_common(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, "flash_attn_varlen_func")
    if not isinstance(causal, bool):
        raise TypeError(f"flash_attn_varlen_func: causal must be a bool, got {type(causal).__name__}")
    if len(window_size) != 2 or dropout_p or softcap or alibi_slopes is not None or block_table is not None:
        raise NotImplementedError("stand-in: window_size of 2 ints, no dropout/softcap/alibi/paged KV")
    left, right = window_size
    if causal:
        right = 0
    scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(q.shape[-1])
    return segment_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, left, right).to(q.dtype)


def varlen_attn_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """Stand-in for torch 2.12-2.14's ``varlen_attn`` (module doc)."""
    if not enable_gqa and query.size(1) != key.size(1):
        raise ValueError(f"Expect query and key/value to have the same number of heads but got Hq={query.size(1)} "
                         f"and Hkv={key.size(1)}. Try setting enable_gqa=True for GQA.")
    return _torch_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size)


def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)):
    """Stand-in for torch 2.10/2.11's ``varlen_attn``: key/value documented as (T_k, H, D), the query's heads."""
    if query.size(1) != key.size(1):
        raise ValueError(f"stand-in of torch 2.10's varlen_attn: key has {key.size(1)} heads, the documented "
                         f"shape is the query's {query.size(1)}")
    return _torch_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size)


def varlen_attn_2_9(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """Stand-in for torch 2.9's ``varlen_attn``: no scale, no window."""
    if query.size(1) != key.size(1):
        raise ValueError("stand-in of torch 2.9's varlen_attn: equal head counts only")
    return _torch_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, None, (-1, 0) if is_causal else (-1, -1))


def _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size):
    _check_common(q, k, v, cu_q, cu_k, max_q, max_k, "varlen_attn")
    if len(window_size) != 2:
        raise ValueError(f"window_size must have length 2, got {len(window_size)}")
    left, right = window_size
    scale = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    return segment_attention(q, k, v, cu_q, cu_k, scale, left, right).to(q.dtype)


def top_left_flash_standin(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), **kwargs):
    """A kernel with flash-attn < 2.1's causal alignment (top-left when seqlen_q != seqlen_k): the self-check must
    catch it, since rejected queries would lose most of the prompt."""
    _check_common(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, "flash_attn_varlen_func")
    out = []
    scale = softmax_scale or 1 / math.sqrt(q.shape[-1])
    for s in range(len(cu_seqlens_q) - 1):
        qs, qe, ks = int(cu_seqlens_q[s]), int(cu_seqlens_q[s + 1]), int(cu_seqlens_k[s])
        ke = ks + (qe - qs)  # top-left: query i sees keys 0..i of the segment's first lq keys
        seg_q = torch.tensor([0, qe - qs], dtype=torch.int32)
        out.append(segment_attention(q[qs:qe], k[ks:ke], v[ks:ke], seg_q, seg_q, scale, -1, 0))
    return torch.cat(out).to(q.dtype)


#: The stand-ins as aligner's kernels (the adapters of aligner/models/attention.py around each signature).
FLASH = attention.Kernel("flash_attn_standin", attention._flash_attn_kernel(flash_attn_varlen_func_standin).run,
                         attention.HALF)
TORCH_2_12 = dataclasses.replace(attention._torch_varlen_kernel(varlen_attn_2_12, gqa=True), name="torch_2_12_standin")
TORCH_2_10 = [dataclasses.replace(attention._torch_varlen_kernel(varlen_attn_2_10, gqa=g), name=f"torch_2_10_gqa{g}")
              for g in (True, False)]
TORCH_2_9 = [dataclasses.replace(attention._torch_varlen_kernel(varlen_attn_2_9, gqa=g), name=f"torch_2_9_gqa{g}")
             for g in (True, False)]
