"""Weights & Biases: ``report_to: [tensorboard, wandb]`` logs the run to W&B (``pip install 'aligner[wandb]'``).

The library is imported when the run starts, never by a run that does not choose this logger. What W&B gets,
on rank 0:

- at the start, ``wandb.init(config=...)`` with the resolved run config, and under ``aligner`` the model plan
  and every plugin's ``distribution-version``; the run files go to ``output_dir/wandb``;
- at every logged step, ``run.log(metrics, step=step)`` with the same tags and values TensorBoard gets
  (``eval/...`` at the evaluation steps);
- at the end, the final metrics in ``run.summary``, the report's plots as ``wandb.Image`` under ``report/``
  (logged at the last step), and where the final model is (``final_model``, ``hub_url``) in the summary;
- the run is finished with exit code 0 (trained to ``train.max_steps``) or 1; a stop request marks it
  preempting first.

The W&B run id is kept in every checkpoint: ``--resume`` continues the same run (``wandb.init(id=...,
resume="allow")``). W&B keeps one value per step and ignores a step lower than the last it has, so the steps
an interrupted run logged after its last checkpoint keep the interrupted run's values there (TensorBoard
shows the resumed run's). ``WANDB_MODE=offline`` writes the run to ``output_dir/wandb`` only, for
``wandb sync`` later; ``WANDB_API_KEY``/``wandb login`` as usual otherwise.

Options (``wandb.<key>``): ``project`` (``aligner``), ``entity``, ``name``, ``group``, ``tags``, ``mode``
(``online``/``offline``/``disabled``; default: ``WANDB_MODE``, else W&B's own).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aligner.hookspecs import PluginInfo, RunStart, RunSummary, hookimpl

NAME = "wandb"


@dataclass
class WandbConfig:
    project: str = "aligner"  #: the W&B project
    entity: str | None = None  #: the team or user (default: the logged-in user's)
    name: str | None = None  #: the run's display name (default: W&B's)
    group: str | None = None  #: the run group
    tags: list[str] = field(default_factory=list)  #: run tags
    mode: str | None = None  #: online, offline or disabled; default: WANDB_MODE, else W&B's

    def __post_init__(self) -> None:
        if self.mode not in (None, "online", "offline", "disabled"):
            raise ValueError(f"wandb.mode must be online, offline or disabled, got {self.mode!r}")


class Wandb:
    def __init__(self) -> None:
        self.run = None
        self.step = 0

    @hookimpl
    def aligner_plugin_info(self) -> PluginInfo:
        return PluginInfo(name=NAME, role="logger", summary="Weights & Biases (pip install 'aligner[wandb]')")

    @hookimpl
    def aligner_config_section(self):
        return NAME, WandbConfig

    @hookimpl
    def aligner_logger_start(self, run: RunStart, config) -> dict:
        try:
            import wandb
        except ImportError as exc:
            raise ImportError(f"{exc}; install it with: pip install 'aligner[wandb]'") from None
        opts: WandbConfig = config.section(NAME)
        resumed = run.resumed or {}
        (run.output_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=opts.project, entity=opts.entity, name=opts.name, group=opts.group, tags=opts.tags or None,
            mode=opts.mode, dir=str(run.output_dir), config=run.config,
            id=resumed.get("run_id"), resume="allow" if resumed.get("run_id") else None,
        )
        self.run.config.update({"aligner": {"plan": run.plan, "plugins": run.plugins}}, allow_val_change=True)
        self.step = run.start_step
        return {"run_id": self.run.id}

    @hookimpl
    def aligner_log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)
        self.step = max(self.step, step)

    @hookimpl
    def aligner_log_final(self, summary: RunSummary) -> None:
        import wandb

        if summary.images:
            self.run.log({f"report/{p.stem}": wandb.Image(str(p)) for p in summary.images}, step=max(self.step, summary.step))
        self.run.summary.update({**summary.metrics, "final_model": str(summary.final_dir),
                                 "merged_model": str(summary.merged_dir) if summary.merged_dir else None,
                                 "hub_url": summary.hub_url, "hub_error": summary.hub_error})

    @hookimpl
    def aligner_logger_close(self, status: str) -> None:
        if self.run is None:
            return
        if status == "stopped" and hasattr(self.run, "mark_preempting"):
            self.run.mark_preempting()
        self.run.finish(exit_code=0 if status == "finished" else 1)
        self.run = None


plugin = Wandb()
