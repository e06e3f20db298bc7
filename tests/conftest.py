"""Shared test setup: offline, a per-session model cache, real multi-process launches."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from aligner.evaluation.report import read_scalars  # noqa: F401  (tests read TensorBoard through the same reader as the report)
from aligner.models.loading import free_port  # noqa: F401  (tests launch runs on free ports)
from aligner.training.launcher import deepspeed_command

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


#: The runs of tests/test_faults.py: dpo with the test-only fault plugin, 8 short steps, no eval.
FAULT_PLUGINS = ["--plugins", "dpo,plugin_fixtures.faults:faults"]
FAULT_SHORT = ["train.max_steps=8", "train.save_every=3", "eval.every=0", "data.eval=null"]
#: Every built-in logger at once, and a test-only one that fails at step 2 (tests/plugin_fixtures/flaky_logger.py).
ALL_LOGGERS = ["report_to=[tensorboard,wandb,mlflow,trackio,plugin_fixtures.flaky_logger:flaky]", "flaky.fail_at_step=2"]
HUB_REPO = "aligner-tests/tiny-dpo"


def fault_run(out: Path, *overrides: str, resume: bool = False, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    args = [*FAULT_PLUGINS, "--set", f"output_dir={out}", *FAULT_SHORT, *overrides] + (["--resume", "auto"] if resume else [])
    return launch(args, env=env)


def logger_env(root: Path) -> dict[str, str]:
    """Where the loggers write in a test: W&B offline into the run's folder, Trackio's local store, no home folder."""
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(root / "wandb-config"),
            "WANDB_CACHE_DIR": str(root / "wandb-cache"), "WANDB_DATA_DIR": str(root / "wandb-data"),
            "TRACKIO_DIR": str(root / "trackio"), "MLFLOW_ALLOW_FILE_STORE": "true", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="session")
def signalled(tmp_path_factory) -> dict:
    """Rank 1 gets SIGUSR1 right after step 4 and SIGTERM while it writes step_4; then ``--resume auto`` to step 8.

    Shared by tests/test_faults.py (the stop and the exact resume) and tests/test_loggers_e2e.py: both runs
    report to every logger, and the resumed one pushes to the Hub with ``HF_HUB_OFFLINE=1`` (which fails, exit 6).
    """
    from aligner.training import checkpoint

    out = tmp_path_factory.mktemp("signalled")
    env = logger_env(out.parent / f"{out.name}-loggers")
    stopped = fault_run(out, "faults.signal_at_step=4", "faults.signal_in_save_at=4", *ALL_LOGGERS, env=env)
    after_stop = {"listed": [p.name for p in checkpoint.list_checkpoints(out)],
                  "entries": sorted(p.name for p in (out / "checkpoints").iterdir()),
                  "latest": (out / "checkpoints" / "latest").read_text(), "final": (out / "final").exists()}
    resumed = fault_run(out, *ALL_LOGGERS, "export.push_to_hub=true", f"export.hub_model_id={HUB_REPO}",
                        resume=True, env=env)
    return {"out": out, "env": env, "stopped": stopped, "resumed": resumed, **after_stop}


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from aligner.data import embedded

    return embedded.build_tokenizer()


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny random Llama saved with save_pretrained (with its tokenizer)."""
    from aligner.data import embedded

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

    from aligner.tools import estimate

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
