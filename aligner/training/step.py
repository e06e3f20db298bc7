"""One micro-batch: gather the log-probs the plugins need, call the hooks, sum the loss.

This module knows no plugin by name. What it computes is decided by the
models the active plugins asked for (``aligner_required_models``).
"""

from __future__ import annotations

import torch

from aligner.data.batch import Batch
from aligner.hookspecs import Engines, LossOutput, SequenceLogps, StepInputs
from aligner.models.plan import ModelPlan
from aligner.registry import ActivePlugins, PluginHookError
from aligner.scoring.logps import batch_logps
from aligner.training.losses import loss_section, weighted_losses
from aligner.training.rewards import flip_transitions, implicit_reward_metrics, reward_beta


def split_pairs(values: torch.Tensor, n_chosen: int | None = None) -> SequenceLogps:
    """(N,) values of [chosen..., rejected...] -> chosen (n_chosen,), rejected (N - n_chosen,); halves by default."""
    n_chosen = values.shape[0] // 2 if n_chosen is None else n_chosen
    return SequenceLogps(chosen=values[:n_chosen], rejected=values[n_chosen:])


def gather_inputs(batch: Batch, engines: Engines, static: dict | None = None, chunk_tokens: int = 0,
                  plan: ModelPlan | None = None) -> StepInputs:
    """Policy log-probs with gradients; reference and anchor log-probs without, when those engines exist.

    ``batch`` is a :class:`aligner.data.batch.Batch`, padded or packed. It may be
    unpaired (``paired`` False, the first ``n_chosen`` rows desirable) and may carry
    ``mismatched``, the mismatched prompt/completion rows: those are scored by the
    policy and the reference without gradients.

    :param static: model name -> its cached log-probs for this batch's split (an
        :class:`aligner.scoring.static_logps.SplitView`); a cached model needs no engine and no forward.
    :param chunk_tokens: ``train.logps_chunk_tokens`` (see aligner/scoring/logps.py).
    :param plan: the run's model plan; a model it says shares another's weights (:meth:`ModelPlan.scored_as`) takes
        that model's log-probs, one forward for both. Without a plan every engine runs its own forward.
    """
    n_chosen = batch.n_chosen
    policy_logps, n_tokens = batch_logps(engines.policy, batch, chunk_tokens)  # (N,), (N,)
    frozen: dict[str, SequenceLogps | None] = {}
    for name in ("reference", "anchor"):
        engine = getattr(engines, name)
        if static and name in static:
            frozen[name] = static[name].logps(list(batch.ids), policy_logps.device)
        elif engine is None:
            frozen[name] = None
        elif plan is not None and plan.scored_as(name) in frozen:
            frozen[name] = frozen[plan.scored_as(name)]  # same weights: one forward, not two
        else:
            with torch.no_grad():
                frozen[name] = split_pairs(batch_logps(engine, batch, chunk_tokens)[0], n_chosen)
    kl_policy = kl_reference = None
    if batch.mismatched is not None:
        with torch.no_grad():
            kl_policy = batch_logps(engines.policy, batch.mismatched, chunk_tokens)[0]  # (N,)
            if engines.reference is not None:
                kl_reference = batch_logps(engines.reference, batch.mismatched, chunk_tokens)[0]
    tokens = split_pairs(n_tokens, n_chosen)
    return StepInputs(
        policy=split_pairs(policy_logps, n_chosen),
        reference=frozen["reference"],
        anchor=frozen["anchor"],
        chosen_tokens=tokens.chosen,
        rejected_tokens=tokens.rejected,
        example_ids=list(batch.ids),
        paired=batch.paired,
        kl_policy=kl_policy,
        kl_reference=kl_reference,
    )


def total_loss(plugins: ActivePlugins, inputs: StepInputs, config) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted sum of the loss plugins' terms plus every constraint's term, and the metrics of all of them.

    ``train/loss`` is the total that is back-propagated (as TRL's ``loss``),
    each loss's own term is ``<name>/loss`` (aligner/training/losses.py); ``rewards/*``
    and ``flips/*`` are logged once, by the core (aligner/training/rewards.py);
    ``logps/chosen`` and ``logps/rejected`` are the policy's mean summed log-probs.
    """
    sections = [loss_section(plugins, name, config) for name in plugins.losses]
    loss, metrics = weighted_losses(plugins, inputs, config, sections, has_reference=inputs.reference is not None)
    for name, out in plugins.call_each("aligner_constraint", inputs=inputs, config=config):
        if out is None:
            continue
        if not isinstance(out, LossOutput):
            raise PluginHookError(f"plugin '{name}' failed in hook aligner_constraint: returned {out!r}, not a LossOutput")
        loss = loss + out.loss
        metrics.update(out.metrics)
    metrics.update(implicit_reward_metrics(inputs, reward_beta(sections)))
    metrics.update(flip_transitions(inputs))
    metrics["train/loss"] = loss.detach()
    metrics["logps/chosen"] = inputs.policy.chosen.detach().mean()
    metrics["logps/rejected"] = inputs.policy.rejected.detach().mean()
    return loss, metrics
