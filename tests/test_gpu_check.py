"""benchmarks/gpu_check.py on the CPU: its kernel-parity phase on the kernel stand-ins, and the driver, which on
a machine without a GPU runs the environment phase and skips the rest."""

import json
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
from kernel_standins import FLASH, top_left_flash_standin  # noqa: E402

from aligner.models import attention  # noqa: E402

SMALL = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "intermediate_size": 64, "num_hidden_layers": 2, "vocab_size": 128}


def test_kernel_parity_passes_a_right_kernel_and_fails_a_top_left_one():
    examples = gpu_check.parity_examples(128, [(9, 5, 7), (0, 6, 3), (20, 4, 11)])
    wrong = attention.Kernel("top_left", attention._flash_attn_kernel(top_left_flash_standin).run, attention.HALF)
    rows = gpu_check.kernel_parity(SMALL, [FLASH, wrong], torch.device("cpu"), examples)
    by = {(r["layout"], r["kernel"]): r for r in rows}
    assert set(by) == {("padded", "sdpa (transformers)"), *((lay, k) for lay in ("packed", "prefix-shared")
                                                             for k in ("flash_attn_standin", "top_left", "sdpa_segments"))}
    assert all(by[(lay, k)]["pass"] for lay in ("packed", "prefix-shared") for k in ("flash_attn_standin", "sdpa_segments"))
    assert by[("packed", "top_left")]["pass"]  # packed segments have lq == lk: the alignment does not show there
    assert not by[("prefix-shared", "top_left")]["pass"]  # it does for the rejected segments
    assert attention.active_kernel() is attention.SDPA_SEGMENTS


@pytest.mark.subprocess
def test_the_driver_without_a_gpu_reports_the_environment_and_skips_every_gpu_phase(tmp_path):
    assert gpu_check.main(["--out", str(tmp_path), "--budget-s", "120"]) == 0
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(results) == [name for name, _ in gpu_check.PHASES]
    assert results["environment"]["status"] == "no GPU" and results["environment"]["torch"] == torch.__version__
    assert all(res["status"] == "skipped: no GPU" for name, res in results.items() if name != "environment")
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.startswith("| phase | status | seconds | what it shows |") and "| kernel parity | skipped: no GPU |" in table
