"""Evaluation on a held-out preference split: the run's own loss and metrics, over every example.

Each rank scores its share of the examples; the per-example log-probs are
gathered so that every rank holds all of them, and the active loss and
constraint hooks run once over the whole split. Metrics are therefore exact
means over the split, not averages of batch means.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from aligner.data import Example, make_collate
from aligner.hookspecs import Engines, StepInputs
from aligner.step import gather_inputs, total_loss


def _shard_batches(examples: list[Example], batch_size: int, rank: int, world: int) -> list[tuple[list[Example], int]]:
    """This rank's batches and how many of each are real. Every rank gets the same number of
    batches (ZeRO-3 forwards are collective), the short ones padded by repeating an example."""
    shard = examples[rank::world]
    per_rank = math.ceil(len(examples) / world)
    n_batches = math.ceil(per_rank / batch_size)
    out = []
    for b in range(n_batches):
        real = shard[b * batch_size:(b + 1) * batch_size]
        filler = [examples[0]] * (batch_size - len(real)) if len(real) < batch_size else []
        out.append((real + filler, len(real)))
    return out


@torch.no_grad()
def collect_inputs(engines: Engines, examples: list[Example], batch_size: int, pad_token_id: int,
                   packing: bool = False, chunk_tokens: int = 0) -> StepInputs:
    """Log-probs of every example under every built model, gathered onto every rank."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    local: list[dict] = []
    collate = make_collate(packing, pad_token_id)
    for batch_examples, n_real in _shard_batches(examples, batch_size, rank, world):
        inputs = gather_inputs(collate(batch_examples), engines, chunk_tokens)
        for i in range(n_real):
            local.append({
                "id": inputs.example_ids[i],
                "chosen_tokens": int(inputs.chosen_tokens[i]),
                "rejected_tokens": int(inputs.rejected_tokens[i]),
                **{f"{model}_{side}": float(getattr(getattr(inputs, model), side)[i])
                   for model in ("policy", "reference", "anchor") if getattr(inputs, model) is not None
                   for side in ("chosen", "rejected")},
            })
    gathered = [local]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
    rows = sorted((r for part in gathered for r in part), key=lambda r: r["id"])

    def column(key: str) -> torch.Tensor:
        return torch.tensor([r[key] for r in rows], dtype=torch.float64)

    def logps(model: str):
        from aligner.hookspecs import SequenceLogps

        if f"{model}_chosen" not in rows[0]:
            return None
        return SequenceLogps(chosen=column(f"{model}_chosen"), rejected=column(f"{model}_rejected"))

    return StepInputs(
        policy=logps("policy"), reference=logps("reference"), anchor=logps("anchor"),
        chosen_tokens=column("chosen_tokens"), rejected_tokens=column("rejected_tokens"),
        example_ids=[r["id"] for r in rows],
    )


def evaluate(plugins, engines: Engines, examples: list[Example], config, pad_token_id: int) -> tuple[dict[str, float], StepInputs]:
    """``eval/...`` metrics (the loss as ``eval/loss``) and the per-example inputs they came from."""
    was_training = engines.policy.training
    engines.policy.eval()
    inputs = collect_inputs(engines, examples, config.eval.batch_size, pad_token_id, config.train.packing,
                            config.train.logps_chunk_tokens)
    if was_training:
        engines.policy.train()
    with torch.no_grad():
        _, metrics = total_loss(plugins, inputs, config)
    out = {("eval/loss" if k == "train/loss" else f"eval/{k}"): float(v) for k, v in metrics.items()}
    return out, inputs
