"""Before a run trains in a folder: every input it needs is there (preflight), and the folder is new or
holds this very run - the same configuration on the same data (prepare_run, on the main rank under the
lock). A resume after a non-finite stop may change the optimizer's hyperparameters."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml
from huggingface_hub.constants import HF_HUB_CACHE

from mipha_lab.config import AFTER_NONFINITE, Experiment, config_differences
from mipha_lab.data.mixtures import MIXTURES, ensure_generated, identity_files, missing_inputs
from mipha_lab.errors import ConfigError
from mipha_lab.model.language import LLM
from mipha_lab.model.vision import VISION
from mipha_lab.runs.folder import RunFolder, file_digest, latest_checkpoint


def data_files(experiment: Experiment) -> list[Path]:
    root = Path(experiment.data_root)
    return [
        path
        for stage in experiment.stages
        for source in MIXTURES.get(stage.mixture).sources
        for path in identity_files(source, root)
    ]


def hub_available(repo: str) -> bool:
    """A local folder, a repository in the Hugging Face cache, or any repository while the hub is online."""
    if Path(repo).exists():
        return True
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes"):
        return True

    snapshots = Path(HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def preflight(experiment: Experiment) -> None:
    """Fail at once, before a run folder or a model exists, naming every missing input and its origin."""
    root, missing = Path(experiment.data_root), []
    for stage in experiment.stages:
        card = MIXTURES.get(stage.mixture)
        if card.generate:
            continue
        origin = f" (from {card.url})" if card.url else ""
        for source in card.sources:
            where = f"stage '{stage.name}', mixture '{stage.mixture}'"
            missing += [f"{where}: {what}{origin}" for what in missing_inputs(source, root)]
    if experiment.model.pretrained:
        llm = LLM.get(experiment.model.llm)
        vision = VISION.get(experiment.model.vision)  # a card, or a class registered in Python (no hub weights)
        wanted = [("vision weights", getattr(vision, "hub_id", None)), ("language-model weights", llm.hub_id)]
        if not llm.tokenizer.startswith("builtin:"):
            wanted.append(("tokenizer", llm.tokenizer))
        for what, repo in wanted:
            if repo and not hub_available(repo):
                missing.append(
                    f"{what} '{repo}': not in the Hugging Face cache and HF_HUB_OFFLINE is set "
                    f"(get them with `huggingface-cli download {repo}`, or point the card at a local folder)"
                )
    if missing:
        raise ConfigError(
            f"{experiment.source or experiment.run_name}: cannot start, missing:\n  - " + "\n  - ".join(missing)
        )


def prepare_run(
    run: RunFolder, experiment: Experiment, world_size: int, allow_changed_data: bool = False
) -> str | None:
    """On the main rank, holding the lock: a new folder is created; one holding this run resumes.
    Returns the state found ('done', 'failed', ...) or None for a new run."""
    state = (run.read_status() or {}).get("state")
    if state in ("failed", "running", "interrupted") and latest_checkpoint(run.path) is None and not run.metrics():
        # it stopped before its first step (a model or data error): nothing to lose, nothing to resume
        print(f"run folder {run.path} holds no trained step yet ({state}); starting it afresh", file=sys.stderr)
        state = None
    if state is None:
        for stage in experiment.stages:  # synthetic data is written before its files are hashed
            ensure_generated(MIXTURES.get(stage.mixture), Path(experiment.data_root))
        run.create(experiment, data_files(experiment), world_size)
        run.status("running", stage=experiment.stages[0].name, step=0, total_steps=None)
        return None
    check_same_configuration(
        run, experiment, after_nonfinite=state == "failed" and (run.path / "nonfinite.json").is_file()
    )
    if state != "done":
        check_same_data(run, experiment, allow_changed_data)
    return state


def check_same_configuration(run: RunFolder, experiment: Experiment, after_nonfinite: bool) -> None:
    """A resume continues the same experiment; after a non-finite stop the optimizer's hyperparameters may
    change (that is the advice), and the folder's config.yaml then records the new values."""

    stored = yaml.safe_load((run.path / "config.yaml").read_text())
    changed = config_differences(stored, experiment.model_dump(mode="json"))
    allowed = [key for key in changed if after_nonfinite and AFTER_NONFINITE.fullmatch(key)]
    refused = [key for key in changed if key not in allowed]
    if refused:
        hint = f" (after a non-finite stop these may change: {AFTER_NONFINITE.pattern})" if after_nonfinite else ""
        raise ConfigError(
            f"run folder {run.path} holds a run of another configuration (differs in: {', '.join(refused)}){hint}; "
            "resuming would mix two experiments - choose another run_name=... or remove the folder"
        )
    if allowed:
        print(f"resuming after the non-finite stop with changed {', '.join(allowed)}", file=sys.stderr)
        run.write_config(experiment)


def check_same_data(run: RunFolder, experiment: Experiment, allow_changed_data: bool) -> None:
    """The annotation files a run trains on are those it started with (sha256 in manifest.json), unless
    the user says otherwise."""
    recorded = (run.read_json("manifest.json") or {}).get("data_files", [])
    current = [file_digest(p) if p.is_file() else {"path": str(p), "sha256": None} for p in data_files(experiment)]
    changed = [
        f"{now['path']} (was {was['path']})" if was["path"] != now["path"] else now["path"]
        for was, now in zip(recorded, current, strict=False)
        if was["sha256"] != now["sha256"]
    ]
    if len(recorded) != len(current):
        changed.append(f"the list of annotation files ({len(recorded)} recorded, {len(current)} now)")
    if not changed:
        return
    if not allow_changed_data:
        raise ConfigError(
            f"run folder {run.path}: the training data changed since the run started (sha256 in "
            f"manifest.json): {'; '.join(changed)}. Resuming would train on other data than the steps "
            "so far; restore the files, or launch with --allow-changed-data to resume anyway"
        )
    print(f"resuming on changed data (--allow-changed-data): {'; '.join(changed)}", file=sys.stderr)
    run.record_data(data_files(experiment))
