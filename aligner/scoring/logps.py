"""Per-sequence log-probabilities of the response tokens, padded or packed, naive or chunked.

log π(y|x) = Σ_t log softmax(W h_t)[y_{t+1}] over the response tokens y_{t+1},
h_t being the final hidden state at position t and W the LM head.

Two ways to get there, one switch (``train.logps_chunk_tokens``):

- ``0`` (the naive baseline): the model returns logits for every position of
  the batch, (N, T, V) in the model's dtype; the response positions are picked
  from them and turned into log-probs.
- ``c > 0`` (chunked): the LM head's forward is swapped for one that scores
  only the response positions, ``c`` tokens at a time: (c, V) fp32 logits →
  logsumexp and the target's logit → discarded. The backward pass recomputes
  each chunk's logits instead of keeping them (:class:`_ChunkedHeadLogps`). The largest logits
  tensor ever alive is (c, V). The swap happens inside the model's (DeepSpeed
  engine's) own forward, so ZeRO-3 gathers the head's weight once for all
  chunks and re-gathers it for the backward pass as for any layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from aligner.config import ConfigError
from aligner.data.batch import Batch
from aligner.models import attention

if TYPE_CHECKING:
    from aligner.hookspecs import SequenceLogps


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor,
                   chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(token | prefix) over each padded row's response tokens, from full logits (naive path).

    :param logits: (N, T, V) model outputs; position t predicts token t+1.
    :param input_ids: (N, T).
    :param response_mask: (N, T) bool, True on the response tokens to score.
    :returns: (summed log-probs (N,), number of scored tokens (N,)).
    """
    targets_mask = response_mask[:, 1:]  # (N, T-1): token t+1 is a response token
    rows, cols = targets_mask.nonzero(as_tuple=True)  # (M,), (M,)
    flat = _picked_logps(logits[:, :-1][rows, cols], input_ids[:, 1:][rows, cols], chunk_size)  # (M,)
    summed = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device).index_add(0, rows, flat)
    return summed, targets_mask.sum(-1)


