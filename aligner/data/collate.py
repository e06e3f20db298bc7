"""Turn tokenized examples into one padded batch: the chosen (desirable) rows first, then the rejected (undesirable) ones.

Both halves go through each model in one forward pass (as TRL concatenates
them), so a micro-batch of B pairs is a tensor of 2B rows. A micro-batch of
unpaired completions is one row each, the desirable ones first.
"""

from __future__ import annotations

import torch

from aligner.data.batch import PaddedBatch
from aligner.data.tokenize import Example, UnpairedExample


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad (prompt ids, response ids) rows into ``input_ids``, ``attention_mask`` and
    ``response_mask`` of shape (N, T); ``response_mask`` marks the response tokens to score."""
    width = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (prompt, response) in enumerate(rows):
        n = len(prompt) + len(response)
        input_ids[i, :n] = torch.tensor(prompt + response)
        attention_mask[i, :n] = 1
        response_mask[i, len(prompt):n] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def collate_pairs(examples: list[Example], pad_token_id: int) -> PaddedBatch:
    """Pad ``[chosen_0..chosen_B-1, rejected_0..rejected_B-1]`` to the longest sequence (right padding).

    A :class:`PaddedBatch` with ``input_ids``, ``attention_mask`` and ``response_mask`` of shape (2B, T)
    (``response_mask`` marks the response tokens whose log-probs are scored), and ``ids`` (the B example ids).
    """
    return collate_batch(examples, pad_token_id)


def _rows(examples: list[Example] | list[UnpairedExample]) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """The (prompt, response) rows of a batch, chosen/desirable first, and each row's example index."""
    if examples and isinstance(examples[0], UnpairedExample):
        order = [i for i, ex in enumerate(examples) if ex.desirable] + [i for i, ex in enumerate(examples) if not ex.desirable]
        return [(examples[i].prompt_ids, examples[i].completion_ids) for i in order], order
    rows = [(ex.prompt_ids, getattr(ex, field)) for field in ("chosen_ids", "rejected_ids") for ex in examples]
    return rows, [*range(len(examples)), *range(len(examples))]


def example_order_rows(examples: list[Example] | list[UnpairedExample]) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """The (prompt, completion) rows in the examples' own (file) order, and each row's example index.

    Unpaired examples: one row each, in the order given (not desirable-first).
    Pairs: the chosen rows, then the rejected ones (the unpaired form of a
    preference batch, as TRL's ``unpair_preference_dataset`` lays it out).
    """
    if examples and isinstance(examples[0], UnpairedExample):
        return [(ex.prompt_ids, ex.completion_ids) for ex in examples], list(range(len(examples)))
    return _rows(examples)


def mismatched_rows(rows: list[tuple[list[int], list[int]]], max_length: int) -> list[tuple[list[int], list[int]]]:
    """Row k's prompt with row k-1's response (row 0 with the last row's), as TRL's KTOTrainer builds
    its KL batch; ``rows`` in example order (:func:`example_order_rows`). The response is cut so that
    prompt + response fits ``max_length``."""
    out = []
    for k, (prompt, _) in enumerate(rows):
        response = rows[k - 1][1]
        out.append((prompt, response[: max(1, max_length - len(prompt))]))
    return out


def collate_batch(examples: list[Example] | list[UnpairedExample], pad_token_id: int, kl_pairs: bool = False,
                  max_length: int | None = None) -> PaddedBatch:
    """Collate paired or unpaired examples for :func:`aligner.training.step.gather_inputs`.

    A :class:`PaddedBatch` of the tensors of :func:`pad_rows` over N rows (2B for B pairs),
    ``n_chosen`` (the first ``n_chosen`` rows are chosen/desirable), ``paired``,
    ``row_index`` (each row's index into ``examples``) and ``ids`` (the example
    ids: one per pair, or one per row for unpaired examples). With ``kl_pairs``,
    ``mismatched`` holds the padded mismatched rows of :func:`mismatched_rows`, built in
    example order; its ``row_index`` is the example index of each one's prompt.
    """
    rows, labels, kl = batch_rows(examples, kl_pairs, max_length)
    mismatched = PaddedBatch(**pad_rows(kl[0], pad_token_id), **kl[1]) if kl else None
    return PaddedBatch(**pad_rows(rows, pad_token_id), **labels, mismatched=mismatched)


def batch_rows(examples: list[Example] | list[UnpairedExample], kl_pairs: bool = False, max_length: int | None = None
               ) -> tuple[list[tuple[list[int], list[int]]], dict, tuple[list, dict] | None]:
    """What a batch of ``examples`` holds, whatever its layout (padded here, packed in aligner/data/packing.py):
    its (prompt, response) rows, chosen/desirable first; their labels (``n_chosen``, ``paired``, ``row_index``,
    ``ids``); and with ``kl_pairs`` the mismatched rows and their labels (see :func:`collate_batch`)."""
    rows, row_index = _rows(examples)
    paired = not isinstance(examples[0], UnpairedExample)
    labels = {"n_chosen": len(examples) if paired else sum(ex.desirable for ex in examples), "paired": paired,
              "row_index": row_index, "ids": [ex.id for ex in examples] if paired else [examples[i].id for i in row_index]}
    if not kl_pairs:
        return rows, labels, None
    limit = max_length or max(len(p) + len(r) for p, r in rows)
    ordered, kl_index = example_order_rows(examples)
    return rows, labels, (mismatched_rows(ordered, limit), {**labels, "row_index": kl_index})
