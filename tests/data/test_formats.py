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


# Tool calling (TRL's ``tools`` column) and data.chat_template_kwargs, with a template that renders both:
# "[nothink]" when enable_thinking is false, "[tools]" + each tool's name + ";" and a newline, then each message
# as <|role|> + content (or "call:" + each tool call's name) + newline.
TOOLS_TEMPLATE = (
    "{% if enable_thinking is defined and not enable_thinking %}[nothink]{% endif %}"
    "{% if tools %}[tools]{% for t in tools %}{{ t['function']['name'] }};{% endfor %}{{ '\\n' }}{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{% if m['tool_calls'] is defined %}{% for c in m['tool_calls'] %}"
    "call:{{ c['function']['name'] }}{% endfor %}{% else %}{{ m['content'] }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TOOL = {"type": "function", "function": {"name": "sort", "description": "Sort a list",
                                         "parameters": {"type": "object", "properties": {"xs": {"type": "array"}}}}}
CALL = {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "sort", "arguments": {"xs": [2, 1]}}}]}


@pytest.fixture
def tools_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = TOOLS_TEMPLATE
    return tok


@pytest.mark.parametrize("tools", [[TOOL], __import__("json").dumps([TOOL])], ids=["list", "json-string"])
def test_a_tools_column_reaches_the_chat_template_and_a_tool_call_is_a_response(tools_tokenizer, tools):
    row = {"prompt": [user("a")], "chosen": [CALL], "rejected": [assistant("c")], "tools": tools}
    p, c, r, _ = tokenize_row(row, tools_tokenizer, 128, None)
    assert p == ids("[tools]sort;\n<|user|>a\n<|assistant|>")
    assert c == ids("call:sort\n") and r == [69, NL]
    without = tokenize_row({**row, "tools": None}, tools_tokenizer, 128, None)
    assert without[0] == CHAT_PROMPT and without[1:3] == (ids("call:sort\n"), [69, NL])


def test_chat_template_kwargs_come_from_the_config_and_a_row_overrides_them(tools_tokenizer):
    row = {"prompt": [user("a")], "chosen": [assistant("b")], "rejected": [assistant("c")]}
    off = {"enable_thinking": False}
    assert tokenize_row(row, tools_tokenizer, 128, None, off)[0] == ids("[nothink]<|user|>a\n<|assistant|>")
    assert tokenize_row(row, tools_tokenizer, 128, None)[0] == CHAT_PROMPT
    own = {**row, "chat_template_kwargs": {"enable_thinking": True}}
    assert tokenize_row(own, tools_tokenizer, 128, None, off)[:3] == CHAT_IDS


def test_null_keys_that_datasets_fills_in_are_not_rendered(tools_tokenizer):
    """A datasets column of messages gives every message every key (tool_calls: None on plain ones)."""
    row = {"prompt": [{**user("a"), "tool_calls": None}], "chosen": [{**CALL, "content": None}],
           "rejected": [{**assistant("c"), "tool_calls": None}], "tools": [{**TOOL, "strict": None}]}
    p, c, r, _ = tokenize_row(row, tools_tokenizer, 128, None)
    assert (p, c, r) == (ids("[tools]sort;\n<|user|>a\n<|assistant|>"), ids("call:sort\n"), [69, NL])


def test_tools_through_the_cached_pipeline_give_the_same_ids(tools_tokenizer, tmp_path):
    """data.train as a jsonl file: datasets reads it, rank 0 tokenizes it into the cache (aligner/data/prepare.py)."""
    import json

    from aligner.config import build_config
    from aligner.data import prepare_data

    path = tmp_path / "tools.jsonl"
    row = {"prompt": [user("a")], "chosen": [CALL], "rejected": [assistant("c")], "tools": json.dumps([TOOL])}
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "rejected": [assistant("d")]}) + "\n")
    cfg = build_config({"data": {"train": str(path), "eval": None, "chat_template_kwargs": {"enable_thinking": False}}})
    train, _ = prepare_data(cfg, tools_tokenizer)
    assert train[0].prompt_ids == ids("[nothink][tools]sort;\n<|user|>a\n<|assistant|>")
    assert train[0].chosen_ids == ids("call:sort\n") and train[1].rejected_ids == [70, NL]


@pytest.mark.parametrize("row, column, problem", [
    ({"tools": "[{not json"}, "tools", r"is not valid JSON \(Expecting property name"),
    ({"tools": [1, 2]}, "tools", r"must be a list of tool JSON schemas \(mappings\), got \[1, 2\]"),
    ({"chat_template_kwargs": [1]}, "chat_template_kwargs", r"must be a mapping of template arguments, got list"),
    ({"chosen": [{"role": "assistant", "tool_calls": "sort"}]}, "chosen", r"message 0 must be a mapping with string "
                                                                          r"'role' and 'content' \(or, for a tool call"),
], ids=["tools-not-json", "tools-not-schemas", "kwargs-not-mapping", "tool-calls-not-a-list"])
def test_bad_tools_and_template_arguments_are_errors_naming_the_row_and_column(tools_tokenizer, row, column, problem):
    good = {"prompt": [user("a")], "chosen": [assistant("b")], "rejected": [assistant("c")]}
    with pytest.raises(DataError, match=rf"d.jsonl, row 1, column '{column}': {problem}"):
        tokenize_dataset([good, {**good, **row}], tools_tokenizer, 64, None, "error", "d.jsonl")


def test_tools_on_a_plain_text_row_are_refused(tiny_tokenizer):
    with pytest.raises(DataError, match=r"row 0, column 'tools': is given but the row is plain text: tools reach the "
                                        r"model only through the chat template"):
        tokenize_dataset([{"prompt": "ab", "chosen": " c", "rejected": " d", "tools": [TOOL]}], tiny_tokenizer, 64,
                         None, "error", "d.jsonl")


def test_chat_template_kwargs_may_not_set_what_aligner_sets():
    from aligner.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=r"data.chat_template_kwargs.add_generation_prompt: aligner sets .* itself "
                                          r"\(tools come from the rows' tools column\); remove add_generation_prompt"):
        build_config({"data": {"chat_template_kwargs": {"add_generation_prompt": True}}})
    with pytest.raises(ConfigError, match=r"key 'data.chat_template_kwargs' expects a mapping, got 'yes'"):
        build_config({"data": {"chat_template_kwargs": "yes"}})
