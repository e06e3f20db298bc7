"""Unpaired (prompt, completion, label) rows for KTO: schema, validation, collation, the mismatched-pair KL rows and eval."""

import json

import pytest
import torch

from aligner.config import build_config
from aligner.data import DataError, UnpairedExample, collate_batch, load_rows, tokenize_dataset
from aligner.data.collate import mismatched_rows
from aligner.data.synthetic import make_rows
from aligner.data.tokenize import tokenize_row
from aligner.evaluation.eval import evaluate
from aligner.hookspecs import Engines
from aligner.registry import activate
from aligner.scoring.logps import batch_logps
from aligner.training.step import gather_inputs


def unpaired_rows(n_pairs, every_rejected=1):
    """Each embedded pair as a desirable row, and its rejected response as an undesirable row every few pairs."""
    rows = []
    for i, r in enumerate(make_rows("train", n=n_pairs)):
        rows.append({"id": f"{r['id']}-c", "prompt": r["prompt"], "completion": r["chosen"], "label": True})
        if i % every_rejected == 0:
            rows.append({"id": f"{r['id']}-r", "prompt": r["prompt"], "completion": r["rejected"], "label": False})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tok_all(rows, tokenizer, label="test.jsonl"):
    return tokenize_dataset(rows, tokenizer, 64, None, "error", label)


def test_unpaired_file_is_detected_and_tokenized_like_the_paired_rows(tmp_path, tiny_tokenizer):
    examples = tok_all(load_rows(write_jsonl(tmp_path / "u.jsonl", unpaired_rows(4))), tiny_tokenizer)
    assert all(isinstance(e, UnpairedExample) for e in examples)
    assert [e.desirable for e in examples] == [True, False] * 4
    pair = make_rows("train", n=1)[0]
    p, c, r, _ = tokenize_row(pair, tiny_tokenizer, 64, None)
    assert (examples[0].prompt_ids, examples[0].completion_ids, examples[1].completion_ids) == (p, c, r)


def test_conversational_unpaired_rows_go_through_the_chat_template(tiny_tokenizer):
    row = {"prompt": [{"role": "user", "content": "sort 2 1 ="}], "completion": [{"role": "assistant", "content": " 1 2"}],
           "label": False}
    (ex,) = tok_all([row], tiny_tokenizer)
    # TRL 1.16: a conversational completion is what the template writes after the prompt, no EOS added
    assert tiny_tokenizer.decode(ex.prompt_ids + ex.completion_ids) == "<|user|>sort 2 1 =\n<|assistant|> 1 2\n"


@pytest.mark.parametrize("labels, row, got", [
    ([True, None, False], 1, "got missing"),
    (["yes", "no"], 0, r"got 'yes' \(str\)"),
    ([1, 0], 0, r"got 1 \(int\)"),
])
def test_a_missing_or_non_bool_label_is_a_row_numbered_error(tmp_path, tiny_tokenizer, labels, row, got):
    rows = []
    for i, label in enumerate(labels):
        rows.append({"prompt": "sort 2 1 =", "completion": f" 1 {i}"} | ({} if label is None else {"label": label}))
    spec = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=rf"dataset {spec}, row {row}, column 'label': must be true \(desirable\) or "
                                        rf"false \(undesirable\), {got}"):
        tok_all(load_rows(spec), tiny_tokenizer, label=spec)


def test_collate_puts_desirable_rows_first_and_builds_kl_rows_in_example_order(tiny_tokenizer):
    examples = tok_all(unpaired_rows(3), tiny_tokenizer)  # labels T F T F T F
    batch = collate_batch(examples, tiny_tokenizer.pad_token_id, kl_pairs=True, max_length=64)
    assert batch.n_chosen == 3 and batch.paired is False
    assert batch.row_index == [0, 2, 4, 1, 3, 5]
    assert batch.ids == [examples[i].id for i in (0, 2, 4, 1, 3, 5)]
    kl = batch.mismatched
    assert kl.row_index == [0, 1, 2, 3, 4, 5]
    for k, example in enumerate(examples):  # TRL's KL batch: prompt k with completion k-1, in file order
        previous = examples[k - 1]
        n = len(example.prompt_ids) + len(previous.completion_ids)
        assert kl.input_ids[k, :n].tolist() == example.prompt_ids + previous.completion_ids
        assert kl.response_mask[k].sum() == len(previous.completion_ids)


def test_kl_rows_of_a_t_f_t_t_batch_pair_as_trl_does(tiny_tokenizer):
    """Labels [T, F, T, T], as (prompt, completion) example indices: shifting the desirable-first order
    would give (0,1), (2,0), (3,2), (1,3); TRL pairs prompt i with completion i-1 in file order:
    (0,3), (1,0), (2,1), (3,2). Only (3,2) is in both."""
    examples = tok_all(unpaired_rows(3, every_rejected=3), tiny_tokenizer)  # T F T T
    assert [ex.desirable for ex in examples] == [True, False, True, True]
    batch = collate_batch(examples, tiny_tokenizer.pad_token_id, kl_pairs=True, max_length=64)
    for k, j in enumerate([3, 0, 1, 2]):
        n = len(examples[k].prompt_ids) + len(examples[j].completion_ids)
        assert batch.mismatched.input_ids[k, :n].tolist() == examples[k].prompt_ids + examples[j].completion_ids


