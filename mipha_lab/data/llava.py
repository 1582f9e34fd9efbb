"""LLaVA-format datasets: JSON or JSONL conversations with an image root, loaded lazily.

A record is `{"id", "image": str | [str, ...] | absent, "conversations": [{"from": "human" | "gpt",
"value"}...]}`. With one image, `<image>` is moved to the start of its turn as `<image>\\n<text>` (the
original's behaviour); with several, the tags stay where they are (interleaved). Tag and image counts
must agree. Bad samples follow the run's policy (`skip`: counted and reported; `error`: raised).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image, UnidentifiedImageError

from mipha_lab.constants import IMAGE_TOKEN, MAX_IMAGE_PIXELS
from mipha_lab.data.batching import sample_item
from mipha_lab.data.image_blobs import ArrowCell, Blob, TarMember, image_source
from mipha_lab.data.image_files import ImageTooLarge, open_rgb
from mipha_lab.data.image_placement import header_size, image_markup, placeholders
from mipha_lab.data.problems import BadSamplePolicy, SampleError, Skipped
from mipha_lab.data.templates import MaskError, Template, check_tokenizer, encode
from mipha_lab.errors import ConfigError, InputError
from mipha_lab.model.image_layout import ImageLayout, TiledProcessor
from mipha_lab.model.image_processing import ImageProcessor, StackedProcessor
from mipha_lab.model.tiling import Size

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Record:
    """One annotation, before any image is opened."""

    sample_id: str
    images: tuple[str | Blob, ...]  # paths under `root`, or images inside shards / dataset tables
    messages: tuple[dict[str, str], ...]
    words: int  # whitespace word count of all turns: the original's cheap length
    root: str = ""  # the folder image paths are relative to

    @property
    def has_image(self) -> bool:
        return bool(self.images)


def _bad_line(data: bytes, err: UnicodeDecodeError) -> int:
    return data.count(b"\n", 0, err.start) + 1


def _read_jsonl(path: Path, policy: BadSamplePolicy) -> tuple[list[Any], list[Skipped]]:
    records, skipped = [], []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                if policy == "error":
                    raise ConfigError(
                        f"{path}:{number}: not UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1})"
                    ) from None
                skipped.append(
                    Skipped(f"{path.name}:{number}", "bad_encoding", f"byte {raw[err.start]:#04x} is not UTF-8")
                )
                continue
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                if policy == "error":
                    raise ConfigError(f"{path}:{number}: not valid JSON ({err.msg})") from None
                skipped.append(Skipped(f"{path.name}:{number}", "bad_json", err.msg))
    return records, skipped


def _decode_json_list(path: Path, policy: BadSamplePolicy) -> tuple[str, list[Skipped]]:
    """The file's text; under `skip`, bytes that are not UTF-8 become U+FFFD and each such line is reported
    (the samples holding them are skipped by read_annotations)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8"), []
    except UnicodeDecodeError as err:
        if policy == "error":
            raise ConfigError(f"{path}:{_bad_line(data, err)}: not UTF-8 (byte {data[err.start]:#04x})") from None
    bad_lines = sorted(
        {
            number
            for number, line in enumerate(data.split(b"\n"), 1)
            if line.decode("utf-8", errors="replace") != line.decode("utf-8", errors="ignore")
        }
    )
    return data.decode("utf-8", errors="replace"), [
        Skipped(f"{path.name}:{n}", "bad_encoding", "bytes that are not UTF-8") for n in bad_lines
    ]


