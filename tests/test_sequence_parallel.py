"""train.sequence_parallel in one process: how a row is split among the ranks that share it, the padding, the
empty shard's backward, the refusals that need no process group, the estimator and the resume check.

The exactness of whole runs (2 ranks against one) is tests/test_sequence_parallel_e2e.py.
"""

import argparse
import re
import types

import pytest
import torch

from aligner.config import ConfigError
from aligner.data import Example, pack_pairs, pack_prefix_shared
from aligner.models import attention
from aligner.recipes.train import configure
from aligner.scoring.logps import _picked_logps, chunked_token_logps
from aligner.scoring.sequence_parallel import Layout, current, head_problem, layout_for, shard, shard_collate
from aligner.tools import estimate
from aligner.training import checkpoint

PAD = 0


def _ids(g, n):
    return torch.randint(3, 200, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def examples():
    g = torch.Generator().manual_seed(4)
    return [Example("a", _ids(g, 13), _ids(g, 4), _ids(g, 6)), Example("b", [], _ids(g, 5), _ids(g, 2)),
            Example("c", _ids(g, 2), _ids(g, 9), _ids(g, 1))]


def _triples(positions, targets, owner, offset=0):
    return {(int(p) + offset, int(t), int(o)) for p, t, o in zip(positions, targets, owner)}


@pytest.mark.parametrize("pack", [pack_pairs, pack_prefix_shared])
@pytest.mark.parametrize("size", [2, 3, 4])
def test_the_shares_of_a_row_cover_its_scoring_list_once_and_only_pad_the_end(examples, pack, size):
    batch = pack(examples)
    parts = [shard(batch, Layout(size, r, 0, 1), PAD) for r in range(size)]
    whole = parts[0].whole
    length = batch.input_ids.shape[1]
    assert whole.input_ids.shape[1] % size == 0 and whole.input_ids.shape[1] - length < size
    assert torch.equal(whole.input_ids[:, :length], batch.input_ids)
    assert not whole.response_mask[:, length:].any()  # the padding is never scored
    assert torch.equal(torch.cat([p.input_ids for p in parts], 1), whole.input_ids)
    seen = [_triples(*p.score_index(), offset=p.start) for p in parts]
    assert sum(len(s) for s in seen) == len(_triples(*batch.score_index()))
    assert set().union(*seen) == _triples(*batch.score_index())
    assert sum(p.real_tokens() for p in parts) == batch.real_tokens()
    assert all(p.n_sequences == batch.n_sequences and p.work_share == 1 / size for p in parts)


@pytest.mark.parametrize("pack", [pack_pairs, pack_prefix_shared])
def test_the_padding_changes_no_real_tokens_logits(random_model_dir, examples, pack):
    """The padded row (the padding joins the last sequence) gives every real position the unpadded row's logits."""
    from transformers import AutoModelForCausalLM

    attention.register()
    model = AutoModelForCausalLM.from_pretrained(random_model_dir, attn_implementation=attention.VARLEN)
    batch = pack(examples)
    length = batch.input_ids.shape[1]
    padded = batch.extended(3, PAD)
    with torch.no_grad():
        plain = model(**attention.model_inputs(model, batch)).logits
        extended = model(**attention.model_inputs(model, padded)).logits
    assert extended.shape[1] == length + 3
    assert torch.allclose(plain, extended[:, :length], atol=1e-6, rtol=0)


@pytest.mark.parametrize("unpaired", [False, True])
def test_packed_unpaired_and_kl_rows_score_as_their_padded_batch(random_model_dir, examples, unpaired):
    """Under SP, unpaired completions and the mismatched KL rows are packed (pack_batch) instead of padded: the same
    rows, labels and per-sequence log-probs, and the mismatched row is sharded with its batch."""
    from transformers import AutoModelForCausalLM

    from aligner.data.collate import collate_batch
    from aligner.data.packing import make_collate, pack_batch
    from aligner.data.tokenize import UnpairedExample
    from aligner.scoring.logps import batch_logps

    attention.register()
    model = AutoModelForCausalLM.from_pretrained(random_model_dir, attn_implementation=attention.VARLEN)
    rows = ([UnpairedExample(f"u{i}", ex.prompt_ids, ex.chosen_ids if i % 2 else ex.rejected_ids, bool(i % 2))
             for i, ex in enumerate(examples)] if unpaired else examples)
    padded, packed = collate_batch(rows, PAD, kl_pairs=True, max_length=64), pack_batch(rows, True, 64)
    for a, b in ((padded, packed), (padded.mismatched, packed.mismatched)):
        assert (a.n_chosen, a.paired, a.row_index, a.ids) == (b.n_chosen, b.paired, b.row_index, b.ids)
        with torch.no_grad():
            (la, ca), (lb, cb) = batch_logps(model, a), batch_logps(model, b)
        assert torch.equal(ca, cb) and torch.allclose(la, lb, atol=1e-5, rtol=0)
    assert type(make_collate(True, PAD, True, 64, pack_all=True)(rows)) is type(packed)
    assert type(make_collate(True, PAD, True, 64)(rows)) is type(padded)  # without SP: padded, as before
    part = shard(packed, Layout(2, 1, 0, 1), PAD)
    assert part.mismatched is not None and part.mismatched.whole.input_ids.shape[1] % 2 == 0


def test_a_padded_batch_has_no_single_row_to_shard(examples):
    from aligner.data import collate_pairs

    with pytest.raises(TypeError, match="shards one packed row"):
        shard(collate_pairs(examples, PAD), Layout(2, 0, 0, 1), PAD)


def test_an_empty_share_still_backpropagates_through_the_head_and_below():
    """A rank holding prompt tokens only scores nothing, yet its backward must run through every layer (its peers'
    all-to-alls and ZeRO-3's gradient hooks pair up with its own): the empty result stays in the graph."""
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    none = torch.zeros(0, dtype=torch.long)
    out = chunked_token_logps(hidden[none], weight, None, none, 4)
    assert out.shape == (0,) and out.requires_grad
    out.sum().backward()
    assert weight.grad is not None and hidden.grad is not None and not weight.grad.any()
    logits = torch.randn(5, 11, requires_grad=True)
    picked = _picked_logps(logits[none], none)
    assert picked.shape == (0,) and picked.requires_grad
    picked.sum().backward()
    assert logits.grad is not None


@pytest.mark.parametrize("size,heads,kv,fault", [
    (2, 3, 3, "the model has 3 attention heads"),
    (2, 6, 3, "the model has 3 key/value heads, which 2 ranks can neither split"),
    (3, 6, 2, "the model has 2 key/value heads, which 3 ranks can neither split"),
])
def test_heads_that_ulysses_cannot_split_are_named_with_the_sizes_that_fit(size, heads, kv, fault):
    problem = head_problem(size, heads, kv)
    assert problem is not None and fault in problem and "set train.sequence_parallel to one of [" in problem


@pytest.mark.parametrize("size,heads,kv", [(2, 4, 2), (4, 8, 2), (8, 32, 8), (8, 8, 2)])
def test_heads_split_or_replicated_by_deepspeed_are_accepted(size, heads, kv):
    assert head_problem(size, heads, kv) is None  # kv < N: DeepSpeed replicates the key/value heads


def _cfg(*overrides):
    cfg, _ = configure(argparse.Namespace(config="configs/tiny-cpu.yaml", plugins="dpo", overrides=[list(overrides)]))
    return cfg


def test_a_size_that_does_not_divide_the_ranks_is_refused_with_the_sizes_that_do():
    with pytest.raises(ConfigError, match=r"train.sequence_parallel=4 does not divide the number of ranks \(6\).*"
                                          r"one of \[1, 2, 3, 6\]"):
        layout_for(_cfg("train.sequence_parallel=4"), 0, 6)


@pytest.mark.parametrize("override, message", [
    ("model.attn_implementation=sdpa", "model.attn_implementation=sdpa cannot run under DeepSpeed's Ulysses attention: "
                                       "the wrapper drops the attention mask"),
    ("model.attn_implementation=eager", "DeepSpeed refuses 'eager'. Set model.attn_implementation=auto or varlen"),
    ("train.packing=false", "train.packing=false asks for padded batches; set train.packing=true"),
    ("train.zero_stage=2", "got zero_optimization stage 2, reduce_scatter True"),
    ("eval.reward_model=some/judge", "eval.reward_model judges greedy generations"),
])
def test_what_the_config_alone_rules_out_is_refused_where_the_layout_is_made(override, message):
    """Recipe.setup makes the layout (aligner.scoring.sequence_parallel.layout_for) before it loads data or builds an engine,
    where the world-size refusal of tests/test_sequence_parallel_e2e.py stops a real 2-rank run."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        layout_for(_cfg("train.sequence_parallel=2", override), 0, 2)
    layout_for(_cfg("train.sequence_parallel=1", override), 0, 2)  # the same config without SP is fine here


def test_zero3_without_reduce_scatter_is_refused(tmp_path):
    conf = tmp_path / "ds.json"
    conf.write_text('{"zero_optimization": {"reduce_scatter": false}}')
    with pytest.raises(ConfigError, match="reduce_scatter False"):
        layout_for(_cfg("train.sequence_parallel=2", f"train.deepspeed_config={conf}"), 0, 2)


def test_the_layout_groups_consecutive_ranks_and_shards_data_over_the_groups():
    cfg = _cfg("train.sequence_parallel=2")
    assert [(lay.rank, lay.dp_rank, lay.dp_world) for lay in (layout_for(cfg, r, 4) for r in range(4))] == \
        [(0, 0, 2), (1, 0, 2), (0, 1, 2), (1, 1, 2)]
    assert current().size == 1 and shard_collate(len, PAD) is len  # one rank per sequence: no sharding


def test_sequence_parallel_must_be_positive():
    with pytest.raises(ConfigError, match="train.sequence_parallel must be > 0, got 0"):
        _cfg("train.sequence_parallel=0")


def test_the_estimate_splits_the_activations_and_refuses_what_training_refuses(capsys):
    shape = estimate.ModelShape.from_dict(estimate.BUILTIN_SHAPES["llama3-8b"], "llama3-8b")
    args = ["train.micro_batch_size=1", "data.max_length=16384"]
    cfg1, plugins = configure(argparse.Namespace(config="configs/llama3-8b-zero3.yaml", plugins="dpo",
                                                 overrides=[args]))
    cfg8, _ = configure(argparse.Namespace(config="configs/llama3-8b-zero3.yaml", plugins="dpo",
                                           overrides=[[*args, "train.sequence_parallel=8"]]))
    one, eight = (estimate.estimate(c, plugins, shape, 8) for c in (cfg1, cfg8))
    lines = [{line.name: line.bytes for line in e.steady} for e in (one, eight)]
    assert lines[1]["policy logits"] < lines[0]["policy logits"]
    assert lines[0]["policy activations"] / 8 < lines[1]["policy activations"] < lines[0]["policy activations"] / 7
    assert lines[1]["policy Adam moments"] == lines[0]["policy Adam moments"]  # ZeRO-3 still splits over 8 ranks
    assert eight.sequence_parallel == 8 and eight.peak < one.peak
    code = estimate.main(["--config", "configs/llama3-8b-zero3.yaml", "--gpus", "6", "--set", "train.sequence_parallel=4"])
    assert code == 2 and "train.sequence_parallel=4 does not divide the number of ranks (6)" in capsys.readouterr().err
    code = estimate.main(["--config", "configs/llama3-8b-zero3.yaml", "--gpus", "6", "--set", "train.sequence_parallel=3"])
    assert code == 2 and "the model has 32 attention heads and Ulysses gives each of the 3 ranks" in capsys.readouterr().err


def test_resuming_with_another_sequence_parallel_size_is_refused():
    meta = {"world_size": 2, "sequence_parallel": 2}
    with pytest.raises(checkpoint.CheckpointError, match="written with sequence_parallel = 2, this run has 1; resume "
                                                         "with the same train.sequence_parallel"):
        checkpoint.check_compatible(types.SimpleNamespace(), meta, {"world_size": 2, "sequence_parallel": 1})
    checkpoint.check_compatible(types.SimpleNamespace(), {"world_size": 2}, {"world_size": 2, "sequence_parallel": 1})


def test_the_memory_benchmark_pairs_are_exactly_the_rows_the_estimator_counts(tmp_path):
    """benchmarks/sp_memory.py compares its runs with aligner-estimate at data.max_length = L: each of its
    sequences must be exactly L tokens (prompt L/2, each response L/2 with its EOS) through aligner's tokenizing."""
    import json
    import random
    import sys

    from aligner.data.tokenize import tokenize_row
    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sp_memory
    from workload import SMOKE, SPECIALS, _words, tokenizer

    path = tmp_path / "pairs.jsonl"
    sp_memory.write_data(path, 20, 3, SMOKE)
    tok = tokenizer(_words(SMOKE.vocab - len(SPECIALS), random.Random(SMOKE.seed)), 64)
    for line in path.read_text().splitlines():
        prompt, chosen, rejected, cut = tokenize_row(json.loads(line), tok, 20, None)
        assert (len(prompt), len(chosen), len(rejected), cut) == (10, 10, 10, False)


def test_under_sp_unpaired_and_kl_batches_stay_packed_unshared_and_the_kernel_checks_each_ranks_heads(
        random_model_dir):
    from transformers import AutoConfig

    from aligner.config import build_config
    from aligner.scoring import batch_path

    model_config = AutoConfig.from_pretrained(random_model_dir)  # 4 query / 2 key-value heads
    sp2 = build_config({"train": {"sequence_parallel": 2}})
    for paired, kl_pairs in ((False, False), (True, True)):
        path = batch_path.decide(sp2, model_config, paired, kl_pairs, cuda=False)
        assert (path.packing, path.prefix_sharing, path.fallbacks) == (True, False, ())
        path = batch_path.decide(build_config({}), model_config, paired, kl_pairs, cuda=False)
        assert path.packing is False  # one rank per sequence: padded, as before
    seen = []
    kernel = attention.Kernel("probe", lambda *a: seen.append(a))
    # the probe returns nothing, so its self-check fails and the run falls back; what matters is what it was given
    batch_path.decide(sp2, model_config, True, False, cuda=True, kernels=[kernel])
    assert seen and seen[0][0].shape[1] == 2 and seen[0][1].shape[1] == 1  # q (T, H/2, D), k (T, KV/2, D)
