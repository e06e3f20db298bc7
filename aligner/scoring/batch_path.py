"""The compute path of a run, decided once: its dtype, padded or packed, prefix-shared or not, chunked LM head or
full logits, and the attention kernel.

The fast path is the default (``train.packing``, ``train.prefix_sharing``, ``train.logps_chunk_tokens``); a
run takes the fastest path that is exact for it, and every step back is a reason in the one start-up line
``batch path: packed + prefix-shared + chunked head (1024 tokens), attention aligner_varlen on flash_attn,
bfloat16`` (also under ``"batch_path"`` in ``output_dir/plan.json``). The rules, each written here only:

- ``model.dtype: auto`` → bfloat16 on a GPU that supports it, float32 otherwise (:func:`resolve_dtype`);
- ``train.packing: false`` → padded;
- unpaired data, or a plugin asking for ``kl_pairs`` (KTO's mismatched pairs) → padded (the packers take pairs);
- a model that soft-caps its attention logits (``config.attn_logit_softcapping``, Gemma-2) → padded with eager
  attention, the one implementation that computes the cap (refused when ``model.attn_implementation: varlen``);
- prefix sharing needs packing and this project's attention function (``model.attn_implementation: auto`` or
  ``varlen``); transformers' ``sdpa``/``eager``/``flash_attention_2`` chosen by name mask from position ids,
  which cannot express [prompt, chosen, rejected], so such a run packs unshared;
- the chunked head needs an LM head that is a plain ``Linear`` whose output the model does not transform
  (``config.final_logit_softcapping``, ``logit_scale``): otherwise full logits;
- the kernel under this project's attention function: on a GPU the first of flash-attn, torch's ``varlen_attn``
  and SDPA per segment that takes the run's dtype and passes its start-up self-check
  (:func:`aligner.models.attention.choose_kernel`); on the CPU, SDPA per segment;
- ``flash_attention_2`` named by the user takes fp16/bf16 only: with float32 weights the run is refused here,
  before any engine is built.

:meth:`BatchPath.apply` gives the resolved config (the dtype, the concrete attention implementation, and the
switches as decided) that the engines, the step, the evaluation and the static pre-pass then read, and makes
the kernel the one this process's packed forwards run on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aligner.models.loading import attention
from aligner.scoring.logps import logits_transform, scoring_head_problem


@dataclass(frozen=True)
class BatchPath:
    """What a run's batches are, how they are scored, and in which dtype.

    :param attn_implementation: the transformers attention implementation the models load with.
    :param kernel: the kernel under :data:`aligner.models.attention.VARLEN` (:data:`aligner.models.attention.KERNELS`); for an
        implementation of transformers' own, its name.
    :param dtype: the run's dtype (``model.dtype`` resolved): the policy's weights, and what every forward runs in.
    :param fallbacks: one reason per step back from the requested path.
    :param kernel_fallbacks: one reason per faster kernel passed over.
    """

    packing: bool
    prefix_sharing: bool
    chunk_tokens: int
    attn_implementation: str
    kernel: str = attention.SDPA_SEGMENTS.name
    dtype: str = "float32"
    fallbacks: tuple[str, ...] = ()
    kernel_fallbacks: tuple[str, ...] = ()

    def describe(self) -> str:
        """The ``batch path:`` log line's text."""
        parts = ["packed" if self.packing else "padded"] + (["prefix-shared"] if self.prefix_sharing else [])
        parts.append(f"chunked head ({self.chunk_tokens} tokens)" if self.chunk_tokens else "full logits")
        attn = self.attn_implementation + (f" on {self.kernel}" if self.kernel != self.attn_implementation else "")
        line = f"{' + '.join(parts)}, attention {attn}, {self.dtype}"
        reasons = self.fallbacks + tuple(f"kernel {r}" for r in self.kernel_fallbacks)
        return line + (f" ({'; '.join(reasons)})" if reasons else "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"fallbacks": list(self.fallbacks),
                                           "kernel_fallbacks": list(self.kernel_fallbacks)}

    def apply(self, cfg):
        """:meth:`configured` ``cfg``; from now on this process's packed forwards run on :attr:`kernel`."""
        if self.attn_implementation == attention.VARLEN:
            attention.register()
            attention.activate(self.kernel)
        return self.configured(cfg)

    def configured(self, cfg):
        """``cfg`` with the dtype and switches as decided and the concrete attention implementation."""
        attn = "varlen" if self.attn_implementation == attention.VARLEN else self.attn_implementation
        train = dataclasses.replace(cfg.train, packing=self.packing, prefix_sharing=self.prefix_sharing,
                                    logps_chunk_tokens=self.chunk_tokens)
        model = dataclasses.replace(cfg.model, attn_implementation=attn, dtype=self.dtype)
        return dataclasses.replace(cfg, train=train, model=model)


