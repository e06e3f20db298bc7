"""Prefix sharing (train.prefix_sharing): [prompt, chosen, rejected] in one row, the prompt computed once, exactly
the per-sequence log-probs and gradients of unshared packing."""

import pytest
import torch

from aligner.data import Example, PrefixSharedBatch, make_collate, pack_pairs, pack_prefix_shared
from aligner.data.tokenize import tokenize_row
from aligner.models import attention
from aligner.scoring.logps import batch_logps, score_pairs

MAX_LENGTH = 48


def _ids(g, n):
    return torch.randint(3, 200, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def examples():
    """Ragged pairs: a 1-token response, an empty prompt, a long prompt, equal responses."""
    g = torch.Generator().manual_seed(1)
    same = _ids(g, 4)
    return [
        Example("one-token", _ids(g, 5), _ids(g, 1), _ids(g, 7)),
        Example("empty-prompt", [], _ids(g, 9), _ids(g, 2)),
        Example("long-prompt", _ids(g, 30), _ids(g, 6), _ids(g, 11)),
        Example("same-response", _ids(g, 3), same, list(same)),
    ]


@pytest.fixture(scope="module")
def chat_examples(tiny_tokenizer):
    """Multi-turn conversational rows through the chat template, some truncated (prompt from the left, responses cut)."""
    turns = [{"role": "user", "content": "sort 3 1 2"}, {"role": "assistant", "content": "1 2 3"},
             {"role": "user", "content": "and now 9 7 8 please, in order"}]
    rows = [{"prompt": turns, "chosen": [{"role": "assistant", "content": "7 8 9"}],
             "rejected": [{"role": "assistant", "content": "9 8 7, I think"}]},
            {"prompt": turns[:1], "chosen": [{"role": "assistant", "content": "1 2 3"}],
             "rejected": [{"role": "assistant", "content": "3 2 1"}]}]
    out, truncated = [], []
    for k, (max_length, max_prompt) in enumerate([(512, None), (80, 50), (96, None)]):
        for j, row in enumerate(rows):
            prompt, chosen, rejected, cut = tokenize_row(row, tiny_tokenizer, max_length, max_prompt)
            out.append(Example(f"chat-{k}-{j}", prompt, chosen, rejected))
            truncated.append(cut)
    assert sum(truncated) >= 2 and not all(truncated)  # one shared prompt per pair, truncated once (tokenize.py)
    return out


def _model(path=None, **config):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    attention.register()
    if path is not None:
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention.VARLEN)
    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      max_position_embeddings=512, tie_word_embeddings=False, **config)
    cfg._attn_implementation = attention.VARLEN
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module", params=["gqa-4q-2kv", "mha-4q-4kv"])
def model(request, random_model_dir):
    if request.param == "gqa-4q-2kv":  # the tiny random Llama the other tests use (grouped-query attention)
        return _model(random_model_dir)
    return _model(num_attention_heads=4, num_key_value_heads=4)


def _logps_and_grads(model, batch, chunk_tokens):
    model.zero_grad()
    logps, counts = batch_logps(model, batch, chunk_tokens)
    weights = torch.linspace(-1, 1, logps.shape[0])
    (logps * weights).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return logps.detach(), counts, grads


@pytest.mark.parametrize("data,chunk_tokens", [("ragged", 0), ("ragged", 5), ("chat", 7)])
def test_prefix_shared_logps_and_gradients_equal_unshared_packing(model, examples, chat_examples, data, chunk_tokens):
    """fp32, 1e-5: per-sequence log-probs, token counts and every parameter's gradient, full-logits and chunked head."""
    exs = examples if data == "ragged" else chat_examples
    want, n_want, g_want = _logps_and_grads(model, pack_pairs(exs), chunk_tokens)
    got, n_got, g_got = _logps_and_grads(model, pack_prefix_shared(exs), chunk_tokens)
    assert torch.equal(n_got, n_want)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert torch.allclose(g_got, g_want, atol=1e-5, rtol=1e-4), (g_got - g_want).abs().max()


