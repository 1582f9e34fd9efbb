"""Chat templates: render a conversation into segments that are supervised or not.

A conversation is a list of messages `{"role": "user" | "assistant" | "system", "content": str}`.
`render` returns segments whose concatenation is the exact string the model sees; the tokenizer runs
once over that whole string (as inference and export will) and `encode` builds the label mask from the
tokenizer's offset mapping. Supervised: each assistant answer and its end token. Masked: BOS, system
prompt, user turns, role tags, separators, image positions.

Boundary rule: a token is supervised when any character it covers belongs to a supervised segment.
The part of the assistant tag that inference leaves for the model to write (the space after
`ASSISTANT:`, since prompts end with `ASSISTANT:`) is supervised with the answer. So the space that
byte-level BPE merges into the answer's first word ("Ġred") is learnt with it, and where a tokenizer
keeps that space as its own token ("Ġ", "Yes"), the model still learns to emit it - otherwise greedy
decoding after `ASSISTANT:` meets a token it was never trained to produce. The answer's first token is
always learnt (the original's off-by-one masked it before 2024-03-23; `mask_first_answer_token`
reproduces that quirk).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mipha_lab.constants import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from mipha_lab.errors import InputError
from mipha_lab.registry import Registry

PHI_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

Message = dict[str, str]


TEMPLATES: Registry[Any] = Registry("chat template", "conversation templates with label masks")


class MaskError(InputError):
    """A sample's label mask cannot be built consistently (never trained on silently)."""


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered conversation, supervised (an answer) or not."""

    text: str
    supervised: bool = False


@dataclass(frozen=True)
class Encoded:
    """A conversation as token ids with its labels (unsupervised positions IGNORE_INDEX)."""

    input_ids: list[int]  # IMAGE_TOKEN_INDEX at each image
    labels: list[int]  # IGNORE_INDEX where masked

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass(frozen=True)
class Template:
    """A turn-based template: `bos` + system block + (user block, assistant tag, answer + end + after)*."""

    name: str
    description: str
    system: str | None
    system_format: str  # "{system}" is replaced
    user_format: str  # "{content}" is replaced
    assistant_tag: str  # before an answer in training
    generation_tag: str  # ends the prompt at inference
    end: str  # ends each answer; supervised with it
    after_end: str = ""  # masked text after the end token (e.g. chatml's newline)
    bos: str | None = None
    tile_marker: str = "<row_{row}_col_{column}>"  # split tiling: before each tile's <image>
    global_marker: str = "<global-img>"  # split tiling: before the whole image's <image>

    @property
    def stop_strings(self) -> list[str]:
        return [self.end]

    def split_markup(self, rows: int, columns: int) -> str:
        """A split image's text (Idefics3's layout): each tile's marker and <image>, a newline after each row,
        then a newline, the whole image's marker and its <image>; an untiled image is the last part alone."""
        whole = self.global_marker + IMAGE_TOKEN
        if not rows:
            return whole
        tiles = "".join(
            "".join(self.tile_marker.format(row=r + 1, column=c + 1) + IMAGE_TOKEN for c in range(columns)) + "\n"
            for r in range(rows)
        )
        return f"{tiles}\n{whole}"

    def split_assistant_tag(self) -> tuple[str, str]:
        """(the tag as the inference prompt ends it, the rest that the model generates)."""
        if not self.assistant_tag.startswith(self.generation_tag):
            raise ValueError(f"template '{self.name}': assistant_tag must start with generation_tag")
        return self.generation_tag, self.assistant_tag[len(self.generation_tag) :]

    def _check_roles(self, messages: Sequence[Message]) -> list[Message]:
        system = [m for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        if len(system) > 1 or (system and messages[0]["role"] != "system"):
            raise InputError("a conversation may hold one system message, first")
        for i, message in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise InputError(f"message {i} has role {message['role']!r}, expected {expected!r} (turns alternate)")
        return turns

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> list[Segment]:
        turns = self._check_roles(messages)
        system = next((m["content"] for m in messages if m["role"] == "system"), self.system)
        segments = [Segment(self.bos)] if self.bos else []
        if system is not None:
            segments.append(Segment(self.system_format.format(system=system)))
        for message in turns:
            if message["role"] == "user":
                segments.append(Segment(self.user_format.format(content=message["content"])))
            else:
                prompt_part, generated_part = self.split_assistant_tag()
                segments.append(Segment(prompt_part))
                segments.append(Segment(generated_part + message["content"] + self.end, supervised=True))
                if self.after_end:
                    segments.append(Segment(self.after_end))
        if add_generation_prompt:
            if turns and turns[-1]["role"] != "user":
                raise InputError("a generation prompt needs the conversation to end with a user message")
            segments.append(Segment(self.generation_tag))
        return segments

    def prompt(self, messages: Sequence[Message]) -> str:
        """The inference prompt: the conversation so far, ending with the generation tag."""
        return "".join(s.text for s in self.render(messages, add_generation_prompt=True))

    def jinja(self) -> str:
        """This template as a transformers chat template: `apply_chat_template` renders exactly `prompt()`
        (and `render()` with answers), for string content or list content (`{"type": "image"}` becomes
        `<image>\\n`, as our prompts put it, and text items are concatenated)."""
        lit = json.dumps
        system_before, system_after = self.system_format.split("{system}")
        user_before, user_after = self.user_format.split("{content}")
        prompt_part, generated_part = self.split_assistant_tag()
        return "".join(
            [
                "{%- set ns = namespace(system=" + lit(self.system) + ") -%}",
                "{%- for m in messages if m['role'] == 'system' -%}"
                "{%- set ns.system = m['content'] if m['content'] is string "
                "else m['content'] | map(attribute='text') | join('') -%}{%- endfor -%}",
                "{{- " + lit(self.bos or "") + " -}}",
                "{%- if ns.system is not none -%}{{- "
                + lit(system_before)
                + " + ns.system + "
                + lit(system_after)
                + " -}}{%- endif -%}",
                "{%- for m in messages if m['role'] != 'system' -%}",
                "{%- set c = namespace(text='') -%}",
                "{%- if m['content'] is string -%}{%- set c.text = m['content'] -%}"
                "{%- else -%}{%- for item in m['content'] -%}",
                "{%- if item['type'] == 'image' -%}{%- set c.text = c.text + " + lit(IMAGE_TOKEN + "\n") + " -%}",
                "{%- elif item['type'] == 'text' -%}{%- set c.text = c.text + item['text'] -%}{%- endif -%}"
                "{%- endfor -%}{%- endif -%}",
                "{%- if m['role'] == 'user' -%}{{- " + lit(user_before) + " + c.text + " + lit(user_after) + " -}}",
                "{%- else -%}{{- "
                + lit(prompt_part + generated_part)
                + " + c.text + "
                + lit(self.end + self.after_end)
                + " -}}{%- endif -%}",
                "{%- endfor -%}",
                "{%- if add_generation_prompt -%}{{- " + lit(self.generation_tag) + " -}}{%- endif -%}",
            ]
        )


@dataclass(frozen=True)
class PlainTemplate(Template):
    """Stage-1 alignment: `<image>` + caption + newline; no system prompt, no roles, no end token."""

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> list[Segment]:
        turns = self._check_roles(messages)
        if len(turns) < 1 or IMAGE_TOKEN not in turns[0]["content"]:
            raise InputError("the plain template needs a first user turn holding <image>")
        images = IMAGE_TOKEN * turns[0]["content"].count(IMAGE_TOKEN)
        if add_generation_prompt:
            return [Segment(images)]
        if len(turns) != 2:
            raise InputError(f"the plain template takes one caption, got {len(turns)} turns")
        return [Segment(images), Segment(turns[1]["content"] + self.end, supervised=True)]


TEMPLATES.register("plain")(
    PlainTemplate(
        name="plain",
        description="stage 1: <image> + caption + newline, no system prompt",
        system=None,
        system_format="",
        user_format="{content}",
        assistant_tag="",
        generation_tag="",
        end="\n",
    )
)
TEMPLATES.register("phi", aliases=("v0", "phi-2", "phi-1.5", "default"))(
    Template(
        name="phi",
        description="Mipha / LLaVA-Phi conversation (USER: ... ASSISTANT: ...<|endoftext|>)",
        system=PHI_SYSTEM,
        system_format="{system} ",
        user_format="USER: {content} ",
        assistant_tag="ASSISTANT: ",
        generation_tag="ASSISTANT:",
        end="<|endoftext|>",
    )
)
TEMPLATES.register("gemma")(
    Template(
        name="gemma",
        description="Mipha-2.4B: the phi layout with <bos> first and answers ending in <eos>",
        system=PHI_SYSTEM,
        system_format="{system} ",
        user_format="USER: {content} ",
        assistant_tag="ASSISTANT: ",
        generation_tag="ASSISTANT:",
        end="<eos>",
        bos="<bos>",
    )
)
TEMPLATES.register("phi-3")(
    Template(
        name="phi-3",
        description="Phi-3 tags (<|user|>...<|end|><|assistant|>), trainable",
        system="You are a helpful AI assistant.",
        system_format="<|system|>{system}<|end|>",
        user_format="<|user|>{content}<|end|>",
        assistant_tag="<|assistant|>",
        generation_tag="<|assistant|>",
        end="<|end|>",
    )
)
TEMPLATES.register("chatml")(
    Template(
        name="chatml",
        description="ChatML (Qwen2.5, SmolLM2): <|im_start|>role\\n...<|im_end|>",
        system="You are a helpful assistant.",
        system_format="<|im_start|>system\n{system}<|im_end|>\n",
        user_format="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_tag="<|im_start|>assistant\n",
        generation_tag="<|im_start|>assistant\n",
        end="<|im_end|>",
        after_end="\n",
    )
)


def get_template(name: str) -> Template:
    return TEMPLATES.get(name)


def check_tokenizer(template: Template, tokenizer: Any) -> None:
    """The template's special strings must each be one token of this tokenizer (else masks drift)."""
    for text in {template.end, template.bos, IMAGE_TOKEN} - {None, "", "\n"}:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise MaskError(
                f"template '{template.name}': the tokenizer ({type(tokenizer).__name__}, "
                f"{getattr(tokenizer, 'name_or_path', '')!r}) splits {text!r} into {len(ids)} tokens; "
                "it must be a single special token"
            )


def encode(
    template: Template,
    tokenizer: Any,
    messages: Sequence[Message],
    *,
    sample_id: str = "?",
    mask_first_answer_token: bool = False,
    image_markup: Sequence[str] | None = None,
) -> Encoded:
    """Tokenize the rendered conversation once and build labels from the offset mapping. `image_markup`
    replaces the conversation's images in order (a split image's tiles and markers)."""
    segments = expand_images(template.render(messages), image_markup)
    text = "".join(s.text for s in segments)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoding["input_ids"], dtype=np.int64)
    offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)

    supervised_chars = np.zeros(len(text), dtype=np.int64)
    bounds, position = [], 0
    for segment in segments:
        if segment.supervised:
            supervised_chars[position : position + len(segment.text)] = 1
            bounds.append((position, position + len(segment.text)))
        position += len(segment.text)
    cumulative = np.concatenate([[0], np.cumsum(supervised_chars)])
    starts, ends = offsets[:, 0], offsets[:, 1]
    supervised = (cumulative[ends] - cumulative[starts]) > 0

    for start, end in bounds:  # every supervised segment must be covered by its own tokens
        covering = np.flatnonzero(supervised & (starts < end) & (ends > start))
        if len(covering) == 0:
            raise MaskError(f"sample {sample_id}: no token covers the answer {text[start:end]!r}")
        if mask_first_answer_token:
            supervised[covering[0]] = False
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    is_image = ids == image_id
    if int(is_image.sum()) != text.count(IMAGE_TOKEN):
        raise MaskError(
            f"sample {sample_id}: {text.count(IMAGE_TOKEN)} <image> tags became {int(is_image.sum())} image tokens"
        )
    if bounds and not supervised.any():
        raise MaskError(f"sample {sample_id}: every token is masked")
    input_ids = np.where(is_image, IMAGE_TOKEN_INDEX, ids)
    labels = np.where(supervised & ~is_image, ids, IGNORE_INDEX)
    return Encoded(input_ids.tolist(), labels.tolist())


def expand_images(segments: list[Segment], image_markup: Sequence[str] | None) -> list[Segment]:
    """The segments with the k-th <image> replaced by `image_markup[k]` (unchanged without markup)."""
    if image_markup is None:
        return segments
    markup = iter(image_markup)
    expanded = []
    for segment in segments:
        pieces = segment.text.split(IMAGE_TOKEN)
        text = pieces[0] + "".join(next(markup) + piece for piece in pieces[1:])
        expanded.append(Segment(text, segment.supervised))
    return expanded


def encode_prompt(
    template: Template, tokenizer: Any, messages: Sequence[Message], image_markup: Sequence[str] | None = None
) -> list[int]:
    """Token ids of an inference prompt (with IMAGE_TOKEN_INDEX at images, expanded by `image_markup`)."""
    (prompt,) = expand_images([Segment(template.prompt(messages))], image_markup)
    ids = np.asarray(tokenizer(prompt.text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    return np.where(ids == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), IMAGE_TOKEN_INDEX, ids).tolist()
