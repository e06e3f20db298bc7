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

How: ``aligner.reference.trust_region`` copies each rank's local ZeRO-3 partitions of the
policy's fp32 master weights into the fp32 reference, with no all-gather; the
moved reference is written into every checkpoint and restored on resume.

Under ``model.lora`` the reference is the base plus a frozen reference adapter
(rank R ≥ r): the update copies the policy's factors (B_r ← [B, 0],
A_r ← [A; 0]), which is exact (``aligner/reference/lora_trust_region.py``).

Metrics: ``tr/updates`` (updates so far) and ``tr/ref_policy_l2``
(‖θ_ref − θ‖ / ‖θ‖ over all weights, after this step's update, on logged steps only: 0 at τ, 2τ, …).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from aligner.hookspecs import PluginInfo, check_interval, hookimpl
from aligner_plugins.reference_update import ReferenceUpdatePlugin

NAME = "tr_hard"


@dataclass
class TRHardConfig:
    alpha: ClassVar[float] = 1.0  #: θ_ref ← θ is the soft rule with α = 1 (a constant, not an option)
    every: int = 512  #: τ, optimizer steps between updates (the paper's recommendation, second-hand; TRL's default)

    def __post_init__(self) -> None:
        check_interval("tr_hard.every", self.every, "[1, inf)", "optimizer steps between updates")


class TRHard(ReferenceUpdatePlugin):
    """The plugin object; the shared hooks (the update, its counter, checkpoints) are in
    :class:`aligner_plugins.reference_update.ReferenceUpdatePlugin`."""

    name = NAME

    @hookimpl
    def aligner_plugin_info(self) -> PluginInfo:
        """tr_hard is the run's reference update."""
        return PluginInfo(name=NAME, role="reference_update",
                          summary="TR hard: every τ steps θ_ref ← θ (TR-DPO/IPO/KTO)")

    @hookimpl
    def aligner_config_section(self) -> tuple[str, type]:
        """Option ``tr_hard.every`` (τ)."""
        return NAME, TRHardConfig


tr_hard = TRHard()