def read_annotations(path: str | Path, policy: BadSamplePolicy = "skip") -> tuple[list[Any], list[Skipped]]:
    """Raw records of a JSON list or a JSONL file; an undecodable line (not JSON, not UTF-8) is an error
    naming the file and line, or under `skip` a skipped sample counted under its reason."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"annotation file {path} does not exist")
    if path.suffix == ".jsonl":
        return _read_jsonl(path, policy)
    text, skipped = _decode_json_list(path, policy)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a JSON list of samples, found {type(data).__name__}")
    if skipped:
        data = [record for record in data if "\ufffd" not in json.dumps(record, ensure_ascii=False)]
    return data, skipped


def normalize(raw: Any, index: int, source: str = "", root: str = "") -> Record:
    """Validate one raw annotation and place its image tags; raises SampleError."""
    sample_id = str(raw.get("id", f"{source}#{index}")) if isinstance(raw, dict) else f"{source}#{index}"
    if not isinstance(raw, dict) or not isinstance(raw.get("conversations"), list):
        raise SampleError(sample_id, "bad_conversation", "expected an object with a 'conversations' list")
    turns = raw["conversations"]
    if not turns:
        raise SampleError(sample_id, "empty_conversation", "no turns")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise SampleError(
                sample_id, "bad_conversation", f"bad turn {str(turn)[:80]!r} (expected from: human/gpt, value: str)"
            )
        messages.append({"role": ROLES[turn["from"]], "content": turn["value"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise SampleError(
            sample_id, "nothing_to_learn", "no assistant turn with text: the sample carries no answer to train on"
        )
    image = raw.get("image")
    images = tuple([image] if isinstance(image, (str, TarMember, ArrowCell)) else image or [])
    if not all(isinstance(entry, (str, TarMember, ArrowCell)) for entry in images):
        raise SampleError(sample_id, "bad_conversation", f"'image' must be a path or a list of paths, got {image!r}")
    tags = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if tags != len(images):
        raise SampleError(sample_id, "image_tag_mismatch", f"{tags} <image> tag(s) for {len(images)} image(s)")
    if len(images) == 1:
        for message in messages:
            if IMAGE_TOKEN in message["content"]:
                text = message["content"].replace(IMAGE_TOKEN, "").strip()
                message["content"] = f"{IMAGE_TOKEN}\n{text}"
    words = sum(len(m["content"].split()) for m in messages)
    return Record(sample_id, images, tuple(messages), words, root)


def _opened(entry: str | Blob, root: str | Path, sample_id: str) -> str | Path | IO[bytes]:
    try:
        source = image_source(entry, root)
    except (OSError, KeyError, IndexError) as err:
        raise SampleError(sample_id, "unreadable_image", f"{entry} ({err})") from None
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise SampleError(sample_id, "missing_image", str(source))
    return source


def load_image(
    entry: str | Blob, root: str | Path, sample_id: str, max_pixels: int | None = MAX_IMAGE_PIXELS
) -> Image.Image:
    """One of a record's images, decoded to RGB; raises SampleError with the reason."""
    source = _opened(entry, root, sample_id)
    try:
        return open_rgb(source, max_pixels)
    except ImageTooLarge as err:
        raise SampleError(sample_id, "image_too_large", f"{entry} ({err})") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise SampleError(sample_id, "unreadable_image", f"{entry} ({err})") from None


