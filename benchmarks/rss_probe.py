"""A measuring plugin for benchmarks/scale_cpu.py: each rank's peak resident memory during training steps.

Load it by target (``--plugins dpo,rss_probe:probe`` with ``benchmarks/`` on ``PYTHONPATH``). It is a
constraint that adds no loss term and asks for no model, so it changes nothing the estimator counts.

After optimizer step 1 it records the process's peak RSS so far (``VmHWM``: loading included) and resets the
high-water mark (``/proc/self/clear_refs``, value 5); after the last step it records ``VmHWM`` again, the
peak of steps 2..N (model states, optimizer moments and activations all exist by then), and writes both to
``<output_dir>/rss_rank<R>.json``, with the wall time of steps 2..N and, on a GPU, the peak allocated and
reserved GPU memory of steps 2..N (``torch.cuda.max_memory_allocated``, reset after step 1).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from aligner.hookspecs import PluginInfo, hookimpl

GIB = 2**30


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class RssProbe:
    def __init__(self) -> None:
        self.load_peak = 0.0
        self.gpu_load_peak = 0.0
        self.started = 0.0

    @hookimpl
    def aligner_plugin_info(self) -> PluginInfo:
        return PluginInfo(name="rss_probe", role="constraint", summary="records each rank's peak RSS (benchmarks)")

    @hookimpl
    def aligner_required_models(self, config) -> set[str]:
        return set()

    @hookimpl
    def aligner_constraint(self, inputs, config):
        """No math: the probe adds no term to the loss (a constraint role's required hook, aligner/hookspecs.py)."""
        return None

    @hookimpl
    def aligner_after_optimizer_step(self, step, engines, config):
        """No math: a measurement. Peak RSS after step 1 (then reset), and of steps 2..N at the last step."""
        cuda = torch.cuda.is_available()
        if step == 1:
            self.load_peak = _status_kib("VmHWM") * 1024 / GIB
            Path("/proc/self/clear_refs").write_text("5")
            if cuda:
                self.gpu_load_peak = torch.cuda.max_memory_allocated() / GIB
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.synchronize()
            self.started = time.perf_counter()
        if step == config.train.max_steps:
            if cuda:
                torch.cuda.synchronize()
            rank = int(os.environ.get("RANK", "0"))
            record = {"rank": rank, "through_step1_gib": self.load_peak, "steps_gib": _status_kib("VmHWM") * 1024 / GIB,
                      "rss_now_gib": _status_kib("VmRSS") * 1024 / GIB,
                      "step_s": (time.perf_counter() - self.started) / max(1, step - 1)}
            if cuda:
                record.update(gpu_through_step1_gib=self.gpu_load_peak, gpu_steps_gib=torch.cuda.max_memory_allocated() / GIB,
                              gpu_reserved_gib=torch.cuda.max_memory_reserved() / GIB)
            out = Path(config.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"rss_rank{rank}.json").write_text(json.dumps(record))
        return None


probe = RssProbe()
