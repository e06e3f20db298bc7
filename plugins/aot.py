"""AOT, paired: Alignment via Optimal Transport (Melnyk et al., 2024, arXiv:2406.05882), as TRL 1.16's
DPOTrainer ``loss_type="aot"`` computes it.

AOT asks the policy's distribution of pair margins to dominate the
reference's (first-order stochastic dominance). With u_i = log π_θ(y_w|x_i) −
log π_θ(y_l|x_i) and v_i the same for π_ref (summed log-probs), both sorted
over the micro-batch, u_(1) ≤ … ≤ u_(B) and v_(1) ≤ … ≤ v_(B), the i-th
order statistics are matched (the 1-D optimal transport plan):

    d_i = u_(i) − v_(i),   L = mean_i [−(1 − ε)·log σ(β·d_i) − ε·log σ(−β·d_i)]

The sort runs over each rank's micro-batch, as TRL's does per device, so the
loss depends on the micro-batch size (the paper sorts the whole batch). ε is
TRL's ``label_smoothing`` (default 0). Default β = 0.1 (TRL's
``DPOConfig.beta``). At the first step policy = reference, so u = v, d = 0 and
L = ln 2 for every ε.

Metrics: ``aot/loss``; the core logs ``rewards/*`` (aligner/training/rewards.py).
Options: ``aot.beta``, ``aot.label_smoothing``, ``aot.weight`` (aligner.hookspecs.LossConfig).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from aligner.hookspecs import LossOutput, PluginInfo, StepInputs, hookimpl
from aligner_plugins.optimal_transport import SortedLossConfig, sorted_difference_loss

NAME = "aot"


@dataclass
class AOTConfig(SortedLossConfig):
    section: ClassVar[str] = NAME


@hookimpl
def aligner_plugin_info() -> PluginInfo:
    """AOT (paired) is a loss."""
    return PluginInfo(name=NAME, role="loss", summary="AOT paired (TRL aot): DPO loss on sorted policy − sorted reference margins")


@hookimpl
def aligner_config_section():
    """Options: ``aot.beta``, ``aot.label_smoothing``, ``aot.weight``."""
    return NAME, AOTConfig


@hookimpl
def aligner_required_models(config) -> set[str]:
    """The reference's margins are the distribution to dominate."""
    return {"reference"}


@hookimpl
def aligner_loss(inputs: StepInputs, config) -> LossOutput:
    """L = mean over the sorted margins of the smoothed logistic loss (see the module docstring)."""
    cfg: AOTConfig = config.section(NAME)
    policy_margins = inputs.policy.chosen - inputs.policy.rejected
    reference_margins = inputs.reference.chosen - inputs.reference.rejected
    return LossOutput(sorted_difference_loss(policy_margins, reference_margins, cfg.beta, cfg.label_smoothing).mean())
