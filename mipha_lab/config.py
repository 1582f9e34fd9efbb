"""Experiment files: a typed schema, `extends` (deep merge) and `key.sub=value` overrides.

Merging rules: mappings merge key by key (the child wins); lists are replaced, except lists of
mappings that all have a `name` (the stages), which merge item by item by name - so a study cell
can change one field of one stage in a few lines. Override paths may address a stage by its name
(`stages.finetune.optimizer.lr=1e-5`) or by index; values are parsed as YAML scalars.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, Field, field_validator, model_validator
from typing_extensions import Self

from mipha_lab.constants import MAX_IMAGE_PIXELS
from mipha_lab.errors import ConfigError
from mipha_lab.registry.user_modules import import_modules
from mipha_lab.validation import StrictModel, load_yaml, validate

if TYPE_CHECKING:  # the policies' apply() sets flags on torch parameters; the schema needs no torch
    from torch import nn

    NamedParams = Sequence[tuple[str, nn.Parameter]]
MODULES = ("vision", "projector", "lm_body", "lm_embeddings", "lm_head")


LLAVA_NEXT_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))  # LLaVA-NeXT's image_grid_pinpoints, in tiles


class AnyresTiling(StrictModel):
    """LLaVA-NeXT's any-resolution tiling: the image on the grid of tiles that keeps the most of it, each tile
    and the whole image through the encoder, a learned newline after each row (model/tiling.py)."""

    kind: Literal["anyres"] = "anyres"
    # the allowed grids as (rows, columns) of encoder-sized tiles: the visual-token budget
    grids: list[tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]] = Field(
        default_factory=lambda: list(LLAVA_NEXT_GRIDS), min_length=1
    )

    @property
    def max_tiles(self) -> int:
        return max(rows * columns for rows, columns in self.grids)


class SplitTiling(StrictModel):
    """Idefics3 / SmolVLM image splitting: the image resized so its longest edge is `max_side` tiles (then up
    to whole tiles), cut into tiles framed by row/column text markers, plus the whole image as one tile."""

    kind: Literal["split"] = "split"
    max_side: int = Field(4, ge=1)  # the longest edge in tiles: at most max_side^2 tiles + the global view

    @property
    def max_tiles(self) -> int:
        return self.max_side**2


Tiling = Annotated[AnyresTiling | SplitTiling, Field(discriminator="kind")]


class ModelConfig(StrictModel):
    """Which components the model is built from, and how (feature layer, resolution, attention, weights)."""

    vision: str
    projector: str = "mlp2x_gelu"
    projector_args: dict[str, Any] = Field(default_factory=dict)
    llm: str
    feature_layer: int | None = None
    feature_select: Literal["patch", "cls_patch"] | None = None
    # the encoder's input side when it differs from its card's (the resolution axis): the image is
    # resized to it and position embeddings are interpolated (bicubic; DINOv2 always interpolates)
    image_size: int | None = Field(None, ge=8)
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    pretrained: bool = True  # load the cards' hub weights (tiny cards have none: random init)
    max_positions: int | None = None
    card_dirs: list[str] = Field(default_factory=list)
    tiling: Tiling | None = None  # high resolution by tiles (`anyres` or `split`); none: one square image


class _Policy(StrictModel):
    """What every trainability mode has: an optional learning rate of the module's own."""

    lr: float | None = Field(None, ge=0, allow_inf_nan=False)  # absolute learning rate of this module
    lr_scale: float | None = Field(None, ge=0, allow_inf_nan=False)  # or a multiplier of the stage's learning rate

    @model_validator(mode="after")
    def _one_rate(self) -> Self:
        if self.lr is not None and self.lr_scale is not None:
            raise ValueError("give lr or lr_scale, not both")
        return self


class Frozen(_Policy):
    """Nothing of the module trains."""

    mode: Literal["frozen"] = "frozen"

    @property
    def label(self) -> str:
        return "frozen"

    def apply(self, params: NamedParams, layers: Callable[[], Sequence[nn.Module]]) -> None:
        for _, param in params:
            param.requires_grad = False


class Full(_Policy):
    """Every parameter of the module trains."""

    mode: Literal["full"] = "full"

    @property
    def label(self) -> str:
        return "full"

    def apply(self, params: NamedParams, layers: Callable[[], Sequence[nn.Module]]) -> None:
        for _, param in params:
            param.requires_grad = True


