"""The batch path of a run, decided once: padded or packed, prefix-shared or not, chunked LM head or full logits.

The fast path is the default (``train.packing``, ``train.prefix_sharing``, ``train.logps_chunk_tokens``); a
run takes the fastest path that is exact for it, and every step back is a reason in the one start-up line
``batch path: packed + prefix-shared + chunked head (1024 tokens), attention aligner_varlen`` (also under
``"batch_path"`` in ``output_dir/plan.json``). The rules, each written here only:

- ``train.packing: false`` → padded;
- unpaired data, or a plugin asking for ``kl_pairs`` (KTO's mismatched pairs) → padded (the packers take pairs);
- a GPU with neither flash-attn nor PyTorch's ``varlen_attn`` → padded (packing would attend across sequences
  or need an (L, L) mask);
- prefix sharing needs packing and this project's attention function (``model.attn_implementation: auto`` or
  ``varlen``); transformers' ``sdpa``/``eager``/``flash_attention_2`` chosen by name mask from position ids,
  which cannot express [prompt, chosen, rejected], so such a run packs unshared;
- the chunked head needs an LM head that is a plain ``Linear`` whose output the model does not transform
  (``config.final_logit_softcapping``, ``logit_scale``): otherwise full logits.

:meth:`BatchPath.apply` gives the resolved config (the concrete attention implementation, and the switches as
decided) that the engines, the step, the evaluation and the static pre-pass then read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aligner import attention
from aligner.logps import logits_transform, scoring_head_problem


@dataclass(frozen=True)
class BatchPath:
    """What a run's batches are and how they are scored.

    :param attn_implementation: the transformers attention implementation the models load with.
    :param fallbacks: one reason per step back from the requested path.
    """

    packing: bool
    prefix_sharing: bool
    chunk_tokens: int
    attn_implementation: str
    fallbacks: tuple[str, ...] = ()

    def describe(self) -> str:
        """The ``batch path:`` log line's text."""
        parts = ["packed" if self.packing else "padded"] + (["prefix-shared"] if self.prefix_sharing else [])
        parts.append(f"chunked head ({self.chunk_tokens} tokens)" if self.chunk_tokens else "full logits")
        line = f"{' + '.join(parts)}, attention {self.attn_implementation}"
        return line + (f" ({'; '.join(self.fallbacks)})" if self.fallbacks else "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"fallbacks": list(self.fallbacks)}

    def apply(self, cfg):
        """``cfg`` with the switches as decided and the concrete attention implementation."""
        attn = "varlen" if self.attn_implementation == attention.VARLEN else self.attn_implementation
        train = dataclasses.replace(cfg.train, packing=self.packing, prefix_sharing=self.prefix_sharing,
                                    logps_chunk_tokens=self.chunk_tokens)
        return dataclasses.replace(cfg, train=train, model=dataclasses.replace(cfg.model, attn_implementation=attn))


def head_problem(model_config, trust_remote_code: bool = False) -> str | None:
    """Why this model's logits cannot be scored by the chunked head, or None (:func:`aligner.logps.logits_transform`,
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


def decide(cfg, model_config, paired: bool, kl_pairs: bool, cuda: bool | None = None,
           varlen_kernel: bool | None = None) -> BatchPath:
    """The run's :class:`BatchPath` from the requested switches (``cfg.train``), the policy's HF config, the data
    (``paired``) and the plugins' inputs (``kl_pairs``), on this machine (``cuda``, ``varlen_kernel``: detected
    when None)."""
    t, requested_attn = cfg.train, cfg.model.attn_implementation
    cuda = torch.cuda.is_available() if cuda is None else cuda
    varlen_kernel = attention.has_varlen_kernel() if varlen_kernel is None else varlen_kernel
    fallbacks: list[str] = []
    packing = t.packing
    if packing and not (paired and not kl_pairs):
        packing = False
        fallbacks.append("padded: unpaired/KTO batches (kl_pairs) are padded")
    if packing and cuda and not varlen_kernel:
        packing = False
        fallbacks.append("padded: this GPU has neither flash-attn nor PyTorch's varlen_attn")
    sharing = packing and t.prefix_sharing
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
    attn = attention.attn_implementation(requested_attn, packing, sharing)
    return BatchPath(packing, sharing, chunk, attn, tuple(fallbacks))


def decide_for_run(cfg, policy_path: Path, paired: bool, kl_pairs: bool) -> BatchPath:
    """:func:`decide` with the policy checkpoint's config (every rank decides alike; rank 0 logs the line)."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(policy_path, trust_remote_code=cfg.model.trust_remote_code)
    return decide(cfg, model_config, paired, kl_pairs)
