"""Datasets by local path or Hub ID, splits, subsets, column mappings, mixtures, eval_fraction and the
tokenization cache (aligner/data/load.py, prepare.py, cache.py), through the real ``datasets`` loaders."""

import json
import logging
import subprocess
import sys

import datasets
import pytest

from aligner.config import build_config
from aligner.data import DataError, load_rows
from aligner.data.prepare import Source, prepare_data, prepare_split, sources
from conftest import ROOT

PAIRS = [{"prompt": f"q{i} =", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(12)]
H4 = [{"prompt": f"q{i}", "prompt_id": str(i), "chosen": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "yes"}],
       "rejected": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "no"}]} for i in range(6)]


@pytest.fixture
def repo(tmp_path):
    """A dataset repository folder laid out as on the Hub: named splits, two subsets declared in the README."""
    root = tmp_path / "ultra"
    (root / "data").mkdir(parents=True)
    (root / "pairs").mkdir()
    datasets.Dataset.from_list(H4).to_parquet(str(root / "data" / "train_prefs-00000-of-00001.parquet"))
    datasets.Dataset.from_list(H4[:2]).to_parquet(str(root / "data" / "test_prefs-00000-of-00001.parquet"))
    datasets.Dataset.from_list(PAIRS).to_parquet(str(root / "pairs" / "train-00000-of-00001.parquet"))
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train_prefs\n    path: data/train_prefs-*\n"
        "  - split: test_prefs\n    path: data/test_prefs-*\n- config_name: pairs\n  data_files:\n  - split: train\n"
        "    path: pairs/train-*\n---\n")
    return root


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNER_CACHE", str(tmp_path / "aligner-cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    return tmp_path / "aligner-cache"


def cfg(**data):
    return build_config({"data": {"eval": None, "max_length": 64, **data}})


def test_a_repository_folder_gives_its_named_splits_and_subsets(repo):
    assert len(load_rows(str(repo), "train_prefs")) == 6 and len(load_rows(str(repo), "test_prefs")) == 2
    assert load_rows(str(repo), "train", "pairs").to_list() == PAIRS


def test_unknown_splits_and_subsets_are_refused_with_those_that_exist(repo):
    with pytest.raises(DataError, match=r"the split 'train' does not exist; its splits are train_prefs, test_prefs"):
        load_rows(str(repo), "train")
    with pytest.raises(DataError, match=r"the subset 'nope' does not exist; its subsets are default, pairs"):
        load_rows(str(repo), "train_prefs", "nope")


def test_a_saved_dataset_dict_picks_the_split(tmp_path):
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(PAIRS)}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_rows(str(tmp_path / "dd"), "train_prefs")) == 12
    with pytest.raises(DataError, match=r"'test' does not exist; its splits are train_prefs"):
        load_rows(str(tmp_path / "dd"), "test")


def test_a_hub_dataset_missing_offline_names_the_id_and_the_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    with pytest.raises(DataError, match=r"dataset someorg/no-such-data is not in the local Hugging Face cache.*"
                                        r"`hf download --repo-type dataset someorg/no-such-data`"):
        load_rows("someorg/no-such-data")


@pytest.mark.parametrize("content, message", [
    (b"", r"e.jsonl is empty \(0 bytes\)"),
    (b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "cho\n',
     r"e.jsonl, line 2 \(row 1\): not valid JSON .*the line may be truncated"),
    (b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n\n{"prompt": "p\xff", "chosen": "a", "rejected": "b"}\n',
     r"e.jsonl, line 3 \(row 1\): bytes b.\\xff.* at byte 13 of the line are not valid UTF-8"),
], ids=["empty", "truncated-line", "invalid-utf8"])
def test_unreadable_jsonl_files_name_the_file_and_line(tmp_path, content, message):
    (tmp_path / "e.jsonl").write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_rows(str(tmp_path / "e.jsonl"))


