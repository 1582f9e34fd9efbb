"""`python -m mipha_lab.registry list [KIND]` and `show KIND NAME`."""

from __future__ import annotations

import argparse
import sys

import yaml

from mipha_lab.data.mixtures import MIXTURES
from mipha_lab.data.templates import TEMPLATES
from mipha_lab.errors import MiphaLabError
from mipha_lab.eval.benchmarks import BENCHMARKS
from mipha_lab.model.language import LLM, LLM_BACKENDS
from mipha_lab.model.projectors import PROJECTORS
from mipha_lab.model.vision import VISION
from mipha_lab.model.vision_backends import VISION_BACKENDS
from mipha_lab.registry import Registry
from mipha_lab.registry.cards import Card

ALL: dict[str, Registry] = {
    "vision": VISION,
    "projector": PROJECTORS,
    "llm": LLM,
    "template": TEMPLATES,
    "mixture": MIXTURES,
    "benchmark": BENCHMARKS,
    "vision-backend": VISION_BACKENDS,
    "llm-backend": LLM_BACKENDS,
}


def list_entries(kinds: list[str]) -> str:
    lines: list[str] = []
    for kind in kinds:
        registry = ALL[kind]
        lines.append(f"{kind} ({registry.description}): {len(registry)}")
        width = max((len(e.name) for e in registry), default=0)
        for entry in registry:
            lines.append(f"  {entry.name:<{width}}  {entry.description}")
        if not len(registry):
            lines.append("  (none yet)")
    return "\n".join(lines)


def show_entry(kind: str, name: str) -> str:
    obj = ALL[kind].get(name)
    if isinstance(obj, Card):
        return f"# {obj.source}\n" + yaml.safe_dump(obj.to_dict(), sort_keys=False)
    return f"{name}: {obj!r}\n{(getattr(obj, '__doc__', '') or '').strip()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mipha_lab.registry", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="every registry and its entries with a one-line description")
    ls.add_argument("kind", nargs="?", choices=sorted(ALL), help="only this registry")
    show = sub.add_parser("show", help="the resolved card (or the docstring) of one entry")
    show.add_argument("kind", choices=sorted(ALL))
    show.add_argument("name")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            print(list_entries([args.kind] if args.kind else list(ALL)))
        else:
            print(show_entry(args.kind, args.name))
    except MiphaLabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
