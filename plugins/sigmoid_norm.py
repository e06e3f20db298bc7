"""Length-normalised DPO, as TRL 1.16's DPOTrainer ``loss_type="sigmoid_norm"`` computes it (the
length-normalised DPO of the Tülu 3 report, Lambert et al., 2024, arXiv:2411.15124).

DPO on per-token averaged log-ratios: with ρ̄(y) = (log π_θ(y|x) − log π_ref(y|x)) / |y|
(summed log-probs over the |y| response tokens),

    L = −log σ(β·(ρ̄(y_w) − ρ̄(y_l)))

averaged over the micro-batch. It differs from ``simpo`` in two ways: it has a
reference model (SimPO's reward is the policy's own per-token log-prob), and no
target margin γ. Default β = 0.1 (TRL's ``DPOConfig.beta``; the Tülu 3 report
trains with a much larger β, since the averaged log-ratio is ~|y| times
smaller). At the first step policy = reference, so ρ̄ = 0 and L = ln 2.

Metrics: ``sigmoid_norm/loss``; the core logs ``rewards/*`` from the summed
log-ratio, as TRL does for every loss (aligner/training/rewards.py).
Options: ``sigmoid_norm.beta``, ``sigmoid_norm.weight`` (aligner.hookspecs.LossConfig).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aligner.hookspecs import LossConfig, LossOutput, PluginInfo, StepInputs, check_interval, hookimpl

NAME = "sigmoid_norm"


@dataclass
class SigmoidNormConfig(LossConfig):
    beta: float = 0.1  #: β, the scale of the per-token averaged log-ratio margin

    def __post_init__(self) -> None:
        super().__post_init__()
        check_interval(f"{NAME}.beta", self.beta, "(0, inf)")


def sigmoid_norm_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, chosen_tokens: torch.Tensor,
                      rejected_tokens: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair losses (B,) from the summed log-ratios and the (B,) response token counts."""
    chosen = chosen_logratios / chosen_tokens.clamp(min=1)
    rejected = rejected_logratios / rejected_tokens.clamp(min=1)
    return -F.logsigmoid(beta * (chosen - rejected))


@hookimpl
def aligner_plugin_info() -> PluginInfo:
    """Length-normalised DPO is a loss."""
    return PluginInfo(name=NAME, role="loss", summary="length-normalised DPO (TRL sigmoid_norm): −log σ(β·Δ per-token log-ratio)")


@hookimpl
def aligner_config_section():
    """Options: ``sigmoid_norm.beta``, ``sigmoid_norm.weight``."""
    return NAME, SigmoidNormConfig


@hookimpl
def aligner_required_models(config) -> set[str]:
    """The log-ratios are against the reference model."""
    return {"reference"}


@hookimpl
def aligner_loss(inputs: StepInputs, config) -> LossOutput:
    """L = mean over pairs of −log σ(β·(ρ̄(y_w) − ρ̄(y_l))) (see the module docstring)."""
    cfg: SigmoidNormConfig = config.section(NAME)
    chosen = inputs.policy.chosen - inputs.reference.chosen
    rejected = inputs.policy.rejected - inputs.reference.rejected
    losses = sigmoid_norm_loss(chosen, rejected, inputs.chosen_tokens, inputs.rejected_tokens, cfg.beta)
    return LossOutput(losses.mean())
