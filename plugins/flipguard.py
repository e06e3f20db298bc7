"""FlipGuard: a focal constraint against update regression (Zhu et al., EMNLP 2024, "FlipGuard: Defending
Preference Alignment against Update Regression with Constrained Optimization", arXiv:2410.00508).

The anchor π_pre (the paper's π_θ0) is the pre-aligned model, frozen: by
default the policy's initial weights, or ``flipguard.anchor_path``. The
paper's full Section 3 is not in the stored copies; what follows is what its
public summaries quote, and every choice they leave open is an option here.

**Negative-flip test** (quoted, DPO form). With the DPO implicit reward
r(x, y) = β·log(π(y|x)/π_ref(y|x)), an example is a negative flip when

    r_pre(x, y) − r_θ(x, y) > ε                                         (flip test)

for its target response y. The reference cancels:

    r_pre − r_θ = β·(log π_pre(y|x) − log π_θ(y|x))

so the test needs no reference (moving or not) and is never degenerate, even
when reference = anchor: the policy's log-likelihood of y fell more than ε/β
nats below the anchor's. (The paper's PPO form compares a reward model's
scores of both models' generations; it is not implemented here.)

**Objective** (quoted up to the weight): L = L_align + γ·C, where C is a KL
toward π_pre applied only to flipped examples (a hard, gradient-free gate)
that "via the KL ↔ CE equivalence reduces to a cross-entropy term on flipped
cases". Treating the target response as the anchor's sample, the cross-entropy
is −log π_θ(y|x), so

    C = (1/B) · Σ_i 1[flip_i] · (−log π_θ(y_i|x_i) / |y_i|)            (focal constraint)

averaged over the *whole* micro-batch (unflipped examples add 0), so that γ
keeps its meaning whatever the flip rate. Its gradient raises log π_θ(y_i|x_i)
of each flipped example, back toward the anchor's; unflipped examples get none.

Choices the public text leaves open (our defaults; the paper's values of ε and
γ were not found in the stored copies):

- ``target``: which response is y. ``chosen`` (default): the preferred
  response y_w. ``margin``: r is the preference margin r(y_w) − r(y_l), so a flip
  means β·[(log π_pre(y_w) − log π_pre(y_l)) − (log π_θ(y_w) − log π_θ(y_l))] > ε;
  the constraint's cross-entropy is still on y_w.
- ``constraint``: ``nll`` (the only one implemented): the per-token sequence
  cross-entropy above. It needs only the anchor's sequence log-probs, which are
  static and cached (``train.cache_static_logps``), so after the pre-pass the
  anchor costs no forward pass. The exact token-level form KL(π_pre ‖ π_θ) over
  the vocabulary would need the anchor's logits every step (nothing cacheable);
  it is not implemented.
- ``beta``: the β of the reward characterisation, 0.1 by default (DPO's
  default); set it to your loss's β so that ε is in the same reward units.
- ``epsilon``: ε > 0, 0.01 by default (0.1 nats at β = 0.1). With ε = 0 the
  numerical noise between cached and live log-probs would count as flips while
  policy = anchor.
- ``gamma``: γ ≥ 0, 1.0 by default.

Metrics: ``flipguard/flip_rate`` (share of the micro-batch flipped),
``flipguard/constraint`` (γ·C, the term added to the loss),
``flipguard/reward_gap`` (mean r_pre − r_θ of the target) and
``anchor/kl_estimate``: the mean over chosen and rejected of
log π_pre(y|x) − log π_θ(y|x), the Monte-Carlo (k1) estimate of the
sequence-level KL(π_pre ‖ π_θ) when the data's responses are taken as samples
of π_pre (the same assumption the cross-entropy makes), in nats per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from aligner.hookspecs import LossOutput, PluginInfo, StepInputs, check_interval, hookimpl
from aligner.models import hub

NAME = "flipguard"
TARGETS = ("chosen", "margin")
CONSTRAINTS = ("nll",)


@dataclass
class FlipGuardConfig:
    #: ε of the flip test r_pre − r_θ > ε, in reward units (the paper's value was not found).
    epsilon: float = 0.01
    #: γ, the weight of the focal constraint (the paper's value was not found).
    gamma: float = 1.0
    #: β of the reward characterisation r = β·log(π/π_ref); match your loss's β.
    beta: float = 0.1
    #: ``chosen`` (y = y_w) or ``margin`` (r = r(y_w) − r(y_l)).
    target: str = "chosen"
    #: ``nll``: per-token cross-entropy of y_w on flipped examples.
    constraint: str = "nll"
    #: The pre-aligned model: a Hub model ID, a local HF checkpoint folder or ``embedded:...``; default the policy's initial weights.
    anchor_path: str | None = None

    def __post_init__(self) -> None:
        check_interval("flipguard.epsilon", self.epsilon, "(0, inf)",
                       "the flip test r_pre − r_θ > ε would count numerical noise as flips; the default is 0.01")
        check_interval("flipguard.gamma", self.gamma, "[0, inf)")
        check_interval("flipguard.beta", self.beta, "(0, inf)")
        if self.target not in TARGETS:
            raise ValueError(f"flipguard.target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.constraint not in CONSTRAINTS:
            raise ValueError(f"flipguard.constraint must be one of {', '.join(CONSTRAINTS)}, got {self.constraint!r} "
                             f"(token_kl needs the anchor's logits every step and is not implemented)")
        if self.anchor_path is not None and not self.anchor_path.startswith("embedded:"):
            # A Hub ID is fetched (or found in the HF cache) by the core when the anchor is built.
            if not hub.is_hub_id(self.anchor_path) and not (Path(self.anchor_path) / "config.json").is_file():
                raise ValueError(f"flipguard.anchor_path: {self.anchor_path} is not a model folder (no config.json "
                                 f"there) nor a Hub model ID; give the pre-aligned model's Hub ID (org/name) or a local "
                                 f"Hugging Face checkpoint folder, or leave it unset to anchor on the policy's initial weights")


def flip_test(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, anchor_chosen: torch.Tensor,
              anchor_rejected: torch.Tensor, beta: float, epsilon: float, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward gap r_pre − r_θ of the target, shape (B,), and the flip mask gap > ε (bool, (B,)); both detached."""
    gap = beta * (anchor_chosen - policy_chosen.detach())
    if target == "margin":
        gap = gap - beta * (anchor_rejected - policy_rejected.detach())
    return gap, gap > epsilon