def _picked_logps(picked: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """(M, V) logits in the model's dtype -> (M,) fp32 log-probs of ``targets``, converting chunk by chunk."""
    out = []
    for chunk, target in zip(picked.split(chunk_size), targets.split(chunk_size)):
        chunk = chunk.float()  # (c, V): the only fp32 copy, one chunk at a time
        out.append(chunk.gather(-1, target[:, None]).squeeze(-1) - chunk.logsumexp(-1))
    # No target (a sequence-parallel rank holding prompt tokens only): an empty result that still depends on the
    # logits, so this rank's backward runs through every layer like its peers' (their collectives pair up).
    return torch.cat(out) if out else picked.float().sum(-1)


class _ChunkedHeadLogps(torch.autograd.Function):
    """log softmax(W h + b)[target] for M tokens, ``chunk`` at a time, with a hand-written backward.

    Forward keeps only the (M,) log-sum-exp per token, never the logits. Backward
    recomputes one chunk's logits z = W h + b (c, V) and turns them in place into
    the gradient of Σ_t g_t·log p_t, g_t being the upstream gradient:

        ∂/∂z = g ⊙ (onehot(target) − softmax(z)),  softmax(z) = exp(z − lse),

    then ∂/∂h = (∂/∂z) W and ∂/∂W += (∂/∂z)ᵀ h (∂/∂b += Σ rows). Against autograd
    through a checkpointed log-softmax this skips the second log-sum-exp, the
    scatter of the gather's gradient and the sum of the two logits gradients:
    one (c, V) buffer, reused, instead of four.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        out, lse = [], []
        for h, t in zip(hidden.split(chunk), targets.split(chunk)):
            logits = F.linear(h, weight, bias).float()  # (c, V), a fresh buffer: the log-sum-exp works in place
            picked = logits.gather(-1, t[:, None]).squeeze(-1)
            top = logits.amax(-1, keepdim=True)  # (c, 1)
            lse.append(logits.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1)))
            out.append(picked - lse[-1])
        ctx.save_for_backward(hidden, weight, bias, targets, torch.cat(lse))
        ctx.chunk = chunk
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if want_h else None
        # In the weight's dtype, as autograd would accumulate it: an fp32 (V, H) buffer would add 2 GiB at 8B scale.
        grad_w = torch.zeros_like(weight) if want_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if want_b else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            span = slice(start, start + ctx.chunk)
            h, t, g = hidden[span], targets[span], grad_out[span].float()
            dz = F.linear(h, weight, bias).float()  # (c, V) logits, recomputed ...
            dz.sub_(lse[span, None]).exp_().mul_(-g[:, None])  # ... -> −g·softmax, in place
            dz[torch.arange(len(t), device=t.device), t] += g  # + g·onehot(target)
            dz = dz.to(hidden.dtype)
            if want_h:
                grad_h[span] = dz @ weight
            if want_w:
                grad_w.addmm_(dz.T.to(weight.dtype), h.to(weight.dtype))
            if want_b:
                grad_b += dz.float().sum(0)
        return grad_h, grad_w, grad_b.to(bias.dtype) if want_b else None, None, None


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """log softmax(W h)[target] for M tokens, ``chunk_tokens`` at a time: (M, H) -> (M,) fp32.

    The largest logits tensor alive, forward or backward, is (chunk_tokens, V):
    the backward pass recomputes each chunk's logits (:class:`_ChunkedHeadLogps`).
    """
    if hidden.shape[0] == 0:  # as in _picked_logps: empty, yet in the graph of the head and every layer below it
        return F.linear(hidden, weight, bias).float().sum(-1)
    return _ChunkedHeadLogps.apply(hidden, weight, bias, targets, chunk_tokens)


#: config keys whose transform a model applies to the LM head's output after it returns (chunked scoring skips it)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale")


def logits_transform(model_config) -> str | None:
    """Why chunked scoring would be wrong for this model (its logits are changed after the LM head), or None."""
    for key in LOGIT_TRANSFORMS:
        if getattr(model_config, key, None) not in (None, 1, 1.0):
            return f"config.{key}={getattr(model_config, key)} transforms the logits after the LM head"
    return None


def scoring_head_problem(hf_model) -> str | None:
    """Why chunked scoring would be wrong for this HF model: its logits are changed after the LM head
    (:func:`logits_transform`), or the head is not a plain ``Linear``; None when it can be scored chunked."""
    problem = logits_transform(hf_model.config)
    if problem:
        return problem
    head = hf_model.get_output_embeddings()
    return None if type(head) is torch.nn.Linear else f"its LM head is a {type(head).__name__}, not a plain Linear"


@contextmanager
def _scoring_head(model, positions: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> Iterator[None]:
    """While active, the model's LM head maps hidden states (N, T, H) to the (M,) log-probs of ``targets``
    at the M flattened positions ``positions``, instead of (N, T, V) logits."""
    hf = getattr(model, "module", model)
    problem = scoring_head_problem(hf)
    head = hf.get_output_embeddings()
    if problem:
        raise ConfigError(f"train.logps_chunk_tokens: this {type(hf).__name__} cannot be scored chunked ({problem}); "
                          f"set train.logps_chunk_tokens=0 for this model")

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        picked = hidden.flatten(0, 1)[positions]  # (M, H), in ``targets``' order
        return chunked_token_logps(picked, head.weight, head.bias, targets, chunk_tokens)

    head.forward = forward  # instance attribute: nn.Module.__call__ (and ZeRO-3's hooks around it) use it
    try:
        yield
    finally:
        del head.forward


def batch_logps(model, batch: Batch, chunk_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` (a DeepSpeed engine or an HF model) on a padded, packed or prefix-shared batch and score the
    responses.

    :param batch: a :class:`aligner.data.batch.Batch`: padded ((2B, T), :func:`aligner.data.collate_pairs`),
        packed ((1, L), :func:`aligner.data.pack_pairs`) or prefix-shared (:func:`aligner.data.pack_prefix_shared`);
        the batch's type supplies the forward arguments and the (logit position, target, owner) list it scores
        (:meth:`aligner.data.batch.Batch.score_index`), which both paths below read.
    :param chunk_tokens: 0 for the naive full-logits path; else score only the
        listed positions, this many tokens at a time.
    :returns: (summed response log-probs (2B,), scored tokens (2B,)), in the order
        ``[chosen..., rejected...]``.
    """
    device = next(getattr(model, "module", model).parameters()).device  # batches are built on the host
    # The index is computed on the host, where the batch was built: nonzero() and mask indexing on a GPU tensor
    # would each wait for the GPU.
    positions, targets, owner = (t.to(device) for t in batch.score_index())  # (M,) each
    batch = batch.to(device)
    n_seqs = batch.n_sequences
    if chunk_tokens:
        with _scoring_head(model, positions, targets, chunk_tokens):
            token_logps = model(**attention.model_inputs(model, batch)).logits  # (M,) fp32
    else:
        logits = model(**attention.model_inputs(model, batch)).logits  # (N, T, V): every position, the model's dtype
        token_logps = _picked_logps(logits.flatten(0, 1)[positions], targets)  # (M,)
    summed = torch.zeros(n_seqs, dtype=torch.float32, device=token_logps.device).index_add(0, owner, token_logps)
    counts = torch.zeros(n_seqs, dtype=torch.long, device=owner.device).index_add(0, owner, torch.ones_like(owner))
    return batch.whole_sequences(summed, counts)  # a sequence-parallel shard's partial sums, summed over its group


@torch.no_grad()
def score_pairs(model, examples: list, batch_size: int, pad_token_id: int, chunk_tokens: int = 0,
                collate: Callable[[list], Batch] | None = None) -> SequenceLogps:
    """Summed response log-probs of every preference pair, ``batch_size`` pairs per forward, in order.

    The scoring loop the static cache's pre-pass (per rank shard), the evaluation CLI (``launch/eval.py``) and
    the tests share: chosen (B,), rejected (B,), float32 on the model's device.

    :param collate: the batch builder (the run's layout, :func:`aligner.data.make_collate`); default padded.
    """
    from aligner.data import collate_pairs
    from aligner.hookspecs import SequenceLogps

    collate = collate or (lambda exs: collate_pairs(exs, pad_token_id))
    chosen, rejected = [], []
    for start in range(0, len(examples), batch_size):
        logps, _ = batch_logps(model, collate(examples[start:start + batch_size]), chunk_tokens)  # (2B,)
        c, r = logps.chunk(2)
        chosen.append(c)
        rejected.append(r)
    return SequenceLogps(chosen=torch.cat(chosen), rejected=torch.cat(rejected))
