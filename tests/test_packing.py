"""Padding-free packing: one row per micro-batch, the same per-sequence log-probs as the padded batch."""

import dataclasses

import pytest
import torch

from aligner.data import Example, PackedBatch, PaddedBatch, collate_pairs, make_collate, pack_pairs, real_tokens
from aligner.models import attention
from aligner.scoring.logps import batch_logps

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def model(random_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(random_model_dir, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def examples():
    """Ragged pairs: a 1-token response, an empty prompt, and a sequence of exactly data.max_length tokens."""
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, 200, (n,), generator=g).tolist()

    return [
        Example("one-token", ids(5), ids(1), ids(7)),
        Example("empty-prompt", [], ids(9), ids(2)),
        Example("at-max-length", ids(30), ids(MAX_LENGTH - 30), ids(10)),
        Example("short", ids(3), ids(4), ids(1)),
    ]


def test_pack_pairs_restarts_positions_and_never_scores_a_sequence_start(examples):
    batch = pack_pairs(examples)
    lengths = [len(e.prompt_ids) + len(e.chosen_ids) for e in examples] + [len(e.prompt_ids) + len(e.rejected_ids) for e in examples]
    assert batch.input_ids.shape == (1, sum(lengths)) and real_tokens(batch) == sum(lengths)
    assert batch.cu_seqlens.tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    assert batch.max_seqlen == MAX_LENGTH
    starts = batch.cu_seqlens[:-1].long()
    assert (batch.position_ids[0, starts] == 0).all() and not batch.response_mask[0, starts].any()
    assert batch.sequence_ids[0, starts].tolist() == list(range(len(lengths)))
    padded = collate_pairs(examples, 0)
    assert real_tokens(padded) == sum(lengths) < padded.input_ids.numel()


def test_packed_logps_equal_padded_logps_and_use_cache_would_leak_across_sequences(model, examples):
    padded, packed = collate_pairs(examples, 0), pack_pairs(examples)
    with torch.no_grad():
        want, n_want = batch_logps(model, padded)
        got, n_got = batch_logps(model, packed)
        # The trap (PLATFORM.md): with a cache, transformers skips the packed-sequence mask.
        leaky = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=True).logits
        sealed = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits
    assert torch.equal(n_got, n_want) and n_want.tolist() == [1, 8, MAX_LENGTH - 30, 4, 7, 1, 10, 1]  # an empty prompt: its first token has no prefix
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert (leaky - sealed).abs().max() > 1e-2


@pytest.mark.parametrize("packed_attention", ["sdpa", attention.VARLEN])
def test_packed_chunked_gradients_equal_padded_naive_gradients(random_model_dir, examples, packed_attention):
    """sdpa: transformers' block-diagonal mask; aligner_varlen: the per-sequence CPU twin that packed runs use."""
    from transformers import AutoModelForCausalLM

    attention.register()
    model = AutoModelForCausalLM.from_pretrained(random_model_dir, attn_implementation="sdpa")
    packed_model = AutoModelForCausalLM.from_pretrained(random_model_dir, attn_implementation=packed_attention)
    weights = torch.linspace(-1, 1, 2 * len(examples))

    def grads(m, batch, chunk_tokens):
        logps, _ = batch_logps(m, batch, chunk_tokens)
        (logps * weights).sum().backward()
        return torch.cat([p.grad.flatten() for p in m.parameters()])

    want = grads(model, collate_pairs(examples, 0), 0)
    got = grads(packed_model, pack_pairs(examples), 7)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()


def test_varlen_attention_cpu_twin_matches_padded_sdpa_and_reads_cu_seqlens(random_model_dir, model, examples):
    from transformers import AutoModelForCausalLM

    varlen = AutoModelForCausalLM.from_pretrained(random_model_dir, attn_implementation=attention.register()).eval()
    packed = pack_pairs(examples)
    kwargs = attention.varlen_kwargs(varlen, packed)
    assert set(kwargs) == {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "attention_mask"}
    assert kwargs["attention_mask"].shape == (1, 1, 0, 0)  # 4-D: transformers passes it through, no packed-sequence scan
    assert attention.varlen_kwargs(model, packed) == {}  # sdpa masks from position_ids instead
    one_sequence = dataclasses.replace(packed, cu_seqlens=torch.tensor([0, packed.input_ids.shape[1]], dtype=torch.int32))
    with torch.no_grad():
        want, _ = batch_logps(model, collate_pairs(examples, 0))
        got, _ = batch_logps(varlen, packed, chunk_tokens=16)
        padded_through_varlen, _ = batch_logps(varlen, collate_pairs(examples, 0))  # falls back to SDPA
        wrong = varlen(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                       **attention.varlen_kwargs(varlen, one_sequence)).logits
        right = varlen(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                       **attention.varlen_kwargs(varlen, packed)).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0) and torch.allclose(padded_through_varlen, want, atol=1e-5, rtol=0)
    assert (wrong - right).abs().max() > 1e-2  # the boundaries come from cu_seqlens


def test_attn_implementation_auto_picks_varlen_for_packed_runs_and_sdpa_for_padded_ones():
    assert attention.attn_implementation("auto", packing=True) == attention.VARLEN
    assert attention.attn_implementation("auto", packing=False) == "sdpa"
    assert attention.attn_implementation("varlen", packing=False) == attention.VARLEN
    assert attention.attn_implementation("eager", packing=True) == "eager"


def test_make_collate_follows_the_packing_switch(examples):
    assert isinstance(make_collate(True, 0)(examples), PackedBatch)
    assert isinstance(make_collate(False, 0)(examples), PaddedBatch)
