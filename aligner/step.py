"""One micro-batch: gather the log-probs the plugins need, call the hooks, sum the loss.

This module knows no plugin by name. What it computes is decided by the
models the active plugins asked for (``aligner_required_models``).
"""

from __future__ import annotations

import torch

from aligner.hookspecs import Engines, LossOutput, SequenceLogps, StepInputs
from aligner.logps import batch_logps
from aligner.registry import ActivePlugins, PluginHookError


def split_pairs(values: torch.Tensor) -> SequenceLogps:
    """(2B,) values of [chosen..., rejected...] -> chosen (B,), rejected (B,)."""
    chosen, rejected = values.chunk(2)
    return SequenceLogps(chosen=chosen, rejected=rejected)


def gather_inputs(batch: dict, engines: Engines, chunk_tokens: int = 0) -> StepInputs:
    """Policy log-probs with gradients; reference and anchor log-probs without, when those engines exist.

    ``batch`` is padded or packed; ``chunk_tokens`` is ``train.logps_chunk_tokens`` (see aligner/logps.py).
    """
    policy_logps, n_tokens = batch_logps(engines.policy, batch, chunk_tokens)  # (2B,), (2B,)
    frozen: dict[str, SequenceLogps | None] = {}
    for name in ("reference", "anchor"):
        engine = getattr(engines, name)
        if engine is None:
            frozen[name] = None
        elif name == "anchor" and engine is engines.reference:
            frozen[name] = frozen["reference"]  # same weights: one forward, not two
        else:
            with torch.no_grad():
                frozen[name] = split_pairs(batch_logps(engine, batch, chunk_tokens)[0])
    chosen_tokens, rejected_tokens = n_tokens.chunk(2)
    return StepInputs(
        policy=split_pairs(policy_logps),
        reference=frozen["reference"],
        anchor=frozen["anchor"],
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
        example_ids=list(batch["ids"]),
    )


def total_loss(plugins: ActivePlugins, inputs: StepInputs, config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss plugin's term plus every constraint's term, and the metrics of all of them.

    ``train/loss`` is the total that is back-propagated (as TRL's ``loss``);
    ``logps/chosen`` and ``logps/rejected`` are the policy's mean summed log-probs.
    """
    loss_out = plugins.call_one(plugins.loss, "aligner_loss", inputs=inputs, config=config)
    if not isinstance(loss_out, LossOutput):
        raise PluginHookError(f"plugin '{plugins.loss}' failed in hook aligner_loss: returned {loss_out!r}, not a LossOutput")
    loss = loss_out.loss
    metrics = dict(loss_out.metrics)
    for name, out in plugins.call_each("aligner_constraint", inputs=inputs, config=config):
        if out is None:
            continue
        if not isinstance(out, LossOutput):
            raise PluginHookError(f"plugin '{name}' failed in hook aligner_constraint: returned {out!r}, not a LossOutput")
        loss = loss + out.loss
        metrics.update(out.metrics)
    metrics["train/loss"] = loss.detach()
    metrics["logps/chosen"] = inputs.policy.chosen.detach().mean()
    metrics["logps/rejected"] = inputs.policy.rejected.detach().mean()
    return loss, metrics
