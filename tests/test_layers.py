"""The package's imports, parsed (ast, every import, also those inside functions): no circle, and no module
importing one of a higher layer. The layers are the README's (Layout); a module not listed fails too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mipha_lab"

# lowest first; a module may import its own layer and the ones below (a prefix names a package)
LAYERS = [
    ("foundation", ["errors", "constants", "validation", "output_folder", "distributed"]),
    ("configuration and cards", ["config", "registry"]),
    ("components and the model", ["model"]),
    ("data", ["data"]),
    ("run folders", ["runs.folder", "runs.lock", "runs.setup", "runs"]),
    ("training engine", ["train"]),
    ("evaluation", ["eval"]),
    (
        "entry points",
        [
            "pipeline",
            "plan",
            "sweep",
            "cluster",
            "runs.status",
            "runs.__main__",
            "serve",
            "export",
            "launch",
            "registry.__main__",
            "eval.__main__",
        ],
    ),
    ("analysis", ["analysis"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> the package modules it imports (names relative to mipha_lab)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    found: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mipha_lab"):
                base = node.module.removeprefix("mipha_lab").lstrip(".")
                for alias in node.names:
                    full = f"{base}.{alias.name}".lstrip(".")
                    targets.add(full if full in modules else base)
            elif isinstance(node, ast.Import):
                targets |= {
                    a.name.removeprefix("mipha_lab").lstrip(".") for a in node.names if a.name.startswith("mipha_lab")
                }
        found[name] = {t for t in targets if t and t != name}
    return found


def layer_of(module: str) -> int:
    """The layer of the longest matching prefix."""
    best, depth = -1, -1
    for number, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > depth:
                best, depth = number, len(prefix)
    return best


def upward(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
        for m, targets in graph.items()
        for t in targets
        if layer_of(t) > layer_of(m)
    ]


def circles(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    found = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                found.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_every_module_has_a_layer():
    assert [m for m in imports() if m and layer_of(m) < 0] == []


def test_no_import_reaches_a_higher_layer():
    assert upward({m: t for m, t in imports().items() if m}) == []


def test_no_import_circle():
    assert circles(imports()) == []


def test_the_checks_see_a_circle_and_an_arrow_up():
    """A made-up edge from the model to the trainer is caught both ways."""
    graph = imports()
    graph["model.vlm"] = graph["model.vlm"] | {"train.trainer"}
    graph["train.trainer"] = graph["train.trainer"] | {"model.vlm"}
    assert upward({"model.vlm": graph["model.vlm"]}) == [
        "model.vlm (components and the model) imports train.trainer (training engine)"
    ]
    assert any("model.vlm" in c and "train.trainer" in c for c in circles(graph))
