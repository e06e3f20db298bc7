"""The export of a LoRA run: ``final/`` holds the policy's adapter in PEFT format, ``final/merged`` the merged model.

``final/`` (``adapter_config.json``, ``adapter_model.safetensors``, the
tokenizer) loads with ``PeftModel.from_pretrained(base, "final")``, the base
being ``model.name_or_path``. With ``export.merge_lora: true`` rank 0 also loads
the base in ``model.dtype`` on the host, applies the adapter just written and
merges it (W = W₀ + (α/r)·B·A, peft's ``merge_and_unload``) into
``final/merged``, which ``AutoModelForCausalLM.from_pretrained`` loads. Only
the trainable parameters are gathered from the ZeRO-3 shards: the adapters are
small, and the base is read again from its own checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from aligner.models.lora import POLICY_ADAPTER


def trainable_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The trainable parameters' full values (gathered under ZeRO-3), on rank 0; None elsewhere. Collective."""
    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
    else:
        state = {n: p.detach().cpu() for n, p in engine.module.named_parameters() if p.requires_grad}
    rank = dist.get_rank() if dist.is_initialized() else 0
    return state if rank == 0 else None


def export_adapter(engine, tokenizer, out_dir: Path, merged_from: Path | None = None,
                   dtype: torch.dtype = torch.float32) -> Path:
    """Write the policy's adapter to ``out_dir`` (and, from ``merged_from``, the merged model to
    ``out_dir/merged``). Collective: every rank calls it."""
    state = trainable_state_dict(engine)
    if state is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        engine.module.save_pretrained(str(out_dir), state_dict=state, selected_adapters=[POLICY_ADAPTER])
        tokenizer.save_pretrained(out_dir)
        if merged_from is not None:
            write_merged(merged_from, out_dir, out_dir / "merged", dtype)
            tokenizer.save_pretrained(out_dir / "merged")
    if dist.is_initialized():
        dist.barrier()
    return out_dir


def write_merged(base_path: Path, adapter_dir: Path, out_dir: Path, dtype: torch.dtype) -> Path:
    """Base + adapter merged into plain weights, saved with ``save_pretrained`` (on this process, on the host)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    if is_deepspeed_zero3_enabled():
        unset_hf_deepspeed_config()  # a plain host model: the training engines are done with loading
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
