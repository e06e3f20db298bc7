"""Validate preference rows and tokenize them as TRL 1.16 does, so the same row gives the same token ids.

The rows are first brought to prompt + responses by TRL's format rules
(:mod:`aligner.data.formats`: explicit or implicit prompt, strings or messages).
Then, as ``DPOTrainer._prepare_dataset`` / ``KTOTrainer._prepare_dataset`` do:

- **String rows**: each response gets the EOS *text* appended unless it
  already ends with it. ``prompt`` and ``prompt + response`` are tokenized as
  plain text, with the tokenizer's own special tokens (a BOS where it adds one).
- **Conversational rows**: ``prompt`` is rendered by the chat template with the
  generation prompt, ``prompt + response`` without it; both are tokenized with
  no special tokens added (``apply_chat_template(tokenize=True)`` does the same).
  No EOS is added: the response is exactly what the template writes after the
  prompt (for Qwen's template that ends ``<|im_end|>\\n``; for a template whose
  turns carry no EOS, no EOS at all).
- The prompt ids are the tokens the prompt and *both* prompt+response sequences
  share (TRL's ``common_prefix_length``); each response is the rest of its
  sequence. A template or a merge across the boundary that changes the end of
  the prompt thus moves those tokens out of the prompt, as in TRL.
- **Tool calling** (TRL's ``tools`` column): a conversational row's ``tools`` (a list of JSON schemas, or
  that list as a JSON string) goes to the chat template as ``tools=``, for the prompt and for each
  prompt+response, as do ``data.chat_template_kwargs`` and the row's own ``chat_template_kwargs`` (a
  mapping; the row's keys win), e.g. ``enable_thinking``. A message may carry ``tool_calls`` instead of
  ``content``. Keys whose value is null are dropped from messages and from tools given as a list: a
  ``datasets`` column of mappings fills the keys a row lacks with null, which a template would render.
  Store tools as a JSON string to keep them exactly as written. A plain-text row with ``tools`` is
  refused: only the chat template renders tools.
- Truncation: the prompt is cut from the left to ``max_prompt_length`` (if
  set), then the responses from the right so that prompt + response fits
  ``max_length`` (TRL's ``keep_start`` when no prompt limit is set). A row whose
  prompt leaves no room for a response cannot fit (TRL drops it silently; we
  report it, or skip it with ``data.on_bad_row: skip``).

Texts are tokenized in batches (one call to the fast tokenizer for many rows).
Bad rows raise :class:`DataError` naming the dataset, row (counted from 0) and
column, or, with ``data.on_bad_row: skip``, are dropped and counted.
"""

from __future__ import annotations

import logging
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from aligner.data.formats import RowError, check_messages, detect_paired, is_conversational, paired_parts, unpaired_parts
from aligner.data.load import DataError

log = logging.getLogger(__name__)

#: Rows per batched call to the tokenizer.
BATCH_ROWS = 1000


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


@dataclass
class Encoded:
    """One row's ids before it becomes an example."""

    prompt_ids: list[int]
    responses: list[list[int]]
    label: bool | None
    truncated: bool


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def template_arguments(row: dict, template_kwargs: dict | None) -> dict[str, Any]:
    """The chat template's extra arguments for a row: ``data.chat_template_kwargs``, the row's own
    ``chat_template_kwargs`` over them, and its ``tools`` (module doc)."""
    own = row.get("chat_template_kwargs")
    if isinstance(own, str):
        try:
            own = json.loads(own)
        except json.JSONDecodeError as exc:
            raise RowError("chat_template_kwargs", f"is not valid JSON ({exc.msg} at character {exc.pos})") from None
    if own is not None and not isinstance(own, dict):
        raise RowError("chat_template_kwargs", f"must be a mapping of template arguments, got {type(own).__name__}")
    out = {**(template_kwargs or {}), **_drop_nulls(own or {})}
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise RowError("tools", f"is not valid JSON ({exc.msg} at character {exc.pos}); give a list of tool "
                                    f"JSON schemas, or that list as a JSON string") from None
    elif tools is not None:
        tools = _drop_nulls(tools)
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise RowError("tools", f"must be a list of tool JSON schemas (mappings), got {tools!r:.200}")
        out["tools"] = tools
    return out


