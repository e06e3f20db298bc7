"""APO-zero: Anchored Preference Optimization (D'Oosterlinck et al., 2024, arXiv:2408.06266, Eq. 7), as TRL
1.16's DPOTrainer ``loss_type="apo_zero"`` computes it.

With the implicit rewards r(y) = β·(log π_θ(y|x) − log π_ref(y|x)) (summed
log-probs), APO-zero pushes the chosen reward up and the rejected one down,
each anchored at zero (for data whose chosen responses are better than the
model's own outputs):

    L = (1 − σ(r(y_w))) + σ(r(y_l))

averaged over the micro-batch. Default β = 0.1 (TRL's ``DPOConfig.beta``). At
the first step policy = reference, so r = 0 and L = 1.

Metrics: ``apo_zero/loss``; the core logs ``rewards/*`` (aligner/training/rewards.py).
Options: ``apo_zero.beta``, ``apo_zero.weight`` (aligner.hookspecs.LossConfig).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aligner.hookspecs import LossConfig, LossOutput, PluginInfo, StepInputs, check_interval, hookimpl

NAME = "apo_zero"


@dataclass
class APOZeroConfig(LossConfig):
    beta: float = 0.1  #: β, the scale of the implicit reward

    def __post_init__(self) -> None:
        super().__post_init__()
        check_interval(f"{NAME}.beta", self.beta, "(0, inf)")


def apo_zero_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair losses (B,) from the summed log-ratios log π_θ − log π_ref of the chosen and rejected responses."""
    return (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)


@hookimpl
def aligner_plugin_info() -> PluginInfo:
    """APO-zero is a loss."""
    return PluginInfo(name=NAME, role="loss", summary="APO-zero (TRL apo_zero): (1 − σ(r_w)) + σ(r_l)")


@hookimpl
def aligner_config_section():
    """Options: ``apo_zero.beta``, ``apo_zero.weight``."""
    return NAME, APOZeroConfig


@hookimpl
def aligner_required_models(config) -> set[str]:
    """The rewards are log-ratios against the reference model."""
    return {"reference"}


@hookimpl
def aligner_loss(inputs: StepInputs, config) -> LossOutput:
    """L = mean over pairs of (1 − σ(r(y_w))) + σ(r(y_l)) (see the module docstring)."""
    cfg: APOZeroConfig = config.section(NAME)
    chosen = inputs.policy.chosen - inputs.reference.chosen
    rejected = inputs.policy.rejected - inputs.reference.rejected
    return LossOutput(apo_zero_loss(chosen, rejected, cfg.beta).mean())
