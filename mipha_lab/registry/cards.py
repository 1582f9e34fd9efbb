"""Component cards: small YAML files that carry everything needed to build a component offline.

Cards live in folders laid out by kind (`vision/`, `llm/`, later `mixtures/`, `benchmarks/`); the
file stem is the card's name. The built-in folder is the repository's top-level `registry/` (shipped
inside the wheel as `mipha_lab/_cards`); users add folders with MIPHA_LAB_CARDS (os.pathsep
separated) or `add_card_dir`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, model_validator
from typing_extensions import Self

from mipha_lab.errors import ConfigError
from mipha_lab.validation import StrictModel, load_yaml, validate

CARDS_ENV = "MIPHA_LAB_CARDS"


class Card(StrictModel):
    """Fields every card has."""

    description: str
    _name: str = PrivateAttr("")
    _source: str = PrivateAttr("<python>")

    @property
    def name(self) -> str:
        return self._name

    @property
    def source(self) -> str:
        """The file the card was read from (or `<python>`), for error messages."""
        return self._source

    def named(self, name: str, source: str = "<python>") -> Self:
        self._name, self._source = name, source
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class ImageSpec(StrictModel):
    """The preprocessing of the encoder's own processor, as the original PIL pipelines do it."""

    resize: Literal["square", "shortest_edge"]
    resize_size: int
    crop_size: int | None = None
    resample: Literal["bicubic", "bilinear", "nearest", "lanczos"] = "bicubic"
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def size(self) -> int:
        """Side of the square tensor handed to the tower."""
        return self.crop_size or self.resize_size

    @property
    def fill_color(self) -> tuple[int, int, int]:
        """Background of the `pad` strategy: the mean colour, truncated as the original does."""
        r, g, b = (int(m * 255) for m in self.mean)
        return (r, g, b)


class FeatureSpec(StrictModel):
    """Which hidden layer of the tower is taken, and whether its prefix tokens (CLS) are kept."""

    layer: int = -2
    select: Literal["patch", "cls_patch"] = "patch"


class VisionCard(Card):
    """A vision tower: its library, architecture, hub weights, preprocessing and feature selection."""

    builder: str
    hub_id: str | None
    architecture: dict[str, Any]
    image: ImageSpec
    features: FeatureSpec = FeatureSpec()


class SubTower(StrictModel):
    """One tower of a fused encoder: a vision card (its name, or the card itself once the model is built, as
    config.json keeps it) and, optionally, another input side (its position embeddings are interpolated)."""

    card: str | VisionCard
    image_size: int | None = None


class FusedVisionCard(Card):
    """Several vision towers on the same image, their patch features concatenated channel-wise (Prismatic's
    DINOv2 + SigLIP). Each tower keeps its own preprocessing and feature layer. Towers whose grids differ
    are an error (`grid: equal`), or average-pooled to the smallest grid (`grid: pool`)."""

    builder: Literal["fused"]
    towers: dict[str, SubTower]
    grid: Literal["equal", "pool"] = "equal"


class SpecialTokens(StrictModel):
    """The special tokens a language model's template relies on."""

    bos: str | None = None
    eos: str
    pad: str | None = None


class LLMCard(Card):
    """A language model: its architecture, hub weights, tokenizer, template and embedding scale."""

    builder: str = "transformers"
    hub_id: str | None
    architecture: dict[str, Any]
    tokenizer: str
    template: str
    special_tokens: SpecialTokens
    # what the LM multiplies its input embeddings by (Gemma: sqrt_hidden_size); image features get the same
    # factor, whichever transformers version applies it (mipha_lab/model/embedding_scale.py)
    embedding_scale: Literal["none", "sqrt_hidden_size"] = "none"


class FirstN(StrictModel):
    """Take the first N samples of a source."""

    first: int


class RandomN(StrictModel):
    """Take N samples of a source at random (seeded)."""

    random: int


class Weight(StrictModel):
    """Take a source with a weight relative to the others."""

    weight: float  # epoch size = weight x source size (random subset below 1, repeats above)


class SourceStats(StrictModel):
    """Declared figures of a source, so a run can be planned (`launch --dry-run`) without its data."""

    samples: int
    image_fraction: float = 1.0  # samples with an image
    text_tokens: float  # mean text tokens per sample, template included
    supervised_tokens: float  # mean tokens that carry a loss


