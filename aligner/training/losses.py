"""Several losses in one run: each active loss plugin's term, times its weight, summed.

``train/loss`` = Σ_k w_k·L_k + Σ_c C_c, the loss terms L_k weighted by their
``<section>.weight`` (:class:`aligner.hookspecs.LossConfig`, default 1, as TRL's
``loss_weights``) plus every constraint's term C_c. Each loss's unweighted term
is logged as ``<plugin name>/loss``. This module knows no plugin by name.
"""

from __future__ import annotations

import torch

from aligner.config import ConfigError
from aligner.hookspecs import LossConfig, LossOutput
from aligner.registry import ActivePlugins, PluginHookError

#: Metric tags that the core alone logs when a reference model is present (aligner/training/rewards.py).
CORE_REWARD_PREFIX = "rewards/"


def loss_section(plugins: ActivePlugins, name: str, config) -> object | None:
    """The options of loss plugin ``name`` (its config section), or ``None`` when it has none."""
    section = plugins.call_one(name, "aligner_config_section")
    return config.sections.get(section[0]) if section else None


def loss_weight(section: object | None) -> float:
    """``weight`` of a loss's options; the :class:`LossConfig` default for a loss without that base."""
    return section.weight if isinstance(section, LossConfig) else LossConfig.weight


def check_weights(plugins: ActivePlugins, config) -> None:
    """Refuse a run whose losses all weigh 0: ``train/loss`` would be 0 (constraints aside) and the policy would not
    move; a weight of 0 on one loss of several is fine (its term is still logged)."""
    keys = []
    for name in plugins.losses:
        section = plugins.call_one(name, "aligner_config_section")
        if loss_weight(config.sections.get(section[0]) if section else None) != 0:
            return
        keys.append(f"{section[0]}.weight" if section else name)
    if keys:
        raise ConfigError(f"{' and '.join(f'{k}=0' for k in keys)}: every loss of the run weighs 0, so train/loss is 0 "
                          f"and nothing trains; give a loss a weight > 0 (e.g. --set {keys[0]}=1), or add a loss to "
                          f"--plugins")


def pair_only_losses(plugins: ActivePlugins, config) -> list[str]:
    """The active losses that did not ask for ``"unpaired"`` (aligner_required_inputs): an unpaired dataset
    is refused unless this is empty, since every loss of the run sees every batch."""
    return [name for name in plugins.losses
            if "unpaired" not in set(plugins.call_one(name, "aligner_required_inputs", config=config) or ())]


def weighted_losses(plugins: ActivePlugins, inputs, config, sections: list[object | None],
                    has_reference: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ_k w_k·L_k over the active losses, and their metrics (``<name>/loss`` for each term).

    With a reference model (``has_reference``) a loss's own ``rewards/*`` tags are
    dropped: the core logs those once, from the DPO-form reward (aligner/training/rewards.py).
    """
    total: torch.Tensor | float = 0.0
    metrics: dict[str, torch.Tensor] = {}
    for name, section in zip(plugins.losses, sections):
        out = plugins.call_one(name, "aligner_loss", inputs=inputs, config=config)
        if not isinstance(out, LossOutput):
            raise PluginHookError(f"plugin '{name}' failed in hook aligner_loss: returned {out!r}, not a LossOutput")
        total = total + loss_weight(section) * out.loss
        metrics.update({k: v for k, v in out.metrics.items()
                        if not (has_reference and k.startswith(CORE_REWARD_PREFIX))})
        metrics[f"{name}/loss"] = out.loss.detach()
    return total, metrics
