"""Plugins that build different sets of models, for the memory estimator's tests and benchmarks/scale_cpu.py."""

from dataclasses import dataclass

import torch.nn.functional as F

from aligner.hookspecs import LossOutput, PluginInfo, hookimpl


class RefFree:
    """A reference-free pairwise loss: L = −log σ(β·(log π(y_w|x) − log π(y_l|x))), β = 0.1.

    DPO's Eq. 7 (Rafailov et al., 2023) with the reference log-ratio dropped; it asks for no model besides
    the policy, which is what the tests need.
    """

    @hookimpl
    def aligner_plugin_info(self):
        return PluginInfo(name="ref_free", role="loss", summary="reference-free pairwise loss (test fixture)")

    @hookimpl
    def aligner_required_models(self, config):
        return set()

    @hookimpl
    def aligner_loss(self, inputs, config):
        """L = −log σ(β·(log π(y_w) − log π(y_l))), mean over the micro-batch."""
        margin = 0.1 * (inputs.policy.chosen - inputs.policy.rejected)
        return LossOutput(-F.logsigmoid(margin).mean(), {"rewards/margins": margin.detach().mean()})


ref_free = RefFree()


@dataclass
class AnchorPullConfig:
    weight: float = 0.01


class AnchorPull:
    """A constraint that asks for the anchor: weight × mean (log π(y_w|x) − log π_anchor(y_w|x))²."""

    @hookimpl
    def aligner_plugin_info(self):
        return PluginInfo(name="anchor_pull", role="constraint", summary="squared log-ratio to the anchor (test fixture)")

    @hookimpl
    def aligner_config_section(self):
        return "anchor_pull", AnchorPullConfig

    @hookimpl
    def aligner_required_models(self, config):
        return {"anchor"}

    @hookimpl
    def aligner_constraint(self, inputs, config):
        """weight × mean over the micro-batch of (log π(y_w) − log π_anchor(y_w))²."""
        term = config.section("anchor_pull").weight * (inputs.policy.chosen - inputs.anchor.chosen).pow(2).mean()
        return LossOutput(term, {"anchor_pull/term": term.detach()})


anchor_pull = AnchorPull()


class MovesReference:
    """A reference-update plugin that leaves the reference as it is (the estimator only needs its role)."""

    @hookimpl
    def aligner_plugin_info(self):
        return PluginInfo(name="moves_reference", role="reference_update", summary="no-op reference update (test fixture)")

    @hookimpl
    def aligner_required_models(self, config):
        return {"reference"}

    @hookimpl
    def aligner_after_optimizer_step(self, step, engines, config):
        """No math: the reference is left unchanged."""
        return None


moves_reference = MovesReference()
