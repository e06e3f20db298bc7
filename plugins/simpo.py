"""SimPO: Simple Preference Optimization with a reference-free reward (Meng, Xia and Chen, 2024,
arXiv:2405.14734, the SimPO objective).

The reward is the policy's per-token mean log-prob, r(y) = (β/|y|)·log π_θ(y|x),
and with a target reward margin γ the loss is

    L = −log σ(β/|y_w|·log π_θ(y_w|x) − β/|y_l|·log π_θ(y_l|x) − γ)

averaged over the micro-batch. No reference model: this plugin asks for none,
so none is built (TRL runs this as CPOTrainer's ``loss_type="simpo"``; with
``cpo_alpha=0`` that is this loss, without the NLL term CPO adds).

Defaults: β = 2.0, the value of the SimPO preprint (2.0 or 2.5, as the
authors' repository README states; it adds that larger β such as 10 may work
better), and γ = 0.5, TRL's ``CPOConfig.simpo_gamma`` default and torchtune's
``SimPOLoss`` default. γ is the margin itself here, not TRL's γ/β.

Metrics: ``simpo/loss`` (this term) and, with TRL's names (as its CPOTrainer
logs them for SimPO), ``rewards/chosen`` and ``rewards/rejected`` (mean r),
``rewards/margins`` (mean r(y_w) − r(y_l)), ``rewards/accuracies`` (share with
r(y_w) > r(y_l)). Those ``rewards/*`` are this reference-free reward only in a
run without a reference model; when another plugin brings a reference, the
core's DPO-form ``rewards/*`` replace them (aligner/training/rewards.py).

TRL 1.16's DPOTrainer ``loss_type="sigmoid_norm"`` is a different loss (DPO on
per-token averaged log-ratios, with a reference): the ``sigmoid_norm`` plugin.
Options inherit ``weight`` (aligner.hookspecs.LossConfig).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aligner.hookspecs import LossConfig, LossOutput, PluginInfo, StepInputs, check_interval, hookimpl

NAME = "simpo"


@dataclass
class SimPOConfig(LossConfig):
    beta: float = 2.0  #: β, the reward scale
    gamma: float = 0.5  #: γ, the target reward margin

    def __post_init__(self) -> None:
        super().__post_init__()
        check_interval("simpo.beta", self.beta, "(0, inf)")
        check_interval("simpo.gamma", self.gamma, "[0, inf)")


def simpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_tokens: torch.Tensor,
               rejected_tokens: torch.Tensor, beta: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example SimPO losses and the chosen/rejected rewards (β/|y|)·log π, all shape (B,). Log-probs summed."""
    chosen_rewards = beta * policy_chosen / chosen_tokens.clamp(min=1)
    rejected_rewards = beta * policy_rejected / rejected_tokens.clamp(min=1)
    return -F.logsigmoid(chosen_rewards - rejected_rewards - gamma), chosen_rewards, rejected_rewards


@hookimpl
def aligner_plugin_info() -> PluginInfo:
    """SimPO is a loss."""
    return PluginInfo(name=NAME, role="loss", summary="SimPO (reference-free): -log σ(β·Δ per-token-mean log π − γ)")


@hookimpl
def aligner_config_section():
    """Options: ``simpo.beta``, ``simpo.gamma``."""
    return NAME, SimPOConfig


@hookimpl
def aligner_required_models(config) -> set[str]:
    """Reference-free: no reference model is asked for, so none is built."""
    return set()


@hookimpl
def aligner_loss(inputs: StepInputs, config) -> LossOutput:
    """L = mean over pairs of −log σ(r(y_w) − r(y_l) − γ) (see the module docstring)."""
    cfg: SimPOConfig = config.section(NAME)
    losses, chosen_r, rejected_r = simpo_loss(
        inputs.policy.chosen, inputs.policy.rejected, inputs.chosen_tokens, inputs.rejected_tokens, cfg.beta, cfg.gamma,
    )
    return LossOutput.pairwise(losses, chosen_r, rejected_r)