class LlavaDataset(torch.utils.data.Dataset):
    """Records -> {input_ids, labels, pixel_values, image_sizes, image_tokens, id}; images open only in
    __getitem__.

    `lengths` (words + image tokens, signed by modality like the original's `modality_lengths`) are
    available without decoding any image, for the samplers. `layout` says how many visual tokens each image
    takes (tiled images: from the size in the file's header).
    """

    def __init__(
        self,
        records: Sequence[Record],
        template: Template,
        tokenizer: Any,
        processor: ImageProcessor | StackedProcessor | TiledProcessor | None,
        *,
        max_length: int,
        layout: ImageLayout,
        policy: BadSamplePolicy = "skip",
        mask_first_answer_token: bool = False,
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
        cache_mb: int = 0,
    ) -> None:
        if policy not in ("skip", "error"):
            raise ConfigError(f"bad-sample policy must be 'skip' or 'error', got {policy!r}")
        check_tokenizer(template, tokenizer)
        self.streamed = bool(getattr(records, "streamed", False))  # data/streaming.py: one epoch at a time
        self.records = records if self.streamed else list(records)
        self.template, self.tokenizer, self.processor = template, tokenizer, processor
        self.max_length, self.layout, self.policy = max_length, layout, policy
        self.mask_first_answer_token = mask_first_answer_token
        self.max_image_pixels = max_image_pixels
        self._token_lengths: list[int] | None = None
        self._cache: dict[int, dict[str, Any] | Skipped] = {}
        self._cache_room = 0 if self.streamed else cache_mb * 2**20  # bytes still free for cached samples

    def __len__(self) -> int:
        return len(self.records)

    def start_epoch(self, epoch: int) -> None:
        """A streamed mixture's positions hold other samples in each epoch; indexed records do not change."""
        if self.streamed:
            self.records.start_epoch(epoch)  # type: ignore[attr-defined]

    @property
    def lengths(self) -> list[int]:
        """Approximate lengths, positive for samples with images and negative for text-only ones."""
        per_image = self.layout.max_visual_tokens
        return [r.words + len(r.images) * per_image if r.has_image else -max(r.words, 1) for r in self.records]

    def _sizes(self, record: Record) -> list[Size]:
        """The images' (height, width) from their headers, where the tiling needs them (else empty)."""
        if self.layout.tiling is None:
            return []
        try:
            return [header_size(_opened(entry, record.root, record.sample_id)) for entry in record.images]
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise SampleError(record.sample_id, "unreadable_image", str(err)) from None

    def _encoded(self, record: Record, sizes: list[Size]) -> tuple[Any, int, tuple[list[int], list[int], list[Size]]]:
        """(token ids and labels, positions after splicing, the placeholders' visual tokens, frames and sizes)."""
        encoded = encode(
            self.template,
            self.tokenizer,
            record.messages,
            sample_id=record.sample_id,
            mask_first_answer_token=self.mask_first_answer_token,
            image_markup=image_markup(self.layout, self.template, sizes) if sizes else None,
        )
        if sizes:
            placed = placeholders(self.layout, sizes)
        else:
            placed = [self.layout.frame_tokens] * len(record.images), [1] * len(record.images), []
        tokens = placed[0]
        return encoded, len(encoded.input_ids) + sum(tokens) - len(tokens), placed

    def token_lengths(self) -> list[int]:
        """Exact positions per sample after splicing (tokenizes every conversation once, opens no image);
        what packing budgets need. Samples whose mask fails count as 0 (they are skipped later)."""
        if self._token_lengths is not None:
            return self._token_lengths
        lengths = []
        for record in self.records:
            try:
                lengths.append(self._encoded(record, self._sizes(record))[1])
            except (InputError, SampleError):
                lengths.append(0)
        self._token_lengths = lengths
        return lengths

    def load(self, index: int) -> dict[str, Any]:
        """The sample, or SampleError."""
        record = self.records[index]
        try:
            encoded, length, (tokens, frames, sizes) = self._encoded(record, self._sizes(record))
        except MaskError as err:
            raise SampleError(record.sample_id, "mask_error", str(err)) from None
        except InputError as err:
            raise SampleError(record.sample_id, "bad_conversation", str(err)) from None
        if length > self.max_length:
            raise SampleError(record.sample_id, "too_long", f"{length} positions > max length {self.max_length}")
        pixels = None
        if record.images:
            if self.processor is None:
                raise ConfigError("this dataset has images but no image processor")
            images = [
                load_image(entry, record.root, record.sample_id, self.max_image_pixels) for entry in record.images
            ]
            processed = [self.processor(image) for image in images]
            if self.layout.tiling is None:
                pixels = processed[0][None] if len(processed) == 1 else torch.stack(processed)
            else:  # each image's frames, images in order
                pixels = processed[0] if len(processed) == 1 else torch.cat(processed)
        ids, labels = torch.tensor(encoded.input_ids), torch.tensor(encoded.labels)
        return sample_item(record.sample_id, ids, labels, pixels, tokens, frames, sizes)

    def __getitem__(self, index: int) -> dict[str, Any] | Skipped:
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        try:
            item: dict[str, Any] | Skipped = self.load(index)
        except SampleError as err:
            if self.policy == "error":
                raise
            item = Skipped(err.sample_id, err.reason, err.detail)
        self._keep(index, item)
        return item

    def _keep(self, index: int, item: dict[str, Any] | Skipped) -> None:
        """Cache the sample while the budget allows (the same sample every epoch: loading is deterministic)."""
        if not self._cache_room:
            return
        size = (
            256 + sum(v.nbytes for v in item.values() if isinstance(v, torch.Tensor)) if isinstance(item, dict) else 256
        )
        if size <= self._cache_room:
            self._cache[index] = item
            self._cache_room -= size


def normalize_all(
    raw: Sequence[Any], source: str, image_root: str | Path = "", policy: BadSamplePolicy = "skip"
) -> tuple[list[Record], list[Skipped]]:
    """Raw records -> validated Records (bad ones raised or returned as Skipped)."""
    records: list[Record] = []
    skipped: list[Skipped] = []
    for index, item in enumerate(raw):
        try:
            records.append(normalize(item, index, source, str(image_root)))
        except SampleError as err:
            if policy == "error":
                raise SampleError(err.sample_id, err.reason, f"{err.detail} (in {source})") from None
            skipped.append(Skipped(err.sample_id, err.reason, err.detail))
    return records, skipped


def read_records(
    annotation_path: str | Path, image_root: str | Path = "", policy: BadSamplePolicy = "skip"
) -> tuple[list[Record], list[Skipped]]:
    """An annotation file -> validated Records (bad ones raised or returned as Skipped)."""
    raw, skipped = read_annotations(annotation_path, policy)
    records, bad = normalize_all(raw, str(annotation_path), image_root, policy)
    return records, skipped + bad
