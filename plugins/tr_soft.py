"""TR soft: the soft trust-region reference update of TR-DPO / TR-IPO / TR-KTO.

From "Learn Your Reference Model for Real Good Alignment" (Gorbatovski et al.,
2024, arXiv:2404.09656): every τ optimizer steps the reference moves toward
the policy,

    θ_ref ← α·θ + (1 − α)·θ_ref

with α ∈ (0, 1] the weight on the *policy* (TRL and the authors' own library
use α this way; α = 1 is the hard update, ``tr_hard``). The first update is at
step τ, then 2τ, …; steps are optimizer steps, not micro-batches.

Settings. The paper's method section is not in our stored copies, so these are
second-hand: the paper's recommendations, as quoted by TRL's maintainers and an
ICLR reviewer, are α = 0.5–0.6 for the soft update (τ = 512 for the hard one),
with β = 0.05, lr 1e-6, 1 epoch, max length 1024, grad-norm clip 2. TRL's
defaults since 2025 are α = 0.6 with τ = 512. Ours are the same, α = 0.6 and
τ = 512 (``tr_soft.alpha``, ``tr_soft.every``), so that results compare with
TRL's. The embedded tiny run is far shorter than 512 steps:
``configs/tiny-cpu-tr.yaml`` sets a small τ so that it does update.

How: ``aligner.reference.trust_region`` mixes each rank's local ZeRO-3 partitions, from
the policy's fp32 master weights into an fp32 reference, with no all-gather;
the moved reference is written into every checkpoint and restored on resume.

Under ``model.lora`` the reference is the frozen base W₀ plus a reference
adapter of rank R (``model.lora.reference_rank``, default 2r), on the policy's
own engine; only the low-rank parts differ, so per adapted layer (scale s = α_lora/r)

    θ_ref ← α·θ + (1 − α)·θ_ref   ⇔   s·B_r·A_r ← s·(α·B·A + (1 − α)·B_r·A_r)

BA is not linear in (A, B): mixing A and B separately would be wrong. The
mixture is exactly the stacked product [α·B, (1 − α)·B_r]·[A; A_r] of rank
≤ r + R, which is recompressed to rank R by a QR of each stacked factor and an
SVD of the small (r + R)² core (``aligner/reference/lora_trust_region.py``). That is
exact while the mixture's rank is ≤ R; past it, each update keeps the best
rank-R approximation in the Frobenius norm (Eckart–Young): the singular values
beyond the R-th are dropped, and that error compounds over updates while the
exact reference's rank (up to r more per update) exceeds R.
``benchmarks/lora_tr_error.py`` measures it against the exact dense mixture
(``benchmarks/RESULTS.md``). Under ZeRO-3 the adapters are gathered (they are
small), rank 0's result is broadcast, and the moved adapter is saved whole in
every checkpoint and restored on resume.

Metrics: ``tr/updates`` (updates so far) and ``tr/ref_policy_l2``
(‖θ_ref − θ‖ / ‖θ‖ over all weights, after this step's update, on logged steps only; under LoRA over the
base's norm ‖θ₀‖, from the factors).
"""

from __future__ import annotations

from dataclasses import dataclass

from aligner.hookspecs import PluginInfo, check_interval, hookimpl
from aligner_plugins.reference_update import ReferenceUpdatePlugin

NAME = "tr_soft"


@dataclass
class TRSoftConfig:
    alpha: float = 0.6  #: α, the policy's weight in θ_ref ← α·θ + (1−α)·θ_ref (TRL's default; the paper's 0.5–0.6)
    every: int = 512  #: τ, optimizer steps between updates (TRL's default; the paper's τ for the hard update)

    def __post_init__(self) -> None:
        check_interval("tr_soft.alpha", self.alpha, "(0, 1]", "the policy's weight in the mix")
        check_interval("tr_soft.every", self.every, "[1, inf)", "optimizer steps between updates")


class TRSoft(ReferenceUpdatePlugin):
    """The plugin object; the shared hooks (the update, its counter, checkpoints) are in
    :class:`aligner_plugins.reference_update.ReferenceUpdatePlugin`."""

    name = NAME

    @hookimpl
    def aligner_plugin_info(self) -> PluginInfo:
        """tr_soft is the run's reference update."""
        return PluginInfo(name=NAME, role="reference_update",
                          summary="TR soft: every τ steps θ_ref ← α·θ + (1−α)·θ_ref (TR-DPO/IPO/KTO)")

    @hookimpl
    def aligner_config_section(self) -> tuple[str, type]:
        """Options ``tr_soft.alpha`` (α) and ``tr_soft.every`` (τ)."""
        return NAME, TRSoftConfig


tr_soft = TRSoft()
