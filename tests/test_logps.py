import torch

from aligner.logps import sequence_logps


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
