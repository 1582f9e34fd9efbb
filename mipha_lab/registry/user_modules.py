"""Your own components, registered in Python: the modules an experiment names under `imports:` (or a
command's `--import`) are imported before any component name is resolved. They are modules of your
environment, named by you; a model folder's config.json only records them (it never imports them)."""

from __future__ import annotations

import importlib

from mipha_lab.errors import ConfigError


def import_modules(modules: list[str], where: str) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(
                f"{where}: cannot import '{name}' ({type(err).__name__}: {err}); it must be importable "
                "from this environment (installed, or on PYTHONPATH)"
            ) from None
