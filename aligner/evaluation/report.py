"""Turn a run's TensorBoard event files into PNG plots and a short markdown summary.

``python launch/report.py <output_dir>`` (or ``aligner-report``) writes
``<output_dir>/report/*.png`` and ``<output_dir>/report/summary.md``. It reads
the event files with TensorBoard's own reader, so it works on a live or a
finished run, and on a resumed one (a step logged twice keeps its last value).
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import sys
from pathlib import Path

#: The core's panels, one PNG each: (file stem, title, tag patterns). A panel with no matching tag is skipped.
#: Plugins add their own through the ``aligner_report_panels`` hook (:func:`panels`).
PANELS: list[tuple[str, str, list[str]]] = [
    ("loss", "Loss", ["train/loss", "eval/loss"]),
    ("rewards", "Implicit rewards", ["rewards/chosen", "rewards/rejected", "eval/rewards/chosen", "eval/rewards/rejected"]),
    ("margins", "Reward margins", ["rewards/margins", "eval/rewards/margins"]),
    ("accuracies", "Preference accuracy", ["rewards/accuracies", "eval/rewards/accuracies", "eval/*accuracy*"]),
    ("throughput", "Throughput (real tokens/s, whole job)", ["perf/tokens_per_s"]),
]


def panels() -> list[tuple[str, str, list[str]]]:
    """The core's panels, then those every installed plugin declares (``aligner_report_panels``)."""
    from aligner.registry import installed

    out = list(PANELS)
    for _, declared in installed().call_each("aligner_report_panels"):
        out += [tuple(panel) for panel in declared or () if panel[0] not in {p[0] for p in out}]
    return out


def read_scalars(tb_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series under ``tb_dir``, sorted by step, one value per step (the last one logged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    series = {}
    for tag in acc.Tags()["scalars"]:
        by_step = {e.step: e.value for e in acc.Scalars(tag)}
        series[tag] = sorted(by_step.items())
    return series


def panel_tags(patterns: list[str], tags: list[str]) -> list[str]:
    chosen: list[str] = []
    for pattern in patterns:
        chosen += [t for t in sorted(tags) if fnmatch.fnmatchcase(t, pattern) and t not in chosen]
    return chosen


def write_plots(series: dict[str, list[tuple[int, float]]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for stem, title, patterns in panels():
        tags = panel_tags(patterns, list(series))
        if not tags:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for tag in tags:
            steps, values = zip(*series[tag])
            ax.plot(steps, values, label=tag, marker="o" if len(steps) < 15 else None)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4g}"


def summary_markdown(series: dict[str, list[tuple[int, float]]], run_dir: Path, plots: list[Path]) -> str:
    lines = [f"# Run report: {run_dir}", ""]
    if "train/loss" in series:
        first, last = series["train/loss"][0], series["train/loss"][-1]
        lines += [f"Trained to step {last[0]}; train/loss {_fmt(first[1])} at step {first[0]} -> {_fmt(last[1])}.", ""]
    lines += ["| tag | steps | first | last | min | max |", "|---|---|---|---|---|---|"]
    for tag in sorted(series):
        values = [v for _, v in series[tag]]
        lines.append(f"| `{tag}` | {len(values)} | {_fmt(values[0])} | {_fmt(values[-1])} | {_fmt(min(values))} | {_fmt(max(values))} |")
    lines += ["", "Plots:", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Read ``run_dir/tensorboard`` and write the plots and ``summary.md``; return the report folder."""
    run_dir = Path(run_dir)
    tb_dir = run_dir / "tensorboard"
    if not tb_dir.is_dir() or not any(tb_dir.glob("events.out.tfevents.*")):
        raise FileNotFoundError(f"{tb_dir}: no TensorBoard event files; pass the output_dir of a run (it holds tensorboard/)")
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    series = read_scalars(tb_dir)
    plots = write_plots(series, out)
    (out / "summary.md").write_text(summary_markdown(series, run_dir, plots))
    return out


def plots(run_dir: str | Path) -> list[Path]:
    """The report's PNG plots of a run (written to ``run_dir/report``), for the loggers that take them; none, with
    a warning, when the run wrote no TensorBoard event files or matplotlib is missing."""
    import logging

    try:
        out = write_report(run_dir)
    except (FileNotFoundError, ImportError) as exc:
        logging.getLogger("aligner").warning("no plots for the loggers: %s (pip install 'aligner[report]' for "
                                             "matplotlib; keep tensorboard in report_to for the event files)", exc)
        return []
    return sorted(out.glob("*.png"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="aligner-report", description="PNG plots and a markdown summary of a run's TensorBoard logs")
    p.add_argument("output_dir", help="a run's output_dir (holds tensorboard/)")
    p.add_argument("--out", help="where to write (default: <output_dir>/report)")
    args = p.parse_args(argv)
    try:
        out = write_report(args.output_dir, args.out)
    except (FileNotFoundError, ImportError) as exc:
        print(f"aligner-report: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}/summary.md and {len(list(out.glob('*.png')))} plots")
    return 0
