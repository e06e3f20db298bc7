"""MLflow: ``report_to: [tensorboard, mlflow]`` logs the run to MLflow (``pip install 'aligner[mlflow]'``).

The extra installs ``mlflow-skinny``, the tracking client without a server. The library is imported when
the run starts, never by a run that does not choose this logger. What MLflow gets, on rank 0, through
``MlflowClient`` (no global active run):

- at the start, a run in experiment ``mlflow.experiment``, with the resolved config flattened into params
  (``train.lr``, ``dpo.beta``, ...; values cut to MLflow's 6000 characters) and as ``config.json``, the model
  plan as ``plan.json`` and the plugins' versions as ``plugins.json`` and tags ``plugin.<name>``;
- at every logged step, one ``log_batch`` with the same tags and values TensorBoard gets, each tag with the
  characters MLflow refuses in a metric name replaced by ``_`` (``flips/correct->correct`` becomes
  ``flips/correct-_correct``; every other tag aligner logs is unchanged);
- at the end, ``final_metrics.json``, the report's plots under ``report/``, the model card under ``model/``,
  and the tags ``final_model`` (the local folder) and ``hub_url``;
- the run ends ``FINISHED``, ``KILLED`` (a stop request: to be resumed) or ``FAILED``.

The run id is kept in every checkpoint: ``--resume`` continues the same run (its status back to
``RUNNING``). Params are written once, when the run is created: a resumed run writes its config as
``resume_step_<N>/config.json`` instead (MLflow refuses to change a param). The steps an interrupted run
logged after its last checkpoint are logged again, so MLflow's history holds both values at those steps
(TensorBoard shows the resumed run's).

Options (``mlflow.<key>``): ``tracking_uri`` (default: ``MLFLOW_TRACKING_URI``, else a file store in
``output_dir/mlruns``), ``experiment`` (``aligner``), ``run_name``. A file store (``file://...`` or a
folder) needs ``MLFLOW_ALLOW_FILE_STORE=true`` since MLflow 3.7; aligner sets it (when unset) for a file
store it was asked to use. ``mlflow ui --backend-store-uri <uri>`` (the full ``mlflow`` package) shows it.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from aligner.hookspecs import PluginInfo, RunStart, RunSummary, hookimpl

NAME = "mlflow"
#: What MLflow allows in a metric or param name (``mlflow/utils/validation.py``), the rest becomes ``_``.
_REFUSED = re.compile(r"[^/\w.\- :]")
_MAX_PARAM = 6000
_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None  #: MLflow tracking URI; default MLFLOW_TRACKING_URI, else output_dir/mlruns
    experiment: str = "aligner"  #: experiment name (created when missing)
    run_name: str | None = None  #: the run's name (default: MLflow's)


def metric_name(tag: str) -> str:
    """A TensorBoard tag as an MLflow metric name: the characters MLflow refuses become ``_``."""
    return _REFUSED.sub("_", tag)


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": "0.001"}``, values as MLflow params (strings, cut)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[metric_name(name)] = json.dumps(value, default=str) if not isinstance(value, str) else value
    return {k: v[:_MAX_PARAM] for k, v in out.items()}


def tracking_uri(configured: str | None, output_dir: Path) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or (output_dir / "mlruns").resolve().as_uri()
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # asked for a file store: MLflow 3.7+ opts out
    return uri


class Mlflow:
    def __init__(self) -> None:
        self.client = None
        self.run_id: str | None = None

    @hookimpl
    def aligner_plugin_info(self) -> PluginInfo:
        return PluginInfo(name=NAME, role="logger", summary="MLflow tracking (pip install 'aligner[mlflow]')")

    @hookimpl
    def aligner_config_section(self):
        return NAME, MlflowConfig

    @hookimpl
    def aligner_logger_start(self, run: RunStart, config) -> dict:
        try:
            from mlflow.entities import Param, RunTag
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise ImportError(f"{exc}; install it with: pip install 'aligner[mlflow]'") from None
        opts: MlflowConfig = config.section(NAME)
        uri = tracking_uri(opts.tracking_uri, run.output_dir)
        self.client = client = MlflowClient(tracking_uri=uri)
        resumed = (run.resumed or {}).get("run_id")
        if resumed:
            self.run_id = resumed
            client.update_run(resumed, status="RUNNING")
            client.log_dict(resumed, run.config, f"resume_step_{run.start_step}/config.json")
        else:
            experiment = client.get_experiment_by_name(opts.experiment)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(opts.experiment)
            self.run_id = client.create_run(experiment_id, run_name=opts.run_name).info.run_id
            params = [Param(k, v) for k, v in flatten(run.config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(self.run_id, params=params[i:i + 100])
            client.log_dict(self.run_id, run.config, "config.json")
        client.log_dict(self.run_id, run.plan, "plan.json")
        client.log_dict(self.run_id, run.plugins, "plugins.json")
        client.log_batch(self.run_id, tags=[RunTag(f"plugin.{k}", v) for k, v in run.plugins.items()])
        return {"run_id": self.run_id}

    @hookimpl
    def aligner_log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(metric_name(k), float(v), now, step)
                                                    for k, v in sorted(metrics.items())])

    @hookimpl
    def aligner_log_final(self, summary: RunSummary) -> None:
        client = self.client
        client.log_dict(self.run_id, summary.metrics, "final_metrics.json")
        for image in summary.images:
            client.log_artifact(self.run_id, str(image), "report")
        card = summary.final_dir / "README.md"
        if card.is_file():
            client.log_artifact(self.run_id, str(card), "model")
        client.set_tag(self.run_id, "final_model", str(summary.final_dir))
        if summary.merged_dir is not None:
            client.set_tag(self.run_id, "merged_model", str(summary.merged_dir))
        client.set_tag(self.run_id, "hub_url", (summary.hub_url or f"not pushed: {summary.hub_error or 'export.push_to_hub is off'}")[:5000])

    @hookimpl
    def aligner_logger_close(self, status: str) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id, status=_STATUS[status])
        self.client = self.run_id = None


plugin = Mlflow()
