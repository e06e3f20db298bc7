"""One dispatch path for every hook: activation-time checks, firstresult, and installed packages that are broken.

The broken packages are real: a ``<name>.dist-info`` folder with an ``entry_points.txt`` and the module it
names, in a temporary folder on the PYTHONPATH of a subprocess, found by ``importlib.metadata`` as pip's
installs are."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from aligner.hookspecs import REQUIRED_HOOKS, ROLES
from aligner.models.plan import make_plan
from aligner.recipes.train import configure, parse_args
from aligner.registry import PluginError, PluginHookError, activate
from conftest import ROOT

BROKEN_MODULES = {
    "explodes_at_import": 'raise RuntimeError("boom at import time")\n',
    "exits_at_import": "import sys\nsys.exit(3)\n",
}
ENTRY_POINTS = """[aligner.plugins]
explodes = explodes_at_import:plugin
exits = exits_at_import:plugin
missing_attr = json:no_such_plugin
missing_module = no_such_module_anywhere:plugin
"""


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("broken-site")
    info = site / "aligner_broken_plugins-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: aligner-broken-plugins\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    for name, text in BROKEN_MODULES.items():
        (site / f"{name}.py").write_text(text)
    return site


def run_with(site: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([*cmd], capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)


@pytest.mark.subprocess
def test_list_plugins_shows_each_broken_package_with_its_error(broken_site):
    proc = run_with(broken_site, str(Path(sys.executable).with_name("aligner-train")), "--list-plugins")
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert "broken" in lines["explodes"] and "aligner-broken-plugins-0.3" in lines["explodes"]
    assert "cannot import module 'explodes_at_import': RuntimeError: boom at import time" in lines["explodes"]
    assert "cannot import module 'exits_at_import': SystemExit: 3" in lines["exits"]
    assert "module 'json' has no attribute 'no_such_plugin'" in lines["missing_attr"]
    assert "cannot import module 'no_such_module_anywhere'" in lines["missing_module"]
    assert "loss" in lines["dpo"] and "broken" not in lines["dpo"]


@pytest.mark.subprocess
def test_broken_packages_leave_runs_that_do_not_name_them_alone(broken_site):
    estimate = str(Path(sys.executable).with_name("aligner-estimate"))
    proc = run_with(broken_site, estimate, "--config", "configs/tiny-cpu.yaml", "--plugins", "dpo,flipguard",
                    "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "model plan: policy" in proc.stdout


@pytest.mark.parametrize("name,message", [
    ("explodes", "plugin 'explodes': cannot import module 'explodes_at_import': RuntimeError: boom at import time"),
    ("exits", "plugin 'exits': cannot import module 'exits_at_import': SystemExit: 3"),
])
@pytest.mark.subprocess
def test_a_run_that_names_a_broken_package_fails_with_its_error_and_no_traceback(broken_site, tmp_path, name, message):
    proc = run_with(broken_site, sys.executable, str(ROOT / "launch/train.py"), "--plugins", f"dpo,{name}",
                    "--set", f"output_dir={tmp_path}")
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_every_role_names_the_hook_it_requires():
    assert set(REQUIRED_HOOKS) == set(ROLES)


def test_a_loss_without_its_hook_is_refused_at_activation():
    with pytest.raises(PluginError, match=r"plugin 'plugin_fixtures.extra:no_loss_hook' has role loss but no "
                                          r"aligner_loss hook; a loss plugin must implement aligner_loss"):
        activate(["plugin_fixtures.extra:no_loss_hook"])


def test_a_hook_wrapper_is_refused_with_a_clear_message():
    with pytest.raises(PluginError, match=r"plugin 'plugin_fixtures.extra:wraps' marks aligner_constraint as a hook "
                                          r"wrapper; aligner calls every implementation itself"):
        activate(["dpo", "plugin_fixtures.extra:wraps"])


@pytest.mark.parametrize("plugins,anchor", [
    (["anchor_plain"], "embedded:plain"),
    (["anchor_plain", "anchor_first"], "embedded:first"),  # tryfirst wins over --plugins order
    (["anchor_none", "anchor_plain"], "embedded:plain"),  # None means "no answer": the next one is asked
])
def test_model_path_is_the_first_non_none_answer_in_call_order(plugins, anchor):
    cfg, active = configure(parse_args(["--plugins", ",".join(f"plugin_fixtures.extra:{p}" for p in plugins)]))
    assert make_plan(cfg, active).models["anchor"].source == anchor


def test_first_result_is_refused_on_a_hook_that_is_not_firstresult():
    with pytest.raises(PluginHookError, match="aligner_constraint is not a firstresult hook"):
        activate(["dpo"]).first_result("aligner_constraint", inputs=None, config=None)
