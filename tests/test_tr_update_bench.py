"""The trust-region update benchmark runs end to end (2 ranks, real DeepSpeed launcher) and both methods agree."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_tr_update_benchmark_prints_both_rows_a_ratio_and_equal_weights(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n<!-- other:begin -->\nkept\n<!-- other:end -->\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "tr_update.py"), "--smoke", "--repeats", "1", "--warmup", "0",
         "--results", str(results)],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^\| shard-local .*\| [\d.]+ \| [\d.]+ \| [\d.]+ \| 1 \|$", out, re.M), out
    assert re.search(r"^\| gathered .*\| [\d.]+ \| [\d.]+ \| [\d.]+ \| 1 \|$", out, re.M), out
    ratio = float(re.search(r"gathered / shard-local \(medians\): ([\d.]+)×", out).group(1))
    assert ratio > 0
    diff, update = map(float, re.search(r"between the two methods: ([\d.e+-]+) \(largest single update: ([\d.e+-]+)\)",
                                        out).groups())
    assert diff <= 1e-6
    assert update > 1e-5  # the policy differs from the reference, so agreement is not trivial
    text = results.read_text()
    assert "<!-- other:begin -->\nkept\n<!-- other:end -->" in text
    section = text.split("<!-- tr_update:begin -->", 1)[1].split("<!-- tr_update:end -->", 1)[0]
    assert "benchmarks/tr_update.py --smoke --repeats 1" in section and "shard-local" in section