@pytest.mark.parametrize("content", [b"", b'{"prompt": "p", "cho\n', b'{"prompt": "\xff"}\n'], ids=["empty", "truncated", "utf8"])
@pytest.mark.subprocess
def test_an_unreadable_jsonl_exits_2_with_no_traceback(tmp_path, random_model_dir, content):
    (tmp_path / "e.jsonl").write_bytes(content)
    proc = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--set", f"output_dir={tmp_path / 'run'}",
                           f"model.name_or_path={random_model_dir}",
                           f"data.train={tmp_path / 'e.jsonl'}", "data.eval=null"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and f"aligner: error: dataset {tmp_path / 'e.jsonl'}" in proc.stderr


def test_columns_map_other_names_and_wrong_mappings_list_what_exists(tmp_path, cache_home, tiny_tokenizer):
    rows = [{"question": "ab", "response_j": " c", "response_k": " d", "score": 1}]
    (tmp_path / "se.jsonl").write_text(json.dumps(rows[0]) + "\n")
    mapping = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    split = prepare_split([Source(str(tmp_path / "se.jsonl"), "train", None, None, mapping)], tiny_tokenizer,
                          cfg().data, 0, "data.train")
    assert (split[0].prompt_ids, split[0].chosen_ids) == ([67, 68], [223, 69, 2])  # as tests/data/test_formats.py
    with pytest.raises(DataError, match=r"data.columns.chosen: dataset .*se.jsonl has no column 'answer'; it has "
                                        r"question, response_j, response_k, score"):
        prepare_split([Source(str(tmp_path / "se.jsonl"), "train", None, None, {"chosen": "answer"})], tiny_tokenizer,
                      cfg().data, 0, "data.train")
    with pytest.raises(DataError, match=r"data.columns: unknown target 'answer'"):
        prepare_split([Source(str(tmp_path / "se.jsonl"), "train", None, None, {"answer": "question"})], tiny_tokenizer,
                      cfg().data, 0, "data.train")


def test_unpaired_columns_are_mapped_too(tmp_path, cache_home, tiny_tokenizer):
    (tmp_path / "u.jsonl").write_text(json.dumps({"q": "ab", "a": " c", "good": False}) + "\n")
    split = prepare_split([Source(str(tmp_path / "u.jsonl"), "train", None, None, {"prompt": "q", "completion": "a", "label": "good"})],
                          tiny_tokenizer, cfg().data, 0, "data.train")
    assert (split[0].prompt_ids, split[0].completion_ids, split[0].desirable) == ([67, 68], [223, 69, 2], False)


def test_a_mixture_draws_counts_and_fractions_and_keeps_ids_unique(repo, tmp_path, cache_home, tiny_tokenizer):
    spec = [{"path": str(repo), "split": "train_prefs"}, {"path": str(repo), "subset": "pairs", "samples": 0.5},
            {"path": str(repo), "subset": "pairs", "samples": 2}]
    train, eval_set = prepare_data(cfg(train=spec), tiny_tokenizer)
    assert len(train) == 6 + 6 + 2 and eval_set == []
    assert [e.id for e in train][:7] == [f"0/{i}" for i in range(6)] + ["1/0"]
    assert train[0].chosen_ids == [ord("y") - 30, ord("e") - 30, ord("s") - 30, 201]  # H4 row: "yes\n", no EOS
    again, _ = prepare_data(cfg(train=spec), tiny_tokenizer)
    assert [e.id for e in again] == [e.id for e in train]  # the same seeded draw


@pytest.mark.parametrize("spec, message", [
    ([{"path": "x.jsonl", "sample": 3}], r"data.train\[0\]: unknown key\(s\) sample"),
    ([{"split": "train"}], r"data.train\[0\]: no path"),
    ([{"path": "x.jsonl", "samples": 1.5}], r"data.train\[0\].samples: 1.5; give a row count"),
    ([], r"data.train is an empty list"),
])
def test_bad_mixture_entries_are_refused(spec, message):
    with pytest.raises(DataError, match=message):
        sources(spec, "train", None, None, "data.train")


