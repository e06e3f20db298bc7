"""BCO on pairs: Binary Classifier Optimization (Jung et al., 2024, arXiv:2404.04656), as TRL 1.16's
DPOTrainer ``loss_type="bco_pair"`` computes it.

The implicit reward r(y) = β·(log π_θ(y|x) − log π_ref(y|x)) (summed log-probs)
is the logit of a binary classifier that tells chosen (label 1) from rejected
(label 0) responses; the loss is its binary cross-entropy,

    L = −log σ(r(y_w)) − log σ(−r(y_l))

averaged over the micro-batch. The paper shifts both rewards by δ, a running
mean of the rewards (its Eq. 9); TRL 1.16's ``bco_pair`` has no shift, and this
plugin follows TRL. Default β = 0.1 (TRL's ``DPOConfig.beta``). At the first
step policy = reference, so r = 0 and L = 2·ln 2 ≈ 1.3863.

Metrics: ``bco_pair/loss``; the core logs ``rewards/*`` (aligner/training/rewards.py).
Options: ``bco_pair.beta``, ``bco_pair.weight`` (aligner.hookspecs.LossConfig).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aligner.hookspecs import LossConfig, LossOutput, PluginInfo, StepInputs, check_interval, hookimpl

NAME = "bco_pair"


@dataclass
class BCOPairConfig(LossConfig):
    beta: float = 0.1  #: β, the scale of the implicit reward

    def __post_init__(self) -> None:
        super().__post_init__()
        check_interval(f"{NAME}.beta", self.beta, "(0, inf)")


def bco_pair_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair losses (B,) from the summed log-ratios log π_θ − log π_ref of the chosen and rejected responses."""
    return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)


@hookimpl
def aligner_plugin_info() -> PluginInfo:
    """BCO (pairs) is a loss."""
    return PluginInfo(name=NAME, role="loss", summary="BCO pairs (TRL bco_pair): −log σ(r_w) − log σ(−r_l)")


@hookimpl
def aligner_config_section():
    """Options: ``bco_pair.beta``, ``bco_pair.weight``."""
    return NAME, BCOPairConfig


@hookimpl
def aligner_required_models(config) -> set[str]:
    """The reward is a log-ratio against the reference model."""
    return {"reference"}


@hookimpl
def aligner_loss(inputs: StepInputs, config) -> LossOutput:
    """L = mean over pairs of −log σ(r(y_w)) − log σ(−r(y_l)) (see the module docstring)."""
    cfg: BCOPairConfig = config.section(NAME)
    chosen = inputs.policy.chosen - inputs.reference.chosen
    rejected = inputs.policy.rejected - inputs.reference.rejected
    return LossOutput(bco_pair_loss(chosen, rejected, cfg.beta).mean())
