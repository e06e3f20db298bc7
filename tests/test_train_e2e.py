"""The embedded DPO run, end to end, through the real DeepSpeed launcher with 2 ZeRO-3 ranks on CPU."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, check_plan_against_estimate, launch, read_scalars

TAGS = ["train/loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
        "logps/chosen", "logps/rejected", "lr", "grad_norm", "perf/tokens_per_s"]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo-run")
    proc = launch(["--config", "configs/tiny-cpu.yaml", "--plugins", "dpo",
                   "--set", f"output_dir={out}", "train.max_steps=40", "eval.every=20", "train.save_every=20"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (out / "launch.log").write_text(proc.stdout + proc.stderr)
    return out


@pytest.mark.slow
def test_the_default_run_takes_the_packed_prefix_shared_chunked_path_and_says_so(dpo_run):
    """configs/tiny-cpu.yaml sets no batch switch: the defaults (aligner/scoring/batch_path.py), logged once, in plan.json."""
    written = json.loads((dpo_run / "plan.json").read_text())
    assert written["batch_path"] == {"packing": True, "prefix_sharing": True, "chunk_tokens": 1024,
                                     "attn_implementation": "aligner_varlen", "kernel": "sdpa_segments",
                                     "dtype": "float32", "fallbacks": [], "kernel_fallbacks": []}
    assert written["models"]["policy"]["dtype"] == "float32"  # model.dtype: auto on the CPU
    logs = (dpo_run / "launch.log").read_text()
    line = ("batch path: packed + prefix-shared + chunked head (1024 tokens), attention aligner_varlen on "
            "sdpa_segments, float32")
    assert logs.count(line) == 1  # rank 0 only
    imbalance = [v for _, v in read_scalars(dpo_run / "tensorboard")["perf/rank_imbalance"]]
    assert len(imbalance) == 40 and all(1.0 <= v < 1.5 for v in imbalance)


@pytest.mark.slow
def test_first_step_loss_is_ln2_and_every_tag_is_logged(dpo_run):
    scalars = read_scalars(dpo_run / "tensorboard")
    assert set(TAGS) <= set(scalars), sorted(scalars)
    step, first = scalars["train/loss"][0]
    assert step == 1 and abs(first - math.log(2)) < 1e-4
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 41))


@pytest.mark.slow
def test_loss_falls_and_eval_accuracy_rises(dpo_run):
    scalars = read_scalars(dpo_run / "tensorboard")
    losses = [v for _, v in scalars["train/loss"]]
    assert sum(losses[-10:]) / 10 < sum(losses[:5]) / 5 - 0.05
    acc = dict(scalars["eval/rewards/accuracies"])
    assert acc[0] == 0.0  # policy == reference: every margin is exactly 0
    assert acc[40] > 0.7 and acc[40] >= acc[20] - 0.05


@pytest.mark.slow
def test_checkpoints_and_exported_model_match_the_engine(dpo_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aligner.data import collate_pairs, load_rows, tokenize_dataset
    from aligner.scoring.logps import batch_logps

    assert sorted(p.name for p in (dpo_run / "checkpoints").glob("step_*")) == ["step_20", "step_40"]
    final = dpo_run / "final"
    assert (final / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    engine_logps = {r["id"]: r for r in map(json.loads, (dpo_run / "eval_logps.jsonl").read_text().splitlines())}
    examples = tokenize_dataset(load_rows("embedded:eval"), tokenizer, 64, None, "error", "eval")[:32]
    with torch.no_grad():
        logps, _ = batch_logps(model, collate_pairs(examples, tokenizer.pad_token_id))
    chosen, rejected = logps.chunk(2)
    for i, ex in enumerate(examples):
        assert engine_logps[ex.id]["step"] == 40
        assert abs(engine_logps[ex.id]["chosen"] - float(chosen[i])) < 1e-4
        assert abs(engine_logps[ex.id]["rejected"] - float(rejected[i])) < 1e-4


@pytest.mark.slow
def test_the_estimator_prints_the_plan_the_dpo_run_built(dpo_run):
    written = check_plan_against_estimate(dpo_run)
    # DPO with the static cache on (the default): the reference's log-probs come from the cache, no engine.
    assert written["built"] == {"policy": {"holds": "engine", "shares": None, "dtype": "float32"},
                                "reference": {"holds": "cache", "shares": None, "dtype": None}}


@pytest.mark.slow
def test_existing_run_is_not_overwritten_without_resume_or_overwrite(dpo_run):
    proc = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--set", f"output_dir={dpo_run}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "already holds checkpoints (step_40); pass --resume auto" in proc.stderr


@pytest.mark.subprocess
def test_list_plugins_from_the_console_script():
    exe = Path(sys.executable).with_name("aligner-train")
    proc = subprocess.run([str(exe), "--list-plugins"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "dpo" in proc.stdout and "loss" in proc.stdout


@pytest.mark.subprocess
def test_missing_model_path_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--set", f"output_dir={tmp_path}",
                           f"model.name_or_path={tmp_path / 'nowhere'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "model.name_or_path:" in proc.stderr and "is not a model folder (no config.json there)" in proc.stderr


@pytest.mark.slow
def test_report_writes_plots_and_a_summary_of_the_run(dpo_run, tmp_path):
    from PIL import Image

    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(ROOT / "launch/report.py"), str(dpo_run), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    plots = {p.stem for p in out.glob("*.png")}
    assert plots == {"loss", "rewards", "margins", "accuracies", "throughput"}  # no TR or FlipGuard tags in a DPO run
    assert Image.open(out / "loss.png").size == (700, 400)
    summary = (out / "summary.md").read_text()
    last_loss = read_scalars(dpo_run / "tensorboard")["train/loss"][-1][1]
    assert f"| `train/loss` | 40 |" in summary and f"{last_loss:.4g} |" in summary
    assert "Trained to step 40" in summary


@pytest.mark.subprocess
def test_report_of_a_folder_without_event_files_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "launch/report.py"), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"{tmp_path}/tensorboard: no TensorBoard event files; pass the output_dir of a run" in proc.stderr
