"""AOT, unpaired: Alignment via Optimal Transport (Melnyk et al., 2024, arXiv:2406.05882), as TRL 1.16's
DPOTrainer ``loss_type="aot_unpaired"`` computes it.

The unpaired form asks the distribution of the chosen responses' log-ratios
to dominate that of the rejected ones. With ρ(y) = log π_θ(y|x) − log π_ref(y|x)
(summed log-probs), the chosen log-ratios and the rejected ones are sorted
separately over the micro-batch and matched by rank:

    d_i = ρ_w,(i) − ρ_l,(i),   L = mean_i [−(1 − ε)·log σ(β·d_i) − ε·log σ(−β·d_i)]

TRL computes it on preference batches (B chosen and B rejected responses), and
so does this plugin: the chosen and the rejected responses need not come from
the same prompts for the loss, only for the data format. The sort runs over
each rank's micro-batch, as TRL's does per device. ε is TRL's
``label_smoothing`` (default 0). Default β = 0.1 (TRL's ``DPOConfig.beta``). At
the first step policy = reference, so ρ = 0, d = 0 and L = ln 2 for every ε.

Metrics: ``aot_unpaired/loss``; the core logs ``rewards/*`` (aligner/training/rewards.py).
Options: ``aot_unpaired.beta``, ``aot_unpaired.label_smoothing``, ``aot_unpaired.weight``
(aligner.hookspecs.LossConfig).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from aligner.hookspecs import LossOutput, PluginInfo, StepInputs, hookimpl
from aligner_plugins.optimal_transport import SortedLossConfig, sorted_difference_loss

NAME = "aot_unpaired"


@dataclass
class AOTUnpairedConfig(SortedLossConfig):
    section: ClassVar[str] = NAME


@hookimpl
def aligner_plugin_info() -> PluginInfo:
    """AOT (unpaired) is a loss."""
    return PluginInfo(name=NAME, role="loss", summary="AOT unpaired (TRL aot_unpaired): DPO loss on sorted ρ_w − sorted ρ_l")


@hookimpl
def aligner_config_section():
    """Options: ``aot_unpaired.beta``, ``aot_unpaired.label_smoothing``, ``aot_unpaired.weight``."""
    return NAME, AOTUnpairedConfig


@hookimpl
def aligner_required_models(config) -> set[str]:
    """The log-ratios are against the reference model."""
    return {"reference"}


@hookimpl
def aligner_loss(inputs: StepInputs, config) -> LossOutput:
    """L = mean over the sorted log-ratios of the smoothed logistic loss (see the module docstring)."""
    cfg: AOTUnpairedConfig = config.section(NAME)
    chosen = inputs.policy.chosen - inputs.reference.chosen
    rejected = inputs.policy.rejected - inputs.reference.rejected
    return LossOutput(sorted_difference_loss(chosen, rejected, cfg.beta, cfg.label_smoothing).mean())
