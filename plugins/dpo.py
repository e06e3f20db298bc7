"""DPO: Direct Preference Optimization (Rafailov et al., 2023, arXiv:2305.18290, Eq. 7).

With the implicit reward r(y) = β·(log π_θ(y|x) − log π_ref(y|x)) and the
margin m = r(y_w) − r(y_l) between the chosen (y_w) and rejected (y_l)
responses, the loss is

    L = −log σ(m)

averaged over the micro-batch. With ``dpo.label_smoothing`` = ε > 0 it is
**conservative DPO (cDPO)** (Mitchell, 2023, "A note on DPO with noisy
preferences and relationship to IPO", a technical note without an arXiv id):
the labels are taken to be flipped with probability ε, and the loss is the
cross-entropy against those soft labels,

    L = −(1 − ε)·log σ(m) − ε·log σ(−m)

This is *not* TRL's ``robust`` loss (Chowdhury et al., 2024, arXiv:2403.00409),
which is the unbiased [−(1 − ε)·log σ(m) + ε·log σ(−m)]/(1 − 2ε): that one is
the separate ``robust`` plugin. TRL 1.16's ``sigmoid`` loss takes no label
smoothing; older TRL versions computed the cDPO form above.

log π is the sum of the response tokens' log-probs. Defaults: β = 0.1 (the
paper's and TRL's default), ε = 0. At the first step policy = reference, so
m = 0 and L = ln 2 ≈ 0.6931.

Metrics: ``dpo/loss`` (this term); the core logs TRL's ``rewards/*`` from r
(aligner/training/rewards.py). Options inherit ``weight`` (aligner.hookspecs.LossConfig).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aligner.hookspecs import LossConfig, LossOutput, PluginInfo, StepInputs, check_interval, hookimpl

NAME = "dpo"


@dataclass
class DPOConfig(LossConfig):
    beta: float = 0.1  #: β, the strength of the implicit KL penalty
    label_smoothing: float = 0.0  #: ε in [0, 0.5): cDPO's assumed probability that a pair's label is flipped

    def __post_init__(self) -> None:
        super().__post_init__()
        check_interval("dpo.beta", self.beta, "(0, inf)")
        check_interval("dpo.label_smoothing", self.label_smoothing, "[0, 0.5)")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example DPO losses and the chosen/rejected implicit rewards, all shape (B,)."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    margin = chosen_rewards - rejected_rewards
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses, chosen_rewards, rejected_rewards


@hookimpl
def aligner_plugin_info() -> PluginInfo:
    return PluginInfo(name=NAME, role="loss", summary="DPO: -log σ(β·Δlog-ratio), optional label smoothing (conservative DPO, cDPO)")


@hookimpl
def aligner_config_section():
    return NAME, DPOConfig


@hookimpl
def aligner_required_models(config) -> set[str]:
    return {"reference"}


@hookimpl
def aligner_loss(inputs: StepInputs, config) -> LossOutput:
    cfg: DPOConfig = config.section(NAME)
    losses, _, _ = dpo_loss(
        inputs.policy.chosen, inputs.policy.rejected, inputs.reference.chosen, inputs.reference.rejected,
        cfg.beta, cfg.label_smoothing,
    )
    return LossOutput(losses.mean())
