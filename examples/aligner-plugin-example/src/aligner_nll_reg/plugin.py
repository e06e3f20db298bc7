"""``nll_reg``: a negative log-likelihood regulariser on the chosen response, as a constraint plugin.

The term added to the loss of any loss plugin (DPO, IPO, ...) is

    L_nll = α · mean_i [ −log π_θ(y_w,i | x_i) / |y_w,i| ]

the chosen response's cross-entropy averaged per token, then over the
micro-batch. Adding it to DPO is the objective of RPO (Pang et al., 2024,
"Iterative Reasoning Preference Optimization", arXiv:2404.19733, which adds the
length-normalised NLL of the chosen response to the DPO loss); TRL exposes the
same term as ``DPOConfig.rpo_alpha``. It keeps the likelihood of preferred
responses from falling while their margin over rejected ones grows.

``nll_reg.alpha`` (α) defaults to 1.0 here, a choice of this example so that the
term has the scale of the DPO loss, not a value taken from a paper.

Logged: ``nll_reg/nll`` (the mean per-token NLL) and ``nll_reg/constraint`` (α times it).
"""

from __future__ import annotations

from dataclasses import dataclass

from aligner.hookspecs import LossOutput, PluginInfo, StepInputs, check_interval, hookimpl

NAME = "nll_reg"


@dataclass
class NLLRegConfig:
    alpha: float = 1.0  #: α, the weight of the chosen response's per-token NLL

    def __post_init__(self) -> None:
        check_interval(f"{NAME}.alpha", self.alpha, "[0, inf)")


@hookimpl
def aligner_plugin_info() -> PluginInfo:
    return PluginInfo(name=NAME, role="constraint", summary="α·per-token NLL of the chosen response (RPO-style regulariser)")


@hookimpl
def aligner_config_section():
    return NAME, NLLRegConfig


@hookimpl
def aligner_required_models(config) -> set[str]:
    return set()  # only the policy's own log-probs


@hookimpl
def aligner_constraint(inputs: StepInputs, config) -> LossOutput:
    """α · mean over the micro-batch of −log π_θ(y_w|x) / |y_w|."""
    alpha = config.section(NAME).alpha
    nll = -(inputs.policy.chosen / inputs.chosen_tokens.clamp(min=1)).mean()
    term = alpha * nll
    return LossOutput(loss=term, metrics={"nll_reg/nll": nll.detach(), "nll_reg/constraint": term.detach()})
