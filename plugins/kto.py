"""KTO: Kahneman-Tversky Optimization (Ethayarajh et al., 2024, arXiv:2402.01306), in TRL's KTOTrainer form.

Each completion y of a prompt x is desirable or undesirable. With the
log-ratio ρ(y) = log π_θ(y|x) − log π_ref(y|x) (summed log-probs) and the
reference point

    z₀ = max(0, mean over mismatched pairs (x, y') of log π_θ(y'|x) − log π_ref(y'|x)),

a biased estimate of KL(π_θ ‖ π_ref) from the batch's completions scored after
other rows' prompts, with no gradient: as TRL's KTOTrainer builds its KL batch,
row i's prompt with row i−1's completion, in the micro-batch's example (file)
order (row 0 takes the last row's completion; aligner/data/collate.py), the per-completion losses are

    desirable:    λ_D·(1 − σ(β·(ρ(y) − z₀)))
    undesirable:  λ_U·(1 − σ(β·(z₀ − ρ(y))))

and L is their mean over all completions of the micro-batch (the paper's
λ_y − v(x, y), as TRL computes it). z₀ is estimated per micro-batch from the
mismatched pairs of all ranks (all-reduced), as TRL gathers it across processes.
At the first step policy = reference,
so ρ = z₀ = 0 and L = 0.5·(λ_D·n_D + λ_U·n_U)/(n_D + n_U), 0.5 with the
default weights.

Data: unpaired rows (``prompt``, ``completion``, ``label``) or preference
pairs, whose chosen response is desirable and rejected one undesirable.

Defaults: β = 0.1, λ_D = λ_U = 1 (TRL's ``KTOConfig`` defaults). With
unbalanced data the paper advises weights such that
λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3] (quoted from TRL's KTOTrainer documentation,
"desirable_weight"/"undesirable_weight"); a training set outside that range
gets a warning with the numbers and a suggested weight.

Metrics: ``kto/loss`` (this term) and ``kto/kl`` (z₀). The core logs
``rewards/chosen`` and ``rewards/rejected`` (mean β·ρ of the desirable and of
the undesirable completions; NaN, i.e. not logged, for a micro-batch without
one of them), ``rewards/margins`` (their difference) and
``rewards/accuracies`` (paired data only), aligner/training/rewards.py. Options inherit
``weight`` (aligner.hookspecs.LossConfig).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from aligner.distributed.comm import comm_device
from aligner.hookspecs import DatasetSummary, LossConfig, LossOutput, PluginInfo, StepInputs, check_interval, hookimpl

NAME = "kto"
log = logging.getLogger(__name__)
ADVISED_RATIO = (1.0, 4 / 3)  #: λ_D·n_D / (λ_U·n_U), the KTO paper's advice as quoted by TRL


@dataclass
class KTOConfig(LossConfig):
    beta: float = 0.1  #: β, the scale of the log-ratio inside the sigmoid
    desirable_weight: float = 1.0  #: λ_D, weight of the desirable completions' losses
    undesirable_weight: float = 1.0  #: λ_U, weight of the undesirable completions' losses

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("beta", "desirable_weight", "undesirable_weight"):
            check_interval(f"kto.{key}", getattr(self, key), "(0, inf)")


def kl_baseline(kl_policy: torch.Tensor, kl_reference: torch.Tensor) -> torch.Tensor:
    """z₀ = max(0, mean(log π_θ(y'|x) − log π_ref(y'|x))) over the mismatched pairs of every rank, detached; a scalar.

    Under several ranks the sum and count are all-reduced, so every rank uses the
    same z₀, estimated from the whole global micro-batch (TRL gathers its KL
    estimate across processes the same way). Every rank computes the loss on
    every micro-batch, so the all-reduce is met by all of them.
    """
    diff = (kl_policy - kl_reference).detach()
    stats = torch.stack([diff.sum(), torch.tensor(float(diff.numel()), dtype=diff.dtype, device=diff.device)])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        stats = stats.to(comm_device())  # the backend's device (NCCL: this rank's GPU)
        dist.all_reduce(stats)
    return (stats[0] / stats[1]).clamp(min=0).to(diff.device)


def kto_loss(policy_desirable: torch.Tensor, ref_desirable: torch.Tensor, policy_undesirable: torch.Tensor,
             ref_undesirable: torch.Tensor, z0: torch.Tensor, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-completion losses (desirable ones first, shape (n_D + n_U,)) and the rewards β·ρ of each group."""
    desirable_ratio = policy_desirable - ref_desirable  # (n_D,)
    undesirable_ratio = policy_undesirable - ref_undesirable  # (n_U,)
    losses = torch.cat([
        desirable_weight * (1 - torch.sigmoid(beta * (desirable_ratio - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - undesirable_ratio))),
    ])
    return losses, beta * desirable_ratio, beta * undesirable_ratio


