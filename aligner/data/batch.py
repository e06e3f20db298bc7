"""The batch types: what a micro-batch is, as data, so that no code tells one kind from another by dict keys.

Every batch holds N scored sequences, ordered ``[chosen/desirable..., rejected/undesirable...]``:

- :class:`PaddedBatch`: one row per sequence, right-padded, (N, T) with an attention mask;
- :class:`PackedBatch`: every sequence back to back in one row, (1, L), with restarting position ids and
  ``cu_seqlens`` (padding-free; aligner/data/packing.py);
- :class:`PrefixSharedBatch`: each pair as ``[prompt, chosen, rejected]`` in one row, the prompt computed once
  (``train.prefix_sharing``; aligner/data/packing.py, aligner/models/attention.py).

Either may be paired (B pairs, N = 2B) or unpaired (``paired`` False, the first ``n_chosen`` rows desirable),
and may carry ``mismatched``: KTO's mismatched prompt/completion rows, a batch of its own (``kl_pairs``,
aligner/data/collate.py; padded, or packed under sequence parallelism).

What differs between the kinds lives in their methods: the layout's forward arguments (:meth:`Batch.model_inputs`:
tokens, and positions or a mask; what the attention reads of the segments, :meth:`Batch.segments`, is added by
:func:`aligner.models.attention.model_inputs`), which sequence each token belongs to (:meth:`Batch.token_owner`),
and the real (non-padding) tokens, and which logits score which target (:meth:`Batch.score_index`). A new kind
(prefix-shared packing; LoRA's adapters on/off per forward) is a new subclass with those methods, and nothing else
changes (a new segment layout also tells the attention how to read it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields, replace

import torch


@dataclass(kw_only=True)
class Batch(ABC):
    """The fields every batch has. ``input_ids`` and ``response_mask`` (True on the tokens to score) share one shape.

    :param ids: the example ids: one per pair (paired), or one per row (unpaired).
    :param n_chosen: the first ``n_chosen`` sequences are chosen/desirable.
    :param row_index: each sequence's index into the examples the batch was built from.
    """

    input_ids: torch.Tensor
    response_mask: torch.Tensor
    ids: list[str]
    n_chosen: int
    row_index: list[int]
    paired: bool = True
    mismatched: Batch | None = None

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with its tensors on ``device`` (the mismatched part stays where it is)."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if torch.is_tensor(getattr(self, f.name))}
        return replace(self, **moved)

    @property
    @abstractmethod
    def n_sequences(self) -> int:
        """N, the sequences scored."""

    @abstractmethod
    def model_inputs(self) -> dict:
        """The forward keyword arguments of this batch's layout (tokens, and positions or a mask), for any model;
        :func:`aligner.models.attention.model_inputs` adds what the model's attention reads of :meth:`segments`."""

    def segments(self) -> Batch:
        """The batch whose sequence bounds the attention reads: this one (a sequence-parallel shard: its whole row)."""
        return self

    @abstractmethod
    def token_owner(self) -> torch.Tensor:
        """(M,): which sequence each scored target token (``response_mask[:, 1:]``) belongs to."""

    def score_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What is scored: (logit positions (M,) into the flattened (N*T) positions of ``input_ids``, target token
        ids (M,), owning sequence (M,)). Position t's logits score token t+1 wherever ``response_mask[:, 1:]`` holds."""
        n, t = self.input_ids.shape
        targets_mask = self.response_mask[:, 1:]  # (N, T-1)
        rows, cols = targets_mask.nonzero(as_tuple=True)  # (M,), row-major
        return rows * t + cols, self.input_ids[:, 1:][targets_mask], self.token_owner()

    @abstractmethod
    def sequence_lengths(self) -> torch.Tensor:
        """(N,) tokens each sequence's forward computes (for FLOP counts)."""

    @abstractmethod
    def real_tokens(self) -> int:
        """Tokens that are not padding."""

    @property
    def work_share(self) -> float:
        """The share of this batch's forward and backward work that this rank does (for FLOP counts): all of it,
        unless the batch is one rank's part of a sequence-parallel row (aligner/scoring/sequence_parallel.py)."""
        return 1.0

    def whole_sequences(self, summed: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence sums of the tokens this rank scored, (N,) each -> the whole sequences' sums: as they are,
        unless the batch is one rank's part of a sequence-parallel row (aligner/scoring/sequence_parallel.py)."""
        return summed, counts

    def extended(self, n_pad: int, pad_token_id: int) -> Batch:
        """The same batch with ``n_pad`` padding tokens appended to its row's last sequence (never scored; they
        attend only to what precedes them, so no real token's result changes), for row lengths a multiple of
        the sequence-parallel size (aligner/scoring/sequence_parallel.py). One-row (packed) batches only."""
        raise TypeError(f"a {type(self).__name__} has no single row to extend")


@dataclass(kw_only=True)
class PaddedBatch(Batch):
    """N rows of (prompt, response) right-padded to T: ``input_ids``, ``attention_mask``, ``response_mask`` (N, T)."""

    attention_mask: torch.Tensor

    @property
    def n_sequences(self) -> int:
        return self.input_ids.shape[0]

    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "use_cache": False}

    def token_owner(self) -> torch.Tensor:
        return self.response_mask[:, 1:].nonzero(as_tuple=True)[0]  # (M,) row of each target

    def sequence_lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(-1).long()

    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass(kw_only=True)
