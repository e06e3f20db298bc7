"""The step's scoring reads the model plan: which frozen model takes another's log-probs is the plan's decision."""

import pytest
import torch

from aligner.config import build_config
from aligner.data import collate_batch, embedded, tokenize_dataset
from aligner.data.synthetic import make_rows
from aligner.hookspecs import Engines
from aligner.models.plan import make_plan
from aligner.registry import activate
from aligner.training.step import gather_inputs


@pytest.fixture(scope="module")
def batch(tiny_tokenizer):
    examples = tokenize_dataset(make_rows("train", n=4), tiny_tokenizer, 64, None, "error", "rows")
    return collate_batch(examples, tiny_tokenizer.pad_token_id)


def counted(model):
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return model, calls


def plan_for(cache: bool):
    plugins = activate(["dpo", "flipguard"])
    cfg = build_config({"train": {"cache_static_logps": cache}}, plugins.config_sections())
    return make_plan(cfg, plugins)


def test_an_anchor_the_plan_shares_with_the_reference_takes_its_log_probs_from_one_forward(batch, tiny_tokenizer):
    plan = plan_for(cache=False)
    assert plan.scored_as("anchor") == "reference" and plan.scored_as("reference") is None
    frozen, calls = counted(embedded.build_model(len(tiny_tokenizer), seed=3).eval())
    policy = embedded.build_model(len(tiny_tokenizer), seed=4)
    inputs = gather_inputs(batch, Engines(policy=policy, reference=frozen, anchor=frozen), plan=plan)
    assert len(calls) == 1 and inputs.anchor is inputs.reference


def test_without_a_plan_that_says_so_an_engine_object_seen_twice_is_scored_twice(batch, tiny_tokenizer):
    frozen, calls = counted(embedded.build_model(len(tiny_tokenizer), seed=3).eval())
    policy = embedded.build_model(len(tiny_tokenizer), seed=4)
    inputs = gather_inputs(batch, Engines(policy=policy, reference=frozen, anchor=frozen))
    assert len(calls) == 2  # identity is not the plan: the decision is made once, in aligner/models/plan.py
    assert torch.equal(inputs.anchor.chosen, inputs.reference.chosen)


def test_a_model_sharing_the_policy_engine_under_lora_is_scored_on_its_own():
    plugins = activate(["dpo", "flipguard"])
    cfg = build_config({"train": {"cache_static_logps": False}, "model": {"lora": {"r": 4}}}, plugins.config_sections())
    plan = make_plan(cfg, plugins)
    assert plan.get("reference").shares == "policy" and plan.scored_as("reference") is None
    assert plan.scored_as("anchor") == "reference"
