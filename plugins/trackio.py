"""Trackio: ``report_to: [tensorboard, trackio]`` logs the run to Trackio (``pip install 'aligner[trackio]'``).

Trackio is local-first: runs go to a SQLite store under ``TRACKIO_DIR`` (default ``$HF_HOME/trackio``),
shown by ``trackio show``, or to a Hugging Face Space with ``trackio.space_id``. The library is imported when
the run starts, never by a run that does not choose this logger. What Trackio gets, on rank 0:

- at the start, ``trackio.init(config=...)`` with the resolved run config, and under ``aligner`` the model
  plan and every plugin's ``distribution-version``;
- at every logged step, ``run.log(metrics, step=step)`` with the same tags and values TensorBoard gets;
- at the end, the report's plots as ``trackio.Image`` under ``report/``, and the final metrics under
  ``final/`` with ``final/model`` (where the final model is) and ``final/hub_url``, logged at the last step.

The run's name is kept in every checkpoint: ``--resume`` continues the same run (Trackio resumes by name,
``resume="allow"``). The steps an interrupted run logged after its last checkpoint are logged again, so
Trackio holds both values at those steps (TensorBoard shows the resumed run's).

Options (``trackio.<key>``): ``project`` (``aligner``), ``name`` (default: Trackio's), ``group``,
``space_id`` (a Space to log to; default: local).
"""

from __future__ import annotations

from dataclasses import dataclass

from aligner.hookspecs import PluginInfo, RunStart, RunSummary, hookimpl

NAME = "trackio"


@dataclass
class TrackioConfig:
    project: str = "aligner"  #: the Trackio project
    name: str | None = None  #: the run's name (default: Trackio's)
    group: str | None = None  #: the run group
    space_id: str | None = None  #: a Hugging Face Space to log to (default: the local store)


class Trackio:
    def __init__(self) -> None:
        self.run = None
        self.step = 0

    @hookimpl
    def aligner_plugin_info(self) -> PluginInfo:
        return PluginInfo(name=NAME, role="logger", summary="Trackio, local-first (pip install 'aligner[trackio]')")

    @hookimpl
    def aligner_config_section(self):
        return NAME, TrackioConfig

    @hookimpl
    def aligner_logger_start(self, run: RunStart, config) -> dict:
        try:
            import trackio
        except ImportError as exc:
            raise ImportError(f"{exc}; install it with: pip install 'aligner[trackio]'") from None
        opts: TrackioConfig = config.section(NAME)
        name = (run.resumed or {}).get("name") or opts.name
        self.run = trackio.init(project=opts.project, name=name, group=opts.group, space_id=opts.space_id,
                                config={**run.config, "aligner": {"plan": run.plan, "plugins": run.plugins}},
                                resume="allow" if run.resumed else "never", embed=False)
        self.step = run.start_step
        return {"name": self.run.name}

    @hookimpl
    def aligner_log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics), step=step)
        self.step = max(self.step, step)

    @hookimpl
    def aligner_log_final(self, summary: RunSummary) -> None:
        import trackio

        step = max(self.step, summary.step)
        if summary.images:
            self.run.log({f"report/{p.stem}": trackio.Image(str(p)) for p in summary.images}, step=step)
        self.run.log({**{f"final/{k}": v for k, v in summary.metrics.items()}, "final/model": str(summary.final_dir),
                      "final/hub_url": summary.hub_url or ""}, step=step)

    @hookimpl
    def aligner_logger_close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


plugin = Trackio()
