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

Unpaired rows (``prompt``, ``completion``, ``label``; KTO's format, as TRL
reads it) are tokenized the same way, one response each; ``label`` must be a
bool (true = desirable). A dataset is unpaired when it has ``completion`` and
``label`` columns and no ``chosen``/``rejected``.

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
UNPAIRED_COLUMNS = ("prompt", "completion", "label")
OPTIONAL_COLUMNS = ("id",)


@dataclass
class Example:
    """One tokenized preference pair."""

    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass
class UnpairedExample:
    """One tokenized unpaired completion with its label (True = desirable)."""

    id: str
    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool


class RowError(ValueError):
    def __init__(self, column: str, problem: str):
        super().__init__(problem)
        self.column = column
        self.problem = problem


def check_columns(columns: list[str], label: str) -> bool:
    """Refuse a dataset that is neither paired nor unpaired; warn about ignored columns.

    Returns True for paired data (``prompt``, ``chosen``, ``rejected``), False
    for unpaired data (``prompt``, ``completion``, ``label``).
    """
    paired = not ("completion" in columns and "label" in columns and "chosen" not in columns and "rejected" not in columns)
    expected = PAIRED_COLUMNS if paired else UNPAIRED_COLUMNS
    missing = [c for c in expected if c not in columns]
    if missing:
        raise DataError(
            f"dataset {label} lacks column(s) {', '.join(missing)}; it has {', '.join(columns) or 'none'}. "
            f"Preference data needs prompt, chosen and rejected (strings, or lists of chat messages); "
            f"unpaired data (for kto) needs prompt, completion and label (true/false)"
        )
    extra = [c for c in columns if c not in expected + OPTIONAL_COLUMNS]
    if extra:
        log.warning("dataset %s: ignoring column(s) %s", label, ", ".join(extra))
    return paired


def _is_messages(value: Any) -> bool:
    return isinstance(value, list)


def _check_messages(column: str, value: list) -> None:
    if not value:
        raise RowError(column, "is an empty message list")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise RowError(column, f"message {i} must be a mapping with string 'role' and 'content', got {msg!r}")


def _texts(row: dict, tokenizer: Any, columns: tuple[str, ...] = PAIRED_COLUMNS) -> tuple[str, list[str], bool]:
    """Return (prompt text, response texts, prompt_has_special_tokens) for a row.

    ``columns`` is the prompt column followed by the response columns.
    """
    values = [row.get(c) for c in columns]
    prompt, responses = values[0], values[1:]
    if all(_is_messages(v) for v in values):
        for column, value in zip(columns, values):
            _check_messages(column, value)
        if not getattr(tokenizer, "chat_template", None):
            raise RowError(
                "prompt",
                "is a chat conversation but the model's tokenizer has no chat template; give string rows, "
                "or a tokenizer with a chat_template in its tokenizer_config.json",
            )
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        texts = []
        for column, value in zip(columns[1:], responses):
            full = tokenizer.apply_chat_template(prompt + value, tokenize=False)
            if not full.startswith(prompt_text):
                raise RowError(column, "the chat template does not render the prompt as a prefix of prompt+response")
            texts.append(full[len(prompt_text):])
        return prompt_text, texts, True
    for column, value in zip(columns, values):
        if not isinstance(value, str):
            kinds = {c: type(v).__name__ for c, v in zip(columns, values)}
            raise RowError(column, f"must be a string (or all {len(columns)} columns message lists), got {kinds}")
    return prompt, list(responses), False


def _tokenize(prompt: str, responses: list[str], columns: tuple[str, ...], templated: bool, tokenizer: Any,
              max_length: int, max_prompt_length: int | None) -> tuple[list[int], list[list[int]], bool]:
    """Tokenize a prompt and its responses (each + EOS), truncated; returns the ids and whether anything was cut."""
    for column, text in zip(columns, responses):
        if not text.strip():
            raise RowError(column, "is an empty response")
    prompt_ids = tokenizer(prompt, add_special_tokens=not templated)["input_ids"]
    eos = tokenizer.eos_token_id
    response_ids = []
    for text in responses:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        response_ids.append(ids)
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
    if any(len(r) > room for r in response_ids):
        truncated = True
    return prompt_ids, [r[:room] for r in response_ids], truncated


def tokenize_row(row: dict, tokenizer: Any, max_length: int, max_prompt_length: int | None) -> tuple[list[int], list[int], list[int], bool]:
    """Tokenize one paired row; returns prompt, chosen and rejected ids and whether it was truncated."""
    prompt, (chosen, rejected), templated = _texts(row, tokenizer)
    if chosen == rejected and chosen.strip():
        raise RowError("rejected", "is identical to chosen; a preference pair needs two different responses")
    prompt_ids, (c, r), truncated = _tokenize(prompt, [chosen, rejected], PAIRED_COLUMNS[1:], templated, tokenizer,
                                              max_length, max_prompt_length)
    return prompt_ids, c, r, truncated


def tokenize_unpaired_row(row: dict, tokenizer: Any, max_length: int, max_prompt_length: int | None) -> tuple[list[int], list[int], bool, bool]:
    """Tokenize one unpaired row; returns prompt and completion ids, the label and whether it was truncated."""
    label = row.get("label")
    if not isinstance(label, bool):
        got = "missing" if label is None else f"{label!r} ({type(label).__name__})"
        raise RowError("label", f"must be true (desirable) or false (undesirable), got {got}")
    prompt, (completion,), templated = _texts(row, tokenizer, UNPAIRED_COLUMNS[:2])
    prompt_ids, (completion_ids,), truncated = _tokenize(prompt, [completion], ("completion",), templated, tokenizer,
                                                         max_length, max_prompt_length)
    return prompt_ids, completion_ids, label, truncated


def tokenize_dataset(rows: Any, tokenizer: Any, max_length: int, max_prompt_length: int | None,
                     on_bad_row: str, label: str) -> list[Example] | list[UnpairedExample]:
    """Validate and tokenize every row of a paired or unpaired dataset (``datasets.Dataset`` or list of dicts)."""
    columns = list(rows.column_names) if hasattr(rows, "column_names") else list(dict.fromkeys(k for r in rows for k in r))
    paired = check_columns(columns, label)
    examples: list[Example] | list[UnpairedExample] = []
    skipped: Counter[str] = Counter()
    seen_ids: dict[str, int] = {}
    n_truncated = 0
    for index, row in enumerate(rows):
        try:
            example_id = str(row["id"]) if row.get("id") is not None else str(index)
            if example_id in seen_ids:
                raise RowError("id", f"repeats the id {example_id!r} of row {seen_ids[example_id]}; ids must be unique")
            if paired:
                p, c, r, truncated = tokenize_row(row, tokenizer, max_length, max_prompt_length)
                example = Example(example_id, p, c, r)
            else:
                p, c, desirable, truncated = tokenize_unpaired_row(row, tokenizer, max_length, max_prompt_length)
                example = UnpairedExample(example_id, p, c, desirable)
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
        examples.append(example)
    if skipped:
        log.warning("dataset %s: skipped %d bad row(s): %s", label, sum(skipped.values()),
                    "; ".join(f"{n}x {why}" for why, n in skipped.most_common()))
    if n_truncated:
        log.info("dataset %s: truncated %d of %d rows to data.max_length=%d", label, n_truncated, len(examples), max_length)
    if not examples:
        raise DataError(f"dataset {label} has no usable rows ({sum(skipped.values())} skipped as bad); see the warnings above")
    return examples
