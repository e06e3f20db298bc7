"""The preference formats TRL reads, brought to one shape (prompt + responses) before tokenizing.

TRL 1.16's rules (``trl/data_utils.py``: ``is_conversational``, ``extract_prompt``,
``maybe_extract_prompt``), restated:

- A value is *conversational* when it is a list whose first item is a mapping
  with a ``role`` key; anything else (a string) is *standard*.
- **Explicit prompt**: a ``prompt`` of the same format as ``chosen`` (both
  strings, or both message lists) is used as given.
- **Implicit prompt**: with no ``prompt``, the prompt is the longest common
  prefix of ``chosen`` and ``rejected``, compared character by character for
  strings and message by message for lists. When the first difference follows
  a space, the space goes to the responses (``"The sky is| blue"``). When one
  response is a prefix of the other, TRL's loop stops one item short and the
  last common item goes to the responses; we keep that.
- **A prompt whose format differs from the responses'** (HuggingFaceH4/
  ultrafeedback_binarized: a ``prompt`` string, conversations that repeat it as
  their first user turn) is ignored and the prompt is extracted as above, as
  ``maybe_extract_prompt`` does, so the prompt is not counted twice.
- **Unpaired rows** (``prompt``, ``completion``, ``label``; KTO's format) take
  their prompt as given; there is no pair to extract it from.

``data.columns`` renames a dataset's own column names to these first.
Rows where no prompt can be found (no common prefix) raise :class:`RowError`.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

PAIRED_COLUMNS = ("prompt", "chosen", "rejected")
UNPAIRED_COLUMNS = ("prompt", "completion", "label")
#: Columns passed to the chat template with a conversational row (TRL's): ``tools`` and ``chat_template_kwargs``.
TEMPLATE_COLUMNS = ("tools", "chat_template_kwargs")
TARGET_COLUMNS = ("prompt", "chosen", "rejected", "completion", "label", "id", *TEMPLATE_COLUMNS)


class RowError(ValueError):
    """One row is wrong; ``column`` names the column, ``problem`` says what is wrong with it."""

    def __init__(self, column: str, problem: str):
        super().__init__(problem)
        self.column = column
        self.problem = problem


def is_conversational(value: Any) -> bool:
    """TRL's test: a list whose first item is a mapping with a ``role``."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def looks_like_messages(value: Any) -> bool:
    """A non-empty list of mappings: meant as chat messages, whether or not each has its ``role``."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def check_messages(column: str, value: Any) -> list[dict]:
    """The messages of a conversational column without their null keys (``datasets`` fills in the keys other rows'
    messages have); each is a mapping with a string ``role``, and a string ``content`` or, for a tool call,
    ``tool_calls`` and no content."""
    if not isinstance(value, list) or not value:
        raise RowError(column, "is an empty message list" if isinstance(value, list) else
                       f"must be a list of chat messages like the other columns, got {type(value).__name__}")
    out = []
    for i, msg in enumerate(value):
        msg = {k: v for k, v in msg.items() if v is not None} if isinstance(msg, dict) else msg
        calls = isinstance(msg, dict) and isinstance(msg.get("tool_calls"), list) and msg["tool_calls"]
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not (
                isinstance(msg.get("content"), str) or (calls and "content" not in msg)):
            needed = ("role",) if isinstance(msg, dict) and "tool_calls" in msg else ("role", "content")
            missing = [repr(k) for k in needed if isinstance(msg, dict) and k not in msg]
            lacks = f"has no {' and no '.join(missing)}; it" if missing else ""
            raise RowError(column, f"message {i} {lacks} must be a mapping with string 'role' and 'content' (or, for "
                                   f"a tool call, 'tool_calls' and no content), e.g. {{'role': 'user', 'content': "
                                   f"'...'}}, got {msg!r}".replace("  ", " "))
        out.append(msg)
    return out


def _messages(value: Any) -> bool:
    """Conversational, or an empty list (a message list with nothing in it, refused later with that reason)."""
    return is_conversational(value) or value == []


def column_mapping(columns: dict[str, str] | None, available: list[str], label: str) -> dict[str, str]:
    """Check ``data.columns`` (aligner name -> the dataset's column) against the dataset; returns source -> target."""
    from aligner.data.load import DataError

    rename: dict[str, str] = {}
    for target, source in (columns or {}).items():
        if target not in TARGET_COLUMNS:
            raise DataError(f"data.columns: unknown target '{target}'; the keys are the names aligner reads "
                            f"({', '.join(TARGET_COLUMNS)}) and the values the dataset's own column names")
        if not isinstance(source, str) or source not in available:
            raise DataError(f"data.columns.{target}: dataset {label} has no column {source!r}; "
                            f"it has {', '.join(available) or 'none'}")
        rename[source] = target
    return rename


def detect_paired(columns: list[str], label: str) -> bool:
    """True for paired data (``chosen``, ``rejected``, optional ``prompt``), False for unpaired
    (``prompt``, ``completion``, ``label``); anything else is refused with what the dataset has."""
    from aligner.data.load import DataError

    paired = "chosen" in columns and "rejected" in columns
    if paired or all(c in columns for c in UNPAIRED_COLUMNS):
        used = PAIRED_COLUMNS if paired else UNPAIRED_COLUMNS
        extra = [c for c in columns if c not in (*used, "id", *TEMPLATE_COLUMNS) and not c.startswith("_aligner")]
        if extra:
            log.warning("dataset %s: ignoring column(s) %s", label, ", ".join(extra))
        return paired
    missing = [c for c in ("chosen", "rejected") if c not in columns]
    if "completion" in columns or "label" in columns:
        missing = [c for c in UNPAIRED_COLUMNS if c not in columns]
    raise DataError(
        f"dataset {label} lacks column(s) {', '.join(missing)}; it has {', '.join(columns) or 'none'}. "
        f"Preference data needs chosen and rejected, with or without prompt (strings, or lists of chat messages); "
        f"unpaired data (for kto) needs prompt, completion and label (true/false). Map other names with "
        f"data.columns, e.g. {{prompt: question, chosen: response_j, rejected: response_k}}"
    )


def extract_prompt(chosen: str | list, rejected: str | list) -> tuple[str | list, str | list, str | list]:
    """The longest common prefix of ``chosen`` and ``rejected`` as the prompt (TRL's ``extract_prompt``)."""
    shortest = min(len(chosen), len(rejected))
    if shortest == 0:
        raise RowError("chosen", "is empty, so no prompt can be extracted from chosen and rejected")
    idx = shortest - 1  # TRL's loop variable when no item differs
    for i in range(shortest):
        if chosen[i] != rejected[i]:
            idx = i - 1 if i > 0 and chosen[i - 1] == " " else i
            break
    if idx <= 0:
        raise RowError("chosen", "shares no prefix with rejected, so there is no implicit prompt; give a prompt "
                                 "column (or map one with data.columns)")
    return chosen[:idx], chosen[idx:], rejected[idx:]


def paired_parts(row: dict) -> tuple[str | list, list[str | list]]:
    """(prompt, [chosen, rejected]) of a paired row, by TRL's explicit/implicit rules (module doc)."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    prompt = row.get("prompt")
    for column, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if looks_like_messages(value):  # a message without its role is not "a string": say what it lacks
            check_messages(column, value)
    if prompt is not None and _messages(prompt) == _messages(chosen):
        return prompt, [chosen, rejected]
    for column, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, (str, list)):
            raise RowError(column, f"must be a string or a list of chat messages, got {type(value).__name__}")
    if _messages(chosen) != _messages(rejected):
        raise RowError("rejected", "is not of the same format as chosen (one is a string, the other messages)")
    prompt, chosen, rejected = extract_prompt(chosen, rejected)
    return prompt, [chosen, rejected]


def unpaired_parts(row: dict) -> tuple[str | list, list[str | list], bool]:
    """(prompt, [completion], label) of an unpaired row; ``label`` must be a bool (true = desirable)."""
    label = row.get("label")
    if not isinstance(label, bool):
        got = "missing" if label is None else f"{label!r} ({type(label).__name__})"
        raise RowError("label", f"must be true (desirable) or false (undesirable), got {got}")
    for column in ("prompt", "completion"):
        if looks_like_messages(row.get(column)):
            check_messages(column, row.get(column))
    return row.get("prompt"), [row.get("completion")], label
