r"""GPU measurement of Mipha-3B (SigLIP-SO400M-384 + mlp2x_gelu + Phi-2 at real size, random init, bf16) in
one run of a few minutes, with no network: the figures a few minutes on a borrowed GPU can give.

Measured in one process, so every ratio compares like with like:
- the card's bf16 matmul peak (8192^3 products timed with CUDA events), next to its datasheet peak;
- training steps of the recipe `experiments/siglip_phi2_fullft.yaml`: stage 2 (everything trains) and
  stage 1 (the projector only: quirk 1 off), with the micro batch, gradient accumulation (its global batch
  over 8 GPUs) and LM recomputation the recipe gives the stage, padded and packed, plain AdamW and loss:
  the unoptimised path. Then, over packed rows, the levers of a stage's `speed` and
  `activation_checkpointing` (train/speed.py): in stage 2 each alone (no recomputation, attention-only
  recomputation, fused AdamW, the fused loss - Liger where it imports, else chunked -, regional
  compilation) and all together (recomputation `auto` for the card's memory), also at twice the micro
  batch; in stage 1 no recomputation, and all together. Every configuration starts from the same weights
  on the same samples, so the first step's loss of each packed one must equal the recipe's (bf16
  rounding). Samples are synthetic: one image (729 tokens) and about 400 text tokens in stage 2 (the
  sample the 45% MFU target is stated for), the pretraining card's caption length in stage 1, the
  supervised share of each stage's mixture card. About 8 optimizer steps after 2 of warm-up, at most
  30 s per configuration; an out-of-memory configuration is recorded and the run goes on. Reported:
  samples/s, tokens/s, MFU (analytic FLOPs of train/flops.py, recomputation not counted) against the
  datasheet peak first, then the measured matmul peak, peak memory, the first step's loss and its
  relative difference from the recipe's; and, on the same samples before training, the loss of a packed
  row and of those samples padded (equal up to rounding);
- greedy generation of 32 new tokens for 16 prompts with an image: batched vs one at a time, the
  speedup and whether the greedy tokens agree.

Packed rows hold micro batch x the longest sample's positions, the most a padded micro-batch holds, so
packing on and off use the same memory (the trainer's packed rows hold micro batch x max_length; without
flash-attention packing costs attention over the whole row, which this measures too). Every training step
is the trainer's own step function (train/step.py) on its torch engine, with the recipe's precision:
fp32 weights, gradients and AdamW states, forward and backward under bf16 autocast, the loss normalised
over the supervised tokens of the whole global batch - what `launch` runs on one GPU (DeepSpeed, absent
on the lent machine, is not timed). Generation runs in bf16, as serving does. Attention:
flash-attention 2 when it imports, else SDPA (`auto`, as the recipe).

Progress goes to stderr, a summary table to stdout, the figures to bench/results/gpu-<card>.json.
`--cpu-smoke` runs the same code with the tiny cards in fp32 on the CPU in seconds (what CI runs); its
JSON goes to --out (default: a new temporary folder), never into the repository.

It needs torch, transformers and the project's small pure-Python dependencies (pyyaml, pydantic, pillow,
numpy, tqdm), not deepspeed, wandb, submitit, timm, open_clip or an installed project. On the lent H200
(Python 3.12, torch and transformers installed, pydantic missing), carry pydantic as wheels. Once, here:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
        typing-extensions==4.16.0 liger-kernel

then one device run with carry [".whl"] and timeout_s 540 (its caps bound it at about 9 minutes; about 5 are
expected: the earlier six configurations took 168-193 s on an H200, bench/results/gpu-nvidia-h200-run*.json):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; set -o pipefail;
    python3 bench/gpu.py --out $OUT 2>&1 | tee $OUT/gpu.log

and copy gpu-<card>-<date>.json (and gpu.log) from what comes back into bench/results/.

    python bench/gpu.py [--cpu-smoke] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import cycle, islice
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from bench._results import write_result
from mipha_lab.config import Experiment, StageConfig, load_experiment
from mipha_lab.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mipha_lab.data.batching import (
    collate_packed,
    collate_padded,
    plan_packed,
    plan_padded,
    real_token_fraction,
    sample_item,
)
from mipha_lab.data.mixtures import MIXTURES
from mipha_lab.distributed import Distributed
from mipha_lab.errors import MiphaLabError
from mipha_lab.model import (
    MultimodalModel,
    build_model,
)
from mipha_lab.registry.cards import SourceStats
from mipha_lab.train.engine import make_engine
from mipha_lab.train.flops import FlopModel, peak_flops
from mipha_lab.train.policy import apply_policy
from mipha_lab.train.speed import apply_speed
from mipha_lab.train.stage import peak_memory_mb, sample_sizes
from mipha_lab.train.step import batch_forward as forward
from mipha_lab.train.step import global_counts, on_device, train_step

RECIPE = REPO / "experiments" / "siglip_phi2_fullft.yaml"
RECIPE_GPUS = 8  # the recipe's global batches are for 8 GPUs (its header): accumulation per GPU follows
STARTED = time.perf_counter()


@dataclass(frozen=True)
class Settings:
    """Everything that differs between the real measurement and the CPU smoke run."""

    device: str
    dtype: torch.dtype  # the matmul peak's and generation's (training follows the recipe's engine precision)
    tiny: bool  # the recipe's cards replaced by their tiny siblings
    stage2_text_tokens: int  # mean text tokens of a stage-2 sample (stage 1: its mixture card's)
    warmup_steps: int
    steps: int
    cap_s: float  # per training configuration, warm-up included
    generation_cap_s: float  # for the one-prompt-at-a-time pass
    matmul_side: int
    matmul_repeats: int
    prompts: int
    prompt_text_tokens: int
    new_tokens: int


REAL = Settings(
    device="cuda",
    dtype=torch.bfloat16,
    tiny=False,
    stage2_text_tokens=400,
    warmup_steps=2,
    steps=8,
    cap_s=30.0,
    generation_cap_s=15.0,
    matmul_side=8192,
    matmul_repeats=20,
    prompts=16,
    prompt_text_tokens=48,
    new_tokens=32,
)
SMOKE = Settings(
    device="cpu",
    dtype=torch.float32,
    tiny=True,
    stage2_text_tokens=40,
    warmup_steps=1,
    steps=2,
    cap_s=60.0,
    generation_cap_s=30.0,
    matmul_side=1024,
    matmul_repeats=3,
    prompts=8,
    prompt_text_tokens=12,
    new_tokens=8,
)


def note(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def card_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def recipe(settings: Settings) -> Experiment:
    """The recipe with random init (no hub), on one process with the trainer's torch engine (DeepSpeed is not
    on the lent machine); in the smoke run with the tiny siblings of its cards, in fp32."""
    overrides = ["model.pretrained=false", "engine.kind=torch"] + (["engine.precision=fp32"] if settings.tiny else [])
    experiment = load_experiment(RECIPE, overrides)
    if settings.tiny:
        overrides += [f"model.vision=tiny-{experiment.model.vision}", f"model.llm=tiny-{experiment.model.llm}"]
        experiment = load_experiment(RECIPE, overrides)
    return experiment


def build(experiment: Experiment, settings: Settings) -> MultimodalModel:
    """Parameters are created on the target device (a 3B-parameter random init on the CPU would take minutes),
    in fp32 as the trainer keeps them (its engine runs forward under bf16 autocast)."""
    with torch.device(settings.device):
        model = build_model(experiment, with_tokenizer=False)
    return model.train()


def matmul_tflops(device: torch.device, dtype: torch.dtype, side: int, repeats: int) -> float:
    """Dense matmul throughput: the peak this card reaches in practice, the fair MFU denominator."""
    a, b = (torch.randn(side, side, device=device, dtype=dtype) for _ in range(2))
    begin = time.perf_counter()
    while time.perf_counter() - begin < 1.0:  # clocks ramp up from idle
        a @ b
        sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            a @ b
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        begin = time.perf_counter()
        for _ in range(repeats):
            a @ b
        seconds = time.perf_counter() - begin
    return 2.0 * side**3 * repeats / seconds / 1e12


def make_samples(
    count: int,
    text_mean: int,
    supervised_share: float,
    vocab: int,
    images: torch.Tensor,
    seed: int,
    image_tokens: int,
) -> list[dict[str, Any]]:
    """Dataset items as the collators take them: one image, then text whose last tokens are supervised
    (answers come last); text lengths spread +-50% around the mean so that padding costs what it costs."""
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    items = []
    for index in range(count):
        text = rng.randint(max(2, text_mean // 2), max(2, 3 * text_mean // 2))
        ids = torch.randint(1, vocab, (1 + text,), generator=generator)
        ids[0] = IMAGE_TOKEN_INDEX
        labels = ids.clone()
        labels[: 1 + text - max(1, round(text * supervised_share))] = IGNORE_INDEX
        items.append(sample_item(f"sample-{index}", ids, labels, images[index % len(images)][None], [image_tokens]))
    return items


def mixture_stats(stage: StageConfig) -> SourceStats:
    """The declared figures of the stage's data: sample lengths follow the recipe's data without the data."""
    stats = MIXTURES.get(stage.mixture).sources[0].stats
    if stats is None:
        raise SystemExit(f"mixture {stage.mixture!r} declares no stats (text_tokens, supervised_tokens)")
    return stats


Sizes = list[tuple[int, int, int, int]]  # (text tokens, frames, supervised, visual tokens) per sample, for FLOPs


def collated(
    items: list[dict[str, Any]], rows: list[list[int]], batching: str, device: torch.device
) -> list[tuple[dict[str, Any], Sizes]]:
    """Micro-batches on the device before the clock starts (data loading is not what is measured)."""
    collate = collate_packed if batching == "packed" else collate_padded
    return [
        (on_device(batch, device), sample_sizes(batch)) for batch in (collate([items[i] for i in row]) for row in rows)
    ]


def guarded(measure: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Out of memory, or a kernel this card or torch lacks, ends one configuration, not the run."""
    try:
        return measure()
    except torch.cuda.OutOfMemoryError as err:
        message = f"out of memory: {str(err).splitlines()[0]}"
    except (RuntimeError, NotImplementedError, ImportError, MiphaLabError) as err:
        message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    note(message)
    return {"error": message}


