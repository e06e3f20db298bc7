"""The logger role in-process (aligner/training/loggers.py, the registry's report_to): choosing loggers, what is refused
and how, the libraries imported only when chosen, and a real logger that fails mid-run dropped with a warning.
The loggers in a real 2-rank run are in tests/test_loggers_e2e.py."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys

import pytest

from aligner.config import ConfigError, build_config
from aligner.hookspecs import RunStart
from aligner.recipes.train import configure
from aligner.registry import PluginError, activate, inactive_sections, logger_names
from aligner.training.loggers import LoggerError, Loggers
from conftest import ROOT, read_scalars


@pytest.mark.parametrize("value, expected", [
    (None, ["tensorboard"]), ("none", []), ([], []), (["none"], []), ("tensorboard,wandb", ["tensorboard", "wandb"]),
    (["mlflow"], ["mlflow"]),
])
def test_report_to_takes_a_list_a_comma_separated_string_or_none(value, expected):
    assert logger_names(value) == expected


@pytest.mark.parametrize("value, problem", [
    ("all", r"report_to: all cannot be combined with other names and all is not supported; list the loggers to "
            r"report to \(installed: mlflow, tensorboard, trackio, wandb"),
    (["tensorboard", "none"], r"report_to: none cannot be combined with other names; list the loggers"),
    (3, r"report_to: expected a list of logger names \(e.g. \[tensorboard, wandb\]\) or none, got 3"),
])
def test_a_report_to_that_names_no_loggers_is_refused_with_the_installed_ones(value, problem):
    with pytest.raises(PluginError, match=problem):
        logger_names(value)


@pytest.mark.parametrize("plugins, loggers, problem", [
    (["dpo", "wandb"], [], r"--plugins names 'wandb', a logger; name loggers in report_to instead, e.g. "
                           r"--set report_to=\[tensorboard,wandb\] \(the default is \[tensorboard\]\)"),
    (["dpo"], ["kto"], r"report_to names 'kto', a loss plugin, not a logger; name it in --plugins"),
    (["dpo"], ["wandbb"], r"unknown logger 'wandbb' in report_to.\navailable plugins:(.|\n)*  wandb +logger"),
    (["dpo"], ["wandb", "wandb"], r"plugin 'wandb' is listed twice in report_to"),
])
def test_each_plugin_is_named_in_its_one_place(plugins, loggers, problem):
    with pytest.raises(PluginError, match=problem):
        activate(plugins, loggers)


def test_report_to_is_set_like_any_key_and_the_config_keeps_loggers_apart_from_plugins(tmp_path):
    args = argparse.Namespace(config=str(ROOT / "configs" / "tiny-cpu.yaml"), plugins="dpo,flipguard", resume=None,
                              overrides=[["report_to=[tensorboard,wandb]", "wandb.project=p", f"output_dir={tmp_path}"]])
    cfg, plugins = configure(args)
    assert cfg.plugins == ["dpo", "flipguard"] and cfg.report_to == ["tensorboard", "wandb"]
    assert plugins.training == ["dpo", "flipguard"] and plugins.loggers == ["tensorboard", "wandb"]
    assert cfg.section("wandb").project == "p" and plugins.versions["wandb"].startswith("aligner-")
    assert cfg.to_dict()["report_to"] == ["tensorboard", "wandb"]


def test_a_section_of_a_logger_not_in_report_to_says_to_add_it_there():
    with pytest.raises(ConfigError, match=r"section 'mlflow' configures plugin 'mlflow', which is not active; add it "
                                          r"to report_to, or remove the section"):
        build_config({"mlflow": {"experiment": "x"}}, {}, inactive_sections(activate(["dpo"])))
    with pytest.raises(ConfigError, match=r"section 'kto' configures plugin 'kto', which is not active; add it to "
                                          r"--plugins, or remove the section"):
        build_config({"kto": {"beta": 0.1}}, {}, inactive_sections(activate(["dpo"])))


@pytest.mark.subprocess
def test_no_logger_library_is_imported_unless_the_run_chooses_it():
    code = ("import sys, argparse; from aligner.recipes.train import configure; from aligner.registry import list_plugins_table; "
            "list_plugins_table(); "
            f"configure(argparse.Namespace(config={str(ROOT / 'configs' / 'tiny-cpu.yaml')!r}, plugins=None, resume=None, "
            "overrides=[['report_to=[tensorboard,wandb,mlflow,trackio]']])); "
            "print(sorted(m for m in ('wandb', 'mlflow', 'trackio') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def start(loggers: list[str], tmp_path, *sets: str) -> tuple[Loggers, object]:
    args = argparse.Namespace(config=str(ROOT / "configs" / "tiny-cpu.yaml"), plugins="dpo", resume=None,
                              overrides=[[f"report_to=[{','.join(loggers)}]", f"output_dir={tmp_path}", *sets]])
    cfg, plugins = configure(args)
    return Loggers(plugins, cfg, rank=0), RunStart(tmp_path, cfg.to_dict(), {"models": {}}, dict(plugins.versions))


@pytest.mark.parametrize("name, module", [("wandb", "wandb"), ("mlflow", "mlflow"), ("trackio", "trackio")])
def test_a_chosen_logger_whose_library_is_missing_is_refused_with_the_pip_line(name, module, tmp_path, monkeypatch):
    for loaded in [m for m in sys.modules if m == module or m.startswith(f"{module}.")] or [module]:
        monkeypatch.setitem(sys.modules, loaded, None)  # Python's own "not installed": import raises ImportError
    loggers, run = start(["tensorboard", name], tmp_path)
    with pytest.raises(LoggerError, match=rf"logger '{name}' could not start: ImportError: .*; install it with: pip "
                                          rf"install 'aligner\[{name}\]'. Fix that, or remove {name} from report_to "
                                          rf"\(now tensorboard, {name}\)"):
        loggers.start(run)
    assert loggers.closed  # the loggers that had started are closed


def test_a_logger_that_cannot_start_stops_the_run_with_its_message(tmp_path):
    (tmp_path / "afile").write_text("")
    loggers, run = start(["mlflow"], tmp_path, f"mlflow.tracking_uri={(tmp_path / 'afile').as_uri()}")
    with pytest.raises(LoggerError, match=r"logger 'mlflow' could not start: NotADirectoryError: .*afile.*Fix that, "
                                          r"or remove mlflow from report_to"):
        loggers.start(run)


def test_a_real_logger_that_fails_mid_run_is_dropped_and_the_others_get_every_step(tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    loggers, run = start(["tensorboard", "mlflow"], tmp_path, f"mlflow.tracking_uri={store.as_uri()}")
    loggers.start(run)
    loggers.log(1, {"train/loss": 0.5})
    run_id = loggers.states()["mlflow"]["run_id"]
    assert [m.value for m in MlflowClient(store.as_uri()).get_metric_history(run_id, "train/loss")] == [0.5]
    shutil.rmtree(store)  # the tracking store is gone, as a server that went away
    with caplog.at_level(logging.WARNING, logger="aligner"):
        loggers.log(2, {"train/loss": 0.25})
        loggers.log(3, {"train/loss": 0.125})
    warnings = [r.getMessage() for r in caplog.records if "is dropped" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("logger 'mlflow' failed (plugin 'mlflow' failed in hook aligner_log: ")
    assert warnings[0].endswith("and is dropped for the rest of this run; training and the other loggers (tensorboard) go on")
    loggers.close("finished")  # the dropped logger is not called again
    assert read_scalars(tmp_path / "tensorboard")["train/loss"] == [(1, 0.5), (2, 0.25), (3, 0.125)]
    assert json.loads(json.dumps(loggers.states())) == {"mlflow": {"run_id": run_id}}


def test_ranks_other_than_zero_hold_no_logger(tmp_path):
    loggers, run = start(["tensorboard"], tmp_path)
    loggers = Loggers(loggers.plugins, loggers.config, rank=1)
    loggers.start(run)
    loggers.log(1, {"train/loss": 1.0})
    loggers.close("finished")
    assert loggers.active == [] and not (tmp_path / "tensorboard").exists()


def test_a_logger_without_aligner_log_is_refused_when_activated():
    with pytest.raises(PluginError, match=r"plugin 'plugin_fixtures.flaky_logger:no_log_hook' has role logger but no "
                                          r"aligner_log hook; a logger plugin must implement aligner_log"):
        activate(["dpo"], ["plugin_fixtures.flaky_logger:no_log_hook"])


def test_a_resume_without_a_logger_keeps_its_run_id_for_a_later_resume_with_it(tmp_path):
    loggers, run = start(["tensorboard"], tmp_path)
    loggers.start(run, resumed={"wandb": {"run_id": "abc123"}})
    loggers.close("finished")
    assert loggers.states() == {"wandb": {"run_id": "abc123"}}
