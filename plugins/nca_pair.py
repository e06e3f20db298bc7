"""NCA on pairs: Noise Contrastive Alignment (Chen et al., 2024, arXiv:2402.05369), as TRL 1.16's
DPOTrainer ``loss_type="nca_pair"`` computes it.

With the implicit rewards r(y) = β·(log π_θ(y|x) − log π_ref(y|x)) (summed
log-probs), NCA optimises each response's own reward instead of only the
margin, which keeps the chosen likelihood from falling:

    L = −log σ(r(y_w)) − ½·log σ(−r(y_w)) − ½·log σ(−r(y_l))

averaged over the micro-batch (the paper's pairwise NCA loss with K = 2).
Default β = 0.1 (TRL's ``DPOConfig.beta``). At the first step policy =
reference, so r = 0 and L = 2·ln 2 ≈ 1.3863.

Metrics: ``nca_pair/loss``; the core logs ``rewards/*`` (aligner/training/rewards.py).
Options: ``nca_pair.beta``, ``nca_pair.weight`` (aligner.hookspecs.LossConfig).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aligner.hookspecs import LossConfig, LossOutput, PluginInfo, StepInputs, check_interval, hookimpl

NAME = "nca_pair"


@dataclass
class NCAPairConfig(LossConfig):
    beta: float = 0.1  #: β, the scale of the implicit reward

    def __post_init__(self) -> None:
        super().__post_init__()
        check_interval(f"{NAME}.beta", self.beta, "(0, inf)")


def nca_pair_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair losses (B,) from the summed log-ratios log π_θ − log π_ref of the chosen and rejected responses."""
    chosen, rejected = beta * chosen_logratios, beta * rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


@hookimpl
def aligner_plugin_info() -> PluginInfo:
    """NCA (pairs) is a loss."""
    return PluginInfo(name=NAME, role="loss", summary="NCA pairs (TRL nca_pair): −log σ(r_w) − ½log σ(−r_w) − ½log σ(−r_l)")


@hookimpl
def aligner_config_section():
    """Options: ``nca_pair.beta``, ``nca_pair.weight``."""
    return NAME, NCAPairConfig


@hookimpl
def aligner_required_models(config) -> set[str]:
    """The rewards are log-ratios against the reference model."""
    return {"reference"}


@hookimpl
def aligner_loss(inputs: StepInputs, config) -> LossOutput:
    """L = mean over pairs of the NCA pair loss (see the module docstring)."""
    cfg: NCAPairConfig = config.section(NAME)
    chosen = inputs.policy.chosen - inputs.reference.chosen
    rejected = inputs.policy.rejected - inputs.reference.rejected
    return LossOutput(nca_pair_loss(chosen, rejected, cfg.beta).mean())
