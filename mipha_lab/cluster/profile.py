"""Cluster profiles (`slurm/*.yaml`): where and how jobs run. `local` is built in (submitit's local
executor, for machines without Slurm). slurm/example-8xgpu.yaml documents every field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from mipha_lab.config import ResourcesConfig
from mipha_lab.validation import StrictModel, load_yaml, validate

CACHE_VARIABLES = ("HF_HOME", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR", "WANDB_CACHE_DIR")


class ClusterProfile(StrictModel):
    """A cluster as a YAML file describes it: partition, account, resources per shape, caches, environment."""

    executor: Literal["slurm", "local"] = "slurm"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    tasks_per_node: int | None = Field(None, ge=1)  # default: one task per GPU (one on a CPU node)
    cpus_per_task: int | None = Field(None, ge=1)
    mem_gb: float | None = Field(None, gt=0)
    time_min: int = Field(60, ge=1)
    constraint: str | None = None
    exclusive: bool = False
    sbatch: dict[str, Any] = Field(default_factory=dict)  # more `#SBATCH --key=value` lines
    setup: list[str] = Field(default_factory=list)  # shell lines run before the job (module load, activate)
    env: dict[str, str] = Field(default_factory=dict)
    scratch_dir: str | None = None  # TMPDIR of the job
    cache_dir: str | None = None  # Hugging Face, torch-extension, Triton and wandb caches
    signal_delay_s: int = Field(120, ge=0)  # how long before the time limit the job is told to checkpoint
    max_requeues: int = Field(3, ge=0)  # time-limit requeues of one job (preemptions do not count)
    max_concurrent: int | None = Field(None, ge=1)  # tasks of one job array running at once
    name: str = "slurm"

    def shape(self, resources: ResourcesConfig) -> Shape:
        """The resources of one run: its own `resources:` block over this profile's defaults."""
        gpus = self.gpus_per_node if resources.gpus_per_node is None else resources.gpus_per_node
        tasks = resources.tasks_per_node or self.tasks_per_node or max(gpus, 1)
        return Shape(
            nodes=resources.nodes or self.nodes,
            gpus_per_node=gpus,
            tasks_per_node=tasks,
            time_min=resources.time_min or self.time_min,
            mem_gb=resources.mem_gb or self.mem_gb,
        )

    def job_environment(self) -> dict[str, str]:
        """Variables a job sets before it imports anything heavy."""
        env = dict(self.env)
        if self.scratch_dir:
            env["TMPDIR"] = self.scratch_dir
        if self.cache_dir:
            for variable, sub in zip(CACHE_VARIABLES, ("hf", "torch_extensions", "triton", "wandb"), strict=True):
                env.setdefault(variable, str(Path(self.cache_dir) / sub))
        return env


class Shape(StrictModel):
    """What a job asks for; runs with the same shape share one job array."""

    nodes: int
    gpus_per_node: int
    tasks_per_node: int
    time_min: int
    mem_gb: float | None

    def describe(self) -> str:
        gpus = f"{self.gpus_per_node} GPU(s), " if self.gpus_per_node else ""
        return f"{self.nodes} node(s) x {self.tasks_per_node} task(s), {gpus}{self.time_min} min"


LOCAL = ClusterProfile(executor="local", name="local")


def load_profile(spec: str | Path) -> ClusterProfile:
    """`local`, or a profile file; errors name the file and the key."""
    if str(spec) == "local":
        return LOCAL
    path = Path(spec)
    data = load_yaml(path)
    data.setdefault("name", path.stem)
    return validate(ClusterProfile, data, str(path))