def focal_constraint(policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
    """C = mean over the micro-batch of 1[flip]·(−log π_θ(y_w|x)/|y_w|); unflipped examples add 0."""
    nll = -policy_chosen / chosen_tokens.clamp(min=1).to(policy_chosen.dtype)
    return torch.where(flipped, nll, torch.zeros_like(nll)).mean()


@hookimpl
def aligner_plugin_info() -> PluginInfo:
    return PluginInfo(name=NAME, role="constraint",
                      summary="FlipGuard: cross-entropy toward the frozen anchor on negative flips (r_pre − r_θ > ε)")


@hookimpl
def aligner_config_section():
    return NAME, FlipGuardConfig


@hookimpl
def aligner_required_models(config) -> set[str]:
    return {"anchor"}


@hookimpl
def aligner_model_path(model: str, config) -> str | None:
    """The anchor is ``flipguard.anchor_path`` when set (else the core's default: the policy's initial weights)."""
    return config.section(NAME).anchor_path if model == "anchor" else None


@hookimpl
def aligner_constraint(inputs: StepInputs, config) -> LossOutput:
    """γ·C on the micro-batch, with the flip test against the anchor's (cached) log-probs."""
    cfg: FlipGuardConfig = config.section(NAME)
    policy, anchor = inputs.policy, inputs.anchor
    gap, flipped = flip_test(policy.chosen, policy.rejected, anchor.chosen, anchor.rejected,
                             cfg.beta, cfg.epsilon, cfg.target)
    term = cfg.gamma * focal_constraint(policy.chosen, inputs.chosen_tokens, flipped)
    kl = torch.cat([anchor.chosen - policy.chosen.detach(), anchor.rejected - policy.rejected.detach()]).mean()
    return LossOutput(loss=term, metrics={
        "flipguard/flip_rate": flipped.float().mean(),
        "flipguard/constraint": term.detach(),
        "flipguard/reward_gap": gap.mean(),
        "anchor/kl_estimate": kl,
    })


@hookimpl
def aligner_report_panels() -> list[tuple[str, str, list[str]]]:
    """The share of flipped examples in training, and the evaluation's flip rates against the anchor."""
    return [("flip_rate", "FlipGuard: flips against the anchor", ["flipguard/flip_rate", "eval/regression/*flip*"])]
