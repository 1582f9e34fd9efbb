"""Folders a command writes (export, convert): never over existing work unless asked, and never half-written.

A folder that exists and is not empty, or that is a run's own `final/` (or the model being read), is refused
unless `--overwrite`; a path that is a file is an error. The new folder is written beside the target under a
`.partial` name and moved into place when complete, so an interrupted write leaves the old folder as it was.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from mipha_lab.errors import ConfigError


def check_output(out: Path, source: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; give the path of a folder to write")
    own = {source.resolve(), (source / "final").resolve()}
    if out.resolve() in own and not overwrite:
        raise ConfigError(
            f"{out} is the model being read ({source}); writing there replaces it - choose another "
            "folder, or pass --overwrite"
        )
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} exists and is not empty; choose another folder, or pass --overwrite to replace it")


def write_folder(out: Path, write: Callable[[Path], object]) -> Path:
    """`write(staging)` fills a fresh folder, which then replaces `out` in one move."""
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out
