"""APO-down: Anchored Preference Optimization (D'Oosterlinck et al., 2024, arXiv:2408.06266, Eq. 8), as TRL
1.16's DPOTrainer ``loss_type="apo_down"`` computes it.

With the implicit rewards r(y) = β·(log π_θ(y|x) − log π_ref(y|x)) (summed
log-probs), APO-down lowers the chosen reward and lowers the rejected one more
(for data whose chosen responses are worse than the model's own outputs):

    L = σ(r(y_w)) + (1 − σ(r(y_w) − r(y_l)))

averaged over the micro-batch. Default β = 0.1 (TRL's ``DPOConfig.beta``). At
the first step policy = reference, so r = 0 and L = 1.

Metrics: ``apo_down/loss``; the core logs ``rewards/*`` (aligner/training/rewards.py).
Options: ``apo_down.beta``, ``apo_down.weight`` (aligner.hookspecs.LossConfig).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aligner.hookspecs import LossConfig, LossOutput, PluginInfo, StepInputs, check_interval, hookimpl

NAME = "apo_down"


@dataclass
class APODownConfig(LossConfig):
    beta: float = 0.1  #: β, the scale of the implicit reward

    def __post_init__(self) -> None:
        super().__post_init__()
        check_interval(f"{NAME}.beta", self.beta, "(0, inf)")


def apo_down_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair losses (B,) from the summed log-ratios log π_θ − log π_ref of the chosen and rejected responses."""
    return torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios)))


@hookimpl
def aligner_plugin_info() -> PluginInfo:
    """APO-down is a loss."""
    return PluginInfo(name=NAME, role="loss", summary="APO-down (TRL apo_down): σ(r_w) + (1 − σ(r_w − r_l))")


@hookimpl
def aligner_config_section():
    """Options: ``apo_down.beta``, ``apo_down.weight``."""
    return NAME, APODownConfig


@hookimpl
def aligner_required_models(config) -> set[str]:
    """The rewards are log-ratios against the reference model."""
    return {"reference"}


@hookimpl
def aligner_loss(inputs: StepInputs, config) -> LossOutput:
    """L = mean over pairs of σ(r(y_w)) + 1 − σ(r(y_w) − r(y_l)) (see the module docstring)."""
    cfg: APODownConfig = config.section(NAME)
    chosen = inputs.policy.chosen - inputs.reference.chosen
    rejected = inputs.policy.rejected - inputs.reference.rejected
    return LossOutput(apo_down_loss(chosen, rejected, cfg.beta).mean())
