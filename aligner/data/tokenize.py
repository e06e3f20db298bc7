"""Validate preference rows and tokenize them the way TRL does, so the same file gives the same tokens.

- String rows: ``prompt`` is tokenized with the tokenizer's own special tokens
  (a BOS where the tokenizer adds one), each response without them, then EOS.
  No chat template.
- Conversational rows (lists of ``{"role", "content"}`` messages): the prompt
  goes through the chat template with the generation prompt; each response is
  the text the template adds after it, then EOS unless the template ends with it.
- Truncation: the prompt is cut from the left to ``max_prompt_length`` (if set),
  then the responses from the right so that prompt + response fits
  ``max_length``. A row whose prompt leaves no room for a response cannot fit.

Bad rows raise :class:`DataError` naming the dataset, row and column, or, with
``data.on_bad_row: skip``, are dropped and counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from aligner.data.load import DataError

log = logging.getLogger(__name__)

PAIRED_COLUMNS = ("prompt", "chosen", "rejected")
OPTIONAL_COLUMNS = ("id",)


@dataclass
class Example:
    """One tokenized preference pair."""

    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


class RowError(ValueError):
    def __init__(self, column: str, problem: str):
        super().__init__(problem)
        self.column = column
        self.problem = problem


def check_columns(columns: list[str], label: str) -> None:
    """Refuse a dataset without the paired columns; warn about columns that are ignored."""
    missing = [c for c in PAIRED_COLUMNS if c not in columns]
    if missing:
        raise DataError(
            f"dataset {label} lacks column(s) {', '.join(missing)}; it has {', '.join(columns) or 'none'}. "
            f"Preference data needs prompt, chosen and rejected (strings, or lists of chat messages)"
        )
    extra = [c for c in columns if c not in PAIRED_COLUMNS + OPTIONAL_COLUMNS]
    if extra:
        log.warning("dataset %s: ignoring column(s) %s", label, ", ".join(extra))


def _is_messages(value: Any) -> bool:
    return isinstance(value, list)


def _check_messages(column: str, value: list) -> None:
    if not value:
        raise RowError(column, "is an empty message list")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise RowError(column, f"message {i} must be a mapping with string 'role' and 'content', got {msg!r}")


def _texts(row: dict, tokenizer: Any) -> tuple[str, str, str, bool]:
    """Return (prompt text, chosen text, rejected text, prompt_has_special_tokens) for a row."""
    prompt, chosen, rejected = (row.get(c) for c in PAIRED_COLUMNS)
    if all(_is_messages(v) for v in (prompt, chosen, rejected)):
        for column, value in zip(PAIRED_COLUMNS, (prompt, chosen, rejected)):
            _check_messages(column, value)
        if not getattr(tokenizer, "chat_template", None):
            raise RowError(
                "prompt",
                "is a chat conversation but the model's tokenizer has no chat template; give string rows, "
                "or a tokenizer with a chat_template in its tokenizer_config.json",
            )
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        responses = []
        for column, value in (("chosen", chosen), ("rejected", rejected)):
            full = tokenizer.apply_chat_template(prompt + value, tokenize=False)
            if not full.startswith(prompt_text):
                raise RowError(column, "the chat template does not render the prompt as a prefix of prompt+response")
            responses.append(full[len(prompt_text):])
        return prompt_text, responses[0], responses[1], True
    for column, value in zip(PAIRED_COLUMNS, (prompt, chosen, rejected)):
        if not isinstance(value, str):
            kinds = {c: type(v).__name__ for c, v in zip(PAIRED_COLUMNS, (prompt, chosen, rejected))}
            raise RowError(column, f"must be a string (or all three columns message lists), got {kinds}")
    return prompt, chosen, rejected, False


def tokenize_row(row: dict, tokenizer: Any, max_length: int, max_prompt_length: int | None) -> tuple[list[int], list[int], list[int], bool]:
    """Tokenize one paired row; returns prompt, chosen and rejected ids and whether it was truncated."""
    prompt, chosen, rejected, templated = _texts(row, tokenizer)
    for column, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise RowError(column, "is an empty response")
    if chosen == rejected:
        raise RowError("rejected", "is identical to chosen; a preference pair needs two different responses")
    prompt_ids = tokenizer(prompt, add_special_tokens=not templated)["input_ids"]
    eos = tokenizer.eos_token_id
    responses = []
    for text in (chosen, rejected):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        responses.append(ids)
    truncated = False
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids, truncated = prompt_ids[-max_prompt_length:], True
    room = max_length - len(prompt_ids)
    if room < 1:
        raise RowError(
            "prompt",
            f"has {len(prompt_ids)} tokens, which leaves no room for a response within data.max_length={max_length}; "
            f"raise data.max_length or set data.max_prompt_length to truncate prompts from the left",
        )
    if any(len(r) > room for r in responses):
        truncated = True
    return prompt_ids, responses[0][:room], responses[1][:room], truncated


def tokenize_dataset(rows: Any, tokenizer: Any, max_length: int, max_prompt_length: int | None,
                     on_bad_row: str, label: str) -> list[Example]:
    """Validate and tokenize every row of a paired dataset (``datasets.Dataset`` or list of dicts)."""
    columns = list(rows.column_names) if hasattr(rows, "column_names") else list(dict.fromkeys(k for r in rows for k in r))
    check_columns(columns, label)
    examples: list[Example] = []
    skipped: Counter[str] = Counter()
    seen_ids: dict[str, int] = {}
    n_truncated = 0
    for index, row in enumerate(rows):
        try:
            example_id = str(row["id"]) if row.get("id") is not None else str(index)
            if example_id in seen_ids:
                raise RowError("id", f"repeats the id {example_id!r} of row {seen_ids[example_id]}; ids must be unique")
            p, c, r, truncated = tokenize_row(row, tokenizer, max_length, max_prompt_length)
        except RowError as exc:
            if on_bad_row == "skip":
                skipped[f"column '{exc.column}' {exc.problem.split(';')[0]}"] += 1
                continue
            raise DataError(
                f"dataset {label}, row {index}, column '{exc.column}': {exc.problem}. "
                f"Fix the row, or set data.on_bad_row: skip to drop bad rows"
            ) from None
        seen_ids[example_id] = index
        n_truncated += truncated
        examples.append(Example(example_id, p, c, r))
    if skipped:
        log.warning("dataset %s: skipped %d bad row(s): %s", label, sum(skipped.values()),
                    "; ".join(f"{n}x {why}" for why, n in skipped.most_common()))
    if n_truncated:
        log.info("dataset %s: truncated %d of %d rows to data.max_length=%d", label, n_truncated, len(examples), max_length)
    if not examples:
        raise DataError(f"dataset {label} has no usable rows ({sum(skipped.values())} skipped as bad); see the warnings above")
    return examples
