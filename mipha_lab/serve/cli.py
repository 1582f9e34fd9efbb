"""`python -m mipha_lab.serve.cli --model-path PATH --image-file IMAGE_OR_URL [--prompt TEXT]`: chat with a
model about an image in the terminal.

Interactive: the reply streams token by token; `/image PATH` switches the image (and starts over),
`/reset` clears the conversation, an empty line or Ctrl-D exits. With `--prompt` one message is
answered and stdout holds only the reply (logs go to stderr). The template comes from the model's
config; `--conv-mode` overrides it (with a warning when it differs). Greedy when the temperature is 0.
The model path is a run folder (its final/) or a saved model folder; weights are read from
safetensors; pickle files (.bin, .pt) only with --allow-pickle, through torch.load(weights_only=True).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from mipha_lab.data.templates import get_template
from mipha_lab.errors import ConfigError, exit_status
from mipha_lab.model import load_model
from mipha_lab.registry.user_modules import import_modules
from mipha_lab.serve.chat import Conversation, open_image

log = logging.getLogger("mipha_lab.serve")
EXAMPLE_IMAGE = Path(__file__).resolve().parent / "example.png"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mipha_lab.serve.cli", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", required=True, help="a run folder or a saved model folder")
    parser.add_argument(
        "--image-file",
        default=str(EXAMPLE_IMAGE),
        help="an image file or an http(s) URL (default: the bundled example, a synthetic shapes scene)",
    )
    parser.add_argument("--conv-mode", default=None, help="the template (default: the model's own)")
    parser.add_argument("--temperature", type=float, default=0.2, help="0 decodes greedily")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--load-8bit", action="store_true", help="8-bit weights (bitsandbytes, CUDA only)")
    parser.add_argument("--load-4bit", action="store_true", help="4-bit weights (bitsandbytes, CUDA only)")
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import this module first (it registers the model's own Python components)",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read .bin/.pt weights (torch.load with weights_only=True); refused otherwise",
    )
    parser.add_argument("--prompt", default=None, help="answer this one message, print only the reply, exit")
    parser.add_argument("--seed", type=int, default=None, help="seed of sampling (temperature > 0)")
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model on its device and the template to talk to it with."""

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.load_8bit or args.load_4bit:
        if device != "cuda":
            raise ConfigError(
                "--load-8bit / --load-4bit need a CUDA GPU (bitsandbytes quantizes on the GPU); "
                "on the CPU load the model in full precision"
            )
        raise ConfigError(
            "--load-8bit / --load-4bit are not supported yet: load the model in bf16 (the default on GPUs)"
        )
    path = Path(args.model_path)
    if not path.exists():
        raise ConfigError(f"--model-path {path}: no such file or folder")
    import_modules(args.imports, "--import")
    model = load_model(path, allow_pickle=args.allow_pickle).to(device)
    if device == "cuda":
        model.to(torch.bfloat16)
    own = model.config.template
    name = args.conv_mode or own
    if name is None:
        raise ConfigError(f"{path}: the model records no template; pass --conv-mode")
    if args.conv_mode and own and args.conv_mode != own:
        log.warning("--conv-mode %s differs from the template the model was trained with (%s)", args.conv_mode, own)
    return model, get_template(name)


def interactive(conversation: Any, image_file: str) -> None:

    print(f"image: {image_file}. Commands: /image PATH, /reset; an empty line or Ctrl-D exits.", file=sys.stderr)
    while True:
        try:
            line = input("USER: ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            conversation.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line.startswith("/image "):
            conversation.set_image(open_image(line.split(" ", 1)[1].strip()))
            print("(new image; conversation cleared)", file=sys.stderr)
            continue
        print("ASSISTANT: ", end="", flush=True)
        conversation.reply(line, emit=lambda piece: print(piece, end="", flush=True))
        print()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    def chat() -> int:

        image = open_image(args.image_file)  # a bad path fails before the model loads
        model, template = load(args)
        if args.seed is not None:
            torch.manual_seed(args.seed)
        conversation = Conversation(
            model, template, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens
        )
        conversation.set_image(image)
        if args.prompt is not None:
            print(conversation.reply(args.prompt))
            return 0
        interactive(conversation, args.image_file)
        return 0

    return exit_status(chat)


if __name__ == "__main__":
    sys.exit(main())