def test_sdpa_is_causal_is_top_left_aligned_so_the_rejected_segment_needs_an_explicit_mask():
    """Why aligner/models/attention.py builds the bottom-right mask: is_causal with q_len < k_len hides the query's own key."""
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(1, 1, 3, 8, generator=g), torch.randn(1, 1, 7, 8, generator=g), torch.randn(1, 1, 7, 8, generator=g)
    cu_q, cu_k = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([0, 7], dtype=torch.int32)
    flat = [t[0].transpose(0, 1) for t in (q, k, v)]  # (T, H, D), the kernels' layout
    bottom_right = attention.SDPA_SEGMENTS.run(*flat, cu_q, cu_k, 3, 7, None, None).transpose(0, 1)[None]
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    top_left = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(bottom_right[:, :, -1], full[:, :, -1], atol=1e-6)  # the last query sees every key
    assert not torch.allclose(top_left, bottom_right, atol=1e-3)


def test_layout_positions_scoring_and_real_tokens(examples):
    batch = pack_prefix_shared(examples)
    ex = examples[0]  # prompt 5, chosen 1, rejected 7, at row offset 0
    P, C, R = len(ex.prompt_ids), len(ex.chosen_ids), len(ex.rejected_ids)
    assert batch.input_ids[0, :P + C + R].tolist() == ex.prompt_ids + ex.chosen_ids + ex.rejected_ids
    assert batch.position_ids[0, :P + C + R].tolist() == [*range(P + C), *range(P, P + R)]  # rejected continue from P
    b = len(examples)
    first_chosen = batch.positions[(batch.owner == 0)][0]
    first_rejected = batch.positions[(batch.owner == b)][0]
    assert first_chosen == first_rejected == P - 1  # both first tokens come from the last prompt token's logits
    assert batch.targets[(batch.owner == b)][0] == ex.rejected_ids[0]
    assert batch.real_tokens() == sum(2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    assert batch.input_ids.numel() == sum(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    counts = torch.bincount(batch.owner, minlength=2 * b)
    assert counts.tolist() == [1, 8, 6, 4, 7, 1, 11, 4]  # an empty prompt: no response's first token is scored


def test_rejected_never_sees_chosen(model, examples):
    """Changing a pair's chosen tokens changes nothing of its rejected log-prob (and vice versa for the prompt)."""
    other = [Example(e.id, e.prompt_ids, [(t + 17) % 200 + 3 for t in e.chosen_ids], e.rejected_ids) for e in examples]
    with torch.no_grad():
        a, _ = batch_logps(model, pack_prefix_shared(examples), 0)
        b, _ = batch_logps(model, pack_prefix_shared(other), 0)
    n = len(examples)
    assert torch.allclose(a[n:], b[n:], atol=1e-6) and not torch.allclose(a[:n], b[:n], atol=1e-3)


def test_a_prefix_shared_batch_on_a_model_without_this_attention_is_refused_with_the_fix(random_model_dir, examples):
    from transformers import AutoModelForCausalLM

    sdpa = AutoModelForCausalLM.from_pretrained(random_model_dir, attn_implementation="sdpa")
    with pytest.raises(ValueError, match=r"prefix-shared batch needs attn_implementation 'aligner_varlen'.*"
                                         r"set train.prefix_sharing=false"):
        batch_logps(sdpa, pack_prefix_shared(examples))


def test_pre_pass_scoring_uses_the_runs_layout(model, examples):
    """score_pairs (the static pre-pass and eval CLI loop) with the run's collate: the same values as the steps."""
    collate = make_collate(True, 0, prefix_sharing=True)
    assert isinstance(collate(examples), PrefixSharedBatch)
    with torch.no_grad():
        scored = score_pairs(model, examples, 2, 0, chunk_tokens=4, collate=collate)
        want, _ = batch_logps(model, pack_pairs(examples), 0)
    n = len(examples)
    assert torch.allclose(scored.chosen, want[:n], atol=1e-5) and torch.allclose(scored.rejected, want[n:], atol=1e-5)
