import torch

from aligner.scoring.logps import sequence_logps


def naive(logits, ids, mask):
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    m = mask[:, 1:].float()
    return (logp * m).sum(-1), m.sum(-1)


def test_chunked_response_logps_and_gradients_match_the_full_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, 50, generator=g, requires_grad=True)
    ids = torch.randint(0, 50, (4, 9), generator=g)
    mask = torch.zeros(4, 9, dtype=torch.bool)
    mask[0, 3:] = True
    mask[1, 8] = True  # a 1-token response at the last position
    mask[2, 1:5] = True
    mask[3, 2:9] = True
    got, n = sequence_logps(logits, ids, mask, chunk_size=3)
    want, n_want = naive(logits, ids, mask)
    assert torch.allclose(got, want, atol=1e-5) and torch.equal(n, n_want.long())
    (g1,) = torch.autograd.grad(got.sum(), logits)
    (g2,) = torch.autograd.grad(want.sum(), logits)
    assert torch.allclose(g1, g2, atol=1e-6)


def test_chunked_lm_head_logps_and_gradients_match_full_fp32_logits():
    from aligner.scoring.logps import chunked_token_logps

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(11, 16, generator=g, requires_grad=True)  # (M, H)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)  # (V, H)
    targets = torch.randint(0, 40, (11,), generator=g)
    upstream = torch.randn(11, generator=g)
    got = chunked_token_logps(hidden, weight, None, targets, chunk_tokens=4)  # chunks of 4, 4, 3
    want = (hidden @ weight.T).float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5)
    g_got = torch.autograd.grad((got * upstream).sum(), (hidden, weight))
    g_want = torch.autograd.grad((want * upstream).sum(), (hidden, weight))
    for a, b in zip(g_got, g_want):
        assert torch.allclose(a, b, atol=1e-5)


def test_chunked_path_never_materialises_all_positions_logits(random_model_dir):
    """The model's head returns (M,) log-probs for the M response tokens, not (N, T, V) logits; same values."""
    from transformers import AutoModelForCausalLM

    from aligner.data import Example, collate_pairs
    from aligner.scoring.logps import _scoring_head, batch_logps

    model = AutoModelForCausalLM.from_pretrained(random_model_dir).eval()
    batch = collate_pairs([Example("a", [5, 6, 7], [8, 9], [10]), Example("b", [5], [11, 12, 13], [14, 15])], 0)
    targets_mask = batch.response_mask[:, 1:]
    positions, targets, _ = batch.score_index()
    with torch.no_grad(), _scoring_head(model, positions, targets, chunk_tokens=2):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    assert out.shape == (int(targets_mask.sum()),)
    assert "forward" not in vars(model.get_output_embeddings())  # the head is itself again
    with torch.no_grad():
        assert torch.allclose(batch_logps(model, batch, 2)[0], batch_logps(model, batch, 0)[0], atol=1e-5)


def test_negative_chunk_size_is_a_config_error_naming_the_key():
    import pytest

    from aligner.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=r"train.logps_chunk_tokens must be >= 0, got -1"):
        build_config({"train": {"logps_chunk_tokens": -1}})
    with pytest.raises(ConfigError, match=r"key 'train.packing' expects true or false"):
        build_config({"train": {"packing": "yes please"}})


def test_chunked_scoring_refuses_a_model_that_rescales_its_logits(random_model_dir):
    import pytest
    from transformers import AutoModelForCausalLM

    from aligner.data import Example, collate_pairs
    from aligner.scoring.logps import batch_logps

    model = AutoModelForCausalLM.from_pretrained(random_model_dir).eval()
    model.config.final_logit_softcapping = 30.0
    batch = collate_pairs([Example("a", [5, 6], [8, 9], [10])], 0)
    with pytest.raises(ValueError, match=r"config.final_logit_softcapping=30.0.*set train.logps_chunk_tokens=0"):
        batch_logps(model, batch, chunk_tokens=4)


def test_chunked_lm_head_with_bias_and_bf16_weights_matches_autograd():
    """The hand-written backward (aligner/scoring/logps.py:_ChunkedHeadLogps) with a bias, a frozen input, and bf16."""
    from aligner.scoring.logps import chunked_token_logps

    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(9, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    bias = torch.randn(40, generator=g, requires_grad=True)
    targets = torch.randint(0, 40, (9,), generator=g)
    upstream = torch.randn(9, generator=g)
    got = chunked_token_logps(hidden, weight, bias, targets, chunk_tokens=4)
    want = (hidden @ weight.T + bias).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    assert torch.allclose(got, want, atol=1e-5)
    want_grads = torch.autograd.grad((want * upstream).sum(), (hidden, weight, bias))
    for a, b in zip(torch.autograd.grad((got * upstream).sum(), (hidden, weight, bias)), want_grads):
        assert torch.allclose(a, b, atol=1e-5)
    (only_weight,) = torch.autograd.grad(  # no gradient asked for the hidden states or the bias
        (chunked_token_logps(hidden.detach(), weight, bias.detach(), targets, 4) * upstream).sum(), weight)
    assert torch.allclose(only_weight, want_grads[1], atol=1e-5)
    h16, w16 = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    got16 = chunked_token_logps(h16, w16, None, targets, chunk_tokens=4)
    gh, gw = torch.autograd.grad((got16 * upstream).sum(), (h16, w16))
    assert got16.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    want_h, want_w = torch.autograd.grad(
        ((h16.float() @ w16.float().T).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1) * upstream).sum(), (h16, w16))
    assert torch.allclose(got16, (h16.float() @ w16.float().T).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1), atol=0.1)
    assert torch.allclose(gh.float(), want_h.float(), atol=0.1, rtol=0.05) and torch.allclose(gw.float(), want_w.float(), atol=0.1, rtol=0.05)
