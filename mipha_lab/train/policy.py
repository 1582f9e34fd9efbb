"""Trainability policy per module: frozen, full, LoRA or partial, each with its own learning rate.

Modules: `vision` (the tower), `projector`, `lm_embeddings` (input embeddings), `lm_head` (output
layer), `lm_body` (everything else in the LM). When the head is tied to the embeddings (Gemma,
Qwen2.5, SmolLM2), the two are one matrix and must share one policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from torch import nn

from mipha_lab.config import MODULES, Frozen, Full, Lora, ModulePolicy, QuirksConfig, StageConfig, Trainable
from mipha_lab.errors import ConfigError
from mipha_lab.model.adapters import add_lora
from mipha_lab.model.vision import VisionTower
from mipha_lab.model.vlm import MultimodalModel


@dataclass
class ModuleRow:
    """One row of a stage's parameter table: a module, its sizes, its policy and learning rate."""

    module: str
    total: int
    trainable: int
    policy: str
    lr: float | None


def module_parameters(
    model: MultimodalModel, vision_towers: Sequence[str] = ()
) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Each parameter in exactly one module group (a tied head counts under lm_embeddings; a fused tower's
    towers named in `vision_towers` are groups `vision.<tower>` of their own)."""
    lm = model.lm
    embeddings, head = lm.embeddings, lm.head
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {name: [] for name in module_names(vision_towers)}
    seen: set[int] = set()

    def add(group: str, module: nn.Module, prefix: str) -> None:
        for name, param in module.named_parameters(prefix=prefix):
            if id(param) not in seen:
                seen.add(id(param))
                groups[group].append((name, param))

    for tower in vision_towers:
        add(f"vision.{tower}", sub_tower(model, tower), f"vision_tower.towers.{tower}")
    add("vision", model.vision_tower, "vision_tower")
    add("projector", model.projector, "projector")
    if model.tiles is not None:  # anyres' newline trains with the projector, as in LLaVA-NeXT
        add("projector", model.tiles, "tiles")
    add("lm_embeddings", embeddings, "lm.embeddings")
    add("lm_head", head, "lm.head")
    add("lm_body", lm.module, "language_model")
    return groups


def module_names(vision_towers: Sequence[str] = ()) -> list[str]:
    """The modules in table order: `vision`, its towers with their own policy, then the rest."""
    return [MODULES[0], *(f"vision.{tower}" for tower in vision_towers), *MODULES[1:]]


def sub_tower(model: MultimodalModel, tower: str) -> VisionTower:
    """A fused vision encoder's tower by name; other names (or a single tower) are a clear error."""
    towers = getattr(model.vision_tower, "towers", None)
    if not isinstance(towers, nn.ModuleDict) or tower not in towers:
        available = f"its towers are {', '.join(towers)}" if isinstance(towers, nn.ModuleDict) else "it has one tower"
        raise ConfigError(
            f"trainable.vision.{tower}: the vision encoder '{model.vision_tower.name}' has no tower '{tower}' "
            f"({available})"
        )
    return cast(VisionTower, towers[tower])


def policy_of(trainable: Trainable, module: str) -> ModulePolicy:
    if module.startswith("vision."):
        return trainable.vision_towers[module.removeprefix("vision.")]
    return getattr(trainable, module)


def is_tied(model: MultimodalModel) -> bool:
    return model.lm.tied


def blocks(model: MultimodalModel, module: str) -> nn.ModuleList:
    """The repeated layers that `partial` counts from."""
    if module == "lm_body":
        return model.lm.layers
    if module == "vision":
        return model.vision_tower.blocks
    if module.startswith("vision."):
        return sub_tower(model, module.removeprefix("vision.")).blocks
    raise ConfigError(f"mode 'partial' applies to vision and lm_body, not {module}")


def check_tied(trainable: Trainable, model: MultimodalModel, llm_name: str) -> None:
    if is_tied(model) and trainable.lm_head != trainable.lm_embeddings:
        raise ConfigError(
            f"language model '{llm_name}' ties lm_head to lm_embeddings (one matrix): give both the same policy "
            f"(got lm_head={trainable.lm_head.mode}, lm_embeddings={trainable.lm_embeddings.mode})"
        )


