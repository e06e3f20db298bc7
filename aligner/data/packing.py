"""Padding-free batches: the chosen and rejected sequences of a micro-batch packed into one row.

The row holds ``[chosen_0..chosen_B-1, rejected_0..rejected_B-1]`` back to back
(the same order as :func:`aligner.data.collate_pairs`), with ``position_ids``
restarting at 0 for every sequence. Attention must stay inside each sequence:

- ``aligner_varlen`` (what ``model.attn_implementation: auto`` picks for packed
  runs without flash-attn), flash-attn: ``cu_seqlens`` and ``max_seqlen`` give the
  sequence boundaries directly (:mod:`aligner.attention`: PyTorch's
  ``varlen_attn`` on GPU, causal SDPA per sequence on CPU).
- ``sdpa``/``eager`` chosen by name: transformers reads the restarting
  ``position_ids`` and builds a block-diagonal causal mask over the whole row
  itself, provided the forward gets *no* ``attention_mask`` and
  ``use_cache=False`` (PLATFORM.md: with a cache the detection is skipped and
  sequences silently attend across boundaries).

No token is padding, so every FLOP goes to a real token.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from aligner.data.batch import Batch, PackedBatch
from aligner.data.collate import collate_batch
from aligner.data.tokenize import Example, UnpairedExample


def pack_pairs(examples: list[Example]) -> PackedBatch:
    """Pack the 2B sequences of ``examples`` into one row of L = sum of their lengths.

    A :class:`PackedBatch`: ``input_ids``, ``position_ids``, ``sequence_ids`` (which of the 2B
    sequences each token belongs to) and ``response_mask`` (the tokens whose
    log-probs are scored), each of shape (1, L); ``cu_seqlens`` (2B+1,) int32 and
    ``max_seqlen`` (int) for varlen attention kernels; and ``ids`` (the B example ids).

    The first token of a sequence is never scored (nothing precedes it), so it is
    left out of ``response_mask`` even when the prompt is empty: the position
    before it is the previous sequence's last token, not its prefix.
    """
    seqs, prompt_lens = [], []
    for field in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            seqs.append(ex.prompt_ids + getattr(ex, field))
            prompt_lens.append(len(ex.prompt_ids))
    lengths = torch.tensor([len(s) for s in seqs])  # (2B,)
    starts = torch.cumsum(lengths, 0) - lengths  # (2B,)
    input_ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)  # (L,)
    sequence_ids = torch.repeat_interleave(torch.arange(len(seqs)), lengths)  # (L,)
    position_ids = torch.arange(len(input_ids)) - starts[sequence_ids]  # (L,) restarts at 0
    response_mask = position_ids >= torch.tensor(prompt_lens)[sequence_ids]
    response_mask &= position_ids > 0
    cu_seqlens = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(lengths, 0)
    return PackedBatch(input_ids=input_ids[None], position_ids=position_ids[None], sequence_ids=sequence_ids[None],
                       response_mask=response_mask[None], cu_seqlens=cu_seqlens, max_seqlen=int(lengths.max()),
                       ids=[ex.id for ex in examples], n_chosen=len(examples), paired=True,
                       row_index=[*range(len(examples)), *range(len(examples))])


def make_collate(packing: bool, pad_token_id: int, kl_pairs: bool = False,
                 max_length: int | None = None) -> Callable[[list], Batch]:
    """The batch builder a run uses: :func:`pack_pairs` (``train.packing``) or the padded ``collate_batch``.

    Packing covers preference pairs; unpaired completions and batches that carry
    mismatched KL rows (``kl_pairs``, for kto) are padded.
    """
    padded = partial(collate_batch, pad_token_id=pad_token_id, kl_pairs=kl_pairs, max_length=max_length)
    if not packing or kl_pairs:
        return padded

    def collate(examples: list) -> Batch:
        return pack_pairs(examples) if not isinstance(examples[0], UnpairedExample) else padded(examples)

    return collate


def real_tokens(batch: Batch) -> int:
    """Non-padding tokens of a padded or packed (no padding at all) batch."""
    return batch.real_tokens()
