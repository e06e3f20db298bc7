"""EXO on pairs: Efficient Exact Optimization (Ji et al., 2024, arXiv:2402.00856, EXO-pref, Eq. 16), as TRL
1.16's DPOTrainer ``loss_type="exo_pair"`` computes it.

With the margin m = β·[(log π_θ − log π_ref)(y_w) − (log π_θ − log π_ref)(y_l)]
(summed log-probs), EXO minimises the reverse KL from the model's preference
distribution over the pair, q = (σ(m), σ(−m)), to the label distribution
p = (1 − ε, ε), instead of DPO's forward cross-entropy:

    L = σ(m)·(log σ(m) − log(1 − ε)) + σ(−m)·(log σ(−m) − log ε)

averaged over the micro-batch (K = 2 responses per prompt). ε must be > 0
(at ε = 0 the loss is infinite). TRL takes ε from its ``label_smoothing`` and
recommends 1e-3 for EXO; this plugin's ``exo_pair.epsilon`` defaults to 1e-3.
Default β = 0.1 (TRL's ``DPOConfig.beta``). At the first step policy =
reference, so m = 0 and L = −ln 2 − ½·ln(ε·(1 − ε)) ≈ 2.7612 at ε = 1e-3.

Metrics: ``exo_pair/loss``; the core logs ``rewards/*`` (aligner/training/rewards.py).
Options: ``exo_pair.beta``, ``exo_pair.epsilon``, ``exo_pair.weight`` (aligner.hookspecs.LossConfig).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aligner.hookspecs import LossConfig, LossOutput, PluginInfo, StepInputs, check_interval, hookimpl

NAME = "exo_pair"


@dataclass
class EXOPairConfig(LossConfig):
    beta: float = 0.1  #: β, the scale of the implicit reward
    epsilon: float = 1e-3  #: ε in (0, 0.5): the label distribution is (1 − ε, ε)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_interval(f"{NAME}.beta", self.beta, "(0, inf)")
        check_interval(f"{NAME}.epsilon", self.epsilon, "(0, 0.5)", "the loss is infinite at 0")


def exo_pair_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
                  epsilon: float) -> torch.Tensor:
    """Per-pair losses (B,) from the summed log-ratios log π_θ − log π_ref of the chosen and rejected responses."""
    margin = beta * (chosen_logratios - rejected_logratios)
    log_q_w, log_q_l = F.logsigmoid(margin), F.logsigmoid(-margin)
    return log_q_w.exp() * (log_q_w - math.log1p(-epsilon)) + log_q_l.exp() * (log_q_l - math.log(epsilon))


@hookimpl
def aligner_plugin_info() -> PluginInfo:
    """EXO (pairs) is a loss."""
    return PluginInfo(name=NAME, role="loss", summary="EXO pairs (TRL exo_pair): KL((σ(m), σ(−m)) ‖ (1−ε, ε))")


@hookimpl
def aligner_config_section():
    """Options: ``exo_pair.beta``, ``exo_pair.epsilon``, ``exo_pair.weight``."""
    return NAME, EXOPairConfig


@hookimpl
def aligner_required_models(config) -> set[str]:
    """The margin is on log-ratios against the reference model."""
    return {"reference"}


@hookimpl
def aligner_loss(inputs: StepInputs, config) -> LossOutput:
    """L = mean over pairs of the EXO pair loss (see the module docstring)."""
    cfg: EXOPairConfig = config.section(NAME)
    chosen = inputs.policy.chosen - inputs.reference.chosen
    rejected = inputs.policy.rejected - inputs.reference.rejected
    return LossOutput(exo_pair_loss(chosen, rejected, cfg.beta, cfg.epsilon).mean())