def with_quirks(trainable: Trainable, model: MultimodalModel, quirks: QuirksConfig) -> Trainable:
    """Quirk 1: the original froze only the inner LM, so an untied head trained whenever the body was frozen."""
    if (
        quirks.stage1_trains_lm_head
        and isinstance(trainable.lm_body, Frozen)
        and isinstance(trainable.lm_head, Frozen)
        and not is_tied(model)
    ):
        return trainable.model_copy(update={"lm_head": Full()})
    return trainable


def module_lr(policy: ModulePolicy, stage_lr: float, shared: bool = False) -> float:
    """The module's own rate, unless quirk 2 (one shared learning rate) is on."""
    if shared:
        return stage_lr
    if policy.lr is not None:
        return policy.lr
    return stage_lr * (policy.lr_scale if policy.lr_scale is not None else 1.0)


def apply_policy(
    model: MultimodalModel, stage: StageConfig, llm_name: str = "", quirks: QuirksConfig | None = None
) -> tuple[list[dict[str, Any]], list[ModuleRow]]:
    """Set requires_grad (injecting LoRA where asked) and return the optimizer's parameter groups
    (one per trainable module, weight decay only on matrices) and the parameter table."""
    quirks = quirks or QuirksConfig()
    trainable = with_quirks(stage.trainable, model, quirks)
    check_tied(trainable, model, llm_name)
    towers = list(trainable.vision_towers)
    for module in module_names(towers):
        policy = policy_of(trainable, module)
        if isinstance(policy, Lora):
            if module.startswith("vision."):
                raise ConfigError(
                    f"stage '{stage.name}', trainable.{module}: LoRA applies to the whole vision encoder "
                    "(trainable.vision), not to one of its towers"
                )
            add_lora(model, module, policy.r, policy.alpha, policy.dropout, policy.target_modules)
    try:
        groups = module_parameters(model, towers)
    except ConfigError as err:
        raise ConfigError(f"stage '{stage.name}', {err}") from None
    param_groups: list[dict[str, Any]] = []
    rows: list[ModuleRow] = []
    for module in module_names(towers):
        policy = policy_of(trainable, module)
        params = groups[module]
        try:
            policy.apply(params, lambda: list(blocks(model, module)))  # noqa: B023 - called at once
        except ConfigError as err:
            raise ConfigError(f"stage '{stage.name}', trainable.{module}: {err}") from None
        chosen = [(n, p) for n, p in params if p.requires_grad]
        lr = module_lr(policy, stage.optimizer.lr, quirks.shared_learning_rate) if chosen else None
        if chosen:
            decay = [p for n, p in chosen if p.ndim >= 2]
            no_decay = [p for n, p in chosen if p.ndim < 2]
            for suffix, plist, wd in (("", decay, stage.optimizer.weight_decay), (".no_decay", no_decay, 0.0)):
                if plist:
                    param_groups.append({"params": plist, "lr": lr, "weight_decay": wd, "name": module + suffix})
        rows.append(
            ModuleRow(module, sum(p.numel() for _, p in params), sum(p.numel() for _, p in chosen), policy.label, lr)
        )
    if not param_groups:
        raise ConfigError(f"stage '{stage.name}': every module is frozen, nothing would train")
    return param_groups, rows


def table_markdown(stage: str, rows: list[ModuleRow]) -> str:
    lines = [
        f"### parameters of stage '{stage}'",
        "",
        "| module | total | trainable | policy | lr |",
        "|---|---:|---:|---|---:|",
    ]
    for r in rows:
        lr = f"{r.lr:.3g}" if r.lr is not None else "-"
        lines.append(f"| {r.module} | {r.total:,} | {r.trainable:,} | {r.policy} | {lr} |")
    total, train = sum(r.total for r in rows), sum(r.trainable for r in rows)
    lines.append(f"| **all** | {total:,} | {train:,} ({100 * train / max(total, 1):.1f}%) | | |")
    return "\n".join(lines) + "\n"
