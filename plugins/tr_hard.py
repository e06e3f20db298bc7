"""TR hard: the hard trust-region reference update of TR-DPO / TR-IPO / TR-KTO.

From "Learn Your Reference Model for Real Good Alignment" (Gorbatovski et al.,
2024, arXiv:2404.09656): every τ optimizer steps the reference is replaced by
the policy,

    θ_ref ← θ

which is the soft update θ_ref ← α·θ + (1 − α)·θ_ref with α = 1. The first
update is at step τ, then 2τ, …; steps are optimizer steps, not micro-batches.
Between updates the reference does not change.

Settings. The paper's method section is not in our stored copies, so this is
second-hand: the paper's recommendation for the hard update, as quoted by TRL's
maintainers and an ICLR reviewer, is τ = 512 (with β = 0.05, lr 1e-6, 1 epoch,
max length 1024, grad-norm clip 2); TRL's default τ is 512 too. Our default is
τ = 512 (``tr_hard.every``). The embedded tiny run is far shorter than 512
steps: ``configs/tiny-cpu-tr.yaml`` sets a small τ so that it does update.

How: ``aligner.trust_region`` copies each rank's local ZeRO-3 partitions of the
policy's fp32 master weights into the fp32 reference, with no all-gather; the
moved reference is written into every checkpoint and restored on resume.

Metrics: ``tr/updates`` (updates so far) and ``tr/ref_policy_l2``
(‖θ_ref − θ‖ / ‖θ‖ over all weights, after this step's update: 0 at τ, 2τ, …).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aligner import trust_region
from aligner.hookspecs import Engines, PluginInfo, hookimpl

NAME = "tr_hard"


@dataclass
class TRHardConfig:
    every: int = 512  #: τ, optimizer steps between updates (the paper's recommendation, second-hand; TRL's default)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"tr_hard.every must be >= 1 (optimizer steps between updates), got {self.every}")


class TRHard:
    """The plugin object; it holds the number of updates made so far (saved in checkpoints)."""

    def __init__(self) -> None:
        self.updates = 0

    @hookimpl
    def aligner_plugin_info(self) -> PluginInfo:
        """tr_hard is the run's reference update."""
        return PluginInfo(name=NAME, role="reference_update",
                          summary="TR hard: every τ steps θ_ref ← θ (TR-DPO/IPO/KTO)")

    @hookimpl
    def aligner_config_section(self) -> tuple[str, type]:
        """Option ``tr_hard.every`` (τ)."""
        return NAME, TRHardConfig

    @hookimpl
    def aligner_required_models(self, config) -> set[str]:
        """The reference, which this plugin replaces every τ steps."""
        return {"reference"}

    @hookimpl
    def aligner_after_optimizer_step(self, step: int, engines: Engines, config) -> dict[str, float]:
        """At steps τ, 2τ, …: θ_ref ← θ on the local shards; log the updates and ‖θ_ref−θ‖/‖θ‖."""
        cfg: TRHardConfig = config.section(NAME)
        if step % cfg.every == 0:
            trust_region.mix_into_reference(engines, 1.0)
            self.updates += 1
        return {"tr/updates": float(self.updates), "tr/ref_policy_l2": trust_region.relative_distance(engines)}

    @hookimpl
    def aligner_state_dict(self) -> dict[str, Any]:
        """The update counter."""
        return {"updates": self.updates}

    @hookimpl
    def aligner_load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the update counter."""
        self.updates = int(state["updates"])

    @hookimpl
    def aligner_save_checkpoint(self, directory: Path, engines: Engines, config) -> None:
        """Each rank writes its reference shards to ``<checkpoint>/tr_hard/reference_rank<r>.safetensors``."""
        trust_region.save_reference(directory / NAME, engines)

    @hookimpl
    def aligner_load_checkpoint(self, directory: Path, engines: Engines, config) -> None:
        """Each rank restores its moved reference shards, so a resumed run does not restart from the initial model."""
        trust_region.load_reference(directory / NAME, engines)


tr_hard = TRHard()
