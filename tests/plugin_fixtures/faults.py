"""A test-only plugin that injects faults through the ordinary hooks (no hook in the core exists for it).

Loaded with ``--plugins dpo,plugin_fixtures.faults:faults`` and driven by its
``faults`` config section. Every fault is off by default, and then the plugin
adds nothing to the loss, so a run with it and no fault is the same as one without.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from aligner.hookspecs import LossOutput, PluginInfo, hookimpl


@dataclass
class FaultsConfig:
    nan_loss_at: int = 0  #: the n-th micro-batch of this process gets a NaN loss term (0: never)
    nan_grad_at: int = 0  #: the n-th micro-batch gets a term whose value is 0 and whose gradient is NaN
    nan_rank: int = -1  #: the rank the NaN faults hit (-1: every rank)
    kill_at_step: int = 0  #: SIGKILL rank ``kill_rank`` right after this optimizer step (0: never)
    kill_in_save_at: int = 0  #: SIGKILL rank ``kill_rank`` while it writes the checkpoint of this step
    kill_rank: int = 1
    #: rank ``kill_rank`` sends itself ``signal`` right after this optimizer step (0: never), as a preempting cluster does
    signal_at_step: int = 0
    signal: str = "SIGUSR1"
    #: ...and SIGTERM while it writes the checkpoint of this step (a second signal during the save)
    signal_in_save_at: int = 0
    #: after this optimizer step, rank ``kill_rank``'s file-size limit (RLIMIT_FSIZE) drops to ``fsize_limit_bytes``
    fsize_limit_after_step: int = 0
    fsize_limit_bytes: int = 4096
    #: every rank sleeps this long in each save, after the engine's shards (a slow file system; 0: no sleep)
    save_sleep_s: float = 0.0


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class Faults:
    """Constraint role, so it may run beside any loss; it returns no term unless a fault is due."""

    def __init__(self) -> None:
        self.micro_batches = 0

    @hookimpl
    def aligner_plugin_info(self):
        return PluginInfo(name="faults", role="constraint", summary="test-only fault injection")

    @hookimpl
    def aligner_config_section(self):
        return "faults", FaultsConfig

    @hookimpl
    def aligner_required_models(self, config):
        return set()

    @hookimpl
    def aligner_constraint(self, inputs, config):
        """Adds NaN (value) or sqrt(0·log π) (value 0, gradient 0·∞ = NaN) at the chosen micro-batch."""
        self.micro_batches += 1
        cfg = config.section("faults")
        if cfg.nan_rank not in (-1, _rank()):
            return None
        if self.micro_batches == cfg.nan_loss_at:
            return LossOutput(torch.tensor(float("nan")))
        if self.micro_batches == cfg.nan_grad_at:
            return LossOutput(torch.sqrt(inputs.policy.chosen * 0.0).sum())
        return None

    @hookimpl
    def aligner_after_optimizer_step(self, step, engines, config):
        """A rank dies mid-run (as on a lost node), is told to stop, or meets a file-size limit."""
        cfg = config.section("faults")
        if _rank() != cfg.kill_rank:
            return
        if step == cfg.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == cfg.signal_at_step:
            os.kill(os.getpid(), signal.Signals[cfg.signal])
        if step == cfg.fsize_limit_after_step:  # the kernel enforces it: the next large write fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (cfg.fsize_limit_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    @hookimpl
    def aligner_save_checkpoint(self, directory, engines, config):
        """A rank dies (or gets a second stop signal) after the engine wrote its shards, before the checkpoint is published."""
        cfg = config.section("faults")
        (directory / "faults").mkdir(parents=True, exist_ok=True)
        (directory / "faults" / f"rank{_rank()}.txt").write_text(str(self.micro_batches))
        if cfg.kill_in_save_at and directory.name == f"step_{cfg.kill_in_save_at}" and _rank() == cfg.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)
        if cfg.signal_in_save_at and directory.name == f"step_{cfg.signal_in_save_at}" and _rank() == cfg.kill_rank:
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(cfg.save_sleep_s)


faults = Faults()