class Lora(_Policy):
    """Low-rank adapters on the module's linear layers train (injected before apply); its weights stay."""

    mode: Literal["lora"] = "lora"
    r: int = Field(64, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"

    @property
    def label(self) -> str:
        return f"lora r={self.r} alpha={self.alpha}"

    def apply(self, params: NamedParams, layers: Callable[[], Sequence[nn.Module]]) -> None:
        for name, param in params:
            param.requires_grad = "lora_" in name


class Partial(_Policy):
    """The module's repeated layers from `from_layer` on train; the layers before, and the rest, do not."""

    mode: Literal["partial"] = "partial"
    from_layer: int = Field(ge=0)

    @property
    def label(self) -> str:
        return f"partial from layer {self.from_layer}"

    def apply(self, params: NamedParams, layers: Callable[[], Sequence[nn.Module]]) -> None:
        for _, param in params:
            param.requires_grad = False
        blocks = list(layers())
        if self.from_layer >= len(blocks):
            raise ConfigError(f"from_layer {self.from_layer} is outside the module's layers 0..{len(blocks) - 1}")
        for layer in blocks[self.from_layer :]:
            layer.requires_grad_(True)


def _policy_shorthand(value: Any) -> Any:
    """A bare string names the mode; a mapping without `mode` is frozen."""
    if isinstance(value, str):
        return {"mode": value}
    if isinstance(value, dict) and "mode" not in value:
        return {**value, "mode": "frozen"}
    return value


# How one module trains in a stage: `frozen`, `full`, `lora` or `partial`, each with its own fields.
ModulePolicy = Annotated[
    Frozen | Full | Lora | Partial, Field(discriminator="mode"), BeforeValidator(_policy_shorthand)
]


class Trainable(StrictModel):
    """How each of the five modules trains in a stage; a fused vision encoder's towers may each have their
    own policy, written `vision.<tower>: frozen` (they override `vision` for that tower)."""

    vision: ModulePolicy = Frozen()
    projector: ModulePolicy = Full()
    lm_body: ModulePolicy = Frozen()
    lm_embeddings: ModulePolicy = Frozen()
    lm_head: ModulePolicy = Frozen()
    vision_towers: dict[str, ModulePolicy] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _tower_keys(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        towers = {key.removeprefix("vision."): v for key, v in value.items() if key.startswith("vision.")}
        if not towers:
            return value
        rest = {key: v for key, v in value.items() if not key.startswith("vision.")}
        return {**rest, "vision_towers": {**rest.get("vision_towers", {}), **towers}}


class OptimizerConfig(StrictModel):
    """AdamW's settings and the gradient clipping of a stage."""

    lr: float = Field(ge=0, allow_inf_nan=False)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    max_grad_norm: float | None = Field(1.0, gt=0, allow_inf_nan=False)


class ScheduleConfig(StrictModel):
    """The learning-rate schedule of a stage: warm-up, then cosine, linear or constant."""

    kind: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, le=1)


class CheckpointingConfig(StrictModel):
    """Activation checkpointing per module (recomputation trades compute for memory). The LM's is all or
    part of each decoder layer: `true` (the whole layer), `attention` or `mlp` (that sub-block only), or
    `auto`: the least recomputation whose estimated peak memory fits `memory_budget_gib` (default: 90% of
    the GPU's memory; none on the CPU, where memory is not the limit)."""

    vision: bool = False
    lm: bool | Literal["attention", "mlp", "auto"] = False
    memory_budget_gib: float | None = Field(None, gt=0)


class CompileConfig(StrictModel):
    """Regional `torch.compile`: the MLP of every LM decoder layer and of every vision block, compiled
    once for any number of tokens; attention stays on its fused kernel (packed rows included)."""

    lm: bool = False
    vision: bool = False


class SpeedConfig(StrictModel):
    """Performance levers of a stage; none changes what is computed (each is tested against the plain path)."""

    compile: CompileConfig = CompileConfig()
    # the head and cross-entropy without all supervised logits at once: `chunked` (any device), `liger`
    # (Liger-Kernel's fused linear + cross-entropy, CUDA)
    fused_loss: Literal["off", "chunked", "liger"] = "off"
    fused_optimizer: bool | None = None  # AdamW's fused kernel (default: on GPUs)

    @field_validator("fused_loss", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML reads a bare `off` as false."""
        return "off" if value is False else value


class QuirksConfig(StrictModel):
    """Behaviours of the original that changed what the released models learned (mipha-reference.md
    section 10, by number); all off by default, which is the corrected behaviour."""

    stage1_trains_lm_head: bool = False  # 1: a stage with the LM body frozen still trains an untied head
    shared_learning_rate: bool = False  # 2: per-module learning rates are ignored (mm_projector_lr never applied)
    no_truncation_after_splice: bool = False  # 3: spliced sequences may exceed the model's positions
    mask_first_answer_token: bool = False  # 5: the off-by-one that masked each answer's first token


class CheckpointConfig(StrictModel):
    """When to write resumable checkpoints to <run>/checkpoints/ (also at the end of every stage)."""

    every_steps: int | None = Field(None, gt=0)
    every_minutes: float | None = 30.0
    keep_last: int = Field(2, ge=1)


class StageConfig(StrictModel):
    """One training stage: its data, template, batching, trainable modules, optimizer and length."""

    name: str
    mixture: str
    template: str
    image_strategy: Literal["square", "pad", "resize-naive", "resize-crop"] = "square"
    max_length: int = Field(2048, gt=0)
    batching: Literal["padded", "modality-grouped", "packed"] = "padded"
    max_images_per_row: int | None = Field(None, gt=0)  # packed: at most this many images in one packed row
    loss_reduction: Literal["token", "sample", "square"] = "token"  # token losses weighted 1, 1/n, 1/sqrt(n)
    global_batch: int = Field(gt=0)
    micro_batch: int = Field(gt=0)
    epochs: float | None = Field(1.0, gt=0, allow_inf_nan=False)
    max_steps: int | None = Field(None, gt=0)
    optimizer: OptimizerConfig
    schedule: ScheduleConfig = ScheduleConfig()
    activation_checkpointing: CheckpointingConfig = CheckpointingConfig()
    speed: SpeedConfig = SpeedConfig()
    trainable: Trainable = Trainable()
    bad_samples: Literal["skip", "error"] = "skip"
    zero_stage: Literal[0, 1, 2, 3] | None = None  # this stage's ZeRO stage (default: engine.zero_stage)

    @model_validator(mode="after")
    def _check(self) -> StageConfig:
        if self.global_batch % self.micro_batch:
            raise ValueError(f"global_batch {self.global_batch} is not a multiple of micro_batch {self.micro_batch}")
        if self.epochs is None and self.max_steps is None:
            raise ValueError("give epochs or max_steps")
        if self.max_images_per_row is not None and self.batching != "packed":
            raise ValueError(f"max_images_per_row caps packed rows; this stage's batching is {self.batching}")
        return self


class EngineConfig(StrictModel):
    """Which engine trains (plain PyTorch or DeepSpeed ZeRO) and in which precision."""

    kind: Literal["auto", "torch", "deepspeed"] = "auto"  # auto: torch for 1 process, DeepSpeed for more
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPUs, fp32 on the CPU
    deterministic: bool = False


class HarnessConfig(StrictModel):
    """lmms-eval tasks run after training with the `mipha_lab` model (the lmms-eval extra)."""

    tasks: list[str] = Field(min_length=1)  # lmms-eval task names: mmstar, ai2d, ...
    include_path: str | None = None  # a folder of local task YAMLs (lmms-eval's --include_path)
    limit: int | None = Field(None, gt=0)  # only the first N documents of each task
    # tasks that are one of our benchmarks under another name (task -> benchmark), scored by our official
    # scorer from their sample logs too; lmms-eval's own pope, mme, gqa, ... are known already
    score_as: dict[str, str] = Field(default_factory=dict)


class EvalConfig(StrictModel):
    """The benchmarks a run is evaluated on after training, and how."""

    benchmarks: list[str] = Field(default_factory=list)
    harness: HarnessConfig | None = None  # lmms-eval's tasks, beside ours (eval/harness.py)
    batch_size: int = Field(16, gt=0)
    max_new_tokens: int | None = None  # default: each benchmark's own
    image_strategy: Literal["square", "pad", "resize-naive", "resize-crop"] = "pad"
    separate_job: bool = False  # on a cluster: evaluate final/ in its own job, run after training succeeds


class TrackingConfig(StrictModel):
    """Where training is logged (wandb, offline by default)."""

    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "mipha-lab"
    group: str | None = None
    tags: list[str] = Field(default_factory=list)


class ResourcesConfig(StrictModel):
    """What one run asks of a cluster; unset fields come from the cluster profile (slurm/*.yaml)."""

    nodes: int | None = Field(None, ge=1)
    gpus_per_node: int | None = Field(None, ge=0)
    tasks_per_node: int | None = Field(None, ge=1)
    time_min: int | None = Field(None, ge=1)
    mem_gb: float | None = Field(None, gt=0)


class SweepConfig(StrictModel):
    """Cells of a study: the cartesian product of `grid`, times the parallel lists of `zip`, times
    `seeds`. Keys are override paths (`stages.instruct.optimizer.lr`)."""

    name: str | None = None  # default: the experiment's run name; cells live in runs_root/<name>/
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    zip: dict[str, list[Any]] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=list)
    max_concurrent: int | None = Field(None, ge=1)  # tasks of one job array running at once

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        empty = [key for key, values in {**self.grid, **self.zip}.items() if not values]
        if empty:
            raise ValueError(f"swept keys need at least one value: {empty}")
        lengths = {key: len(values) for key, values in self.zip.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"zip lists must have the same length, got {lengths}")
        both = set(self.grid) & set(self.zip)
        if both or ("seed" in {**self.grid, **self.zip} and self.seeds):
            raise ValueError(f"a key is swept twice: {sorted(both) or ['seed']}")
        return self


class Experiment(StrictModel):
    """An experiment file, resolved: the model, its stages, engine, evaluation and where runs go."""

    imports: list[str] = Field(default_factory=list)  # modules registering your own components, imported first
    model: ModelConfig
    stages: list[StageConfig]
    engine: EngineConfig = EngineConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    quirks: QuirksConfig = QuirksConfig()
    resources: ResourcesConfig = ResourcesConfig()
    sweep: SweepConfig | None = None
    seed: int = 0
    data_root: str = "./data"
    data_workers: int = 0  # DataLoader worker processes per rank
    # keep each loaded sample (tokens and pixels) in memory up to this size, so later epochs skip decoding,
    # preprocessing and tokenizing it again (per process: each data worker holds its own)
    data_cache_mb: int = Field(0, ge=0)
    pin_memory: bool | None = None  # page-locked batches, copied to the GPU without blocking (default: on GPUs)
    # images with more pixels are skipped (reason image_too_large) before decoding; PIL's bomb guard by default
    max_image_pixels: int | None = Field(MAX_IMAGE_PIXELS, gt=0)
    runs_root: str = "./runs"
    run_name: str | None = None
    extends_chain: list[str] = Field(default_factory=list)  # filled by the loader
    source: str | None = None

    @field_validator("stages")
    @classmethod
    def _unique_stage_names(cls, stages: list[StageConfig]) -> list[StageConfig]:
        names = [s.name for s in stages]
        if not stages or len(set(names)) != len(names):
            raise ValueError(f"stages need at least one entry and unique names, got {names}")
        return stages

    def stage(self, name: str) -> StageConfig:
        return next(s for s in self.stages if s.name == name)

    def zero_stage(self, stage: StageConfig) -> int:
        return self.engine.zero_stage if stage.zero_stage is None else stage.zero_stage


def _named_list(value: Any) -> bool:
    return isinstance(value, list) and value != [] and all(isinstance(v, dict) and "name" in v for v in value)


def deep_merge(base: Any, child: Any) -> Any:
    if isinstance(base, dict) and isinstance(child, dict):
        merged = dict(base)
        for key, value in child.items():
            merged[key] = deep_merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    if _named_list(base) and _named_list(child):
        children = {c["name"]: c for c in child}
        items = [deep_merge(b, children[b["name"]]) if b["name"] in children else copy.deepcopy(b) for b in base]
        known = {b["name"] for b in base}
        return items + [copy.deepcopy(c) for c in child if c["name"] not in known]
    return copy.deepcopy(child)


def _resolve_file(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], list[str]]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: `extends` forms a cycle ({' -> '.join(map(str, (*seen, path)))})")
    data = load_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data, [str(path)]
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: key 'extends' must be a path to another experiment file")
    parent_path = (path.parent / parent) if not Path(parent).is_absolute() else Path(parent)
    if not parent_path.is_file():
        raise ConfigError(f"{path}: extends {parent!r}, but {parent_path} does not exist")
    base, chain = _resolve_file(parent_path, (*seen, path))
    return deep_merge(base, data), [*chain, str(path)]


def apply_override(data: dict[str, Any], override: str, source: str = "command line") -> None:
    """`key.sub=value`; list items by index or, for named lists, by name."""
    if "=" not in override:
        raise ConfigError(f"{source}: override {override!r} must look like key.sub=value")
    path, raw = override.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    keys = path.split(".")
    node: Any = data
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            index = next((i for i, item in enumerate(node) if isinstance(item, dict) and item.get("name") == key), None)
            if index is None and key.lstrip("-").isdigit():
                index = int(key)
            if index is None or not -len(node) <= index < len(node):
                names = [item.get("name") for item in node if isinstance(item, dict)]
                raise ConfigError(f"{source}: {'.'.join(keys[: depth + 1])} names no item (items: {names})")
            if last:
                node[index] = value
            node = node[index]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise ConfigError(f"{source}: cannot set {path}: {'.'.join(keys[:depth])} is a {type(node).__name__}")


class Scale(StrictModel):
    """A scale file (`experiments/scales/tiny.yaml`): the same experiment structure at another size.
    `experiment` is merged onto the file before any override; then every vision and language-model
    card is replaced by its sibling `<components><name>` and the values listed in `map` are replaced
    (`{key path: {value: new value}}`), after overrides and sweeps, so each cell keeps its identity."""

    components: str | None = None
    map: dict[str, dict[Any, Any]] = Field(default_factory=dict)
    experiment: dict[str, Any] = Field(default_factory=dict)
    name: str = "scale"


def load_scale(spec: str | Path) -> Scale:
    """A scale by name (experiments/scales/NAME.yaml, also shipped in the package) or by path."""
    path = Path(spec)
    if not path.is_file():
        package = Path(__file__).resolve().parent
        found = [d / "scales" / f"{spec}.yaml" for d in (package / "_experiments", package.parent / "experiments")]
        path = next((p for p in found if p.is_file()), found[-1])
    data = load_yaml(path)
    data.setdefault("name", path.stem)
    return validate(Scale, data, path)


def get_path(data: Any, path: str) -> Any:
    """The value at `key.sub` (list items by name or index), or None where the path does not exist."""
    node = data
    for key in path.split("."):
        if isinstance(node, list):
            node = (
                next((i for i in node if isinstance(i, dict) and i.get("name") == key), None)
                if not key.isdigit()
                else (node[int(key)] if int(key) < len(node) else None)
            )
        elif isinstance(node, dict):
            node = node.get(key)
        else:
            return None
    return node


def _finish_scale(data: dict[str, Any], scale: Scale) -> None:
    model = data.get("model", {})
    if scale.components:
        for key in ("vision", "llm"):
            if isinstance(model.get(key), str) and not model[key].startswith(scale.components):
                model[key] = scale.components + model[key]
    for path, values in scale.map.items():
        current = get_path(data, path)
        if current is not None and current in values:
            apply_override(data, f"{path}={json.dumps(values[current])}", f"scale '{scale.name}'")


def load_experiment(path: str | Path, overrides: list[str] | None = None, scale: Scale | None = None) -> Experiment:
    """Read, resolve `extends`, apply the scale and the overrides, validate. Errors name the file and the key path."""
    path = Path(path)
    data, chain = _resolve_file(path)
    if scale is not None:
        data = deep_merge(data, scale.experiment)
    for override in overrides or []:
        apply_override(data, override)
    if scale is not None:
        _finish_scale(data, scale)
    data.setdefault("run_name", path.stem)
    if len(chain) > 1 or "extends_chain" not in data:  # a resolved config.yaml keeps the chain it records
        data["extends_chain"] = chain
        data["source"] = str(path.resolve())
    where = str(path) + (f" (extends {' <- '.join(chain[:-1])})" if len(chain) > 1 else "")
    if overrides:
        where += f" with overrides {overrides}"
    experiment = validate(Experiment, data, where)
    import_modules(experiment.imports, f"{where}: key 'imports'")  # before any component name is resolved
    return experiment


def dump_experiment(experiment: Experiment) -> str:
    return yaml.safe_dump(experiment.model_dump(mode="json"), sort_keys=False)


# what a resume after a non-finite stop may change (the advice names these keys)
AFTER_NONFINITE = re.compile(
    r"stages\.[^.]+\.(optimizer\.(lr|eps|betas|weight_decay|max_grad_norm)|schedule\.warmup_ratio)(\.\d+)?"
)
IGNORED_ON_RESUME = (
    "eval",
    "tracking",
    "resources",
    "data_workers",
    "data_cache_mb",
    "extends_chain",
    "source",
    "runs_root",
    "data_root",
)


def config_differences(
    stored: Any, current: Any, ignored: tuple[str, ...] = IGNORED_ON_RESUME, prefix: str = ""
) -> list[str]:
    """Key paths whose values differ between two resolved configs, top-level keys in `ignored` left out
    (by default what a resume may change). Stages are named by their names."""
    if isinstance(stored, dict) and isinstance(current, dict):
        return [
            d
            for key in sorted(set(stored) | set(current))
            if not (not prefix and key in ignored)
            for d in config_differences(stored.get(key), current.get(key), ignored, f"{prefix}{key}.")
        ]
    if isinstance(stored, list) and isinstance(current, list) and len(stored) == len(current):
        return [
            d
            for i, (a, b) in enumerate(zip(stored, current, strict=True))
            for d in config_differences(a, b, ignored, f"{prefix}{a.get('name', i) if isinstance(a, dict) else i}.")
        ]
    return [] if stored == current else [prefix.rstrip(".")]
