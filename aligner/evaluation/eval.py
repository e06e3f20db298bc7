"""Evaluation on a held-out preference split: the run's own loss and metrics, over every example.

Each rank scores its share of the examples; the per-example log-probs are
gathered so that every rank holds all of them, and the active loss and
constraint hooks run once over the whole split. Metrics are therefore exact
means over the split, not averages of batch means.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from aligner.data import Example, UnpairedExample, make_collate
from aligner.data.sampler import shard_batches
from aligner.evaluation.regression import likelihood_margins, preference_flips
from aligner.hookspecs import Engines, SequenceLogps, StepInputs
from aligner.models.plan import ModelPlan, make_plan
from aligner.scoring import sequence_parallel
from aligner.training.step import gather_inputs, total_loss


@torch.no_grad()
def collect_inputs(engines: Engines, examples: list[Example] | list[UnpairedExample], batch_size: int,
                   pad_token_id: int, kl_pairs: bool = False, max_length: int | None = None,
                   static: dict | None = None, packing: bool = False, chunk_tokens: int = 0,
                   prefix_sharing: bool = False, plan: ModelPlan | None = None) -> StepInputs:
    """Log-probs of every example under every built (or cached, ``static``) model, gathered onto every rank.

    Works on paired and unpaired examples, padded or packed (``packing``, ``prefix_sharing``). With
    ``kl_pairs`` the mismatched-pair log-probs of every eval batch (rows of real
    examples only) are gathered too. ``plan``: the run's model plan (:func:`aligner.training.step.gather_inputs`).
    """
    rank, world = sequence_parallel.data_parallel()  # the ranks that share a sequence score the same examples
    built = [m for m in ("policy", "reference", "anchor") if getattr(engines, m) is not None or m in (static or {})]
    local: list[dict] = []
    local_kl: list[tuple[float, float]] = []
    sharded = sequence_parallel.current().size > 1  # then unpaired and KL batches are packed too
    collate = sequence_parallel.shard_collate(
        make_collate(packing, pad_token_id, kl_pairs, max_length, prefix_sharing, sharded), pad_token_id)
    for batch_examples, n_real in shard_batches(examples, batch_size, rank, world):
        batch = collate(batch_examples)
        inputs = gather_inputs(batch, engines, static, chunk_tokens, plan)
        n_chosen = batch.n_chosen
        for row, index in enumerate(batch.row_index):
            if index >= n_real:
                continue
            side, j = ("chosen", row) if row < n_chosen else ("rejected", row - n_chosen)
            values = {m: float(getattr(getattr(inputs, m), side)[j]) for m in built}
            local.append({"id": batch_examples[index].id, "side": side, **values,
                          "tokens": int(getattr(inputs, f"{side}_tokens")[j])})
        if inputs.kl_policy is not None:  # mismatched rows whose prompt is a real example's
            for k, index in enumerate(batch.mismatched.row_index):
                if index < n_real:
                    ref = inputs.kl_reference[k] if inputs.kl_reference is not None else float("nan")
                    local_kl.append((float(inputs.kl_policy[k]), float(ref)))
    if sequence_parallel.current().rank:  # its group's first rank speaks for it: each example once
        local, local_kl = [], []
    gathered = [(local, local_kl)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (local, local_kl))
    rows = sorted((r for part, _ in gathered for r in part), key=lambda r: (r["id"], r["side"]))
    chosen = [r for r in rows if r["side"] == "chosen"]
    rejected = [r for r in rows if r["side"] == "rejected"]

    def column(part: list[dict], key: str) -> torch.Tensor:
        return torch.tensor([r[key] for r in part], dtype=torch.float64)

    def logps(model: str) -> SequenceLogps | None:
        return SequenceLogps(chosen=column(chosen, model), rejected=column(rejected, model)) if model in built else None

    paired = not isinstance(examples[0], UnpairedExample)
    kl = torch.tensor([v for _, part in gathered for v in part], dtype=torch.float64).reshape(-1, 2)  # (N, 2)
    return StepInputs(
        policy=logps("policy"), reference=logps("reference"), anchor=logps("anchor"),
        chosen_tokens=column(chosen, "tokens"), rejected_tokens=column(rejected, "tokens"),
        example_ids=[r["id"] for r in chosen] + ([] if paired else [r["id"] for r in rejected]),
        paired=paired,
        kl_policy=kl[:, 0] if kl_pairs else None,
        kl_reference=kl[:, 1] if kl_pairs and engines.reference is not None else None,
    )


def evaluate(plugins, engines: Engines, examples: list[Example] | list[UnpairedExample], config,
             pad_token_id: int, static: dict | None = None, plan: ModelPlan | None = None) -> tuple[dict[str, float], StepInputs]:
    """``eval/...`` metrics (the loss as ``eval/loss``) and the per-example inputs they came from.

    With an anchor and paired data, also the regression metrics against it
    (:func:`aligner.evaluation.regression.preference_flips`) under ``eval/regression/...``.
    """
    was_training = engines.policy.training
    engines.policy.eval()
    kl_pairs = (plan or make_plan(config, plugins)).needs("kl_pairs")  # the run's plan; made here when called alone
    inputs = collect_inputs(engines, examples, config.eval.batch_size, pad_token_id, kl_pairs, config.data.max_length,
                            static, config.train.packing, config.train.logps_chunk_tokens, config.train.prefix_sharing,
                            plan)
    if was_training:
        engines.policy.train()
    with torch.no_grad():
        _, metrics = total_loss(plugins, inputs, config)
    out = {("eval/loss" if k == "train/loss" else f"eval/{k}"): float(v) for k, v in metrics.items()}
    if inputs.anchor is not None and inputs.paired:
        flips = preference_flips(likelihood_margins(inputs.policy), likelihood_margins(inputs.anchor))
        out.update({f"eval/regression/{k}": v for k, v in flips.items()})
    return out, inputs
