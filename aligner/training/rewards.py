"""The metrics the core logs once per micro-batch, whatever the losses: TRL's ``rewards/*`` and the
flip transitions against the reference (``flips/*``).

``rewards/*`` follow TRL 1.16's DPOTrainer, which logs them from the DPO-form
implicit reward for every ``loss_type`` (IPO included):

    r(y) = β·(log π_θ(y|x) − log π_ref(y|x)),  log π summed over the response tokens,

``rewards/chosen`` and ``rewards/rejected`` the means of r over the chosen
(desirable) and rejected (undesirable) responses, ``rewards/margins`` their
difference (the mean of r(y_w) − r(y_l) for pairs), ``rewards/accuracies`` the
share of pairs with r(y_w) > r(y_l) (pairs only). TRL has a single ``beta``; an
aligner run has one per loss, so β is :func:`reward_beta`'s choice.

``flips/*`` follow the trust-region authors' library (turbo-alignment's
``flips/correct->incorrect`` and the three others): a pair is *correct* under a
model when log π(y_w|x) > log π(y_l|x); each tag is the share of the
micro-batch's pairs that were correct/incorrect under the reference and are
correct/incorrect under the policy now. With a moving reference (a reference-update
plugin) the comparison is against the current reference.
"""

from __future__ import annotations

import torch

from aligner.hookspecs import StepInputs

#: β for ``rewards/*`` when no active loss has a ``beta`` option: TRL's ``DPOConfig.beta`` default.
DEFAULT_REWARD_BETA = 0.1


def reward_beta(loss_sections: list[object]) -> float:
    """β of ``rewards/*``: the ``beta`` of the first loss (``--plugins`` order) whose options have one, else
    :data:`DEFAULT_REWARD_BETA`. A single-loss run logs its own β, as before; a mix logs the first loss's."""
    for section in loss_sections:
        beta = getattr(section, "beta", None)
        if isinstance(beta, (int, float)) and not isinstance(beta, bool):
            return float(beta)
    return DEFAULT_REWARD_BETA


def implicit_reward_metrics(inputs: StepInputs, beta: float) -> dict[str, torch.Tensor]:
    """TRL's ``rewards/*`` from the policy's and the reference's summed log-probs; ``{}`` without a reference.

    An unpaired batch without desirable (or undesirable) completions gets NaN
    for that mean, which the logger leaves out of its average.
    """
    if inputs.reference is None:
        return {}
    chosen = (beta * (inputs.policy.chosen - inputs.reference.chosen)).detach()  # (n_chosen,)
    rejected = (beta * (inputs.policy.rejected - inputs.reference.rejected)).detach()  # (n_rejected,)
    nan = torch.tensor(float("nan"), dtype=chosen.dtype, device=chosen.device)
    chosen_mean = chosen.mean() if chosen.numel() else nan
    rejected_mean = rejected.mean() if rejected.numel() else nan
    metrics = {"rewards/chosen": chosen_mean, "rewards/rejected": rejected_mean,
               "rewards/margins": chosen_mean - rejected_mean}
    if inputs.paired:
        metrics["rewards/accuracies"] = (chosen > rejected).float().mean()
    return metrics


def flip_transitions(inputs: StepInputs) -> dict[str, torch.Tensor]:
    """``flips/<ref>-><policy>``: shares of the pairs that are correct/incorrect (log π(y_w) > log π(y_l)) under
    the reference and under the policy; the four sum to 1. ``{}`` for unpaired batches or without a reference."""
    if inputs.reference is None or not inputs.paired or inputs.policy.chosen.numel() == 0:
        return {}
    policy_ok = (inputs.policy.chosen > inputs.policy.rejected).detach()  # (B,)
    reference_ok = inputs.reference.chosen > inputs.reference.rejected  # (B,)
    out = {}
    for ref_name, ref_mask in (("correct", reference_ok), ("incorrect", ~reference_ok)):
        for pol_name, pol_mask in (("correct", policy_ok), ("incorrect", ~policy_ok)):
            out[f"flips/{ref_name}->{pol_name}"] = (ref_mask & pol_mask).float().mean()
    return out
