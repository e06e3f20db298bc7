"""Padding-free batches: the chosen and rejected sequences of a micro-batch packed into one row.

The row holds ``[chosen_0..chosen_B-1, rejected_0..rejected_B-1]`` back to back
(the same order as :func:`aligner.data.collate_pairs`), with ``position_ids``
restarting at 0 for every sequence. Attention must stay inside each sequence:

- ``aligner_varlen`` (what ``model.attn_implementation: auto`` picks for packed
  runs without flash-attn), flash-attn: ``cu_seqlens`` and ``max_seqlen`` give the
  sequence boundaries directly (:mod:`aligner.models.attention`: PyTorch's
  ``varlen_attn`` on GPU, causal SDPA per sequence on CPU).
- ``sdpa``/``eager`` chosen by name: transformers reads the restarting
  ``position_ids`` and builds a block-diagonal causal mask over the whole row
  itself, provided the forward gets *no* ``attention_mask`` and
  ``use_cache=False`` (PLATFORM.md: with a cache the detection is skipped and
  sequences silently attend across boundaries).

No token is padding, so every FLOP goes to a real token.

With ``train.prefix_sharing`` (:func:`pack_prefix_shared`) each pair is laid out
as ``[prompt, chosen, rejected]`` and its prompt is computed once
(:class:`aligner.data.batch.PrefixSharedBatch`). The prompt is the same for both
responses by construction: tokenization keeps one ``prompt_ids`` per pair and
truncation cuts that one prompt (aligner/data/tokenize.py ``split_ids``), so no
pair ever needs an unshared fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from aligner.data.batch import Batch, PackedBatch, PrefixSharedBatch
from aligner.data.collate import batch_rows, collate_batch
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
    rows = [(ex.prompt_ids, getattr(ex, field)) for field in ("chosen_ids", "rejected_ids") for ex in examples]
    return pack_rows(rows, ids=[ex.id for ex in examples], n_chosen=len(examples), paired=True,
                     row_index=[*range(len(examples)), *range(len(examples))])


def pack_rows(rows: list[tuple[list[int], list[int]]], **labels) -> PackedBatch:
    """Pack (prompt, response) ``rows`` into one row, with the batch's ``labels`` (:class:`PackedBatch` fields)."""
    seqs = [p + r for p, r in rows]
    prompt_lens = [len(p) for p, _ in rows]
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
                       **labels)


def pack_batch(examples: list[Example] | list[UnpairedExample], kl_pairs: bool = False,
               max_length: int | None = None) -> PackedBatch:
    """The rows :func:`aligner.data.collate.collate_batch` pads (pairs or unpaired completions, and with
    ``kl_pairs`` the mismatched rows, packed on their own), packed instead: the layout sequence parallelism
    shards (aligner/scoring/sequence_parallel.py)."""
    rows, labels, kl = batch_rows(examples, kl_pairs, max_length)
    return pack_rows(rows, **labels, mismatched=pack_rows(kl[0], **kl[1]) if kl else None)


def _range(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def pack_prefix_shared(examples: list[Example]) -> PrefixSharedBatch:
    """Pack B pairs as ``[prompt_i, chosen_i, rejected_i]`` back to back in one row (module doc).

    Per pair i at row offset s, with P, C, R tokens: the query segments are [s, s+P+C) and [s+P+C, s+P+C+R);
    their keys are the row positions [s, s+P+C) and [s, s+P) + [s+P+C, s+P+C+R). Chosen token t (t >= 0) is
    scored from position s+P+t-1; rejected token t from s+P-1 (t = 0: the last prompt token) or s+P+C+t-1.
    As in :func:`pack_pairs`, a sequence's very first token (empty prompt, t = 0) has no prefix and is not scored.
    """
    b = len(examples)
    tokens, positions, response = [], [], []
    seg_bounds, kv_index, kv_bounds = [0], [], [0]
    score_pos, targets, owner, prompt_lengths = [], [], [], []
    for i, ex in enumerate(examples):
        p, c, r = ex.prompt_ids, ex.chosen_ids, ex.rejected_ids
        s, P, C, R = len(tokens), len(p), len(c), len(r)
        tokens += p + c + r
        positions += _range(0, P + C) + _range(P, R)
        response += [False] * P + [True] * (C + R)
        seg_bounds += [s + P + C, s + P + C + R]
        kv_index += _range(s, P + C)
        kv_bounds.append(len(kv_index))
        kv_index += _range(s, P) + _range(s + P + C, R)
        kv_bounds.append(len(kv_index))
        first = 0 if P else 1  # with no prompt, a response's first token has nothing before it
        for t in range(first, C):
            score_pos.append(s + P + t - 1), targets.append(c[t]), owner.append(i)
        for t in range(first, R):
            score_pos.append(s + P - 1 if t == 0 else s + P + C + t - 1), targets.append(r[t]), owner.append(b + i)
        prompt_lengths.append(P)
    seg = torch.tensor(seg_bounds, dtype=torch.int32)
    kv = torch.tensor(kv_bounds, dtype=torch.int32)
    long = partial(torch.tensor, dtype=torch.long)
    return PrefixSharedBatch(
        input_ids=long(tokens)[None], position_ids=long(positions)[None], response_mask=torch.tensor(response)[None],
        cu_seqlens=seg, max_seqlen=int(seg.diff().max()), kv_index=long(kv_index), kv_cu_seqlens=kv,
        max_kv_seqlen=int(kv.diff().max()), positions=long(score_pos), targets=long(targets),
        owner=long(owner), prompt_lengths=long(prompt_lengths), ids=[ex.id for ex in examples], n_chosen=b,
        paired=True, row_index=[*range(b), *range(b)])


def make_collate(packing: bool, pad_token_id: int, kl_pairs: bool = False,
                 max_length: int | None = None, prefix_sharing: bool = False,
                 pack_all: bool = False) -> Callable[[list], Batch]:
    """The batch builder a run uses: :func:`pack_prefix_shared` (``train.prefix_sharing``), :func:`pack_pairs`
    (``train.packing``) or the padded ``collate_batch``, as the run's batch path decided (aligner/scoring/batch_path.py).

    Packing covers preference pairs; unpaired completions and batches that carry
    mismatched KL rows (``kl_pairs``, for kto) are padded, unless ``pack_all`` (sequence parallelism, which shards
    one packed row: :func:`pack_batch`).
    """
    padded = partial(collate_batch, pad_token_id=pad_token_id, kl_pairs=kl_pairs, max_length=max_length)
    if not packing:
        return padded
    rest = partial(pack_batch, kl_pairs=kl_pairs, max_length=max_length) if pack_all else padded  # unpaired, KL rows
    if kl_pairs:
        return rest
    pack = pack_prefix_shared if prefix_sharing else pack_pairs

    def collate(examples: list) -> Batch:
        return pack(examples) if not isinstance(examples[0], UnpairedExample) else rest(examples)

    return collate


def real_tokens(batch: Batch) -> int:
    """Non-padding tokens of a padded or packed (no padding at all) batch."""
    return batch.real_tokens()