def test_kl_rows_of_pairs_never_match_a_prompt_with_its_own_response():
    rows = [([1], [10]), ([2], [20]), ([1], [11]), ([2], [21])]  # B=2 pairs: chosen rows, then rejected rows
    assert mismatched_rows(rows, 64) == [([1], [21]), ([2], [10]), ([1], [20]), ([2], [11])]
    assert mismatched_rows([([1, 2, 3], [9, 9, 9])] * 2, 4) == [([1, 2, 3], [9])] * 2  # cut to max_length


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer):
    from aligner.data import embedded

    return embedded.build_model(len(tiny_tokenizer), seed=5).eval()


def test_gather_inputs_scores_the_kl_rows_without_gradient(tiny_model, tiny_tokenizer):
    examples = tok_all(unpaired_rows(3, every_rejected=3), tiny_tokenizer)  # T F T T
    batch = collate_batch(examples, tiny_tokenizer.pad_token_id, kl_pairs=True, max_length=64)
    inputs = gather_inputs(batch, Engines(policy=tiny_model, reference=tiny_model))
    assert not inputs.paired and inputs.policy.chosen.shape == (3,) and inputs.policy.rejected.shape == (1,)
    assert inputs.policy.chosen.requires_grad and not inputs.kl_policy.requires_grad
    with torch.no_grad():
        expected, _ = batch_logps(tiny_model, batch.mismatched)
        own, _ = batch_logps(tiny_model, batch)
    assert torch.allclose(inputs.kl_policy, expected) and torch.allclose(inputs.kl_reference, expected)
    assert not torch.allclose(expected, own)  # mismatched rows score differently from the batch's own rows
    no_kl = gather_inputs(collate_batch(examples, tiny_tokenizer.pad_token_id), Engines(policy=tiny_model))
    assert no_kl.kl_policy is None and no_kl.reference is None


def test_kto_eval_on_unpaired_data_gives_the_formula_value_when_policy_is_reference(tiny_model, tiny_tokenizer):
    examples = tok_all(unpaired_rows(10, every_rejected=2), tiny_tokenizer)  # 10 desirable, 5 undesirable
    plugins = activate(["kto"])
    cfg = build_config({"kto": {"undesirable_weight": 4.0}, "eval": {"batch_size": 4}}, plugins.config_sections())
    metrics, inputs = evaluate(plugins, Engines(policy=tiny_model, reference=tiny_model), examples, cfg,
                               tiny_tokenizer.pad_token_id)
    assert inputs.policy.chosen.shape == (10,) and inputs.policy.rejected.shape == (5,)
    assert sorted(inputs.example_ids) == sorted(e.id for e in examples)
    assert metrics["eval/loss"] == pytest.approx(0.5 * (10 * 1.0 + 5 * 4.0) / 15, abs=1e-9)
    assert metrics["eval/kto/kl"] == 0.0 and "eval/rewards/accuracies" not in metrics
    assert metrics["eval/logps/chosen"] == pytest.approx(float(inputs.policy.chosen.mean()))


def test_unpaired_data_is_refused_for_a_loss_that_trains_on_pairs(tmp_path, tiny_tokenizer):
    from aligner.recipes.train import load_examples

    spec = write_jsonl(tmp_path / "u.jsonl", unpaired_rows(2))
    plugins = activate(["dpo"])
    data = {"train": str(spec), "eval": None, "max_length": 64}
    cfg = build_config({"data": data}, plugins.config_sections())
    with pytest.raises(DataError, match=r"is unpaired \(prompt, completion, label\), but the loss 'dpo' trains on preference pairs"):
        load_examples(tiny_tokenizer, cfg, plugins)
    kto_plugins = activate(["kto"])
    train, _ = load_examples(tiny_tokenizer, build_config({"data": data}, kto_plugins.config_sections()), kto_plugins)
    assert len(train) == 4


def test_unpaired_data_is_refused_when_any_of_several_losses_trains_on_pairs(tmp_path, tiny_tokenizer):
    from aligner.recipes.train import load_examples

    spec = write_jsonl(tmp_path / "u.jsonl", unpaired_rows(2))
    plugins = activate(["kto", "sft"])  # kto takes unpaired rows, sft does not
    data = {"train": str(spec), "eval": None, "max_length": 64}
    cfg = build_config({"data": data}, plugins.config_sections())
    with pytest.raises(DataError, match=r"but the loss 'sft' trains on preference pairs"):
        load_examples(tiny_tokenizer, cfg, plugins)