class PackedBatch(Batch):
    """N sequences in one row of L tokens: ``position_ids`` restart at 0 per sequence, ``sequence_ids`` name each
    token's sequence (1, L), ``cu_seqlens`` (N+1,) int32 and ``max_seqlen`` serve varlen attention kernels."""

    position_ids: torch.Tensor
    sequence_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    @property
    def n_sequences(self) -> int:
        return len(self.cu_seqlens) - 1

    def model_inputs(self) -> dict:
        """Restarting position ids and no mask (transformers then masks per sequence); a varlen kernel also gets
        ``cu_seqlens`` (aligner/models/attention.py)."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False}

    def token_owner(self) -> torch.Tensor:
        return self.sequence_ids[:, 1:][self.response_mask[:, 1:]]

    def sequence_lengths(self) -> torch.Tensor:
        return self.cu_seqlens.diff().long()

    def real_tokens(self) -> int:
        return int(self.input_ids.numel())

    def extended(self, n_pad: int, pad_token_id: int) -> PackedBatch:
        if n_pad == 0:
            return self
        row = _extend_row(self, n_pad, pad_token_id)
        cu = self.cu_seqlens.clone()
        cu[-1] += n_pad
        last = self.sequence_ids[:, -1:].expand(1, n_pad)
        return replace(self, **row, sequence_ids=torch.cat([self.sequence_ids, last], 1), cu_seqlens=cu,
                       max_seqlen=int(cu.diff().max()))


def _extend_row(batch: Batch, n_pad: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``position_ids`` (continuing the last sequence's) and ``response_mask`` (False) of a one-row
    batch with ``n_pad`` tokens appended."""
    pos = batch.position_ids[:, -1:] + torch.arange(1, n_pad + 1)  # (1, n_pad)
    return {"input_ids": torch.cat([batch.input_ids, batch.input_ids.new_full((1, n_pad), pad_token_id)], 1),
            "position_ids": torch.cat([batch.position_ids, pos], 1),
            "response_mask": torch.cat([batch.response_mask, batch.response_mask.new_zeros((1, n_pad))], 1)}


@dataclass(kw_only=True)
class PrefixSharedBatch(Batch):
    """B pairs in one row of L = Σ (P_i + C_i + R_i) tokens, each as ``[prompt, chosen, rejected]``: the prompt's
    hidden states are computed once and serve both responses (arXiv 2410.20305, "Accelerating Direct Preference
    Optimization with Prefix Sharing").

    - ``position_ids`` (1, L): the prompt and chosen count 0..P+C-1; the rejected tokens continue from the prompt's
      end, P..P+R-1, as if the chosen tokens were not there.
    - Attention, per pair, two query segments (``cu_seqlens`` (2B+1,) int32, row bounds): [prompt, chosen] attends
      causally to itself; [rejected] attends to [prompt K/V; rejected K/V], causal aligned bottom-right, never to
      chosen. ``kv_index`` (Lk,) lists each segment's key tokens (row positions) back to back, bounds
      ``kv_cu_seqlens`` (2B+1,). Every kernel takes the R rejected queries against their P + R keys as they are
      (:mod:`aligner.models.attention`).
    - Scoring (``positions``, ``targets``, ``owner``, each (M,)): the first rejected token is predicted by the LAST
      PROMPT token's logits, the same position that predicts the first chosen token, so scoring is an explicit
      list rather than ``response_mask[:, 1:]``. Owners are 0..B-1 (chosen), B..2B-1 (rejected).

    ``response_mask`` (1, L) marks the response tokens. Real tokens count the prompt once per sequence
    (prompt + chosen + prompt + rejected), as for the other kinds, so throughput compares across layouts.
    """

    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    kv_index: torch.Tensor
    kv_cu_seqlens: torch.Tensor
    max_kv_seqlen: int
    positions: torch.Tensor
    targets: torch.Tensor
    owner: torch.Tensor
    prompt_lengths: torch.Tensor

    @property
    def n_sequences(self) -> int:
        return 2 * len(self.prompt_lengths)

    def model_inputs(self) -> dict:
        """Positions and no mask; :mod:`aligner.models.attention` adds the segment bounds and gather indices it reads."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False}

    def token_owner(self) -> torch.Tensor:
        return self.owner

    def score_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.positions, self.targets, self.owner

    def sequence_lengths(self) -> torch.Tensor:
        """Computed tokens: P+C for a chosen sequence, R for a rejected one (its prompt is the chosen's)."""
        seg = self.cu_seqlens.diff().long()  # (2B,) [p0+c0, r0, p1+c1, r1, ...]
        return torch.cat([seg[0::2], seg[1::2]])

    def real_tokens(self) -> int:
        return int(self.input_ids.numel() + self.prompt_lengths.sum())

    def extended(self, n_pad: int, pad_token_id: int) -> PrefixSharedBatch:
        """The padding joins the last (rejected) segment as queries and as keys."""
        if n_pad == 0:
            return self
        length = self.input_ids.shape[1]
        cu, kv_cu = self.cu_seqlens.clone(), self.kv_cu_seqlens.clone()
        cu[-1] += n_pad
        kv_cu[-1] += n_pad
        return replace(self, **_extend_row(self, n_pad, pad_token_id), cu_seqlens=cu, max_seqlen=int(cu.diff().max()),
                       kv_index=torch.cat([self.kv_index, torch.arange(length, length + n_pad)]), kv_cu_seqlens=kv_cu,
                       max_kv_seqlen=int(kv_cu.diff().max()))
