"""A test-only logger that fails mid-run, as a logger whose server went away does (``report_to: [..., ``
``plugin_fixtures.flaky_logger:flaky]``): it writes every step it was given to ``output_dir/flaky.jsonl``
and raises ``ConnectionError`` at ``flaky.fail_at_step``. The run must drop it with a warning and go on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from aligner.hookspecs import PluginInfo, RunStart, hookimpl


@dataclass
class FlakyConfig:
    fail_at_step: int = 0  #: raise at this step (0: never)


class Flaky:
    def __init__(self) -> None:
        self.path: Path | None = None
        self.fail_at = 0

    @hookimpl
    def aligner_plugin_info(self):
        return PluginInfo(name="flaky", role="logger", summary="test-only logger that fails at a chosen step")

    @hookimpl
    def aligner_config_section(self):
        return "flaky", FlakyConfig

    @hookimpl
    def aligner_logger_start(self, run: RunStart, config) -> None:
        self.path, self.fail_at = run.output_dir / "flaky.jsonl", config.section("flaky").fail_at_step

    @hookimpl
    def aligner_log(self, step: int, metrics: dict[str, float]) -> None:
        if step == self.fail_at:
            raise ConnectionError(f"the flaky server went away at step {step}")
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "train/loss": metrics.get("train/loss")}) + "\n")


flaky = Flaky()


class LoggerWithoutHook:
    """Declares the logger role but has no aligner_log: refused when activated."""

    @hookimpl
    def aligner_plugin_info(self):
        return PluginInfo(name="no_log_hook", role="logger", summary="declares the logger role only")


no_log_hook = LoggerWithoutHook()
