"""DiscoPOP: the log-ratio modulated loss discovered by LLM-driven search (Lu et al., 2024,
arXiv:2406.08414, Eq. 5), as TRL 1.16's DPOTrainer ``loss_type="discopop"`` computes it.

With the margin m = β·[(log π_θ − log π_ref)(y_w) − (log π_θ − log π_ref)(y_l)]
(summed log-probs) and a temperature τ, the loss blends DPO's logistic loss
with an exponential loss, weighted by σ(m/τ):

    L = (1 − σ(m/τ))·(−log σ(m)) + σ(m/τ)·exp(−m)

averaged over the micro-batch. Defaults: β = 0.1 (TRL's ``DPOConfig.beta``)
and τ = 0.05 (TRL's ``discopop_tau`` default, the paper's value). At the first
step policy = reference, so m = 0 and L = ½·ln 2 + ½ ≈ 0.8466.

Metrics: ``discopop/loss``; the core logs ``rewards/*`` (aligner/training/rewards.py).
Options: ``discopop.beta``, ``discopop.tau``, ``discopop.weight`` (aligner.hookspecs.LossConfig).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aligner.hookspecs import LossConfig, LossOutput, PluginInfo, StepInputs, check_interval, hookimpl

NAME = "discopop"


@dataclass
class DiscoPOPConfig(LossConfig):
    beta: float = 0.1  #: β, the scale of the implicit reward
    tau: float = 0.05  #: τ, the temperature of the mixing weight σ(m/τ)

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("beta", "tau"):
            check_interval(f"{NAME}.{key}", getattr(self, key), "(0, inf)")


def discopop_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
                  tau: float) -> torch.Tensor:
    """Per-pair losses (B,) from the summed log-ratios log π_θ − log π_ref of the chosen and rejected responses."""
    margin = beta * (chosen_logratios - rejected_logratios)
    mix = torch.sigmoid(margin / tau)
    return (1 - mix) * -F.logsigmoid(margin) + mix * torch.exp(-margin)


@hookimpl
def aligner_plugin_info() -> PluginInfo:
    """DiscoPOP is a loss."""
    return PluginInfo(name=NAME, role="loss", summary="DiscoPOP (TRL discopop): (1−σ(m/τ))·(−log σ(m)) + σ(m/τ)·e^(−m)")


@hookimpl
def aligner_config_section():
    """Options: ``discopop.beta``, ``discopop.tau``, ``discopop.weight``."""
    return NAME, DiscoPOPConfig


@hookimpl
def aligner_required_models(config) -> set[str]:
    """The margin is on log-ratios against the reference model."""
    return {"reference"}


@hookimpl
def aligner_loss(inputs: StepInputs, config) -> LossOutput:
    """L = mean over pairs of the DiscoPOP loss (see the module docstring)."""
    cfg: DiscoPOPConfig = config.section(NAME)
    chosen = inputs.policy.chosen - inputs.reference.chosen
    rejected = inputs.policy.rejected - inputs.reference.rejected
    return LossOutput(discopop_loss(chosen, rejected, cfg.beta, cfg.tau).mean())