def render_row(row: dict, tokenizer: Any, paired: bool,
               template_kwargs: dict | None = None) -> tuple[str, list[str], bool, bool | None]:
    """(prompt text, prompt+response texts, templated, label) of one row, by TRL's rules (module doc)."""
    if paired:
        prompt, responses = paired_parts(row)
        label, names = None, ("chosen", "rejected")
        if responses[0] == responses[1]:
            raise RowError("rejected", "is identical to chosen; a preference pair needs two different responses")
    else:
        prompt, responses, label = unpaired_parts(row)
        names = ("completion",)
    if is_conversational(prompt):
        prompt, *responses = [check_messages(c, v) for c, v in zip(("prompt", *names), (prompt, *responses))]
        if not getattr(tokenizer, "chat_template", None):
            raise RowError("prompt", "is a chat conversation but the model's tokenizer has no chat template; give "
                                     "string rows, set model.chat_template, or use a tokenizer with a chat_template")
        extra = template_arguments(row, template_kwargs)
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **extra)
        fulls = [tokenizer.apply_chat_template(prompt + r, tokenize=False, **extra) for r in responses]
        return prompt_text, fulls, True, label
    if row.get("tools") is not None:
        raise RowError("tools", "is given but the row is plain text: tools reach the model only through the chat "
                                "template; give prompt and responses as chat messages, or drop the tools column")
    for column, value in zip(("prompt", *names), (prompt, *responses)):
        if not isinstance(value, str):
            kinds = {c: type(v).__name__ for c, v in zip(("prompt", *names), (prompt, *responses))}
            raise RowError(column, f"must be a string (or all columns message lists), got {kinds}")
    eos = tokenizer.eos_token or ""
    for column, text in zip(names, responses):
        if not text.strip() or text == eos:
            raise RowError(column, "is an empty response")
    return prompt, [prompt + (r if r.endswith(eos) else r + eos) for r in responses], False, label


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_ids(prompt_ids: list[int], full_ids: list[list[int]], names: tuple[str, ...], max_length: int,
              max_prompt_length: int | None) -> tuple[list[int], list[list[int]], bool]:
    """Prompt = the prefix every sequence shares; responses = the rest; then truncation (module doc)."""
    cut = min(_common_prefix(prompt_ids, f) for f in full_ids)
    prompt, responses = prompt_ids[:cut], [f[cut:] for f in full_ids]
    for column, ids in zip(names, responses):
        if not ids:
            raise RowError(column, "is empty once the prompt is removed (the template writes nothing after the prompt)")
    truncated = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt, truncated = prompt[-max_prompt_length:], True
    room = max_length - len(prompt)
    if room < 1:
        raise RowError(
            "prompt",
            f"has {len(prompt)} tokens, which leaves no room for a response within data.max_length={max_length}; "
            f"raise data.max_length or set data.max_prompt_length to truncate prompts from the left",
        )
    truncated = truncated or any(len(r) > room for r in responses)
    return prompt, [r[:room] for r in responses], truncated


def encode_rows(rows: list[dict], tokenizer: Any, paired: bool, max_length: int, max_prompt_length: int | None,
                template_kwargs: dict | None = None) -> list[Encoded | RowError]:
    """Encode many rows with two batched tokenizer calls (plain text with special tokens, templated without);
    ``template_kwargs``: ``data.chat_template_kwargs``."""
    names = ("chosen", "rejected") if paired else ("completion",)
    rendered: list[tuple[str, list[str], bool, bool | None] | RowError] = []
    for row in rows:
        try:
            rendered.append(render_row(row, tokenizer, paired, template_kwargs))
        except RowError as exc:
            rendered.append(exc)
    ids: dict[bool, list[list[int]]] = {}
    for templated in (False, True):
        texts = [t for r in rendered if not isinstance(r, RowError) and r[2] == templated for t in (r[0], *r[1])]
        ids[templated] = tokenizer(texts, add_special_tokens=not templated)["input_ids"] if texts else []
    cursor = {False: 0, True: 0}
    out: list[Encoded | RowError] = []
    for r in rendered:
        if isinstance(r, RowError):
            out.append(r)
            continue
        _, fulls, templated, label = r
        start, cursor[templated] = cursor[templated], cursor[templated] + 1 + len(fulls)
        seqs = ids[templated][start:cursor[templated]]
        try:
            prompt, responses, truncated = split_ids(seqs[0], seqs[1:], names, max_length, max_prompt_length)
            out.append(Encoded(prompt, responses, label, truncated))
        except RowError as exc:
            out.append(exc)
    return out


def row_ids(raw_ids: list[Any] | None, n: int) -> list[str]:
    """The ``id`` column as strings, or the row numbers (from 0) where there is none."""
    return [str(v) if v is not None else str(i) for i, v in enumerate(raw_ids or [None] * n)]


