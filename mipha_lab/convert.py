"""`python -m mipha_lab.convert mipha IN_DIR OUT_DIR [--allow-pickle]`: a released Mipha / LLaVA-Phi checkpoint
(`mipha_phi`, `mipha_gemma`, `mipha_phi3`, `llava_phi`) written in our format (config.json with resolved
cards, one safetensors file, tokenizer, preprocessor). The checkpoint is recognised by its config.json
and tensor names, never by the folder's name; every stored tensor must land in place. Released folders
also load directly (serve.cli, eval, export); converting once saves the checks on every later load.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mipha_lab.errors import ConfigError, exit_status
from mipha_lab.model import MultimodalModel
from mipha_lab.model.released import RELEASED, is_released
from mipha_lab.output_folder import check_output, write_folder


def convert_mipha(source: Path, out: Path, allow_pickle: bool = False, overwrite: bool = False) -> Path:

    config_path = source / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{source}: no config.json - not a model folder")
    if not is_released(json.loads(config_path.read_text())):
        raise ConfigError(f"{config_path}: model_type is not one of {', '.join(RELEASED)} (a released Mipha / "
                          "LLaVA-Phi checkpoint); a mipha-lab model needs no conversion")
    check_output(out, source, overwrite)
    model = MultimodalModel.from_pretrained(source, allow_pickle=allow_pickle)
    return write_folder(out, model.save_pretrained)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mipha_lab.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", choices=["mipha"], help="the released layout (Mipha and LLaVA-Phi share one)")
    parser.add_argument("source", type=Path, help="the released checkpoint's folder")
    parser.add_argument("out", type=Path, help="the folder to write")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read .bin/.pt weights (torch.load with weights_only=True); refused otherwise")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR when it is not empty or is the folder being read (refused otherwise)")
    args = parser.parse_args(argv)

    def run() -> int:
        out = convert_mipha(args.source, args.out, args.allow_pickle, args.overwrite)
        print(f"wrote {out} (load it with MultimodalModel.from_pretrained or any --model-path)")
        return 0

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