def test_a_mixture_of_paired_and_unpaired_data_or_too_many_samples_is_refused(tmp_path, cache_home, tiny_tokenizer):
    (tmp_path / "p.jsonl").write_text(json.dumps(PAIRS[0]) + "\n")
    (tmp_path / "u.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b", "label": True}) + "\n")
    with pytest.raises(DataError, match=r"mixes paired and unpaired datasets"):
        prepare_data(cfg(train=[str(tmp_path / "p.jsonl"), str(tmp_path / "u.jsonl")]), tiny_tokenizer)
    with pytest.raises(DataError, match=r"samples=5 but it has only 1 rows"):
        prepare_data(cfg(train=[{"path": str(tmp_path / "p.jsonl"), "samples": 5}]), tiny_tokenizer)


def test_eval_fraction_carves_a_deterministic_disjoint_eval_split(repo, cache_home, tiny_tokenizer):
    c = cfg(train=str(repo), subset="pairs", eval_fraction=0.25)
    train, eval_set = prepare_data(c, tiny_tokenizer)
    train_ids, eval_ids = [e.id for e in train], [e.id for e in eval_set]
    assert len(eval_ids) == 3 and len(train_ids) == 9 and not set(train_ids) & set(eval_ids)
    assert [e.id for e in prepare_data(c, tiny_tokenizer)[1]] == eval_ids
    seeded = build_config({"data": {"train": str(repo), "subset": "pairs", "eval": None, "eval_fraction": 0.25},
                           "train": {"seed": 7}})
    assert [e.id for e in prepare_data(seeded, tiny_tokenizer)[1]] != eval_ids


def test_the_cache_is_reused_and_keyed_by_lengths_and_chat_template(repo, cache_home, tiny_tokenizer, caplog):
    import copy

    c = cfg(train=str(repo), train_split="train_prefs")
    with caplog.at_level(logging.INFO, logger="aligner.data.prepare"):
        first, _ = prepare_data(c, tiny_tokenizer)
        second, _ = prepare_data(c, tiny_tokenizer)
    assert "tokenized 6 rows into the cache" in caplog.text and "6 tokenized rows from the cache" in caplog.text
    assert second.folder == first.folder and [e.chosen_ids for e in second] == [e.chosen_ids for e in first]
    other_template = copy.deepcopy(tiny_tokenizer)
    other_template.chat_template = tiny_tokenizer.chat_template.replace("\n", " ")
    assert prepare_data(c, other_template)[0].folder != first.folder
    assert prepare_data(cfg(train=str(repo), train_split="train_prefs", max_length=32), tiny_tokenizer)[0].folder != first.folder
    assert len(list(cache_home.joinpath("tokenized").iterdir())) == 3


def test_parallel_workers_give_the_same_ids_as_one_process(tmp_path, cache_home, tiny_tokenizer):
    from aligner.data import tokenize_dataset

    rows = [dict(r, id=str(i)) for i, r in enumerate(PAIRS * 3)]
    (tmp_path / "many.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    split, _ = prepare_data(cfg(train=str(tmp_path / "many.jsonl"), num_proc=2), tiny_tokenizer)
    assert list(split) == tokenize_dataset(rows, tiny_tokenizer, 64, None, "error", "many")


def test_bad_rows_are_skipped_and_counted_through_the_cache_path(tmp_path, cache_home, tiny_tokenizer, caplog):
    rows = [PAIRS[0], {"chosen": "xa", "rejected": "ya"}, PAIRS[1]]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"row 1, column 'chosen': shares no prefix with rejected"):
        prepare_data(cfg(train=str(tmp_path / "b.jsonl")), tiny_tokenizer)
    split, _ = prepare_data(cfg(train=str(tmp_path / "b.jsonl"), on_bad_row="skip"), tiny_tokenizer)
    assert [e.id for e in split] == ["0", "2"] and "skipped 1 bad row(s)" in caplog.text
