"""SPPO, hard-label form: Self-Play Preference Optimization (Wu et al., 2024, arXiv:2405.00675), as TRL
1.16's DPOTrainer ``loss_type="sppo_hard"`` computes it.

SPPO regresses each response's log-ratio ρ(y) = log π_θ(y|x) − log π_ref(y|x)
(summed log-probs) onto η·(P(y ≻ π) − ½) (the paper's Eq. 4.7, η = 1/β). With
hard probabilities, P = 1 for the chosen and 0 for the rejected response
(TRL's convention; the paper estimates soft P with PairRM outside the trainer):

    L = (ρ(y_w) − 1/(2β))² + (ρ(y_l) + 1/(2β))²

averaged over the micro-batch. Note the log-ratios are *not* multiplied by β
(as in TRL). Default β = 0.1 (TRL's ``DPOConfig.beta``). At the first step
policy = reference, so ρ = 0 and L = 2·(1/(2β))² = 1/(2β²) = 50 at β = 0.1.

Metrics: ``sppo_hard/loss``; the core logs ``rewards/*`` (aligner/training/rewards.py).
Options: ``sppo_hard.beta``, ``sppo_hard.weight`` (aligner.hookspecs.LossConfig).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aligner.hookspecs import LossConfig, LossOutput, PluginInfo, StepInputs, check_interval, hookimpl

NAME = "sppo_hard"


@dataclass
class SPPOHardConfig(LossConfig):
    beta: float = 0.1  #: β = 1/η; the log-ratio targets are ±1/(2β)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_interval(f"{NAME}.beta", self.beta, "(0, inf)")


def sppo_hard_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair losses (B,) from the summed log-ratios log π_θ − log π_ref of the chosen and rejected responses."""
    target = 0.5 / beta
    return (chosen_logratios - target) ** 2 + (rejected_logratios + target) ** 2


@hookimpl
def aligner_plugin_info() -> PluginInfo:
    """SPPO (hard) is a loss."""
    return PluginInfo(name=NAME, role="loss", summary="SPPO hard (TRL sppo_hard): (ρ_w − 1/(2β))² + (ρ_l + 1/(2β))²")


@hookimpl
def aligner_config_section():
    """Options: ``sppo_hard.beta``, ``sppo_hard.weight``."""
    return NAME, SPPOHardConfig


@hookimpl
def aligner_required_models(config) -> set[str]:
    """The targets are on log-ratios against the reference model."""
    return {"reference"}


@hookimpl
def aligner_loss(inputs: StepInputs, config) -> LossOutput:
    """L = mean over pairs of the SPPO hard loss (see the module docstring)."""
    cfg: SPPOHardConfig = config.section(NAME)
    chosen = inputs.policy.chosen - inputs.reference.chosen
    rejected = inputs.policy.rejected - inputs.reference.rejected
    return LossOutput(sppo_hard_loss(chosen, rejected, cfg.beta).mean())
