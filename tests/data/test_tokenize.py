import json

import datasets
import pytest

from aligner.data import DataError, load_rows, tokenize_dataset
from aligner.data.synthetic import make_rows
from aligner.data.tokenize import tokenize_row

GOOD = {"prompt": "sort 3 1 2 =", "chosen": " 1 2 3", "rejected": " 3 2 1"}


def tok_all(rows, tokenizer, max_length=64, max_prompt_length=None, on_bad_row="error"):
    return tokenize_dataset(rows, tokenizer, max_length, max_prompt_length, on_bad_row, "test.jsonl")


def test_string_row_is_prompt_then_response_then_eos(tiny_tokenizer):
    p, c, r, truncated = tokenize_row(GOOD, tiny_tokenizer, 64, None)
    assert p == tiny_tokenizer("sort 3 1 2 =")["input_ids"]
    assert c == tiny_tokenizer(" 1 2 3", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert tiny_tokenizer.decode(p + c) == "sort 3 1 2 = 1 2 3</s>"
    assert not truncated


def test_conversational_row_goes_through_the_chat_template(tiny_tokenizer):
    row = make_rows("train", n=1, conversational=True)[0]
    p, c, _, _ = tokenize_row(row, tiny_tokenizer, 128, None)
    assert tiny_tokenizer.decode(p) == f"<|user|>{row['prompt'][0]['content']}\n<|assistant|>"
    # TRL 1.16: the response is exactly what the template writes after the prompt; this template writes no EOS
    assert tiny_tokenizer.decode(c) == f"{row['chosen'][0]['content']}\n"


def test_conversational_row_without_chat_template_is_refused(tiny_tokenizer):
    import copy

    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    row = make_rows("train", n=1, conversational=True)[0]
    with pytest.raises(DataError, match=r"row 0, column 'prompt': is a chat conversation but the model's tokenizer has no chat template"):
        tok_all([row], plain)


@pytest.mark.parametrize(
    "bad, column, problem",
    [
        ({"prompt": "p", "chosen": "", "rejected": "x"}, "chosen", "is an empty response"),
        ({"prompt": "p", "chosen": "x", "rejected": 3}, "rejected", "must be a string"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected", "is identical to chosen"),
        ({"prompt": "p" * 80, "chosen": "a", "rejected": "b"}, "prompt", "has 80 tokens, which leaves no room for a response"),
    ],
)
def test_bad_row_error_names_row_and_column(tiny_tokenizer, bad, column, problem):
    rows = [GOOD, dict(GOOD, chosen=" 1 2 3 "), bad]
    with pytest.raises(DataError, match=rf"test.jsonl, row 2, column '{column}': {problem}.*data.on_bad_row: skip"):
        tok_all(rows, tiny_tokenizer)


def test_skip_mode_drops_and_counts_bad_rows(tiny_tokenizer, caplog):
    rows = [GOOD, {"prompt": "p", "chosen": "", "rejected": "x"}, dict(GOOD, rejected=" 2 1 3")]
    examples = tok_all(rows, tiny_tokenizer, on_bad_row="skip")
    assert [e.id for e in examples] == ["0", "2"]
    assert "skipped 1 bad row(s)" in caplog.text


def test_missing_column_lists_what_the_file_has(tiny_tokenizer):
    with pytest.raises(DataError, match=r"lacks column\(s\) rejected; it has prompt, chosen"):
        tok_all([{"prompt": "p", "chosen": "c"}], tiny_tokenizer)


def test_extra_columns_are_ignored_with_a_warning(tiny_tokenizer, caplog):
    examples = tok_all([dict(GOOD, score=3)], tiny_tokenizer)
    assert len(examples) == 1 and "ignoring column(s) score" in caplog.text


def test_duplicate_ids_are_refused(tiny_tokenizer):
    with pytest.raises(DataError, match=r"row 1, column 'id': repeats the id 'a' of row 0"):
        tok_all([dict(GOOD, id="a"), dict(GOOD, id="a")], tiny_tokenizer)


def test_truncation_cuts_prompt_from_the_left_then_responses(tiny_tokenizer):
    row = {"prompt": "0123456789", "chosen": "abcdefghij", "rejected": "xy"}
    p, c, r, truncated = tokenize_row(row, tiny_tokenizer, max_length=12, max_prompt_length=4)
    assert tiny_tokenizer.decode(p) == "6789"
    assert tiny_tokenizer.decode(c) == "abcdefgh" and len(p + c) == 12
    assert tiny_tokenizer.decode(r) == "xy</s>" and truncated


def test_files_of_each_format_load_the_same_rows(tmp_path):
    rows = make_rows("eval", n=5)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "dir"))
    for spec in (jsonl, tmp_path / "d.parquet", tmp_path / "dir"):
        assert load_rows(str(spec)).to_list() == rows


def test_missing_or_unknown_dataset_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"unknown file type '.txt'"):
        load_rows(str(tmp_path / "d.txt"))
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match=r"broken.jsonl, line 1 \(row 0\): not valid JSON"):
        load_rows(str(tmp_path / "broken.jsonl"))
