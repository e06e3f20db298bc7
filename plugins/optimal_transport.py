"""What the two AOT losses share (Melnyk et al., 2024, arXiv:2406.05882): their options, and the loss on the
difference of two sorted samples (the 1-D optimal transport plan matches their order statistics).

With a_(1) ≤ … ≤ a_(B) and b_(1) ≤ … ≤ b_(B) sorted over the micro-batch, d_i = a_(i) − b_(i) and

    L_i = −(1 − ε)·log σ(β·d_i) − ε·log σ(−β·d_i)

``aot`` sorts the policy's and the reference's pair margins (a, b); ``aot_unpaired`` sorts the chosen and the
rejected log-ratios. This module is no plugin itself: each of the two plugin files registers its own hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from aligner.hookspecs import LossConfig, check_interval


@dataclass
class SortedLossConfig(LossConfig):
    """``beta`` and ``label_smoothing`` of an AOT loss; ``section`` names the plugin in error messages."""

    section: ClassVar[str] = ""
    beta: float = 0.1  #: β, the scale of the sorted differences (TRL's ``DPOConfig.beta`` default)
    label_smoothing: float = 0.0  #: ε in [0, 0.5): weight of the flipped-label term (TRL's ``label_smoothing``)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_interval(f"{self.section}.beta", self.beta, "(0, inf)")
        check_interval(f"{self.section}.label_smoothing", self.label_smoothing, "[0, 0.5)")


def sorted_difference_loss(a: torch.Tensor, b: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Per-order-statistic losses (B,) from two (B,) samples ``a`` and ``b``, each sorted (see the module docstring)."""
    d = torch.sort(a, dim=0).values - torch.sort(b, dim=0).values
    return -(1 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)
