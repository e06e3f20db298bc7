"""SFT term: the negative log-likelihood of the chosen responses, as TRL 1.16's DPOTrainer
``loss_type="sft"`` computes it (the generation loss of MPO, Wang et al., 2024, arXiv:2411.10442; the
NLL term of RPO, Pang et al., 2024, arXiv:2404.19733, which TRL's old ``rpo_alpha`` added).

With the chosen responses' summed log-probs log π_θ(y_w,i|x_i) and token
counts |y_w,i| over the micro-batch's B pairs, the loss is the token-level mean

    L = −Σ_i log π_θ(y_w,i|x_i) / Σ_i |y_w,i|

(TRL: the cross-entropy over every chosen completion token of the batch, so
longer responses weigh more than in a per-sequence mean). It needs no
reference model, and its value is the policy's own NLL, not a constant, even
when policy = reference. MPO is ``--plugins dpo,bco_pair,sft --set
dpo.weight=0.8 --set bco_pair.weight=0.2`` (sigmoid 0.8 + bco_pair 0.2 + sft 1).

Metrics: ``sft/loss`` (this term). Options: ``sft.weight`` (aligner.hookspecs.LossConfig).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aligner.hookspecs import LossConfig, LossOutput, PluginInfo, StepInputs, hookimpl

NAME = "sft"


@dataclass
class SFTConfig(LossConfig):
    """Only ``sft.weight``."""


def sft_loss(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """The token-level mean NLL (a scalar) from the (B,) summed chosen log-probs and their token counts."""
    return -chosen_logps.sum() / chosen_tokens.sum().clamp(min=1)


@hookimpl
def aligner_plugin_info() -> PluginInfo:
    """SFT is a loss."""
    return PluginInfo(name=NAME, role="loss", summary="SFT (TRL sft): token-level mean NLL of the chosen responses")


@hookimpl
def aligner_config_section():
    """Options: ``sft.weight``."""
    return NAME, SFTConfig


@hookimpl
def aligner_required_models(config) -> set[str]:
    """The policy alone: no reference model."""
    return set()


@hookimpl
def aligner_loss(inputs: StepInputs, config) -> LossOutput:
    """L = −Σ log π_θ(y_w|x) / Σ |y_w| over the micro-batch (see the module docstring)."""
    return LossOutput(sft_loss(inputs.policy.chosen, inputs.chosen_tokens))
