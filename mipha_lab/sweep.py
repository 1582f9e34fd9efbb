"""Experiment files (several, globs, `sweep:` blocks) -> cells, each with a deterministic run folder.

A cell's run name is `<sweep>/<swept values>-<hash>`: the values make it readable, the hash (of the
resolved config without paths, tracking settings, resources and the run name) makes it the same on
any machine, so a relaunched sweep finds its finished and half-finished cells again.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mipha_lab.config import Experiment, Scale, SweepConfig, load_experiment
from mipha_lab.errors import ConfigError

NOT_HASHED = ("tracking", "resources", "run_name", "runs_root", "data_root", "source", "extends_chain", "sweep")


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: its experiment, run name and the overrides that made it."""

    experiment: Experiment
    overrides: dict[str, Any] = field(default_factory=dict)  # the swept values of this cell

    @property
    def run_name(self) -> str:
        return self.experiment.run_name or "run"

    @property
    def run_path(self) -> Path:
        return Path(self.experiment.runs_root) / self.run_name


def config_hash(experiment: Experiment) -> str:
    """Eight hex digits of the resolved config that decides what a run computes."""
    data = experiment.model_dump(mode="json", exclude=set(NOT_HASHED))
    data["model"].pop("card_dirs", None)  # paths on this machine
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]


def _short_keys(keys: list[str]) -> dict[str, str]:
    """For each key path, the fewest trailing components that no other key ends with."""

    def suffix(key: str, depth: int) -> str:
        return ".".join(key.split(".")[-depth:])

    short = {}
    for key in keys:
        depth = 1
        while depth <= key.count(".") and any(suffix(o, depth) == suffix(key, depth) for o in keys if o != key):
            depth += 1
        short[key] = suffix(key, depth)
    return short


def _format(value: Any) -> str:
    text = (
        f"{value:g}"
        if isinstance(value, float)
        else json.dumps(value)
        if isinstance(value, (list, dict))
        else str(value)
    )
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "empty"


def cell_name(overrides: dict[str, Any], digest: str) -> str:
    short = _short_keys(list(overrides))
    readable = "_".join(f"{short[k]}={_format(v)}" for k, v in overrides.items())
    return f"{readable}-{digest}" if readable else digest


def sweep_points(experiment: Experiment) -> list[dict[str, Any]]:
    """Every combination of swept values, in a stable order: grid (row-major), then zip, then seeds."""
    sweep = experiment.sweep
    assert sweep is not None
    grid = [dict(zip(sweep.grid, values, strict=True)) for values in itertools.product(*sweep.grid.values())]
    zipped = [dict(zip(sweep.zip, values, strict=True)) for values in zip(*sweep.zip.values(), strict=True)] or [{}]
    seeds = [{"seed": seed} for seed in sweep.seeds] or [{}]
    return [{**g, **z, **s} for g in grid for z in zipped for s in seeds]


def expand(
    path: str | Path, overrides: list[str] | None = None, scale: Scale | None = None, seeds: list[int] | None = None
) -> list[Cell]:
    """One experiment file -> its cells (one cell, with its own run name, when it has no sweep).
    `seeds` runs every cell with each seed (a `sweep: {seeds: ...}` added to the file's own)."""
    overrides = list(overrides or [])
    base = load_experiment(path, overrides, scale)
    if seeds:
        base = base.model_copy(update={"sweep": (base.sweep or SweepConfig()).model_copy(update={"seeds": seeds})})
    if base.sweep is None:
        return [Cell(base)]
    name = base.sweep.name or base.run_name
    cells = []
    for point in sweep_points(base):
        swept = [f"{key}={json.dumps(value)}" for key, value in point.items()]
        experiment = load_experiment(path, overrides + swept + ["sweep=null"], scale)
        run_name = f"{name}/{cell_name(point, config_hash(experiment))}"
        cells.append(Cell(experiment.model_copy(update={"run_name": run_name}), point))
    names = [c.run_name for c in cells]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: the sweep repeats a cell ({sorted(n for n in names if names.count(n) > 1)[0]})")
    return cells


def experiment_files(targets: list[str]) -> list[Path]:
    """Files, globs (quoted so the shell leaves them to us; `**` descends into folders), folders of
    experiment files (every YAML below them) and run folders (their config.yaml)."""
    files: list[Path] = []
    for target in targets:
        matches = sorted(glob.glob(target, recursive=True)) if glob.has_magic(target) else [target]
        if not matches:
            raise ConfigError(f"{target}: no experiment file matches")
        for match in map(Path, matches):
            if match.is_dir() and not (match / "config.yaml").is_file():
                files += sorted(match.rglob("*.yaml"))  # a folder of experiment files: the whole study
            else:
                files.append(match / "config.yaml" if match.is_dir() else match)
    return files


def expand_all(
    targets: list[str], overrides: list[str] | None = None, scale: Scale | None = None, seeds: list[int] | None = None
) -> list[Cell]:
    return [cell for path in experiment_files(targets) for cell in expand(path, overrides, scale, seeds)]
