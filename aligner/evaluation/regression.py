"""Update-regression metrics of a model against its anchor (the pre-aligned model), as FlipGuard reports them.

Two judges say whether a model handles an example correctly:

- **Preference pairs.** The model's margin is its log-likelihood margin
  m(π) = log π(y_w|x) − log π(y_l|x) (the implicit reward margin against a
  uniform reference, up to β; it needs no reference model, so the anchor's is
  not degenerate when the reference is the anchor). Correct means m > 0.
- **Generations on the embedded task** (the paper's generation protocol): each
  model's greedy response is scored by the gold reward; the model regresses on
  an example when its score is below the anchor's, and improves when above.

A negative flip is an example the anchor handled correctly and the model does
not; a positive flip the reverse. Both rates are shares of *all* N examples,
as in the regression-free model-update literature (Yan et al., 2021,
"positive-congruent training"), which FlipGuard's NFR follows; the share among
the anchor-correct examples only is ``negative_flip_rate / anchor_accuracy``.
"""

from __future__ import annotations

import torch

from aligner.hookspecs import SequenceLogps


def likelihood_margins(logps: SequenceLogps) -> torch.Tensor:
    """m = log π(y_w|x) − log π(y_l|x) per example, shape (N,)."""
    return (logps.chosen - logps.rejected).double()


def preference_flips(model_margins: torch.Tensor, anchor_margins: torch.Tensor) -> dict[str, float]:
    """Accuracies (m > 0) of both models, negative/positive flip rates and mean margins over N examples."""
    model_ok, anchor_ok = model_margins > 0, anchor_margins > 0
    return {
        "policy_accuracy": model_ok.double().mean().item(),
        "anchor_accuracy": anchor_ok.double().mean().item(),
        "negative_flip_rate": (anchor_ok & ~model_ok).double().mean().item(),
        "positive_flip_rate": (~anchor_ok & model_ok).double().mean().item(),
        "policy_margin": model_margins.double().mean().item(),
        "anchor_margin": anchor_margins.double().mean().item(),
    }


def generation_flips(model_rewards: torch.Tensor, anchor_rewards: torch.Tensor) -> dict[str, float]:
    """Mean gold rewards of both models' generations and the shares of examples scored below/above the anchor."""
    model_rewards, anchor_rewards = model_rewards.double(), anchor_rewards.double()
    return {
        "policy_reward": model_rewards.mean().item(),
        "anchor_reward": anchor_rewards.mean().item(),
        "negative_flip_rate": (model_rewards < anchor_rewards).double().mean().item(),
        "positive_flip_rate": (model_rewards > anchor_rewards).double().mean().item(),
    }


def reward_model_flips(model_rewards: torch.Tensor, anchor_rewards: torch.Tensor, epsilon: float) -> dict[str, float]:
    """FlipGuard's PPO-form judge: a negative flip when R(x, y_pre) − R(x, y_θ) > ε, a positive one when
    R(x, y_θ) − R(x, y_pre) > ε, as shares of all N prompts; and the mean rewards of both models' generations."""
    gap = anchor_rewards.double() - model_rewards.double()  # (N,) R(x, y_pre) − R(x, y_θ)
    return {
        "policy_reward": model_rewards.double().mean().item(),
        "anchor_reward": anchor_rewards.double().mean().item(),
        "negative_flip_rate": (gap > epsilon).double().mean().item(),
        "positive_flip_rate": (-gap > epsilon).double().mean().item(),
        "epsilon": float(epsilon),
    }
