"""A plugin that asks for an input aligner does not provide, loaded by ``module:attr`` in tests."""

from aligner.hookspecs import PluginInfo, hookimpl


class WantsLogits:
    @hookimpl
    def aligner_plugin_info(self):
        return PluginInfo(name="wants_logits", role="constraint", summary="asks for an unknown input")

    @hookimpl
    def aligner_required_inputs(self, config):
        return {"logits"}

    @hookimpl
    def aligner_constraint(self, inputs, config):
        return None


wants_logits = WantsLogits()
