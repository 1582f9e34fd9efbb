"""Experiment tracking: wandb (offline by default) on rank 0; nothing when disabled."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Literal, cast, get_args

from mipha_lab.config import Experiment
from mipha_lab.errors import ConfigError

WandbMode = Literal["offline", "online", "disabled"]
WANDB_MODES: tuple[str, ...] = get_args(WandbMode)


class Tracker:
    """Logs a run's metrics to wandb on rank 0 (offline by default); does nothing when disabled."""

    def __init__(self, experiment: Experiment, run_dir: Path, enabled: bool) -> None:
        self.run = None
        mode = os.environ.get("WANDB_MODE") or experiment.tracking.wandb_mode  # the environment wins, as in wandb
        if mode not in WANDB_MODES:
            raise ConfigError(f"WANDB_MODE={mode!r}: expected one of {', '.join(WANDB_MODES)}")
        if enabled and mode != "disabled":
            import wandb  # heavy, absent on the lent GPU machine: only when tracking is on

            id_file = run_dir / "wandb-id"  # a resumed run continues the same wandb run
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
            self.run = wandb.init(
                project=experiment.tracking.project,
                group=experiment.tracking.group,
                tags=experiment.tracking.tags,
                name=experiment.run_name,
                dir=str(run_dir),
                mode=cast(WandbMode, mode),  # checked above
                config=experiment.model_dump(mode="json"),
                reinit="finish_previous",
                id=run_id,
                resume="allow",
            )

    def log(self, row: dict[str, Any]) -> None:
        if self.run is not None:
            flat = {k: v for k, v in row.items() if isinstance(v, (int, float)) and v is not None}
            flat.update({f"lr/{k}": v for k, v in row.get("lr", {}).items()})
            flat.update({f"time/{k}": v for k, v in row.get("time", {}).items()})
            self.run.log(flat, step=row["step"])

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
