"""Every built-in logger in one real 2-rank run with a stop and a resume, read back from each logger's own store.

The run is ``signalled`` (tests/conftest.py, shared with tests/test_faults.py): 8 DPO steps reporting to
TensorBoard, W&B (``WANDB_MODE=offline``), MLflow (a file store in ``output_dir/mlruns``, the default) and
Trackio (its local store in ``TRACKIO_DIR``), plus a test-only logger that fails at step 2. Rank 1 is signalled
after step 4 (the run stops with a checkpoint, exit 5); ``--resume auto`` trains steps 5-8 and then pushes to
the Hub with ``HF_HUB_OFFLINE=1``, which fails (exit 6) with the export intact.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from aligner.training import checkpoint
from conftest import HUB_REPO, read_scalars

pytestmark = pytest.mark.slow


def tensorboard_losses(out) -> list[tuple[int, float]]:
    return read_scalars(out / "tensorboard")["train/loss"]


def same_as_tensorboard(series: list[tuple[int, float]], out) -> bool:
    """Each step once, in order, with TensorBoard's value (TensorBoard stores float32)."""
    expected = tensorboard_losses(out)
    return [s for s, _ in series] == [s for s, _ in expected] and all(
        np.float32(v) == np.float32(e) for (_, v), (_, e) in zip(series, expected))


def test_both_runs_report_to_every_logger_and_keep_the_run_ids_in_the_checkpoints(signalled):
    out = signalled["out"]
    assert signalled["stopped"].returncode == 5 and signalled["resumed"].returncode == 6
    assert [s for s, _ in tensorboard_losses(out)] == list(range(1, 9))
    for proc in (signalled["stopped"], signalled["resumed"]):
        assert "reporting to tensorboard, wandb, mlflow, trackio, flaky" in proc.stderr
    kept = [json.loads((out / "checkpoints" / tag / checkpoint.MARKER).read_text())["loggers"] for tag in ("step_4", "step_8")]
    assert set(kept[0]) == {"wandb", "mlflow", "trackio"} and kept[0] == kept[1]  # the resumed run is the same run
    assert kept[0]["wandb"]["run_id"] and kept[0]["mlflow"]["run_id"] and kept[0]["trackio"]["name"]


def test_a_logger_that_fails_is_dropped_with_a_warning_and_the_others_lose_nothing(signalled):
    stopped = signalled["stopped"]
    assert ("logger 'flaky' failed (plugin 'flaky' failed in hook aligner_log: ConnectionError: the flaky server went "
            "away at step 2) and is dropped for the rest of this run; training and the other loggers "
            "(tensorboard, wandb, mlflow, trackio) go on") in stopped.stderr
    steps = [json.loads(line)["step"] for line in (signalled["out"] / "flaky.jsonl").read_text().splitlines()]
    assert steps == [1, 5, 6, 7, 8]  # dropped at 2; the resumed run (a new process) starts it again


def test_mlflow_holds_every_step_of_both_runs_in_one_run_read_back_through_its_client(signalled, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.7+ asks to opt in to its file store

    out = signalled["out"]
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("aligner").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == json.loads(
        (out / "checkpoints" / "step_8" / checkpoint.MARKER).read_text())["loggers"]["mlflow"]["run_id"]
    run = runs[0]
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert same_as_tensorboard(history, out)
    assert run.info.status == "FINISHED"  # training finished; only the push failed
    assert run.data.params["train.max_steps"] == "8" and run.data.params["dpo.beta"] == "0.1"
    assert run.data.tags["plugin.dpo"].startswith("aligner-") and run.data.tags["final_model"] == str(out / "final")
    assert run.data.tags["hub_url"].startswith(f"not pushed: cannot push to {HUB_REPO}: HF_HUB_OFFLINE=1")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "plan.json", "plugins.json", "final_metrics.json", "report", "model",
            "resume_step_4"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} >= {"report/loss.png", "report/rewards.png"}
    assert "flips/correct-_correct" in run.data.metrics  # the one tag with a character MLflow refuses


WANDB_BLOCK = 32768  # the W&B run file is a LevelDB-format log: 32 KiB blocks of 7-byte-headed chunks


