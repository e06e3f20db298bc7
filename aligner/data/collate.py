"""Turn tokenized pairs into one padded batch: all chosen sequences, then all rejected ones.

Both halves go through each model in one forward pass (as TRL concatenates
them), so a micro-batch of B pairs is a tensor of 2B rows.
"""

from __future__ import annotations

import torch

from aligner.data.tokenize import Example


def collate_pairs(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor | list[str]]:
    """Pad ``[chosen_0..chosen_B-1, rejected_0..rejected_B-1]`` to the longest sequence (right padding).

    Returns ``input_ids``, ``attention_mask`` and ``response_mask`` of shape (2B, T)
    (``response_mask`` marks the response tokens whose log-probs are scored),
    and ``ids`` (the B example ids).
    """
    seqs, masks = [], []
    for field in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            response = getattr(ex, field)
            seqs.append(ex.prompt_ids + response)
            masks.append([0] * len(ex.prompt_ids) + [1] * len(response))
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)  # (2B, T)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    response_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (seq, mask) in enumerate(zip(seqs, masks)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
        response_mask[i, : len(seq)] = torch.tensor(mask, dtype=torch.bool)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
            "ids": [ex.id for ex in examples]}
