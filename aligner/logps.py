"""Per-sequence log-probabilities of the response tokens.

Only response positions are scored, and the fp32 log-softmax runs over chunks
of those positions, so fp32 logits are never held for every token of the batch
times the whole vocabulary at once.
"""

from __future__ import annotations

import torch


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor,
                   chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(token | prefix) over each sequence's response tokens.

    :param logits: (N, T, V) model outputs; position t predicts token t+1.
    :param input_ids: (N, T).
    :param response_mask: (N, T) bool, True on the response tokens to score.
    :returns: (summed log-probs (N,), number of scored tokens (N,)).
    """
    targets_mask = response_mask[:, 1:]  # (N, T-1): token t+1 is a response token
    rows, cols = targets_mask.nonzero(as_tuple=True)  # (M,), (M,)
    picked = logits[:, :-1][rows, cols]  # (M, V) in the model's dtype
    targets = input_ids[:, 1:][rows, cols]  # (M,)
    token_logps = []
    for chunk, target in zip(picked.split(chunk_size), targets.split(chunk_size)):
        chunk = chunk.float()  # (c, V): the only fp32 copy, one chunk at a time
        token_logps.append(chunk.gather(-1, target[:, None]).squeeze(-1) - chunk.logsumexp(-1))
    flat = torch.cat(token_logps) if token_logps else logits.new_zeros(0, dtype=torch.float32)
    summed = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device).index_add(0, rows, flat)
    return summed, targets_mask.sum(-1)


def batch_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` (a DeepSpeed engine or an HF model) on a collated batch and score the responses."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return sequence_logps(out.logits, batch["input_ids"], batch["response_mask"])
