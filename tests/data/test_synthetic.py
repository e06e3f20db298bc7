from aligner.data.synthetic import gold_reward, make_rows, write_jsonl


def test_gold_reward_is_one_only_for_the_sorted_answer():
    assert gold_reward("sort 3 1 2 =", " 1 2 3") == 1.0
    assert gold_reward("sort 3 1 2 =", " 1 3 2") == 1 / 3
    assert gold_reward("sort 3 1 2 =", " 1 2 3 3") == 3 / 4
    assert gold_reward("sort 3 1 2 =", "") == 0.0


def test_rows_are_deterministic_and_chosen_beats_rejected():
    a, b = make_rows("train", n=50), make_rows("train", n=50)
    assert a == b
    assert all(gold_reward(r["prompt"], r["chosen"]) > gold_reward(r["prompt"], r["rejected"]) for r in a)
    assert {r["prompt"] for r in make_rows("eval", n=50)} != {r["prompt"] for r in a}


def test_write_jsonl_writes_both_splits(tmp_path):
    paths = write_jsonl(tmp_path)
    assert [p.name for p in paths] == ["train.jsonl", "eval.jsonl"]
    assert len(paths[1].read_text().splitlines()) == 256
