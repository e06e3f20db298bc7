"""The example third-party package (examples/aligner-plugin-example) adds a plugin with no change to aligner."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT, launch, read_scalars

EXAMPLE = ROOT / "examples" / "aligner-plugin-example"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """pip-install the example package (offline, no build isolation) into its own site folder."""
    site = tmp_path_factory.mktemp("example-site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
                           "--target", str(site), str(EXAMPLE)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ["PYTHONPATH"]])}


@pytest.mark.subprocess
def test_installed_package_is_listed_with_its_distribution(installed):
    proc = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--list-plugins"], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **installed})
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("nll_reg"))
    assert "constraint" in row and "aligner-plugin-example-0.1.0" in row


@pytest.mark.slow
def test_installed_plugin_trains_beside_dpo(installed, tmp_path):
    proc = launch(["--plugins", "dpo,nll_reg", "--set", f"output_dir={tmp_path}", "train.max_steps=3", "eval.every=0",
                   "train.save_every=0", "nll_reg.alpha=0.5",
                   "train.cache_static_logps=false"],  # 3 steps: no pre-pass over the whole train split
                  env=installed)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    scalars = read_scalars(tmp_path / "tensorboard")
    (step, nll), = scalars["nll_reg/nll"][:1]
    (_, term), = scalars["nll_reg/constraint"][:1]
    (_, total), = scalars["train/loss"][:1]
    assert step == 1 and nll > 0
    assert term == pytest.approx(0.5 * nll, rel=1e-5)
    # policy = reference at step 1: the DPO term is ln 2, so the total is ln 2 + the regulariser's term.
    assert total == pytest.approx(math.log(2) + term, rel=1e-5)