def resolve_dtype(requested: str, cuda: bool | None = None) -> str:
    """``model.dtype``: ``auto`` is bfloat16 on a GPU that supports it (compute capability 8.0 and up) and float32
    elsewhere (the CPU, older GPUs); a dtype named is used as it is."""
    if requested != "auto":
        return requested
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        return "float32"
    return "bfloat16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "float32"


def attention_shape(model_config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of a transformers model config."""
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return heads, kv_heads, head_dim


def head_problem(model_config, trust_remote_code: bool = False) -> str | None:
    """Why this model's logits cannot be scored by the chunked head, or None (:func:`aligner.scoring.logps.logits_transform`,
    and the head's class, read from the model built on the meta device: no memory, no weights)."""
    problem = logits_transform(model_config)
    if problem:
        return problem
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - an exotic class: the scoring head itself refuses it with the fix
        return None
    return scoring_head_problem(model)


#: :attr:`BatchPath.kernel` of a GPU path decided away from the GPU (``aligner-estimate``): the run picks it.
KERNEL_AT_START = "the kernel the start-up self-check picks"


def decide(cfg, model_config, paired: bool, kl_pairs: bool, cuda: bool | None = None,
           kernels: list[attention.Kernel] | None = None, pick_kernel: bool = True) -> BatchPath:
    """The run's :class:`BatchPath` from the requested switches (``cfg.train``, ``cfg.model``), the policy's HF
    config, the data (``paired``) and the plugins' inputs (``kl_pairs``), on this machine (``cuda``: detected when
    None; ``kernels``: the GPU kernel candidates, default :func:`aligner.models.attention.detect_kernels`). Without
    ``pick_kernel`` a GPU path's kernel is left to the run (:data:`KERNEL_AT_START`): no kernel is run here."""
    from aligner.config import ConfigError

    t, requested_attn = cfg.train, cfg.model.attn_implementation
    cuda = torch.cuda.is_available() if cuda is None else cuda
    dtype = resolve_dtype(cfg.model.dtype, cuda)
    fallbacks: list[str] = []
    packing, pairs_only = t.packing, paired and not kl_pairs
    if packing and not pairs_only and t.sequence_parallel == 1:  # under SP they are packed (pack_batch) and sharded
        packing = False
        fallbacks.append("padded: unpaired/KTO batches (kl_pairs) are padded")
    softcap = getattr(model_config, "attn_logit_softcapping", None)
    if softcap is not None and requested_attn in ("auto", "varlen"):
        if requested_attn == "varlen":
            raise ConfigError(f"model.attn_implementation=varlen: this model soft-caps its attention logits "
                              f"(config.attn_logit_softcapping={softcap}), which aligner's packed kernels do not "
                              f"compute; use model.attn_implementation: auto (padded, eager attention)")
        requested_attn = "eager"
        if packing:
            packing = False
            fallbacks.append(f"padded: config.attn_logit_softcapping={softcap} needs eager attention")
    if requested_attn.startswith("flash_attention") and dtype not in ("bfloat16", "float16"):
        raise ConfigError(f"model.attn_implementation={requested_attn} takes fp16/bf16 weights only, and model.dtype is "
                          f"{dtype}; set model.dtype: bfloat16 (or auto on a GPU), or model.attn_implementation: auto")
    sharing = packing and t.prefix_sharing and pairs_only
    if sharing and requested_attn not in ("auto", "varlen"):
        sharing = False
        fallbacks.append(f"no prefix sharing: model.attn_implementation={requested_attn} masks from position ids; "
                         f"use auto or varlen")
    chunk = t.logps_chunk_tokens
    if chunk:
        problem = head_problem(model_config, cfg.model.trust_remote_code)
        if problem:
            chunk = 0
            fallbacks.append(f"full logits: {problem}")
    attn = attention.attn_implementation(requested_attn, packing)
    kernel, kernel_fallbacks = attn, []
    if attn == attention.VARLEN:
        kernel = attention.SDPA_SEGMENTS.name
        if cuda and not pick_kernel:
            kernel = KERNEL_AT_START
        elif cuda:
            window = getattr(model_config, "sliding_window", None)
            heads, kv_heads, head_dim = attention_shape(model_config)
            if t.sequence_parallel > 1:  # each rank's kernel runs its share of the heads (aligner/scoring/sequence_parallel.py)
                from aligner.scoring.sequence_parallel import local_heads

                heads, kv_heads = local_heads(heads, kv_heads, t.sequence_parallel)
            chosen, kernel_fallbacks = attention.choose_kernel(getattr(torch, dtype), heads, kv_heads, head_dim,
                                                               window, candidates=kernels)
            kernel = chosen.name
    return BatchPath(packing, sharing, chunk, attn, kernel, dtype, tuple(fallbacks), tuple(kernel_fallbacks))


def decide_for_run(cfg, policy_path: Path, paired: bool, kl_pairs: bool) -> BatchPath:
    """:func:`decide` with the policy checkpoint's config (every rank decides alike; rank 0 logs the line)."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(policy_path, trust_remote_code=cfg.model.trust_remote_code)
    return decide(cfg, model_config, paired, kl_pairs)
