"""What the studies share to turn seeds into words: percentile-bootstrap intervals over seeds, the wording
that follows from an interval (one rule, used by study_tr.py and study_flipguard.py), and their grid figure.

The unit of resampling is the seed (one training run): each resample draws, with replacement, as many runs
as there are from each method independently, and recomputes the statistic (a mean, the peak of a mean
curve, a difference of two). The interval is the 2.5th–97.5th percentile of the resamples (95 %). With
5 seeds such an interval is rough (it is narrower than a t-interval); it is what the studies can afford.

Wording: a difference is "higher"/"lower" only when its whole interval is above/below 0; an interval that
contains 0 is "no different at this budget", whatever the sign of the point estimate.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

N_BOOT = 4000
LEVEL = 0.95


def resample_indices(n: int, rng: np.random.Generator, n_boot: int = N_BOOT) -> np.ndarray:
    """(n_boot, n) indices, each row a draw of n runs with replacement."""
    return rng.integers(0, n, size=(n_boot, n))


def interval(draws: np.ndarray) -> tuple[float, float]:
    """The central LEVEL interval of bootstrap draws, NaN ones left out (a resample where a statistic is undefined)."""
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return float("nan"), float("nan")
    tail = (1 - LEVEL) / 2 * 100
    lo, hi = np.percentile(draws, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap(stat: Callable[[np.ndarray], float], runs: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """(estimate, lo, hi) of ``stat`` over ``runs`` (first axis: one row per seed)."""
    rng = np.random.default_rng(seed)
    draws = np.array([stat(runs[idx]) for idx in resample_indices(len(runs), rng)])
    return (float(stat(runs)), *interval(draws))


def bootstrap_diff(stat: Callable[[np.ndarray], float], a: np.ndarray, b: np.ndarray,
                   seed: int = 0) -> tuple[float, float, float]:
    """(estimate, lo, hi) of stat(a) − stat(b), the runs of a and of b resampled independently."""
    rng = np.random.default_rng(seed)
    ia, ib = resample_indices(len(a), rng), resample_indices(len(b), rng)
    draws = np.array([stat(a[i]) - stat(b[j]) for i, j in zip(ia, ib)])
    return (float(stat(a) - stat(b)), *interval(draws))


def compare_word(lo: float, hi: float) -> str:
    """The word for a difference's interval: only an interval wholly on one side of 0 gets a direction."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "not comparable"
    if lo > 0:
        return "higher"
    if hi < 0:
        return "lower"
    return "no different at this budget (the interval contains 0)"


def claim_word(lo: float, hi: float) -> str:
    """A claim that the difference is positive: supported (interval above 0), refuted (below 0), else not resolved."""
    word = compare_word(lo, hi)
    return {"higher": "supported", "lower": "refuted",
            "not comparable": "not resolved at this budget (not comparable)"}.get(word, "not resolved at this budget")


def fmt(est: float, lo: float, hi: float, signed: bool = False, digits: int = 3) -> str:
    """``0.612 [0.580, 0.640]``, or with signs for a difference (``+0.050 [-0.010, +0.110]``); ``n/a`` if undefined."""
    if not np.isfinite(est):
        return "n/a"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{f.format(est)} [{f.format(lo)}, {f.format(hi)}]"


def heatmap(ax, grid: np.ndarray, xticks: list[str], yticks: list[str], xlabel: str, ylabel: str, title: str):
    """A sweep's grid of seed means, each cell written in; NaN cells (not run) left blank. Returns the image."""
    im = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w", fontsize=9)
    ax.set_xticks(range(len(xticks)), xticks)
    ax.set_yticks(range(len(yticks)), yticks)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    return im