@torch.no_grad()
def packing_loss(model: MultimodalModel, items: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """One packed row and the same samples padded, before any step: packing must not change the loss."""
    losses = {
        name: float(forward(model, on_device(collate(items), device)).loss)
        for name, collate in (("padded", collate_padded), ("packed", collate_packed))
    }
    return {**losses, "samples": len(items), "abs_difference": abs(losses["packed"] - losses["padded"])}


def train(
    model: MultimodalModel,
    experiment: Experiment,
    stage: StageConfig,
    param_groups: list[dict[str, Any]],
    micro: list[tuple[dict[str, Any], Sizes]],
    accumulation: int,
    settings: Settings,
    peaks: dict[str, float | None],
    device: torch.device,
    flop_model: FlopModel,
) -> dict[str, Any]:
    """Optimizer steps of `accumulation` micro-batches each through the trainer's own step function
    (train/step.py: the engine's precision, the global-token loss, clipping, AdamW) until the steps are done
    or the cap is reached; figures over the steps after warm-up."""
    dist = Distributed(0, 1, 0, device)
    engine = make_engine(model, param_groups, experiment, stage, len(micro) // accumulation, dist, accumulation)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses: list[float] = []
    begin, timed_from, done = time.perf_counter(), None, 0
    try:
        for step in range(len(micro) // accumulation):
            if step == settings.warmup_steps:
                sync(device)
                timed_from = time.perf_counter()
            batches = [batch for batch, _ in micro[step * accumulation : (step + 1) * accumulation]]
            counts = global_counts(batches, model.config.max_positions, dist)
            losses.append(train_step(engine, batches, counts, dist).loss)
            if step >= settings.warmup_steps:
                done += 1
            if time.perf_counter() - begin > settings.cap_s:
                break
        sync(device)
        end = time.perf_counter()
    finally:
        model.zero_grad(set_to_none=True)
    values = losses
    figures: dict[str, Any] = {
        "loss_first": values[0],
        "loss_last": values[-1],
        "loss_finite": all(math.isfinite(v) for v in values),
        "peak_memory_gib": peak_memory_mb(device) / 1024,
        "steps": done,
    }
    if timed_from is None or not done:
        return {**figures, "error": f"no step after warm-up within {settings.cap_s:.0f} s"}
    seconds = end - timed_from
    first = settings.warmup_steps * accumulation
    timed = [size for _, sizes in micro[first : first + done * accumulation] for size in sizes]
    flops = flop_model.batch(timed)
    tokens = sum(text + visual for text, _, _, visual in timed)
    achieved = flops.useful / seconds
    return {
        **figures,
        "seconds": seconds,
        "samples": len(timed),
        "samples_per_s": len(timed) / seconds,
        "tokens_per_s": tokens / seconds,
        "tflops_per_s": achieved / 1e12,
        "useful_tflop_per_sample": flops.useful / len(timed) / 1e12,
        "recompute_share": flops.recompute / (flops.useful + flops.recompute),
        "mfu_datasheet_peak": achieved / (peaks["datasheet"] * 1e12) if peaks["datasheet"] else None,
        "mfu_measured_peak": achieved / (peaks["measured"] * 1e12),
    }


def with_speed(stage: StageConfig, recompute: Any = None, micro_batch: int | None = None, **speed: Any) -> StageConfig:
    """The stage with levers changed: the LM's recomputation, the micro batch, `speed` fields."""
    checkpointing = stage.activation_checkpointing
    if recompute is not None:
        checkpointing = checkpointing.model_copy(update={"lm": recompute})
    return StageConfig.model_validate(
        {
            **stage.model_dump(),
            "activation_checkpointing": checkpointing.model_dump(),
            "speed": {**stage.speed.model_dump(), **speed},
            "micro_batch": micro_batch or stage.micro_batch,
        }
    )


def variants(key: str, stage: StageConfig, fused_loss: str) -> list[tuple[str, str, StageConfig]]:
    """(name, batching, settings) of a stage's configurations: the recipe as it runs (padded and packed,
    its LM recomputation, the plain AdamW and loss), then over packed rows each lever alone, then all of
    them together (recomputation `auto`: the least that fits the card)."""
    recipe = with_speed(stage, fused_optimizer=False)
    best = {"fused_optimizer": True, "fused_loss": fused_loss, "compile": {"lm": True, "vision": True}}
    out = [("padded", "padded", recipe), ("packed", "packed", recipe)]
    if key == "stage2":
        out += [
            ("packed-no-recompute", "packed", with_speed(recipe, False)),
            ("packed-recompute-attention", "packed", with_speed(recipe, "attention")),
            ("packed-fused-adamw", "packed", with_speed(recipe, False, fused_optimizer=True)),
            ("packed-fused-loss", "packed", with_speed(recipe, False, fused_loss=fused_loss)),
            ("packed-compiled", "packed", with_speed(recipe, False, compile={"lm": True, "vision": True})),
            ("packed-all", "packed", with_speed(recipe, "auto", **best)),
            ("packed-all-mb8", "packed", with_speed(recipe, "auto", 2 * stage.micro_batch, **best)),
        ]
    else:
        out += [
            ("packed-no-recompute", "packed", with_speed(recipe, False)),
            ("packed-all", "packed", with_speed(recipe, "auto", **best)),
        ]
    return out


def measure_stage(
    model: MultimodalModel,
    experiment: Experiment,
    key: str,
    stage: StageConfig,
    text_mean: int,
    settings: Settings,
    peaks: dict[str, float | None],
    device: torch.device,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """A stage's configurations on the same samples, each from the same weights (so that the first step's
    loss of every packed configuration must equal the recipe's packed one), and the packing loss check."""
    param_groups, _ = apply_policy(model, stage)
    trained = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    stats = mixture_stats(stage)
    share = stats.supervised_tokens / stats.text_tokens
    side = model.vision_tower.image_size
    images = torch.randn(8, 3, side, side, generator=torch.Generator().manual_seed(1)).to(device)
    vocab = model.lm.vocab_size
    fused_loss = "liger" if device.type == "cuda" and importlib.util.find_spec("liger_kernel") else "chunked"
    configurations = variants(key, stage, fused_loss)
    accumulation = max(1, stage.global_batch // (stage.micro_batch * RECIPE_GPUS))
    micro_batches = (settings.warmup_steps + settings.steps) * accumulation
    items = make_samples(
        2 * micro_batches * stage.micro_batch, text_mean, share, vocab, images, 2, model.num_image_tokens
    )
    lengths = [len(item["input_ids"]) - 1 + model.num_image_tokens for item in items]
    apply_speed(model, with_speed(stage, False), experiment, device, 1)
    check = guarded(
        lambda: packing_loss(
            model, [items[i] for i in plan_packed(lengths, stage.micro_batch * max(lengths), 3, 0)[0]], device
        ),
        device,
    )
    note(f"{key}: packed vs padded loss on the same samples: {check}")
    results: dict[str, dict[str, Any]] = {}
    for name, batching, setting in configurations:
        per_step = setting.micro_batch * RECIPE_GPUS
        steps_accumulation = max(1, stage.global_batch // per_step)
        budget = setting.micro_batch * max(lengths)
        plan = (
            plan_packed(lengths, budget, seed=3, epoch=0)
            if batching == "packed"
            else plan_padded(len(items), setting.micro_batch, seed=3, epoch=0)
        )
        count = (settings.warmup_steps + settings.steps) * steps_accumulation
        chosen = list(islice(cycle(plan), count))
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if param_name in trained:
                    param.copy_(trained[param_name])
        recompute = guarded(lambda setting=setting: apply_speed(model, setting, experiment, device, 1), device)
        if isinstance(recompute, dict):  # the lever could not be set up here
            results[f"{key}-{name}"] = {"stage": stage.name, **recompute}
            continue
        flop_model = FlopModel(model, {"vision": setting.activation_checkpointing.vision, "lm": recompute})
        note(
            f"{key}-{name}: {count} micro-batches of {sum(map(len, chosen)) / len(chosen):.1f} samples, "
            f"accumulation {steps_accumulation}, LM recomputation {recompute}, speed {setting.speed.model_dump()}"
        )
        figures = guarded(
            lambda setting=setting, chosen=chosen, batching=batching, acc=steps_accumulation, fm=flop_model: train(
                model,
                experiment,
                setting,
                param_groups,
                collated(items, chosen, batching, device),
                acc,
                settings,
                peaks,
                device,
                fm,
            ),
            device,
        )
        results[f"{key}-{name}"] = {
            "stage": stage.name,
            "batching": batching,
            "micro_batch": setting.micro_batch,
            "accumulation": steps_accumulation,
            "lm_recompute": recompute,
            "speed": setting.speed.model_dump(),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "samples_per_micro_batch": sum(map(len, chosen)) / len(chosen),
            "real_token_fraction": real_token_fraction(chosen, lengths, budget if batching == "packed" else None),
            "row_budget": budget if batching == "packed" else None,
            **figures,
        }
        note(f"{key}-{name}: {row_text(results[f'{key}-{name}'])}")
    apply_speed(model, with_speed(stage, False), experiment, device, 1)  # levers off (generation follows)
    baseline = results.get(f"{key}-packed", {}).get("loss_first")
    for result in results.values():  # the same first global batch from the same weights: the same loss
        same_batches = result.get("batching") == "packed" and result.get("micro_batch") == stage.micro_batch
        if same_batches and baseline and "loss_first" in result:
            result["loss_first_vs_recipe"] = abs(result["loss_first"] - baseline) / abs(baseline)
    return results, check


def greedy(row: torch.Tensor, eos: int) -> list[int]:
    """Generated tokens up to and including the first end token (the rest is padding)."""
    tokens = row.tolist()
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def measure_generation(model: MultimodalModel, settings: Settings, device: torch.device) -> dict[str, Any]:
    """Batched greedy generation (left padding after splicing, KV cache) against one prompt at a time,
    as LLaVA evaluates; the one-at-a-time pass stops at the cap and compares the prompts it reached."""
    model.eval().to(settings.dtype)  # as serving does
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    side = model.vision_tower.image_size
    images = torch.randn(settings.prompts, 3, side, side, generator=torch.Generator().manual_seed(4))
    images = images.to(device, settings.dtype)
    vocab = model.lm.vocab_size
    items = make_samples(settings.prompts, settings.prompt_text_tokens, 0.0, vocab, images, 5, model.num_image_tokens)
    eos = model.language_model.config.eos_token_id

    def generate(chosen: list[dict[str, Any]], new_tokens: int) -> torch.Tensor:
        batch = on_device(collate_padded(chosen), device)
        return model.generate(
            batch["input_ids"],
            batch["attention_mask"],
            batch["pixel_values"],
            max_new_tokens=new_tokens,
            eos_token_id=eos,
        )

    generate(items[:2], 2)  # first-call costs (kernels, allocator) out of the timings
    sync(device)
    begin = time.perf_counter()
    batched = [greedy(row, eos) for row in generate(items, settings.new_tokens)]
    sync(device)
    batched_s = time.perf_counter() - begin
    single: list[list[int]] = []
    begin = time.perf_counter()
    for item in items:
        single.append(greedy(generate([item], settings.new_tokens)[0], eos))
        if time.perf_counter() - begin > settings.generation_cap_s:
            break
    sync(device)
    single_s = time.perf_counter() - begin
    batched_rate = sum(map(len, batched)) / batched_s
    single_rate = sum(map(len, single)) / single_s
    return {
        "prompts": len(items),
        "prompts_single": len(single),
        "new_tokens": settings.new_tokens,
        "image_tokens": model.num_image_tokens,
        "prompt_text_tokens": settings.prompt_text_tokens,
        "tokens_per_s": {"batched": batched_rate, "single": single_rate},
        "speedup": batched_rate / single_rate,
        "agreement": sum(a == b for a, b in zip(batched, single, strict=False)) / len(single),  # single: up to the cap
        "peak_memory_gib": peak_memory_mb(device) / 1024,
    }


def row_text(r: dict[str, Any]) -> str:
    if "samples_per_s" not in r:
        return f"{r.get('error')}"
    sheet = f"{r['mfu_datasheet_peak']:.1%}" if r["mfu_datasheet_peak"] is not None else "-"
    same = f"{r['loss_first_vs_recipe']:.1e}" if "loss_first_vs_recipe" in r else "-"
    return (
        f"{r['samples_per_s']:9.2f} {r['tokens_per_s']:10.0f} {sheet:>10} {r['mfu_measured_peak']:9.1%} "
        f"{r['peak_memory_gib']:8.1f} {r['steps']:5d} {r['loss_first']:7.3f} {same:>8}"
    )


def summary(figures: dict[str, Any]) -> str:
    peaks = figures["peak_tflops"]
    sheet = f"{peaks['datasheet']:.0f}" if peaks["datasheet"] else "unknown"
    attention = figures["attn_implementation"]
    lines = [
        f"gpu: {figures['device']} ({figures['dtype']}, attention: LM {attention['lm']}, vision "
        f"{attention['vision']}); matmul peak {peaks['measured']:.3g} TFLOP/s measured, {sheet} datasheet; "
        f"build {figures['build_s']:.0f} s",
        f"{'configuration':33} {'samples/s':>9} {'tokens/s':>10} {'MFU sheet':>10} {'MFU meas':>9} "
        f"{'peak GiB':>8} {'steps':>5} {'loss 1st':>7} {'vs recipe':>8}",
    ]
    lines += [f"{name:33} {row_text(r)}" for name, r in figures["training"].items()]
    lines.append(
        "packed vs padded loss on the same samples: "
        + ", ".join(
            f"{key} {c['packed']:.4f} vs {c['padded']:.4f}" if "error" not in c else f"{key} {c['error']}"
            for key, c in figures["packing_loss"].items()
        )
    )
    g = figures["generation"]
    if "speedup" in g:
        rates = g["tokens_per_s"]
        lines.append(
            f"generation: batch {g['prompts']} vs 1: {g['speedup']:.2f}x ({rates['batched']:.0f} vs "
            f"{rates['single']:.0f} tokens/s, {g['new_tokens']} new tokens), greedy tokens equal: "
            f"{g['agreement']:.0%}"
        )
    else:
        lines.append(f"generation: {g['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny cards, fp32, on the CPU (what CI runs)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the JSON (default: bench/results; with --cpu-smoke a new temporary folder)",
    )
    args = parser.parse_args(argv)
    settings = SMOKE if args.cpu_smoke else REAL
    if settings.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --cpu-smoke")
    device = torch.device(settings.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    experiment = recipe(settings)
    datasheet = peak_flops(name)
    peaks = {
        "measured": matmul_tflops(device, settings.dtype, settings.matmul_side, settings.matmul_repeats),
        "datasheet": datasheet / 1e12 if datasheet else None,
    }
    note(
        f"{name}: matmul {settings.matmul_side}^3 {settings.dtype}: {peaks['measured']:.3g} TFLOP/s "
        f"(datasheet {peaks['datasheet']})"
    )
    training: dict[str, dict[str, Any]] = {}
    packing: dict[str, dict[str, Any]] = {}
    stage1_text = round(mixture_stats(experiment.stages[0]).text_tokens)
    model, build_s = None, 0.0
    for key, stage, text_mean in (
        ("stage2", experiment.stages[-1], settings.stage2_text_tokens),
        ("stage1", experiment.stages[0], stage1_text),
    ):
        model = None
        gc.collect()
        begin = time.perf_counter()
        model = build(experiment, settings)
        sync(device)
        build_s += time.perf_counter() - begin
        note(
            f"built {experiment.model.vision} + {experiment.model.projector} + {experiment.model.llm} on {device} "
            f"({sum(p.numel() for p in model.parameters()):,} parameters) in {time.perf_counter() - begin:.1f} s"
        )
        configurations, packing[key] = measure_stage(model, experiment, key, stage, text_mean, settings, peaks, device)
        training.update(configurations)
    assert model is not None
    generation = guarded(lambda: measure_generation(model, settings, device), device)
    lm_attention = model.lm.attention
    vision_attention = getattr(model.vision_tower.backbone.config, "_attn_implementation", None)
    figures = {
        "smoke": args.cpu_smoke,
        "device": name,
        "dtype": f"training fp32 weights, {experiment.engine.precision} compute; generation "
        f"{str(settings.dtype).removeprefix('torch.')}",
        "attn_implementation": {"lm": lm_attention, "vision": vision_attention},
        "recipe": str(RECIPE.relative_to(REPO)),
        "cards": [experiment.model.vision, experiment.model.llm],
        "peak_tflops": peaks,
        "build_s": build_s,
        "training": training,
        "packing_loss": packing,
        "generation": generation,
        "seconds_total": time.perf_counter() - STARTED,
    }
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu-smoke-")) if args.cpu_smoke else None)
    path = write_result(
        "gpu-cpu-smoke" if args.cpu_smoke else f"gpu-{card_slug(name)}-{time.strftime('%Y-%m-%d')}", figures, out
    )
    print(summary(figures))
    print(f"-> {path} ({figures['seconds_total']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
