"""The hooks tr_soft and tr_hard share: every τ optimizer steps θ_ref ← α·θ + (1−α)·θ_ref, saved with checkpoints.

From "Learn Your Reference Model for Real Good Alignment" (Gorbatovski et al.,
2024, arXiv:2404.09656). ``tr_soft`` is the rule with α ∈ (0, 1] (the policy's
weight), ``tr_hard`` the rule with α = 1 (θ_ref ← θ); the first update is at
step τ, then 2τ, … (optimizer steps). The update itself runs on each rank's
local ZeRO-3 shards, with no all-gather: :mod:`aligner.reference.trust_region` holds those
engine operations (mix, distance, save and load of the shards), this module
the plugin logic (when to update, the counter, the metrics, the checkpoint hooks).

Metrics: ``tr/updates`` (updates so far) and ``tr/ref_policy_l2``
(‖θ_ref − θ‖ / ‖θ‖ over all weights, after this step's update), the latter
computed only on the steps whose metrics are logged: it is a pass over every
weight and, under ZeRO-3, an all-reduce.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aligner.hookspecs import Engines, hookimpl
from aligner.reference.trust_region import load_reference, mix_into_reference, relative_distance, save_reference

PANELS = [("trust_region", "Trust region: reference-policy distance", ["tr/ref_policy_l2"])]


class ReferenceUpdatePlugin:
    """The hooks a trust-region plugin shares: every τ steps θ_ref ← α·θ + (1−α)·θ_ref, saved with checkpoints.

    A subclass sets ``name`` and implements ``aligner_plugin_info`` and
    ``aligner_config_section``; its config section holds ``every`` (τ) and
    ``alpha`` (α; a class constant 1.0 for the hard update). The instance counts
    the updates made so far, which checkpoints keep.
    """

    name: str

    def __init__(self) -> None:
        self.updates = 0

    @hookimpl
    def aligner_required_models(self, config) -> set[str]:
        """The reference, which this plugin moves."""
        return {"reference"}

    @hookimpl
    def aligner_after_optimizer_step(self, step: int, engines: Engines, config, logged: bool) -> dict[str, float]:
        """At steps τ, 2τ, …: θ_ref ← α·θ + (1−α)·θ_ref on the local shards; on logged steps also
        ‖θ_ref−θ‖/‖θ‖ (every rank gets the same ``logged``, so the all-reduce inside is matched)."""
        cfg = config.section(self.name)
        if step % cfg.every == 0:
            mix_into_reference(engines, cfg.alpha)
            self.updates += 1
        metrics = {"tr/updates": float(self.updates)}
        if logged:
            metrics["tr/ref_policy_l2"] = relative_distance(engines)
        return metrics

    @hookimpl
    def aligner_report_panels(self) -> list[tuple[str, str, list[str]]]:
        """The reference-policy distance over the steps."""
        return PANELS

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
        """Each rank writes its reference shards to ``<checkpoint>/<name>/reference_rank<r>.safetensors``."""
        save_reference(directory / self.name, engines)

    @hookimpl
    def aligner_load_checkpoint(self, directory: Path, engines: Engines, config) -> None:
        """Each rank restores its moved reference shards, so a resumed run does not restart from the initial model."""
        load_reference(directory / self.name, engines)
