"""`python -m bench --smoke` runs every benchmark once (what CI runs); the tests check the figures each one
reports. Speed ratios are machine-dependent and only checked to be measured; what must hold on any
machine is asserted: equal outputs and losses, FLOP counts, real-token fractions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NAMES = ["contention", "dataloader", "eval_throughput", "flops", "packing", "splice"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return done, out


def result(smoke, name: str) -> dict:
    done, out = smoke
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / f"{name}.json").read_text())


def test_every_benchmark_prints_its_line_and_the_table(smoke):
    done, out = smoke
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for name in NAMES:
        assert sum(line.startswith(f"{name}: ") for line in lines) == 1, name
        assert any(line.startswith(f"| {name} | ") for line in lines), name
        figures = json.loads((out / f"{name}.json").read_text())
        assert figures["name"] == name and figures["smoke"] is True and figures["machine"]["cores"]


def test_packing_fills_rows_and_keeps_the_loss(smoke):
    packing = result(smoke, "packing")
    assert packing["real_token_fraction"] >= 0.95 > packing["padded_real_token_fraction"]
    assert packing["loss_abs_difference"] < 1e-4
    assert packing["gradient_max_difference"] < 1e-4
    assert packing["micro_batches"]["packed"] < packing["micro_batches"]["padded"]
    assert packing["tokens_per_s_ratio"] > 0 and packing["row_budget"] == 8192


def test_splice_is_timed_against_an_equal_per_sample_loop(smoke):
    splice = result(smoke, "splice")
    assert splice["identical_outputs"] is True
    assert splice["ratio"] > 0 and splice["micro_batch"] == 4
    assert set(splice["splice_only_ratio"]) == {"4", "32"} and min(splice["splice_only_ratio"].values()) > 0


def test_eval_batches_answer_as_batch_one(smoke):
    evaluation = result(smoke, "eval_throughput")
    assert evaluation["agreement"] == 1.0  # fp32 on the CPU: batched greedy answers equal batch-1 answers
    assert evaluation["speedup"] > 0 and set(evaluation["questions_per_s"]) == {"1", "16", "32"}


def test_dataloader_matches_the_reference(smoke):
    dataloader = result(smoke, "dataloader")
    assert dataloader["identical_outputs"] is True and dataloader["ratio"] > 0


def test_analytic_flops_agree_with_torch_within_five_percent(smoke):
    flops = result(smoke, "flops")
    plain = [c for c in flops["cases"] if not c["lm_checkpointing"]]
    assert sorted((c["model"], c["stage"]) for c in plain) == [
        ("mid", "stage 1"),
        ("mid", "stage 2"),
        ("tiny", "stage 1"),
        ("tiny", "stage 2"),
    ]
    assert all(c["ratio"] == pytest.approx(1.0, abs=0.05) for c in plain)
    assert flops["ratio"] == max((c["ratio"] for c in plain), key=lambda r: abs(r - 1))
    # checkpointing recomputes at most one forward of the LM: our count is an upper bound
    assert 1.0 <= flops["recompute_ratio"] < 1.5


def test_a_failing_benchmark_fails_the_run_and_is_named(tmp_path, monkeypatch, capsys):
    import bench.__main__ as runner

    (tmp_path / "good.py").write_text("print('good: 1.00x (this over that)')\n")
    (tmp_path / "bad.py").write_text("raise SystemExit(3)\n")
    monkeypatch.setattr(runner, "HERE", tmp_path)
    assert runner.main([]) == 1
    captured = capsys.readouterr()
    assert "good: 1.00x (this over that)" in captured.out and "| bad | FAILED |" in captured.out
    assert "bench: failed: bad" in captured.err


def test_contention_times_both_spin_policies_alone_and_paired(smoke):
    contention = result(smoke, "contention")
    policies = contention["policies"]
    assert policies["libgomp default"]["GOMP_SPINCOUNT"] == "300000"
    assert policies["mipha-lab"]["GOMP_SPINCOUNT"] != "300000"
    for figures in policies.values():
        assert figures["alone_s_per_step"] > 0 and len(figures["paired_s_per_step"]) == 2 and figures["slowdown"] > 0
