"""Plugins that are not installed, loaded by ``module:attr`` in tests."""

from dataclasses import dataclass

import torch

from aligner.hookspecs import LossOutput, PluginInfo, hookimpl


@dataclass
class ChosenNLLConfig:
    weight: float = 0.5


class ChosenNLL:
    """A constraint: weight × mean per-token NLL of the chosen response (an SFT regulariser)."""

    @hookimpl
    def aligner_plugin_info(self):
        return PluginInfo(name="chosen_nll", role="constraint", summary="SFT regulariser on chosen responses")

    @hookimpl
    def aligner_config_section(self):
        return "chosen_nll", ChosenNLLConfig

    @hookimpl
    def aligner_required_models(self, config):
        return set()

    @hookimpl
    def aligner_constraint(self, inputs, config):
        nll = -(inputs.policy.chosen / inputs.chosen_tokens.clamp(min=1)).mean()
        term = config.section("chosen_nll").weight * nll
        return LossOutput(term, {"chosen_nll/term": term.detach()})


chosen_nll = ChosenNLL()


class Broken:
    @hookimpl
    def aligner_plugin_info(self):
        return PluginInfo(name="broken", role="constraint", summary="raises in its hook")

    @hookimpl
    def aligner_constraint(self, inputs, config):
        raise RuntimeError("boom from the broken plugin")


broken = Broken()


class SecondLoss:
    @hookimpl
    def aligner_plugin_info(self):
        return PluginInfo(name="second_loss", role="loss", summary="another loss")

    @hookimpl
    def aligner_loss(self, inputs, config):
        return LossOutput(torch.zeros(()), {})


second_loss = SecondLoss()


class OldApi:
    @hookimpl
    def aligner_plugin_info(self):
        return PluginInfo(name="old_api", role="constraint", summary="built for API 0", api_version="0.3")


old_api = OldApi()


order_calls: list = []


class _OrderProbe:
    """A constraint that records the order it was called in."""

    name = ""

    @hookimpl
    def aligner_plugin_info(self):
        return PluginInfo(name=self.name, role="constraint", summary="records its call order")

    def record(self):
        order_calls.append(self.name)


class PlainProbe(_OrderProbe):
    def __init__(self, name):
        self.name = name

    @hookimpl
    def aligner_constraint(self, inputs, config):
        self.record()


class LastProbe(_OrderProbe):
    name = "last_probe"

    @hookimpl(trylast=True)
    def aligner_constraint(self, inputs, config):
        self.record()


class FirstProbe(_OrderProbe):
    name = "first_probe"

    @hookimpl(tryfirst=True)
    def aligner_constraint(self, inputs, config):
        self.record()


last_probe, plain_a, first_probe, plain_b = LastProbe(), PlainProbe("plain_a"), FirstProbe(), PlainProbe("plain_b")


class WrapsConstraint:
    """A constraint whose hook is a pluggy hook wrapper, which aligner does not run: refused at activation."""

    @hookimpl
    def aligner_plugin_info(self):
        return PluginInfo(name="wraps", role="constraint", summary="wraps aligner_constraint")

    @hookimpl(wrapper=True)
    def aligner_constraint(self, inputs, config):
        result = yield
        return result


wraps = WrapsConstraint()


class LossWithoutHook:
    """A loss plugin that forgot aligner_loss: refused at activation, before any engine is built."""

    @hookimpl
    def aligner_plugin_info(self):
        return PluginInfo(name="no_loss_hook", role="loss", summary="declares the loss role only")


no_loss_hook = LossWithoutHook()


class AnchorFrom:
    """Answers aligner_model_path for the anchor with a fixed folder name; the subclass below marks it tryfirst."""

    def __init__(self, name: str, answer: str | None) -> None:
        self.name, self.answer = name, answer

    @hookimpl
    def aligner_plugin_info(self):
        return PluginInfo(name=self.name, role="constraint", summary="names the anchor checkpoint")

    @hookimpl
    def aligner_required_models(self, config):
        return {"anchor"}

    @hookimpl
    def aligner_model_path(self, model, config):
        return self.answer if model == "anchor" else None

    @hookimpl
    def aligner_constraint(self, inputs, config):
        return None


class AnchorFromFirst(AnchorFrom):
    @hookimpl(tryfirst=True)
    def aligner_model_path(self, model, config):
        return self.answer if model == "anchor" else None


anchor_plain = AnchorFrom("anchor_plain", "embedded:plain")
anchor_first = AnchorFromFirst("anchor_first", "embedded:first")
anchor_none = AnchorFromFirst("anchor_none", None)
