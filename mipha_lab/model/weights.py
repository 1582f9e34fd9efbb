"""Weights in and out of model folders: which files hold them (a folder's own weight files only), reading
them, and placing a state dict into a model so that every tensor lands (tied parameters are stored once).

The rule: `model.safetensors.index.json` (the shards it lists), else `model.safetensors`, else
`model-XXXXX-of-YYYYY.safetensors` (every shard present), else - only with `allow_pickle` -
`pytorch_model.bin.index.json` / `pytorch_model*.bin`, through `torch.load(weights_only=True)`. Any
other file beside them (an adapter, a reference, a user's copy) is never read as weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from mipha_lab.errors import ConfigError

WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = WEIGHTS_NAME
SAFE_SHARD = re.compile(r"model-(\d+)-of-(\d+)\.safetensors")
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_FILES = re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin")


def _indexed(folder: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConfigError(
            f"{index}: not a weight index (expected JSON with a 'weight_map' of tensor -> file): {err}"
        ) from None
    files = [folder / name for name in sorted(set(weight_map.values()))]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise ConfigError(f"{index} lists shard(s) that are not in {folder}: {', '.join(missing)}")
    return files


def _numbered_shards(folder: Path, pattern: re.Pattern[str]) -> list[Path]:
    found = sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name))
    if found and pattern is SAFE_SHARD:
        total = int(SAFE_SHARD.fullmatch(found[0].name).group(2))  # type: ignore[union-attr]
        if len(found) != total:
            raise ConfigError(
                f"{folder}: {len(found)} of {total} weight shards (model-*-of-{total:05d}.safetensors) "
                "are present; a shard is missing"
            )
    return found


def weight_files(folder: Path, allow_pickle: bool = False) -> list[Path]:
    """The folder's own weight files, in the order of the rule above."""
    if (folder / SAFE_INDEX).is_file():
        return _indexed(folder, folder / SAFE_INDEX)
    if (folder / SAFE_SINGLE).is_file():
        return [folder / SAFE_SINGLE]
    shards = _numbered_shards(folder, SAFE_SHARD)
    if shards:
        return shards
    pickled = (
        _indexed(folder, folder / PICKLE_INDEX)
        if (folder / PICKLE_INDEX).is_file()
        else _numbered_shards(folder, PICKLE_FILES)
    )
    if not pickled:
        raise ConfigError(
            f"{folder}: no weights - expected {SAFE_INDEX}, {SAFE_SINGLE} or model-*-of-*.safetensors "
            "(other .safetensors files in the folder are not read as weights)"
        )
    if not allow_pickle:
        raise ConfigError(
            f"{folder}: the weights are pickle files ({', '.join(p.name for p in pickled)}), which can "
            "run code when loaded; they are refused - convert them to safetensors, or pass "
            "--allow-pickle to read them with torch.load(weights_only=True)"
        )
    return pickled


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors file; a truncated or corrupt one is an error naming it."""

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ConfigError(
            f"{path}: not a readable safetensors file ({err}); it may be truncated (an interrupted "
            "copy or a full disk) - copy it again"
        ) from None


def read_weights(folder: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder, allow_pickle):
        if path.suffix == ".safetensors":
            state.update(read_safetensors(path))
        else:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


def place_weights(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load `state` into `model`: every stored tensor must land in place (same name, same shape) and every
    parameter must be stored, except those tied to one stored earlier."""
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state) - tied_names(model))
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if unexpected or missing or wrong:
        raise ConfigError(
            f"{source}: the weights do not match the model - stored but without a place: "
            f"{unexpected[:5]}, not stored: {missing[:5]}, wrong shape (stored vs model): {wrong[:5]}"
        )
    model.load_state_dict(state, strict=False)  # checked above; tied parameters are stored once


def tied_names(model: nn.Module) -> set[str]:
    """Names of parameters that share memory with an earlier one (saved once, re-tied on load)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.data_ptr() in seen:
            tied.add(name)
        seen.setdefault(tensor.data_ptr(), name)
    return tied
