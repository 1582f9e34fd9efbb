"""Checkpoints of a run, written atomically and complete enough to resume bit for bit.

`<run>/checkpoints/step-XXXXXXXX/` holds state.json (stage, steps, data position, skip counts),
model.safetensors (every weight, LoRA adapters included), the optimizer and scheduler (optimizer.pt,
or DeepSpeed's own partitioned files under deepspeed/) and rng-rank<R>.pt for every rank. A
checkpoint is first written under `.partial-...` and renamed when complete, so a folder named
`step-*` is never half-written; partial folders left by a killed write are removed on the next save.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file

from mipha_lab.errors import ConfigError, StorageError, disk_writes
from mipha_lab.runs.folder import PREFIX, checkpoint_dir, latest_checkpoint
from mipha_lab.train import faults


@dataclass
class TrainState:
    """Where training stands: the stage being trained and how far into it (in optimizer steps)."""

    stage_index: int  # len(stages) once every stage is done
    stage_step: int  # optimizer steps done in this stage
    global_step: int  # steps of earlier stages + stage_step
    epoch: int = 0  # epoch of the next batch
    batches_done: int = 0  # micro-batches of that epoch this rank has consumed
    skips: dict[str, Any] = field(default_factory=dict)  # SkipReport counts and examples so far


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_state(folder: Path) -> TrainState:
    return TrainState(**json.loads((folder / "state.json").read_text()))


class CheckpointWriter:
    """Writes checkpoints for one rank; rank 0 commits (renames) them and applies the retention count."""

    def __init__(self, run_path: Path, rank: int, keep_last: int, barrier: Any) -> None:
        self.root, self.rank, self.keep_last, self.barrier = checkpoint_dir(run_path), rank, keep_last, barrier

    def save(self, state: TrainState, model_state: dict[str, torch.Tensor] | None, engine: Any = None) -> Path:
        """Every rank calls this; `model_state` is the full state dict on rank 0 (None elsewhere).
        Without an engine (the end of a stage) no optimizer state is written: the next stage starts afresh.
        A failed write (a full disk) removes the partial folder and says which checkpoint resumes."""
        final = self.root / f"{PREFIX}{state.global_step:08d}"
        partial = self.root / f".partial-{final.name}"
        kept = latest_checkpoint(self.root.parent)
        try:
            with disk_writes(
                f"writing checkpoint {final.name} in {self.root}",
                f"the last complete checkpoint ({kept.name if kept else 'none yet'}) is kept - free "
                "space, then launch the same command again to resume from it",
            ):
                return self._save(final, partial, state, model_state, engine)
        except StorageError:
            shutil.rmtree(partial, ignore_errors=True)  # give the space back; complete checkpoints stay
            raise

    def _save(
        self, final: Path, partial: Path, state: TrainState, model_state: dict[str, torch.Tensor] | None, engine: Any
    ) -> Path:

        if self.rank == 0:
            for stale in self.root.glob(".partial-*"):
                shutil.rmtree(stale, ignore_errors=True)
            partial.mkdir(parents=True)
        self.barrier()
        if engine is not None:
            engine.save_state(partial)
        torch.save(rng_state(), partial / f"rng-rank{self.rank}.pt")
        if self.rank == 0:
            assert model_state is not None  # rank 0 holds the gathered state
            save_file(model_state, str(partial / "model.safetensors"), metadata={"format": "pt"})
            faults.maybe_kill("checkpoint", state.global_step)
            (partial / "state.json").write_text(json.dumps(asdict(state), indent=2) + "\n")
        self.barrier()
        if self.rank == 0:
            if final.exists():  # a checkpoint of the same step (resumed run reaching it again)
                shutil.rmtree(final)
            partial.rename(final)
            self._prune()
        self.barrier()
        return final

    def _prune(self) -> None:
        found = sorted(self.root.glob(f"{PREFIX}*"), key=lambda p: int(p.name[len(PREFIX) :]))
        for old in found[: max(0, len(found) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)


def load_model_state(folder: Path, model: torch.nn.Module) -> None:
    """The checkpoint's weights (a truncated or corrupt file is an error naming it and the way out)."""

    path = folder / "model.safetensors"
    try:
        load_model(model, str(path), strict=True)  # re-ties what was saved once
    except (SafetensorError, OSError) as err:
        raise ConfigError(
            f"{path}: not a readable safetensors file ({err}); to resume from the checkpoint before "
            f"it, move {folder} out of the way and launch again"
        ) from None


def load_rng(folder: Path, rank: int) -> None:
    path = folder / f"rng-rank{rank}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no RNG state for rank {rank}: was it written by a run with fewer ranks?")
    set_rng_state(torch.load(path, weights_only=False))
