"""IPO: Identity Preference Optimisation (Azar et al., 2023, arXiv:2310.12036, the sampled IPO loss).

With the per-token averaged log-ratio of each response,
ρ(y) = (log π_θ(y|x) − log π_ref(y|x)) / |y|, and h = ρ(y_w) − ρ(y_l), the loss is

    L = (h − 1/(2β))²

averaged over the micro-batch (the paper writes τ for β). IPO regresses the
margin h onto the fixed target 1/(2β) instead of pushing it to infinity as
DPO's −log σ does.

The log-probs are averaged per token, as TRL's DPOTrainer does for
``loss_type="ipo"``. That makes IPO's β **not comparable to DPO's**: DPO's β
scales a sum over the response's tokens, IPO's sets the target of a per-token
mean, so a good IPO β is typically much smaller than a good DPO β on the same
data. Default: β = 0.1, TRL's ``DPOConfig.beta`` default, which it uses for
every loss type. At the first step policy = reference, so h = 0 and
L = (1/(2β))² (= 25 at β = 0.1).

Metrics: ``ipo/loss`` (this term), and the averaged form of the rewards
under this plugin's prefix: ``ipo/rewards/chosen`` and ``ipo/rewards/rejected``
(mean β·ρ), ``ipo/rewards/margins`` (mean β·h), ``ipo/rewards/accuracies``
(share with h > 0). TRL 1.16 logs ``rewards/*`` from the *summed* log-ratio
β·(log π_θ − log π_ref) for every loss type, IPO included; the core logs
exactly that (aligner/training/rewards.py). Options inherit ``weight``
(aligner.hookspecs.LossConfig).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aligner.hookspecs import LossConfig, LossOutput, PluginInfo, StepInputs, check_interval, hookimpl

NAME = "ipo"


@dataclass
class IPOConfig(LossConfig):
    beta: float = 0.1  #: β (the paper's τ); the margin target is 1/(2β). Not comparable to dpo.beta.

    def __post_init__(self) -> None:
        super().__post_init__()
        check_interval("ipo.beta", self.beta, "(0, inf)")


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example IPO losses and the chosen/rejected rewards β·ρ, all shape (B,). Log-probs are summed; token counts (B,)."""
    chosen_ratio = (policy_chosen - ref_chosen) / chosen_tokens.clamp(min=1)  # ρ(y_w)
    rejected_ratio = (policy_rejected - ref_rejected) / rejected_tokens.clamp(min=1)  # ρ(y_l)
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio, beta * rejected_ratio


@hookimpl
def aligner_plugin_info() -> PluginInfo:
    """IPO is a loss."""
    return PluginInfo(name=NAME, role="loss", summary="IPO: (h − 1/(2β))², h = Δ per-token-mean log-ratio")


@hookimpl
def aligner_config_section():
    """Options: ``ipo.beta``."""
    return NAME, IPOConfig


@hookimpl
def aligner_required_models(config) -> set[str]:
    """IPO needs the reference model's log-probs."""
    return {"reference"}


@hookimpl
def aligner_loss(inputs: StepInputs, config) -> LossOutput:
    """L = mean over pairs of (h − 1/(2β))², h on per-token averaged log-ratios (see the module docstring)."""
    cfg: IPOConfig = config.section(NAME)
    losses, chosen_r, rejected_r = ipo_loss(
        inputs.policy.chosen, inputs.policy.rejected, inputs.reference.chosen, inputs.reference.rejected,
        inputs.chosen_tokens, inputs.rejected_tokens, cfg.beta,
    )
    averaged = LossOutput.pairwise(losses, chosen_r, rejected_r)
    return LossOutput(averaged.loss, {f"{NAME}/{tag}": value for tag, value in averaged.metrics.items()})
