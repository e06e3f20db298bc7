"""Robust DPO: Provably Robust DPO (Chowdhury, Kini and Natarajan, 2024, arXiv:2403.00409), as TRL 1.16's
DPOTrainer ``loss_type="robust"`` computes it.

With the margin m = β·[(log π_θ − log π_ref)(y_w) − (log π_θ − log π_ref)(y_l)]
(summed log-probs) and ε the assumed rate at which preference labels are
flipped, the loss is the *unbiased* estimate of the clean-label DPO loss:

    L = [−(1 − ε)·log σ(m) + ε·log σ(−m)] / (1 − 2ε)

averaged over the micro-batch. Its expectation over the flip noise is the DPO
loss on clean labels. This is not conservative DPO (cDPO,
−(1 − ε)·log σ(m) − ε·log σ(−m), the ``dpo`` plugin's ``label_smoothing``):
the ε term has the opposite sign and the whole is rescaled by 1/(1 − 2ε).

Defaults: β = 0.1 and ε = 0 (TRL's ``beta`` and ``label_smoothing``
defaults; ε = 0 is plain DPO). At the first step policy = reference, so m = 0
and L = ((1 − ε) − ε)·ln 2/(1 − 2ε) = ln 2 for every ε.

Metrics: ``robust/loss``; the core logs ``rewards/*`` (aligner/training/rewards.py).
Options: ``robust.beta``, ``robust.label_smoothing``, ``robust.weight`` (aligner.hookspecs.LossConfig).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aligner.hookspecs import LossConfig, LossOutput, PluginInfo, StepInputs, check_interval, hookimpl

NAME = "robust"


@dataclass
class RobustConfig(LossConfig):
    beta: float = 0.1  #: β, the strength of the implicit KL penalty
    label_smoothing: float = 0.0  #: ε in [0, 0.5): the assumed label-flip rate

    def __post_init__(self) -> None:
        super().__post_init__()
        check_interval(f"{NAME}.beta", self.beta, "(0, inf)")
        check_interval(f"{NAME}.label_smoothing", self.label_smoothing, "[0, 0.5)")


def robust_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
                label_smoothing: float) -> torch.Tensor:
    """Per-pair losses (B,) from the summed log-ratios log π_θ − log π_ref of the chosen and rejected responses."""
    margin = beta * (chosen_logratios - rejected_logratios)
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(margin) + eps * F.logsigmoid(-margin)) / (1 - 2 * eps)


@hookimpl
def aligner_plugin_info() -> PluginInfo:
    """Robust DPO is a loss."""
    return PluginInfo(name=NAME, role="loss", summary="robust DPO (TRL robust): [−(1−ε)log σ(m) + ε log σ(−m)]/(1−2ε)")


@hookimpl
def aligner_config_section():
    """Options: ``robust.beta``, ``robust.label_smoothing``, ``robust.weight``."""
    return NAME, RobustConfig


@hookimpl
def aligner_required_models(config) -> set[str]:
    """The margin is on log-ratios against the reference model."""
    return {"reference"}


@hookimpl
def aligner_loss(inputs: StepInputs, config) -> LossOutput:
    """L = mean over pairs of the robust DPO loss (see the module docstring)."""
    cfg: RobustConfig = config.section(NAME)
    chosen = inputs.policy.chosen - inputs.reference.chosen
    rejected = inputs.policy.rejected - inputs.reference.rejected
    return LossOutput(robust_loss(chosen, rejected, cfg.beta, cfg.label_smoothing).mean())
