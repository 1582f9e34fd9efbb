"""What a recipe costs before it runs: `python -m mipha_lab.launch EXP.yaml --dry-run [--json]`.

The real model is built on the meta device (no weights, no network), each stage's trainability policy
is applied to it, and the analytic FLOPs of train/flops.py give the compute per sample. Sample counts
come from the data when it is present, else from the mixture card's declared `stats`; token counts
from the card's stats, else measured on the data with the model's tokenizer.

Memory per GPU is train/memory.py's estimate for DeepSpeed in bf16 (bf16 weights and gradients, fp32
AdamW states partitioned as the ZeRO stage says) and the activations of one micro batch under the
stage's LM recomputation (`auto` resolved as training would on the planned GPU).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import torch

from mipha_lab.config import Experiment, StageConfig
from mipha_lab.data.mixtures import (
    MIXTURES,
    ensure_generated,
    load_mixture,
    missing_inputs,
    read_source,
    sample_indices,
)
from mipha_lab.data.streaming import StreamedRecords, stream_count
from mipha_lab.data.templates import encode, get_template
from mipha_lab.errors import ConfigError
from mipha_lab.model import MultimodalModel, build_model
from mipha_lab.model.language import LLM, load_tokenizer
from mipha_lab.train.flops import PEAK_BF16, sample_flops
from mipha_lab.train.memory import GPU_MEMORY_GIB, estimate_gib
from mipha_lab.train.policy import apply_policy, module_parameters
from mipha_lab.train.speed import lm_recompute


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_model(experiment: Experiment) -> MultimodalModel:

    plain = experiment.model_copy(update={"model": experiment.model.model_copy(update={"pretrained": False})})
    with torch.device("meta"):
        return build_model(plain, with_tokenizer=False)


def stage_data(stage: StageConfig, experiment: Experiment) -> dict[str, float]:
    """Samples per epoch, images, text and supervised tokens per sample for one stage."""
    root = Path(experiment.data_root)
    samples = images = text = supervised = 0.0
    card = MIXTURES.get(stage.mixture)
    ensure_generated(card, root)  # synthetic data costs seconds: plan on the real thing
    for source in card.sources:
        missing = missing_inputs(source, root)
        if not missing and source.stream:  # counted from the manifest, measured on the stream's first samples
            count = float(stream_count(source, root))
            head = list(itertools.islice(StreamedRecords(card.model_copy(update={"sources": [source]}), root, 0), 500))
            with_image = sum(1 for r in head if r.images) / max(len(head), 1)
        elif not missing:
            records, _ = read_source(source, root, experiment.seed, "skip")
            count = float(len(records))
            with_image = sum(1 for r in records if r.images) / max(count, 1.0)
        elif source.stats is not None:
            count = float(len(sample_indices(source.stats.samples, source, experiment.seed)))
            count = min(count, float(source.cap or count))
            with_image = source.stats.image_fraction
        else:
            raise ConfigError(
                f"mixture '{stage.mixture}': {missing[0]} is missing and source '{source.name}' declares no "
                "stats (samples, text_tokens, supervised_tokens) to plan without it"
            )
        if source.stats is not None:
            tokens, answers = source.stats.text_tokens, source.stats.supervised_tokens
        else:
            tokens, answers = measured_tokens(stage, experiment)
        samples += count
        images += count * with_image
        text += count * tokens
        supervised += count * answers
    n = max(samples, 1.0)
    return {"samples": samples, "images": images / n, "text_tokens": text / n, "supervised_tokens": supervised / n}


def measured_tokens(stage: StageConfig, experiment: Experiment) -> tuple[float, float]:
    """Mean text tokens (image placeholders left out) and supervised tokens of the stage's data,
    tokenized as training would (the first 2000 samples)."""

    records, _ = load_mixture(stage.mixture, experiment.data_root, experiment.seed, "skip")
    tokenizer, template = load_tokenizer(LLM.get(experiment.model.llm)), get_template(stage.template)
    text = answers = 0
    sample = list(itertools.islice(iter(records), 2000))
    for record in sample:
        encoded = encode(template, tokenizer, record.messages, sample_id=record.sample_id)
        text += len(encoded.input_ids) - len(record.images)
        answers += sum(1 for label in encoded.labels if label >= 0)
    if not sample:
        raise ConfigError(f"stage '{stage.name}': no usable sample to measure tokens on")
    return text / len(sample), answers / len(sample)


def plan_experiment(experiment: Experiment, gpu: str = "H100", num_gpus: int = 8, mfu: float = 0.4) -> dict[str, Any]:
    if gpu not in PEAK_BF16:
        raise ConfigError(f"unknown GPU '{gpu}'; known: {', '.join(PEAK_BF16)}")
    peak = PEAK_BF16[gpu]
    model = meta_model(experiment)
    lm = model.language_model
    lm_width, lm_layers = model.lm.width, len(model.lm.layers)
    params = {"vision": _count(model.vision_tower), "projector": _count(model.projector), "llm": _count(lm)}
    params["total"] = sum(params.values())
    stages: list[dict[str, Any]] = []
    for stage in experiment.stages:
        model = meta_model(experiment)  # a fresh model per stage: policies (LoRA) must not accumulate
        with torch.device("meta"):
            apply_policy(model, stage, experiment.model.llm, experiment.quirks)
        data = stage_data(stage, experiment)
        per_epoch = math.ceil(data["samples"] / stage.global_batch)  # a last, smaller batch counts as a step
        steps = (
            stage.max_steps if stage.max_steps is not None else max(1, math.floor((stage.epochs or 1.0) * per_epoch))
        )
        recompute = lm_recompute(model, stage, experiment, num_gpus, GPU_MEMORY_GIB[gpu])
        layout = model.layout  # a tiled image is counted at its budget: the most frames and tokens it can take
        flops = sample_flops(
            model,
            data["text_tokens"],
            data["images"] * layout.max_frames,
            data["supervised_tokens"],
            {"vision": stage.activation_checkpointing.vision, "lm": recompute},
            data["images"] * layout.max_visual_tokens,
        )
        per_sample = flops.useful + flops.recompute
        tokens = data["text_tokens"] + data["images"] * layout.max_visual_tokens
        groups = module_parameters(model)
        trainable = {name: sum(p.numel() for _, p in group if p.requires_grad) for name, group in groups.items()}
        gpu_hours = steps * stage.global_batch * per_sample / (peak * mfu) / 3600
        stages.append(
            {
                "name": stage.name,
                "samples": int(data["samples"]),
                "steps": steps,
                "trainable": trainable,
                "tokens_per_sample": round(tokens, 2),
                "flops_per_sample": per_sample,
                "lm_recompute": recompute,
                "memory_per_gpu_gib": round(
                    estimate_gib(
                        model,
                        lm_width,
                        lm_layers,
                        stage.micro_batch * tokens,
                        recompute,
                        "deepspeed",
                        experiment.zero_stage(stage),
                        num_gpus,
                    ),
                    2,
                ),
                "gpu_hours": round(gpu_hours, 4),
                "wall_hours": round(gpu_hours / num_gpus, 4),
            }
        )
    return {
        "experiment": experiment.source or experiment.run_name,
        "params": params,
        "visual_tokens": model.layout.max_visual_tokens,
        "frames_per_image": model.layout.max_frames,
        "assumptions": {"gpu": gpu, "num_gpus": num_gpus, "mfu": mfu, "peak_tflops": peak / 1e12},
        "stages": stages,
        "total_gpu_hours": round(sum(s["gpu_hours"] for s in stages), 4),
    }


def format_plan(plan: dict[str, Any]) -> str:
    a, p = plan["assumptions"], plan["params"]
    lines = [
        f"plan of {plan['experiment']} on {a['num_gpus']} x {a['gpu']} at {a['mfu']:.0%} MFU "
        f"({a['peak_tflops']:.0f} TFLOP/s peak bf16)",
        f"parameters: vision {p['vision']:,}, projector {p['projector']:,}, LM {p['llm']:,}, total {p['total']:,}; "
        f"{plan['visual_tokens']} visual tokens per image"
        + (
            f" at most ({plan['frames_per_image']} encoder frames, counted at that budget)"
            if plan["frames_per_image"] > 1
            else ""
        ),
        "| stage | samples | steps | trainable | tokens/sample | TFLOP/sample | GiB/GPU | GPU hours |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in plan["stages"]:
        lines.append(
            f"| {s['name']} | {s['samples']:,} | {s['steps']:,} | {sum(s['trainable'].values()):,} | "
            f"{s['tokens_per_sample']:.0f} | {s['flops_per_sample'] / 1e12:.3f} | {s['memory_per_gpu_gib']:.1f} | "
            f"{s['gpu_hours']:.2f} |"
        )
    lines.append(
        f"total: {plan['total_gpu_hours']:.2f} GPU hours "
        f"({plan['total_gpu_hours'] / a['num_gpus']:.2f} h on {a['num_gpus']} GPUs)"
    )
    return "\n".join(lines)