def weighting_advice(summary: DatasetSummary, cfg: KTOConfig) -> str | None:
    """The paper's weighting advice when λ_D·n_D / (λ_U·n_U) is outside [1, 4/3], else None."""
    n_d, n_u = summary.n_desirable, summary.n_undesirable
    if n_d == 0 or n_u == 0:
        return (f"{summary.label} has {n_d} desirable and {n_u} undesirable completions; KTO learns from both kinds, "
                f"add rows of the missing kind")
    ratio = cfg.desirable_weight * n_d / (cfg.undesirable_weight * n_u)
    low, high = ADVISED_RATIO
    if low <= ratio <= high:
        return None
    fix = (f"kto.undesirable_weight={cfg.desirable_weight * n_d / n_u:.4g}" if ratio > high
           else f"kto.desirable_weight={cfg.undesirable_weight * n_u / n_d:.4g}")
    return (f"{summary.label} has {n_d} desirable and {n_u} undesirable completions; with "
            f"kto.desirable_weight={cfg.desirable_weight:g} and kto.undesirable_weight={cfg.undesirable_weight:g}, "
            f"λ_D·n_D/(λ_U·n_U) = {ratio:.3f} is outside [1, 4/3], the range the KTO paper advises "
            f"(Ethayarajh et al., 2024, as TRL's KTOTrainer docs quote it). Upweight the rarer kind, e.g. --set {fix}")


@hookimpl
def aligner_plugin_info() -> PluginInfo:
    """KTO is a loss."""
    return PluginInfo(name=NAME, role="loss", summary="KTO: λ·(1 − σ(±β·(log-ratio − z₀))), unpaired or paired data")


@hookimpl
def aligner_config_section():
    """Options: ``kto.beta``, ``kto.desirable_weight``, ``kto.undesirable_weight``."""
    return NAME, KTOConfig


@hookimpl
def aligner_required_models(config) -> set[str]:
    """KTO needs the reference model's log-probs."""
    return {"reference"}


@hookimpl
def aligner_required_inputs(config) -> set[str]:
    """KTO trains on unpaired data too, and needs the mismatched-pair log-probs for z₀."""
    return {"unpaired", "kl_pairs"}


@hookimpl
def aligner_train_data(summary: DatasetSummary, config) -> None:
    """Warn about class weights outside the paper's advice, and about a micro-batch too small for z₀."""
    advice = weighting_advice(summary, config.section(NAME))
    if advice:
        log.warning(advice)
    if config.train.micro_batch_size < 2:
        log.warning("train.micro_batch_size=1: KTO's z₀ pairs each completion with another row's prompt of the same "
                    "micro-batch, which needs at least 2 rows with different prompts; raise train.micro_batch_size")


@hookimpl
def aligner_loss(inputs: StepInputs, config) -> LossOutput:
    """L = mean over the micro-batch's completions of the weighted KTO losses (see the module docstring)."""
    cfg: KTOConfig = config.section(NAME)
    z0 = kl_baseline(inputs.kl_policy, inputs.kl_reference)
    losses, _, _ = kto_loss(
        inputs.policy.chosen, inputs.reference.chosen, inputs.policy.rejected, inputs.reference.rejected,
        z0, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight,
    )
    return LossOutput(loss=losses.mean(), metrics={"kto/kl": z0})