def wandb_records(path):
    """The protobuf records of a W&B ``run-<id>.wandb`` file (its ``:W&B`` header, then LevelDB log chunks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if WANDB_BLOCK - pos % WANDB_BLOCK < 7:  # a block's tail too short for a header is padding
            pos += WANDB_BLOCK - pos % WANDB_BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # FULL, FIRST
            pending = chunk
        elif kind in (3, 4):  # MIDDLE, LAST
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_files_hold_every_step_of_both_runs_under_one_run_id(signalled):
    out = signalled["out"]
    run_id = json.loads((out / "checkpoints" / "step_4" / checkpoint.MARKER).read_text())["loggers"]["wandb"]["run_id"]
    files = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)  # two processes, one run
    losses, images, summary = {}, set(), {}
    for f in files:
        for record in wandb_records(f):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                assert record.run.run_id == run_id
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
                if "train/loss" in items:
                    losses[int(items["_step"])] = float(items["train/loss"])
                images |= {k.removesuffix("/_type") for k, v in items.items()
                           if k.startswith("report/") and k.endswith("/_type") and "image-file" in v}
            elif kind == "summary":
                summary.update({i.key or "/".join(i.nested_key): i.value_json for i in record.summary.update})
    assert same_as_tensorboard(sorted(losses.items()), out)
    assert {"report/loss", "report/rewards"} <= images
    assert json.loads(summary["final_model"]) == str(out / "final")


def test_trackio_local_store_holds_every_step_of_both_runs_in_one_run(signalled):
    out, env = signalled["out"], signalled["env"]
    name = json.loads((out / "checkpoints" / "step_8" / checkpoint.MARKER).read_text())["loggers"]["trackio"]["name"]
    # Trackio reads TRACKIO_DIR when it is imported: read its store in a process of its own
    read = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage; "
            "print(json.dumps(SQLiteStorage.get_logs('aligner', sys.argv[1])))")
    proc = subprocess.run([sys.executable, "-c", read, name], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    logs = json.loads(proc.stdout.splitlines()[-1])
    losses = sorted((row["step"], row["train/loss"]) for row in logs if "train/loss" in row)
    assert same_as_tensorboard(losses, out)
    assert any("report/loss" in row for row in logs) and any(row.get("final/model") == str(out / "final") for row in logs)


def test_an_offline_push_exits_6_names_the_cause_and_the_fix_and_leaves_the_export_intact(signalled):
    from transformers import AutoModelForCausalLM

    out, resumed = signalled["out"], signalled["resumed"]
    assert (f"export.push_to_hub: HF_HUB_OFFLINE=1 is set, so the push to {HUB_REPO} at the end of this run will "
            f"fail (exit code 6") in resumed.stderr  # said at the start, before training
    line = next(line for line in resumed.stderr.splitlines() if line.startswith("aligner: trained, but the push"))
    assert line == (f"aligner: trained, but the push to the Hub failed: cannot push to {HUB_REPO}: HF_HUB_OFFLINE=1 "
                    f"forbids uploads. Unset HF_HUB_OFFLINE (on a machine that reaches the Hub). Training succeeded "
                    f"and {out}/final is intact; to upload it by hand: `hf upload {HUB_REPO} {out}/final .`")
    assert {"README.md", "config.json", "model.safetensors"} <= {p.name for p in (out / "final").iterdir()}
    assert AutoModelForCausalLM.from_pretrained(out / "final") is not None
    assert json.loads((out / "final_metrics.json").read_text())["train/loss"] > 0


def test_the_full_export_has_a_model_card_with_hub_metadata_and_the_dpo_citation(signalled):
    from huggingface_hub import ModelCard

    card = ModelCard.load(signalled["out"] / "final" / "README.md")
    assert card.data.library_name == "transformers" and card.data.tags == ["aligner", "dpo", "faults"]
    assert card.data.base_model is None  # embedded:tiny-sort is no Hub model
    text = card.text
    assert "| `dpo` | loss | aligner-" in text and "beta=0.1" in text
    assert "| optimizer steps | 8 |" in text and "| batch | 8 per rank x 1 accumulation x 2 ranks = 16 per step |" in text
    assert f'AutoModelForCausalLM.from_pretrained("{HUB_REPO}")' in text
    assert ("`dpo`: Direct Preference Optimization (Rafailov et al., 2023), "
            "[arXiv:2305.18290](https://arxiv.org/abs/2305.18290)") in text
