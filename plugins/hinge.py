"""Hinge loss on the DPO log-ratio margin, as TRL's DPOTrainer ``loss_type="hinge"`` (after SLiC,
Zhao et al., 2023, arXiv:2305.10425).

With the implicit reward r(y) = β·(log π_θ(y|x) − log π_ref(y|x)) (summed
log-probs, as DPO) and m = r(y_w) − r(y_l), the loss is

    L = max(0, 1 − m) = relu(1 − β·[(log π_θ − log π_ref)(y_w) − (log π_θ − log π_ref)(y_l)])

averaged over the micro-batch: pairs whose margin already exceeds 1 add no
gradient. β is the reciprocal of the margin in log-ratio units (TRL's wording).
Default β = 0.1, TRL's ``DPOConfig.beta`` default. At the first step
policy = reference, so m = 0 and L = 1.

Metrics: ``hinge/loss`` (this term); the core logs TRL's ``rewards/*`` from r
(aligner/training/rewards.py). Options inherit ``weight`` (aligner.hookspecs.LossConfig).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aligner.hookspecs import LossConfig, LossOutput, PluginInfo, StepInputs, check_interval, hookimpl

NAME = "hinge"


@dataclass
class HingeConfig(LossConfig):
    beta: float = 0.1  #: β: the hinge is at a log-ratio margin of 1/β

    def __post_init__(self) -> None:
        super().__post_init__()
        check_interval("hinge.beta", self.beta, "(0, inf)")


def hinge_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example hinge losses and the chosen/rejected implicit rewards, all shape (B,)."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    return torch.relu(1 - (chosen_rewards - rejected_rewards)), chosen_rewards, rejected_rewards


@hookimpl
def aligner_plugin_info() -> PluginInfo:
    """Hinge is a loss."""
    return PluginInfo(name=NAME, role="loss", summary="hinge (SLiC/TRL): relu(1 − β·Δlog-ratio)")


@hookimpl
def aligner_config_section():
    """Options: ``hinge.beta``."""
    return NAME, HingeConfig


@hookimpl
def aligner_required_models(config) -> set[str]:
    """The hinge is on log-ratios against the reference model."""
    return {"reference"}


@hookimpl
def aligner_loss(inputs: StepInputs, config) -> LossOutput:
    """L = mean over pairs of relu(1 − m) (see the module docstring)."""
    cfg: HingeConfig = config.section(NAME)
    losses, _, _ = hinge_loss(
        inputs.policy.chosen, inputs.policy.rejected, inputs.reference.chosen, inputs.reference.rejected, cfg.beta,
    )
    return LossOutput(losses.mean())
