"""Batched text generation with a KV cache: greedy or sampled, for evaluation and studies.

Prompts are left-padded into one batch; each new token is fed back with the
cache, so every step costs one token's forward. A finished sequence (EOS)
keeps emitting padding. Under ZeRO-3 the caller wraps the call in
:func:`gathered` so each rank holds the full weights while generating (fine for
evaluation-sized models; an 8B policy is better exported and generated from
with a serving stack).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from collections.abc import Iterator

import torch


@contextmanager
def gathered(model) -> Iterator[None]:
    """Gather ZeRO-3 partitioned parameters for the duration of the block (no-op otherwise). Collective."""
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        with nullcontext():
            yield


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
             seed: int = 0, add_special_tokens: bool = True) -> list[str]:
    """Continue each prompt; ``temperature == 0`` is greedy, otherwise multinomial sampling at that temperature.

    Sampling draws from a ``torch.Generator`` seeded with ``seed``, so the same
    call gives the same text. Returns the decoded continuations (special tokens removed).
    """
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    width = max(map(len, encoded))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)  # (B, T) left-padded
    attention = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    eos = tokenizer.eos_token_id
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    new_tokens = []
    cache = None
    step_ids = input_ids
    for _ in range(max_new_tokens):
        positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
        out = model(input_ids=step_ids, attention_mask=attention, position_ids=positions,
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1].float()  # (B, V)
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1).cpu()
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(device)
        else:
            token = logits.argmax(-1)
        token = torch.where(done, torch.full_like(token, pad), token)
        new_tokens.append(token)
        if eos is not None:
            done |= token == eos
        if bool(done.all()):
            break
        step_ids = token[:, None]
        attention = torch.cat([attention, (~done | (token == eos)).long()[:, None]], dim=-1)
    if not new_tokens:
        return [""] * len(prompts)
    out_ids = torch.stack(new_tokens, dim=1).tolist()
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in out_ids]
