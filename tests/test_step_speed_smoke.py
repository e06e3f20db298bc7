"""benchmarks/step_speed.py --smoke: every row runs through the real launchers on a tiny workload.

The aligner rows double as the fast path's end-to-end test: 2 ZeRO-3 ranks on CPU, the naive row
(padded, full logits) and the default row (no flags: packed, prefix-shared, chunked log-probs, ranks
balanced by tokens; here with gradient checkpointing) give the same per-step losses, starting at ln 2,
and both log the perf/* tags to TensorBoard.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, read_scalars

STEPS = 3


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_speed.py"), "--smoke", "--work", str(work),
           "--rows", "naive,default,trl", "--steps", str(STEPS), "--json", str(work / "rows.json"),
           "--fast-set", "model.gradient_checkpointing=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads((work / "rows.json").read_text())


@pytest.mark.slow
def test_fast_path_gives_the_naive_losses_from_ln2_and_logs_perf_tags(smoke):
    _, result = smoke
    rows = {r["row"]: r for r in result["rows"]}
    naive, fast = (read_scalars(Path(rows[name]["output_dir"]) / "tensorboard") for name in ("naive", "default"))
    for scalars in (naive, fast):
        assert abs(scalars["train/loss"][0][1] - math.log(2)) < 1e-5
        assert [s for s, _ in scalars["perf/peak_mem_gib"]] == list(range(1, STEPS + 1))
        assert all(0.05 < v < 64 for _, v in scalars["perf/peak_mem_gib"])  # GiB of host RSS, largest rank
        assert all(v > 0 for _, v in scalars["perf/tokens_per_s"] + scalars["perf/cpu_s"])
        assert "perf/mfu" not in scalars  # no MFU on CPU
    for (_, a), (_, b) in zip(naive["train/loss"], fast["train/loss"], strict=True):
        assert abs(a - b) < 1e-5
    assert naive["train/loss"][1][1] != naive["train/loss"][0][1]  # the policy did move


@pytest.mark.slow
def test_table_has_every_row_or_says_why_trl_was_skipped(smoke):
    stdout, result = smoke
    names = [r["row"] for r in result["rows"]]
    assert names[:2] == ["naive", "default"] and "| naive | padded, full logits, reference forward every step |" in stdout
    try:
        import trl  # noqa: F401
    except ImportError:
        assert result["skipped"] == {"trl": "TRL is not installed (pip install -e '.[bench]' installs trl 1.16)"}
        assert "row trl skipped: TRL is not installed" in stdout
    else:
        trl_row = result["rows"][2]
        assert trl_row["row"] == "trl" and abs(trl_row["loss1"] - math.log(2)) < 1e-4 and trl_row["tok_s"] > 0


@pytest.mark.subprocess
def test_unknown_row_is_a_clear_error():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_speed.py"), "--rows", "naive,turbo"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--rows: unknown row(s) turbo; choose from naive, packing, chunked, cached, fast, default, unshared, unbalanced, trl" in proc.stderr


def test_gpu_twin_parses_on_cpu():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import step_speed

    args = step_speed.parse_args(["--device", "cuda", "--nproc", "1"])
    assert step_speed.spec_for(args).hidden == 2048 and args.rows[-1] == "trl"
    cmd = step_speed.aligner_command(args, step_speed.ALIGNER_ROWS["fast"], Path("/w"), step_speed.spec_for(args))
    assert "model.dtype=bfloat16" in cmd and "train.packing=true" in cmd and "data.max_length=2048" in cmd


def test_rows_describe_their_plugin_set_and_update_the_reference_as_often_as_trl():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import step_speed

    rows, tr = step_speed.ALIGNER_ROWS, "dpo,tr_soft,flipguard"
    assert step_speed.row_note(rows["naive"], "dpo") == "padded, full logits, reference forward every step"
    assert "reference and anchor forwards every step" in step_speed.row_note(rows["naive"], tr)
    assert "shared with the anchor" in step_speed.row_note(rows["naive"], "dpo,flipguard")
    assert "anchor log-probs cached, reference live" in step_speed.row_note(rows["fast"], tr)
    assert step_speed.update_every_step(tr) == ["tr_soft.every=1"] and step_speed.update_every_step("dpo") == []
    args = step_speed.parse_args(["--plugins", tr])
    assert "tr_soft.every=1" in step_speed.aligner_command(args, rows["fast"], Path("/w"), step_speed.spec_for(args))
    assert "anchor log-probs cached, reference live" in step_speed.row_note(rows["default"], tr)
    assert step_speed.section_name("dpo", "long") == "step_speed_long"
    long_args = step_speed.parse_args(["--workload", "long"])
    assert step_speed.spec_for(long_args).name == "long" and "prompt mean 372, response mean 87" in \
        step_speed.workload.describe(step_speed.spec_for(long_args))
    assert step_speed.section_name("dpo") == "step_speed"
    assert step_speed.section_name(tr) == "step_speed_dpo_tr_soft_flipguard"


def test_profile_plugin_records_a_window_of_steps_and_profile_step_sorts_ops_into_terms(tmp_path):
    import types

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import profile_plugin
    import profile_step

    section = profile_plugin.ProfileConfig(start=1, steps=2)
    config = types.SimpleNamespace(output_dir=str(tmp_path), section=lambda name: section)
    plugin = profile_plugin.Profiler()
    a = torch.randn(64, 64)
    for step in range(1, 5):
        if step == 2:  # inside the window (after step 1, up to step 3)
            torch.nn.functional.scaled_dot_product_attention(a[None, None], a[None, None], a[None, None])
            (a @ a).exp().sum()
        plugin.aligner_after_optimizer_step(step=step, engines=None, config=config)
    rows = json.loads((tmp_path / "profile" / "rank0.json").read_text())["rows"]
    terms = profile_step.split_terms(rows)
    assert terms["matmul"] > 0 and terms["attention"] > 0 and terms["elementwise"] > 0
    assert profile_step.term_of("aten::addmm_") == "matmul" and profile_step.term_of("aten::copy_") == "copies"
    assert profile_step.term_of("LinearFunctionForZeroStage3Backward") == "other"


@pytest.mark.subprocess
def test_profile_step_refuses_an_unknown_row_and_an_empty_window():
    script = str(ROOT / "benchmarks" / "profile_step.py")
    proc = subprocess.run([sys.executable, script, "--rows", "fast,turbo"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--rows: unknown row(s) turbo; choose from naive, packing, chunked, cached, fast" in proc.stderr
    proc = subprocess.run([sys.executable, script, "--steps", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--start and --steps must be >= 1, got 2 and 0" in proc.stderr
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import profile_plugin

    with pytest.raises(ValueError, match="profile.start and profile.steps must be >= 1"):
        profile_plugin.ProfileConfig(start=0)
