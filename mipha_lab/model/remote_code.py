"""Nothing from a model folder runs as code: tokenizers load with `trust_remote_code=False`, and a folder
whose tokenizer or processor config names code of its own (`auto_map`) is refused before transformers
sees it, so no prompt on stdin can be answered "y" into running it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from mipha_lab.errors import ConfigError

# files transformers would follow to code (`auto_map`); config.json is read by us as data and never run
CODE_BEARING = (
    "tokenizer_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "image_processor_config.json",
)
NO_REMOTE_CODE: dict[str, Any] = {"trust_remote_code": False}


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
            raise ConfigError(
                f"{path}: 'auto_map' points at code shipped with the folder ({json.dumps(auto_map)}); "
                "mipha-lab never runs code from a model folder - use a folder whose tokenizer and "
                "processor are standard transformers classes (remove 'auto_map')"
            )


def load_folder_tokenizer(source: str | Path) -> Any:
    """`AutoTokenizer.from_pretrained` without remote code: a local folder is checked first; a refusal from
    transformers (a hub tokenizer with code) becomes a clear error."""

    if Path(source).is_dir():
        refuse_folder_code(Path(source))
    try:
        return AutoTokenizer.from_pretrained(source, **NO_REMOTE_CODE)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ConfigError(f"{source}: its tokenizer needs code of its own, which mipha-lab never runs") from None
        raise
