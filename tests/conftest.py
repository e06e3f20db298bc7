"""Shared test setup: offline, a per-session model cache, real multi-process launches."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from aligner.launcher import deepspeed_command
from aligner.models import free_port  # noqa: F401  (tests launch runs on free ports)
from aligner.report import read_scalars  # noqa: F401  (tests read TensorBoard through the same reader as the report)

ROOT = Path(__file__).resolve().parents[1]
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ALIGNER_CACHE", tempfile.mkdtemp(prefix="aligner-test-cache-"))
# Test-only plugin modules (tests/plugin_fixtures) importable by module:attr, in-process and in launched runs.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))
sys.path.insert(0, str(ROOT / "tests"))


def launch(args: list[str], nproc: int = 2, timeout: int = 300, cwd: Path | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run launch/train.py through the real DeepSpeed launcher with ``nproc`` ranks."""
    cmd = deepspeed_command(args, nproc)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from aligner import embedded

    return embedded.build_tokenizer()


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny random Llama saved with save_pretrained (with its tokenizer)."""
    from aligner import embedded

    path = tmp_path_factory.mktemp("random-model")
    embedded.build_model(len(tiny_tokenizer), seed=3).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def check_plan_against_estimate(out: Path, plugins: str | None = None, logs: str | None = None) -> dict:
    """The model plan a finished run wrote (``out/plan.json``) equals the one ``aligner-estimate --json`` prints for
    the run's own config (``out/config.json``), and the engines and caches the run holds are what the plan says.

    ``plugins``: the run's ``--plugins`` when they include ``module:attr`` targets (config.json keeps their names).
    ``logs``: the run's output, whose ``models built:`` line must name the plan's engines.
    """
    import contextlib
    import io
    import json

    from deepspeed.accelerator import get_accelerator

    from aligner import estimate

    get_accelerator()  # DeepSpeed prints its accelerator choice to stdout once per process: not into the JSON below
    written = json.loads((out / "plan.json").read_text())
    args = ["--config", str(out / "config.json"), "--device", "cpu", "--json", *(["--plugins", plugins] if plugins else [])]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert estimate.main(args) == 0
    predicted = json.loads(printed.getvalue())["plan"]
    assert predicted == {"models": written["models"], "inputs": written["inputs"]}
    for name, spec in written["models"].items():
        built = written["built"][name]
        assert built["holds"] == ("cache" if spec["state"] == "cached" else "engine"), (name, written)
        assert built["shares"] == spec["shares"], (name, written)
        if built["holds"] == "engine":
            assert built["dtype"] == spec["dtype"], (name, written)
    if logs is not None:
        engines = [n for n in ("policy", "reference", "anchor") if written["built"].get(n, {}).get("holds") == "engine"]
        assert f"models built: {', '.join(engines)}" in logs
    return written
