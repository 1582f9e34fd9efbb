"""What a model folder holds, read as data: its config (ours, or a released Mipha / LLaVA-Phi checkpoint's
turned into ours), its tokenizer, and its weights under our names. The format is decided by config.json
alone, never by the folder's name; nothing from the folder runs as code (remote_code.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mipha_lab.errors import ConfigError
from mipha_lab.model.language import with_image_token
from mipha_lab.model.released import RELEASED, is_released, our_names, released_config
from mipha_lab.model.remote_code import load_folder_tokenizer, refuse_folder_code
from mipha_lab.model.spec import VLMConfig
from mipha_lab.model.weights import read_weights
from mipha_lab.validation import validate


@dataclass
class FolderContents:
    """What a model folder holds, read: our config, the tokenizer, and the weights as stored."""

    config: VLMConfig
    tokenizer: Any
    state: dict[str, torch.Tensor]  # as stored
    released_heads: int | None = None  # a released checkpoint: its attention heads (to split a fused q/k/v)

    def weights_for(self, model_keys: set[str]) -> dict[str, torch.Tensor]:
        """The stored tensors under the model's names."""
        if self.released_heads is None:
            return self.state
        return our_names(self.state, model_keys, self.released_heads)


def read_model_folder(folder: str | Path, allow_pickle: bool = False) -> FolderContents:
    """config.json, tokenizer and weights (its own weight files, weights.py; pickle files only with
    `allow_pickle`) of our format or a released checkpoint."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{folder} is not a model folder: it has no config.json")
    raw = json.loads(config_path.read_text())
    refuse_folder_code(folder)
    tokenizer = load_folder_tokenizer(folder) if (folder / "tokenizer_config.json").is_file() else None
    if is_released(raw):
        state = read_weights(folder, allow_pickle)
        tokenizer = with_image_token(tokenizer) if tokenizer is not None else None
        return FolderContents(
            released_config(folder, raw, set(state), tokenizer), tokenizer, state, raw["num_attention_heads"]
        )
    if raw.get("format") != "mipha-lab":
        raise ConfigError(
            f"{config_path}: unknown model format (format={raw.get('format')!r}, "
            f"model_type={raw.get('model_type')!r}); "
            f"expected a mipha-lab model or a released checkpoint with model_type one of {', '.join(RELEASED)}"
        )
    return FolderContents(validate(VLMConfig, raw, config_path), tokenizer, read_weights(folder, allow_pickle))
