"""Benchmarks keep working in their smoke mode (figures are reported, not asserted: machines are noisy)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dataloader_benchmark_smoke(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "dataloader.py"), "--smoke", "--samples", "16", "--repeats", "1",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("dataloader: ")
    result = json.loads((tmp_path / "dataloader.json").read_text())
    assert result["identical_outputs"] is True and result["ratio"] > 0 and result["machine"]["cores"]


def test_eval_throughput_benchmark_smoke(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "eval_throughput.py"), "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("eval_throughput: ")
    result = json.loads((tmp_path / "eval_throughput.json").read_text())
    assert result["agreement"] == 1.0  # batched greedy answers equal batch-1 answers (fp32, CPU)
    assert result["speedup"] > 0 and set(result["questions_per_s"]) == {"1", "16", "32"}