def bad_row(label: str, index: int | str, column: str, problem: str) -> DataError:
    return DataError(f"dataset {label}, row {index}, column '{column}': {problem}. "
                     f"Fix the row, or set data.on_bad_row: skip to drop bad rows")


def check_ids(ids: list[str], keep: list[bool], label: str, on_bad_row: str) -> None:
    """Refuse (or, with skip, drop) a row whose id repeats an earlier kept row's."""
    seen: dict[str, int] = {}
    for index, (example_id, ok) in enumerate(zip(ids, keep)):
        if not ok:
            continue
        if example_id in seen:
            if on_bad_row == "skip":
                keep[index] = False
                continue
            raise bad_row(label, index, "id", f"repeats the id {example_id!r} of row {seen[example_id]}; ids must be unique")
        seen[example_id] = index


def report(label: str, skipped: Counter, n_truncated: int, n_kept: int, max_length: int) -> None:
    """Log what was skipped and truncated; refuse a dataset with no usable row."""
    if skipped:
        log.warning("dataset %s: skipped %d bad row(s): %s", label, sum(skipped.values()),
                    "; ".join(f"{n}x {why}" for why, n in skipped.most_common()))
    if n_truncated:
        log.info("dataset %s: truncated %d of %d rows to data.max_length=%d", label, n_truncated, n_kept, max_length)
    if not n_kept:
        raise DataError(f"dataset {label} has no usable rows ({sum(skipped.values())} skipped as bad); see the warnings above")


def tokenize_row(row: dict, tokenizer: Any, max_length: int, max_prompt_length: int | None,
                 template_kwargs: dict | None = None) -> tuple[list[int], list[int], list[int], bool]:
    """Tokenize one paired row; returns prompt, chosen and rejected ids and whether it was truncated."""
    (result,) = encode_rows([row], tokenizer, True, max_length, max_prompt_length, template_kwargs)
    if isinstance(result, RowError):
        raise result
    return result.prompt_ids, result.responses[0], result.responses[1], result.truncated


def tokenize_unpaired_row(row: dict, tokenizer: Any, max_length: int, max_prompt_length: int | None) -> tuple[list[int], list[int], bool, bool]:
    """Tokenize one unpaired row; returns prompt and completion ids, the label and whether it was truncated."""
    (result,) = encode_rows([row], tokenizer, False, max_length, max_prompt_length)
    if isinstance(result, RowError):
        raise result
    return result.prompt_ids, result.responses[0], bool(result.label), result.truncated


def tokenize_dataset(rows: Any, tokenizer: Any, max_length: int, max_prompt_length: int | None,
                     on_bad_row: str, label: str, template_kwargs: dict | None = None) -> list[Example] | list[UnpairedExample]:
    """Validate and tokenize every row in memory (a ``datasets.Dataset`` or a list of dicts).

    Training runs go through :func:`aligner.data.prepare.prepare_data` instead (parallel, cached); this is
    the same encoding, for small sets and tests.
    """
    rows = rows.to_list() if hasattr(rows, "to_list") else list(rows)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    paired = detect_paired(columns, label)
    encoded: list[Encoded | RowError] = []
    for start in range(0, len(rows), BATCH_ROWS):
        encoded += encode_rows(rows[start:start + BATCH_ROWS], tokenizer, paired, max_length, max_prompt_length,
                               template_kwargs)
    ids = row_ids([r.get("id") for r in rows] if "id" in columns else None, len(rows))
    keep, skipped = keep_rows(encoded, label, on_bad_row)
    check_ids(ids, keep, label, on_bad_row)
    examples = [Example(i, e.prompt_ids, *e.responses) if paired else UnpairedExample(i, e.prompt_ids, e.responses[0], e.label)
                for i, e, ok in zip(ids, encoded, keep) if ok]
    report(label, skipped, sum(e.truncated for e, ok in zip(encoded, keep) if ok), len(examples), max_length)
    return examples


def keep_rows(encoded: list[Encoded | RowError], label: str, on_bad_row: str, first_index: int = 0) -> tuple[list[bool], Counter]:
    """Which rows are usable; the first bad one raises unless ``on_bad_row`` is ``skip`` (then counted by reason)."""
    keep, skipped = [], Counter()
    for index, e in enumerate(encoded, start=first_index):
        if isinstance(e, RowError):
            if on_bad_row != "skip":
                raise bad_row(label, index, e.column, e.problem)
            skipped[f"column '{e.column}' {e.problem.split(';')[0]}"] += 1
        keep.append(not isinstance(e, RowError))
    return keep, skipped
