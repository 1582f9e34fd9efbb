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
