"""bench/gpu.py keeps working: its CPU smoke run measures every configuration, and it runs where deepspeed,
wandb, submitit, timm and open_clip are missing (the lent GPU machine). Figures are checked for presence
and sense, never for speed: these machines are noisy."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mipha_lab.config import load_experiment

pytestmark = pytest.mark.slow  # two smoke runs of about 15 s each

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu.py"
LEVERS = ("recompute-attention", "fused-adamw", "fused-loss", "compiled", "all-mb8")
CONFIGURATIONS = {
    f"stage{n}-{name}" for n in (1, 2) for name in ("padded", "packed", "packed-no-recompute", "packed-all")
}
CONFIGURATIONS |= {f"stage2-packed-{lever}" for lever in LEVERS}
MISSING_ON_THE_GPU_MACHINE = ("deepspeed", "wandb", "submitit", "timm", "open_clip")


def _run(command: list[str], out: Path) -> dict:
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("gpu: cpu") and "-> " in run.stdout, run.stdout
    return json.loads((out / "gpu-cpu-smoke.json").read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu-smoke")
    return _run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out)], out)


def test_every_training_configuration_is_measured(smoke):
    assert set(smoke["training"]) == CONFIGURATIONS
    for name, result in smoke["training"].items():
        assert "error" not in result, (name, result)
        assert result["steps"] >= 1 and result["samples_per_s"] > 0 and result["tokens_per_s"] > 0, name
        assert result["loss_finite"] and math.isfinite(result["loss_last"]), name
        assert result["peak_memory_gib"] > 0 and 0 < result["real_token_fraction"] <= 1, name
    train = smoke["training"]
    # stage 1 trains the projector only, stage 2 everything; micro batches and checkpointing follow the recipe
    assert 0 < train["stage1-padded"]["trainable_params"] < train["stage2-padded"]["trainable_params"]
    recipe = load_experiment(REPO / smoke["recipe"])
    for key, stage in (("stage1", recipe.stages[0]), ("stage2", recipe.stages[-1])):
        for batching in ("padded", "packed"):
            result = train[f"{key}-{batching}"]
            assert result["stage"] == stage.name and result["micro_batch"] == stage.micro_batch
            assert result["lm_recompute"] == ("full" if stage.activation_checkpointing.lm else "none")
            assert result["speed"]["fused_optimizer"] is False and result["speed"]["fused_loss"] == "off"
    for stage in ("stage1", "stage2"):  # a packed row holds at least the samples of a padded micro-batch
        packed, padded = train[f"{stage}-packed"], train[f"{stage}-padded"]
        assert packed["samples_per_micro_batch"] >= padded["samples_per_micro_batch"]
        assert packed["row_budget"] > 0 and padded["row_budget"] is None


def test_every_lever_starts_from_the_recipes_loss(smoke):
    """Each packed configuration starts from the same weights on the same rows: its first step's loss equals
    the recipe's (fp32 on the CPU: up to rounding), and the levers were in effect."""
    train = smoke["training"]
    for name, result in train.items():
        if result["batching"] == "packed" and result["micro_batch"] == train["stage2-packed"]["micro_batch"]:
            assert result["loss_first_vs_recipe"] < 1e-4, name
    assert train["stage2-packed-recompute-attention"]["lm_recompute"] == "attention"
    assert train["stage2-packed-compiled"]["speed"]["compile"] == {"lm": True, "vision": True}
    assert train["stage2-packed-fused-loss"]["speed"]["fused_loss"] == "chunked"  # Liger is CUDA-only
    assert train["stage2-packed-all"]["lm_recompute"] == "none"  # auto on the CPU: memory is not the limit
    assert train["stage2-packed-all-mb8"]["micro_batch"] == 2 * train["stage2-packed"]["micro_batch"]


def test_packing_keeps_the_loss(smoke):
    assert set(smoke["packing_loss"]) == {"stage1", "stage2"}
    for check in smoke["packing_loss"].values():
        assert check["samples"] >= 2
        assert check["abs_difference"] < 1e-4 * abs(check["padded"])  # fp32: equal up to rounding


def test_mfu_against_both_peaks(smoke):
    assert smoke["peak_tflops"]["measured"] > 0
    assert smoke["peak_tflops"]["datasheet"] is None  # no datasheet for a CPU
    for result in smoke["training"].values():
        assert result["mfu_measured_peak"] > 0 and result["tflops_per_s"] > 0
        recomputes = result["lm_recompute"] != "none"
        assert "mfu_datasheet_peak" in result and (0 < result["recompute_share"] < 1) == recomputes
        assert list(result).index("mfu_datasheet_peak") < list(result).index("mfu_measured_peak")
    assert smoke["machine"]["cores"] and smoke["smoke"] is True


def test_batched_generation_equals_one_prompt_at_a_time(smoke):
    generation = smoke["generation"]
    assert generation["agreement"] == 1.0  # fp32 on the CPU: the greedy tokens must be identical
    assert generation["prompts_single"] == generation["prompts"] > 1
    assert generation["speedup"] > 0 and generation["tokens_per_s"]["single"] > 0


def test_runs_without_the_packages_the_gpu_machine_lacks(tmp_path):
    """Each of them made unimportable before the script starts: it still builds, trains and generates."""
    prelude = textwrap.dedent(f"""
        import runpy, sys
        for name in {MISSING_ON_THE_GPU_MACHINE!r}:
            sys.modules[name] = None  # `import name` now raises ImportError
        sys.argv = [{str(SCRIPT)!r}, "--cpu-smoke", "--out", {str(tmp_path)!r}]
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        finally:
            assert all(sys.modules[name] is None for name in {MISSING_ON_THE_GPU_MACHINE!r})
    """)
    result = _run([sys.executable, "-c", prelude], tmp_path)
    assert set(result["training"]) == CONFIGURATIONS
    assert all("error" not in r for r in result["training"].values())


def test_the_benchmark_times_the_trainers_step():
    """bench/gpu.py's training loss is the trainer's: the mean over every supervised token of the global
    batch (micro-batches holding different numbers of them), computed here from plain forwards."""
    sys.path.insert(0, str(REPO))
    import torch

    from bench import gpu

    settings = gpu.SMOKE
    experiment = gpu.recipe(settings)
    stage = experiment.stages[-1]
    model = gpu.build(experiment, settings)
    param_groups, _ = gpu.apply_policy(model, stage)
    vocab = model.language_model.get_input_embeddings().weight.shape[0]
    side = model.vision_tower.image_size
    items = gpu.make_samples(6, 40, 0.5, vocab, torch.randn(2, 3, side, side), 0, model.num_image_tokens)
    micro = gpu.collated(items, [[0, 1, 2], [3], [4, 5]], "padded", torch.device("cpu"))
    with torch.no_grad():
        outs = [gpu.forward(model, batch) for batch, _ in micro]
    expected = float(sum(o.loss_sum for o in outs) / sum(o.num_supervised for o in outs))
    per_micro_mean = float(sum(o.loss for o in outs) / len(outs))  # what a loss / accumulation loop reports
    assert abs(expected - per_micro_mean) > 1e-4  # the batch tells the two apart
    figures = gpu.train(
        model,
        experiment,
        stage,
        param_groups,
        micro,
        3,
        settings.__class__(**{**settings.__dict__, "warmup_steps": 0, "steps": 1}),
        {"measured": 1.0, "datasheet": None},
        torch.device("cpu"),
        gpu.FlopModel(model),
    )
    assert figures["loss_first"] == pytest.approx(expected, rel=1e-6)
