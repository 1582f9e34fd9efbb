"""LoRA adapters on a MultimodalModel: injected (peft), recorded in the model's config so a saved model
loads with its adapters unmerged, and merged into plain weights on demand."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, cast

from torch import nn

from mipha_lab.errors import ConfigError
from mipha_lab.model.lm_interface import LanguageModel
from mipha_lab.model.spec import LoraSpec, VLMConfig


def _recorded(model: nn.Module) -> list[LoraSpec]:
    """The adapters the model's config records (a MultimodalModel's VLMConfig)."""
    return cast(VLMConfig, model.config).adapters


def _part(model: nn.Module, name: str) -> nn.Module:
    return cast(nn.Module, getattr(model, name))


def lora_host(model: nn.Module, module: str) -> nn.Module:
    """The submodule whose linear layers a `vision` or `lm_body` LoRA policy adapts."""
    if module == "lm_body":
        return LanguageModel(_part(model, "language_model")).decoder
    if module == "vision":
        return _part(model, "vision_tower")
    raise ConfigError(f"mode 'lora' applies to vision and lm_body, not {module}")


def linear_names(module: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, child in module.named_modules() if isinstance(child, nn.Linear)})


def add_lora(
    model: nn.Module,
    module: str,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: Sequence[str] | Literal["all-linear"],
) -> LoraSpec:
    """Inject adapters into `module` of `model` in place and record them in `model.config.adapters`."""
    from peft import LoraConfig, inject_adapter_in_model  # heavy: only where LoRA is used

    host = lora_host(model, module)
    targets = linear_names(host) if target_modules == "all-linear" else list(target_modules)
    spec = LoraSpec(module=module, r=r, alpha=alpha, dropout=dropout, target_modules=targets)
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets), host)
    _recorded(model).append(spec)
    return spec


def restore_adapters(model: nn.Module, specs: Sequence[LoraSpec]) -> None:
    """Re-inject the adapters a saved config records (before its weights are loaded)."""
    for spec in list(specs):
        _recorded(model).remove(spec)
        add_lora(model, spec.module, spec.r, spec.alpha, spec.dropout, spec.target_modules)


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base layer and remove the adapter modules; returns how many."""
    from peft.tuners.lora import LoraLayer  # heavy: only where LoRA is used

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
            merged += 1
    if isinstance(getattr(model, "config", None), VLMConfig):
        _recorded(model).clear()
    return merged
