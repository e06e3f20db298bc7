"""A test-only observer for trust-region runs: after every optimizer step it writes the gathered weights of the
policy (its fp32 master), the reference and the anchor, and the reference/anchor log-probs the step used.

It asks for the anchor, as FlipGuard does, so a run with it has a moving reference and a frozen anchor. List it
after the reference-update plugin in ``--plugins``: hooks run in that order, so it sees the updated reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from aligner.hookspecs import PluginInfo, hookimpl


@dataclass
class TRProbeConfig:
    dump_dir: str = ""


def _gathered(module: torch.nn.Module, master: bool) -> dict[str, torch.Tensor]:
    """Full copies of every parameter (a collective under ZeRO-3); the fp32 master weights if ``master``."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(module.named_parameters())
    if master:
        return {n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in params.items()}
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {n: p.detach().cpu().float().clone() for n, p in params.items()}


class TRProbe:
    def __init__(self) -> None:
        self.seen: list[dict] = []

    @hookimpl
    def aligner_plugin_info(self):
        return PluginInfo(name="tr_probe", role="constraint", summary="records weights and log-probs of a TR run")

    @hookimpl
    def aligner_config_section(self):
        return "tr_probe", TRProbeConfig

    @hookimpl
    def aligner_required_models(self, config):
        return {"anchor"}

    @hookimpl
    def aligner_constraint(self, inputs, config):
        self.seen.append({"ids": list(inputs.example_ids),
                          "reference": torch.cat([inputs.reference.chosen, inputs.reference.rejected]).cpu(),
                          "anchor": torch.cat([inputs.anchor.chosen, inputs.anchor.rejected]).cpu()})
        return None

    @hookimpl
    def aligner_after_optimizer_step(self, step, engines, config):
        record = {"policy": _gathered(engines.policy.module, master=True),
                  "reference": _gathered(engines.reference.module, master=False),
                  "anchor": _gathered(engines.anchor.module, master=False),
                  "anchor_is_reference": engines.anchor is engines.reference,
                  "reference_dtype": str(next(engines.reference.module.parameters()).dtype),
                  "micro_batches": self.seen}
        self.seen = []
        if not dist.is_initialized() or dist.get_rank() == 0:
            out = Path(config.section("tr_probe").dump_dir)
            out.mkdir(parents=True, exist_ok=True)
            torch.save(record, out / f"step_{step}.pt")
        return None


tr_probe = TRProbe()
