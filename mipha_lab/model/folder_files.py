"""What is read from a model folder, and how: its own weight files only, and never code.

Weights: `model.safetensors.index.json` (the shards it lists), else `model.safetensors`, else
`model-XXXXX-of-YYYYY.safetensors` (every shard present), else - only with `allow_pickle` -
`pytorch_model.bin.index.json` / `pytorch_model*.bin`, through `torch.load(weights_only=True)`. Any
other file beside them (an adapter, a reference, a user's copy) is never read as weights.

Code: tokenizers load with `trust_remote_code=False`, and a folder whose tokenizer or processor config
names code of its own (`auto_map`) is refused before transformers sees it, so no prompt on stdin can
be answered "y" into running it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from mipha_lab.errors import ConfigError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
SAFE_SHARD = re.compile(r"model-(\d+)-of-(\d+)\.safetensors")
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_FILES = re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin")
# files transformers would follow to code (`auto_map`); config.json is read by us as data and never run
CODE_BEARING = ("tokenizer_config.json", "preprocessor_config.json", "processor_config.json", "image_processor_config.json")
NO_REMOTE_CODE: dict[str, Any] = {"trust_remote_code": False}


def _indexed(folder: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConfigError(f"{index}: not a weight index (expected JSON with a 'weight_map' of tensor -> file): {err}") from None
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
            raise ConfigError(f"{folder}: {len(found)} of {total} weight shards (model-*-of-{total:05d}.safetensors) "
                              "are present; a shard is missing")
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
    pickled = _indexed(folder, folder / PICKLE_INDEX) if (folder / PICKLE_INDEX).is_file() else \
        _numbered_shards(folder, PICKLE_FILES)
    if not pickled:
        raise ConfigError(f"{folder}: no weights - expected {SAFE_INDEX}, {SAFE_SINGLE} or model-*-of-*.safetensors "
                          "(other .safetensors files in the folder are not read as weights)")
    if not allow_pickle:
        raise ConfigError(f"{folder}: the weights are pickle files ({', '.join(p.name for p in pickled)}), which can "
                          "run code when loaded; they are refused - convert them to safetensors, or pass "
                          "--allow-pickle to read them with torch.load(weights_only=True)")
    return pickled


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors file; a truncated or corrupt one is an error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ConfigError(f"{path}: not a readable safetensors file ({err}); it may be truncated (an interrupted "
                          "copy or a full disk) - copy it again") from None


def read_weights(folder: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder, allow_pickle):
        if path.suffix == ".safetensors":
            state.update(read_safetensors(path))
        else:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


def refuse_folder_code(folder: Path) -> None:
    """A tokenizer or processor config that points at code (`auto_map`) is refused, naming the file and the code."""
    for name in CODE_BEARING:
        path = folder / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        auto_map = config.get("auto_map") if isinstance(config, dict) else None
        if auto_map:
            raise ConfigError(f"{path}: 'auto_map' points at code shipped with the folder ({json.dumps(auto_map)}); "
                              "mipha-lab never runs code from a model folder - use a folder whose tokenizer and "
                              "processor are standard transformers classes (remove 'auto_map')")


def load_folder_tokenizer(source: str | Path) -> Any:
    """`AutoTokenizer.from_pretrained` without remote code: a local folder is checked first; a refusal from
    transformers (a hub tokenizer with code) becomes a clear error."""
    from transformers import AutoTokenizer

    if Path(source).is_dir():
        refuse_folder_code(Path(source))
    try:
        return AutoTokenizer.from_pretrained(source, **NO_REMOTE_CODE)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ConfigError(f"{source}: its tokenizer needs code of its own, which mipha-lab never runs") from None
        raise
