"""A benchmark-only plugin that runs ``torch.profiler`` over a window of optimizer steps and writes where the time went.

Used by ``benchmarks/profile_step.py`` (``--plugins dpo,profile_plugin:profiler`` with ``benchmarks/`` on
``PYTHONPATH``). It adds nothing to the loss. The profiler starts after step ``profile.start`` and stops after
step ``profile.start + profile.steps``, so the window holds whole steps: forward, backward, ZeRO-3 gathers and
reduce-scatters, the optimizer. Each rank writes ``<output_dir>/profile/rank<r>.json``: the self CPU time of every
op and every ``record_function`` range (DeepSpeed's and aligner's), summed over the window.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from aligner.hookspecs import PluginInfo, hookimpl


@dataclass
class ProfileConfig:
    start: int = 2  #: the profiler starts after this optimizer step (warm-up steps before it are left out)
    steps: int = 2  #: how many whole steps it records

    def __post_init__(self) -> None:
        if self.start < 1 or self.steps < 1:
            raise ValueError(f"profile.start and profile.steps must be >= 1 (the window starts after an optimizer "
                             f"step and holds whole steps), got start={self.start}, steps={self.steps}")


class Profiler:
    """Constraint role with no term: it only observes the steps."""

    def __init__(self) -> None:
        self.prof: profile | None = None

    @hookimpl
    def aligner_plugin_info(self):
        return PluginInfo(name="profiler", role="constraint", summary="torch.profiler over a window of steps (benchmarks)")

    @hookimpl
    def aligner_config_section(self):
        return "profile", ProfileConfig

    @hookimpl
    def aligner_required_models(self, config):
        return set()

    @hookimpl
    def aligner_constraint(self, inputs, config):
        return None

    @hookimpl
    def aligner_after_optimizer_step(self, step, engines, config):
        cfg = config.section("profile")
        if step == cfg.start:
            self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
            self.prof.__enter__()
        elif self.prof is not None and step == cfg.start + cfg.steps:
            self.prof.__exit__(None, None, None)
            rank = dist.get_rank() if dist.is_initialized() else 0
            rows = [{"name": e.key, "calls": e.count, "self_cpu_s": e.self_cpu_time_total / 1e6 / cfg.steps,
                     "cpu_s": e.cpu_time_total / 1e6 / cfg.steps}
                    for e in self.prof.key_averages()]
            out = Path(config.output_dir) / "profile"
            out.mkdir(parents=True, exist_ok=True)
            (out / f"rank{rank}.json").write_text(json.dumps({"steps": cfg.steps, "rows": rows}, indent=1))
            self.prof = None
        return None


profiler = Profiler()
