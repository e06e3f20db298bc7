"""Every preference format TRL 1.16 reads gives TRL 1.16's token ids (aligner/data/formats.py, tokenize.py).

The expected ids are written out by hand. The embedded tokenizer is byte-level with no merges: ids 0-2 are
<pad>, <s>, </s>, then the 256 byte symbols in code-point order. Printable ASCII '!'..'~' are the first 94
symbols, so id(c) = 3 + (ord(c) - 33) = ord(c) - 30 ('a' = 67, 'b' = 68, 'c' = 69, 'd' = 70, 'x' = 90).
Space is the symbol 'Ġ' (U+0120, rank 220: after the 188 printable symbols, byte 32 of the unprintable ones)
= 223, and newline 'Ċ' (U+010A, rank 198) = 201. The embedded chat template renders each message as
``<|role|>content\\n`` and the generation prompt as ``<|assistant|>``.

What TRL 1.16 does with such rows (``DPOTrainer._prepare_dataset``): string responses get the EOS text
appended, conversational ones nothing; the response is what prompt+response adds to the prompt.
"""

import copy

import pytest

from aligner.data import DataError, tokenize_dataset
from aligner.data.tokenize import tokenize_row, tokenize_unpaired_row

SP, NL, EOS, BOS = 223, 201, 2, 1


def ids(text: str) -> list[int]:
    """The hand rule above, for printable ASCII, space and newline."""
    return [SP if c == " " else NL if c == "\n" else ord(c) - 30 for c in text]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_the_hand_rule_matches_the_tokenizer(tiny_tokenizer):
    assert ids("ab c\n") == [67, 68, 223, 69, 201]
    assert tiny_tokenizer("ab c\n", add_special_tokens=False)["input_ids"] == [67, 68, 223, 69, 201]


# prompt "ab", responses " c" / " d": string rows are prompt, then response, then EOS.
STRING_IDS = ([67, 68], [SP, 69, EOS], [SP, 70, EOS])
# One user turn "a", assistant answers "b" / "c": prompt = "<|user|>a\n<|assistant|>", response "b\n", no EOS.
CHAT_PROMPT = ids("<|user|>a\n<|assistant|>")
CHAT_IDS = (CHAT_PROMPT, [68, NL], [69, NL])


@pytest.mark.parametrize("row, expected", [
    ({"prompt": "ab", "chosen": " c", "rejected": " d"}, STRING_IDS),  # explicit prompt, strings
    # implicit: the first difference is at 3, after a space, so the space goes to the responses (TRL)
    ({"chosen": "ab c", "rejected": "ab d"}, STRING_IDS),
    # implicit, one response a prefix of the other: TRL's loop stops one short: prompt "a", "b" / "bx"
    ({"chosen": "ab", "rejected": "abx"}, ([67], [68, EOS], [68, 90, EOS])),
    ({"prompt": [user("a")], "chosen": [assistant("b")], "rejected": [assistant("c")]}, CHAT_IDS),  # explicit, messages
    ({"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("c")]}, CHAT_IDS),  # implicit, messages
    # HuggingFaceH4/ultrafeedback_binarized: a string prompt repeated inside the conversations -> implicit
    ({"prompt": "a", "chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("c")]}, CHAT_IDS),
], ids=["explicit-strings", "implicit-strings", "implicit-prefix", "explicit-messages", "implicit-messages",
        "prompt-format-differs"])
def test_each_paired_format_gives_trls_ids(tiny_tokenizer, row, expected):
    p, c, r, truncated = tokenize_row(row, tiny_tokenizer, 64, None)
    assert (p, c, r) == expected and not truncated


def test_a_response_already_ending_in_eos_gets_no_second_one(tiny_tokenizer):
    p, c, r, _ = tokenize_row({"prompt": "ab", "chosen": " c</s>", "rejected": " d"}, tiny_tokenizer, 64, None)
    assert c == [SP, 69, EOS] and r == [SP, 70, EOS]


def test_a_tokenizer_that_adds_bos_puts_it_once_at_the_start_of_the_prompt(tiny_tokenizer):
    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tiny_tokenizer)
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    # TRL tokenizes prompt and prompt+response each with special tokens; the shared prefix holds the BOS
    assert tokenize_row({"prompt": "ab", "chosen": " c", "rejected": " d"}, tok, 64, None)[:3] == \
        ([BOS, 67, 68], [SP, 69, EOS], [SP, 70, EOS])
    # conversational: the template's text is tokenized with no special tokens added (apply_chat_template)
    assert tokenize_row({"prompt": [user("a")], "chosen": [assistant("b")], "rejected": [assistant("c")]},
                        tok, 64, None)[:3] == CHAT_IDS


def test_a_template_with_text_after_its_end_of_turn_token_gets_no_second_eos(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)  # Qwen-like: each turn ends "</s>\n"
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]{% endif %}")
    p, c, r, _ = tokenize_row({"prompt": [user("a")], "chosen": [assistant("b")], "rejected": [assistant("c")]}, tok, 64, None)
    assert p == ids("[user]a") + [EOS, NL] + ids("[assistant]")
    assert c == [68, EOS, NL] and r == [69, EOS, NL]


@pytest.mark.parametrize("row, expected", [
    ({"prompt": "ab", "completion": " c", "label": True}, ([67, 68], [SP, 69, EOS], True)),
    ({"prompt": [user("a")], "completion": [assistant("b")], "label": False}, (CHAT_PROMPT, [68, NL], False)),
], ids=["strings", "messages"])
def test_unpaired_rows_give_trls_ids(tiny_tokenizer, row, expected):
    p, c, label, _ = tokenize_unpaired_row(row, tiny_tokenizer, 64, None)
    assert (p, c, label) == expected


@pytest.mark.parametrize("row, column, problem", [
    ({"chosen": "xa", "rejected": "ya"}, "chosen", "shares no prefix with rejected"),
    ({"chosen": [user("a"), assistant("b")], "rejected": [user("z"), assistant("b")]}, "chosen", "shares no prefix"),
    ({"chosen": "ab c", "rejected": [user("ab")]}, "rejected", "is not of the same format as chosen"),
    ({"chosen": "ab c", "rejected": "ab c"}, "rejected", "is identical to chosen"),
    ({"prompt": "ab", "chosen": "", "rejected": " d"}, "chosen", "is an empty response"),
    ({"prompt": [user("a")], "chosen": [], "rejected": [assistant("c")]}, "chosen", "is an empty message list"),
], ids=["no-common-prefix", "no-common-turn", "mixed-formats", "identical", "empty", "empty-messages"])
def test_rows_with_no_prompt_or_no_response_are_errors_naming_the_row(tiny_tokenizer, row, column, problem):
    good = {"prompt": "ab", "chosen": " c", "rejected": " d"}
    with pytest.raises(DataError, match=rf"d.jsonl, row 1, column '{column}': {problem}"):
        tokenize_dataset([good, row], tiny_tokenizer, 64, None, "error", "d.jsonl")


def test_a_template_that_writes_nothing_after_the_prompt_is_an_error_naming_the_row(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)  # renders user turns only: every response is empty
    tok.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    row = {"prompt": [user("a")], "chosen": [assistant("b")], "rejected": [assistant("c")]}
    with pytest.raises(DataError, match=r"row 0, column 'chosen': is empty once the prompt is removed"):
        tokenize_dataset([row], tok, 64, None, "error", "d.jsonl")