class ColumnFilter(StrictModel):
    """Keep a sample when its column compares true with `value`; a list column (FineVision's per-turn
    ratings) must compare true in every element."""

    column: str
    op: Literal[">=", ">", "<=", "<", "==", "!="]
    value: float | str


class SourceSpec(StrictModel):
    """One source of a mixture; paths are relative to the data root given at launch (URLs stay URLs).

    `kind` says how it is stored: `llava` (a JSON / JSONL file of conversations plus an image folder),
    `hf` (a Hugging Face dataset: a `save_to_disk` folder or parquet / arrow files by glob) or
    `webdataset` (tar shards by brace pattern)."""

    name: str
    kind: Literal["llava", "hf", "webdataset"] = "llava"
    annotations: str | None = None  # llava: the annotation file
    images: str | None = None  # llava: the image folder; hf: the folder stored image paths are relative to
    path: str | None = None  # hf: folder or glob; webdataset: shard pattern (local or fsspec URL)
    format: Literal["llava", "cauldron"] = "llava"  # hf: which columns hold the conversation (hf_source.py)
    columns: dict[str, str] = Field(
        default_factory=dict
    )  # hf: our column name -> the dataset's (conversations, image, images, texts, id)
    sample: Literal["all"] | FirstN | RandomN | Weight = "all"
    where: list[ColumnFilter] = Field(default_factory=list)  # every filter must hold (applied before `sample`)
    cap: int | None = Field(default=None, gt=0)  # at most this many samples (a seeded random subset)
    stream: bool = False  # hf / webdataset: read front to back through a shuffle buffer (data/streaming.py)
    stats: SourceStats | None = None

    @model_validator(mode="after")
    def _located(self) -> Self:
        needed = "annotations" if self.kind == "llava" else "path"
        if getattr(self, needed) is None:
            raise ValueError(f"source '{self.name}' of kind {self.kind} needs `{needed}`")
        if self.stream and (self.kind == "llava" or self.where or self.sample != "all"):
            raise ValueError(
                f"source '{self.name}': a streamed source is a Hugging Face dataset or shards, with `cap` but no "
                "`where` or `sample` rule (those need the index a stream does not build)"
            )
        return self


class MixtureCard(Card):
    """Training data: its sources (annotation files and image folders) and how each is sampled."""

    sources: list[SourceSpec]
    generate: Literal["shapes"] | None = None  # synthetic data written into the data root on first use
    url: str | None = None  # where the real data comes from (for error messages)


CARD_SCHEMAS: dict[str, type[Card]] = {"vision": VisionCard, "llm": LLMCard, "mixtures": MixtureCard}


def builtin_card_dir() -> Path:
    package = Path(__file__).resolve().parents[1]
    shipped = package / "_cards"
    return shipped if shipped.is_dir() else package.parent / "registry"


_extra_dirs: list[Path] = []


def card_dirs() -> list[Path]:
    """Built-in folder first, then MIPHA_LAB_CARDS, then folders added in code (later ones win)."""
    from_env = [Path(p) for p in os.environ.get(CARDS_ENV, "").split(os.pathsep) if p]
    return [builtin_card_dir(), *from_env, *_extra_dirs]


def card_schema(kind: str, raw: Any) -> type[Card]:
    """The schema of a card of this kind: a vision card with `builder: fused` composes other vision cards."""
    if kind == "vision" and isinstance(raw, dict) and raw.get("builder") == "fused":
        return FusedVisionCard
    return CARD_SCHEMAS[kind]


def read_card(path: str | Path, kind: str) -> Card:
    """Read and validate one card file; errors name the file and the field."""
    path = Path(path)
    raw = load_yaml(path)
    card = validate(card_schema(kind, raw), raw, source=path)
    return card.named(path.stem, str(path))


def iter_card_files(kind: str, dirs: list[Path] | None = None) -> list[Path]:
    files: list[Path] = []
    for folder in dirs if dirs is not None else card_dirs():
        files += sorted((folder / kind).glob("*.yaml"))
    return files


def add_card_dir(path: str | Path) -> None:
    """Make the cards of another folder (with `vision/`, `llm/`... inside) available by name; registries
    read it on their next use, and its cards replace built-in ones of the same name."""
    folder = Path(path).resolve()
    if not folder.is_dir():
        raise ConfigError(f"card folder {folder} does not exist")
    if folder not in _extra_dirs:
        _extra_dirs.append(folder)
