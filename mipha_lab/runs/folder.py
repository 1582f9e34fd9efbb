"""The self-describing run folder every run leaves (layout in the README; later tools rely on the names)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from mipha_lab.config import Experiment, dump_experiment
from mipha_lab.errors import StorageError

log = logging.getLogger(__name__)

PACKAGES = (
    "mipha-lab",
    "torch",
    "torchvision",
    "transformers",
    "tokenizers",
    "timm",
    "open-clip-torch",
    "peft",
    "deepspeed",
    "submitit",
    "wandb",
    "safetensors",
    "pydantic",
)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _git(*args: str) -> str | None:
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def file_digest(path: Path) -> dict[str, Any]:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": sha.hexdigest()}


def hardware() -> dict[str, Any]:

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"host": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count(), "gpus": gpus}


CHECKPOINTS = "checkpoints"  # <run>/checkpoints/step-XXXXXXXX/ (train/checkpoint.py writes them)
PREFIX = "step-"


def checkpoint_dir(run_path: Path) -> Path:
    return run_path / CHECKPOINTS


def latest_checkpoint(run_path: Path) -> Path | None:
    """The newest complete checkpoint (partial folders never count)."""
    found = sorted(checkpoint_dir(run_path).glob(f"{PREFIX}*"), key=lambda p: int(p.name[len(PREFIX) :]))
    return found[-1] if found else None


class RunFolder:
    """A run's folder: config, manifest, status, metrics, checkpoints, stages and final/ (its layout)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def for_experiment(cls, experiment: Experiment) -> RunFolder:
        return cls(Path(experiment.runs_root) / (experiment.run_name or "run"))

    def _write(self, name: str, text: str) -> Path:
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(target.name + ".tmp")
        try:
            temporary.write_text(text)
            temporary.replace(target)  # never a half-written file under the real name
        except OSError as err:
            temporary.unlink(missing_ok=True)
            raise StorageError(
                f"{target}: could not be written ({err.strerror or err}); the previous version is "
                "kept - free space, then launch again"
            ) from None
        return target

    def write_json(self, name: str, data: Any) -> Path:
        return self._write(name, json.dumps(data, indent=2) + "\n")

    def create(self, experiment: Experiment, data_files: list[Path], world_size: int) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_config(experiment)
        versions: dict[str, str | None] = {}
        for package in PACKAGES:
            try:
                versions[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                versions[package] = None
        dirty = _git("status", "--porcelain")
        self.write_json(
            "manifest.json",
            {
                "created": _now(),
                "git": {"commit": _git("rev-parse", "HEAD"), "dirty": bool(dirty) if dirty is not None else None},
                "versions": versions,
                "hardware": hardware(),
                "world_size": world_size,
                "seed": experiment.seed,
                "command": [sys.executable, *sys.argv],
                "data_files": [file_digest(p) for p in data_files if p.is_file()],
            },
        )

    def write_config(self, experiment: Experiment) -> None:
        self._write("config.yaml", dump_experiment(experiment))

    def record_data(self, data_files: list[Path]) -> None:
        """The annotation files' digests now (a resume with --allow-changed-data moves the reference)."""
        manifest = self.read_json("manifest.json") or {}
        manifest["data_files"] = [file_digest(p) for p in data_files if p.is_file()]
        self.write_json("manifest.json", manifest)

    def status(self, state: str, **fields: Any) -> None:
        self.write_json("status.json", {"state": state, **fields, "updated": _now()})

    def read_json(self, name: str) -> Any:
        path = self.path / name
        return json.loads(path.read_text()) if path.is_file() else None

    def read_status(self) -> dict[str, Any] | None:
        return self.read_json("status.json")

    def append_metrics(self, row: dict[str, Any]) -> None:
        path = self.path / "metrics.jsonl"
        try:
            with path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        except OSError as err:
            raise StorageError(
                f"{path}: writing step {row.get('step')}'s metrics failed: {err.strerror or err}; "
                "free space, then launch the same command again to resume from the last "
                "checkpoint"
            ) from None

    def truncate_metrics(self, last_step: int) -> None:
        """Drop rows after `last_step` (a resumed run trains those steps again; no duplicates)."""
        rows = [row for row in self.metrics() if row["step"] <= last_step]
        self._write("metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows))

    def metrics(self) -> list[dict[str, Any]]:
        """Every readable row; a line cut short (a kill or a full disk mid-write) is left out with a warning
        naming it - the step it described is trained again on resume."""
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        rows = []
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
            elif line.strip():
                log.warning("%s:%d: unreadable row left out (cut short by a kill or a full disk?)", path, number)
        return rows

    def write_params(self, stage: str, rows: list[Any], markdown: str) -> None:
        self.write_json(f"params-{stage}.json", [row.__dict__ for row in rows])
        self._write(f"params-{stage}.md", markdown)
