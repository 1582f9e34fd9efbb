"""A multi-turn conversation with a model: the image goes with the first user message, the whole
conversation is the prompt of each turn, and the reply streams as it is generated (stop strings held
back until they cannot be the start of one)."""

from __future__ import annotations

from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import torch
from PIL import Image

from mipha_lab.data.image_files import open_rgb
from mipha_lab.data.image_placement import image_markup
from mipha_lab.data.templates import Template, encode_prompt
from mipha_lab.errors import InputError
from mipha_lab.model.image_processing import Strategy


def open_image(source: str) -> Image.Image:
    """A local file or an http(s) URL, as RGB; a clear error for anything unreadable."""
    try:
        if source.startswith(("http://", "https://")):
            with urlopen(source, timeout=30) as response:
                return open_rgb(BytesIO(response.read()))
        return open_rgb(Path(source))
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read the image {source}: {err}") from err


class ReplyStreamer:
    """A transformers streamer that hands out decoded text as it becomes final: the tail that could be
    the beginning of a stop string is held back, and the stop string itself is never shown."""

    def __init__(self, tokenizer: Any, stops: list[str], emit: Callable[[str], None]) -> None:
        self.tokenizer, self.stops, self.emit = tokenizer, [s for s in stops if s], emit
        self.ids: list[int] = []
        self.shown = 0
        self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        self.ids += value.reshape(-1).tolist()
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=False)  # stop strings are often special tokens

    def text(self) -> str:
        text = self._decoded()
        cut = min((text.find(s) for s in self.stops if s in text), default=-1)
        return text[:cut] if cut >= 0 else text

    def _flush(self, final: bool) -> None:
        if self.stopped:
            return
        full = self._decoded()
        text = self.text()
        if len(text) < len(full):
            self.stopped = True  # a stop string appeared: everything after it is dropped
        elif not final:  # hold back a tail that may grow into a stop string, and an unfinished character
            hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - hold]
            if text.endswith("\ufffd"):
                text = text[:-1]
        if len(text) > self.shown:
            self.emit(text[self.shown :])
            self.shown = len(text)


class Conversation:
    """A chat with a model: the turns so far, the image, and the sampling settings."""

    def __init__(
        self,
        model: Any,
        template: Template,
        *,
        temperature: float = 0.2,
        top_p: float = 1.0,
        max_new_tokens: int = 512,
        image_strategy: Strategy = "pad",
    ) -> None:
        self.model, self.template = model, template
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.processor = model.image_processor(image_strategy)
        self.image: Image.Image | None = None
        self.messages: list[dict[str, str]] = []

    def set_image(self, image: Image.Image) -> None:
        """A new image starts a new conversation (it belongs to the first user message)."""
        self.image = image
        self.reset()

    def reset(self) -> None:
        self.messages = []

    def reply(self, text: str, emit: Callable[[str], None] = lambda _: None) -> str:
        """Answer `text` in the conversation so far; `emit` receives the reply piece by piece."""
        first = not self.messages and self.image is not None
        self.messages.append({"role": "user", "content": ("<image>\n" if first else "") + text})
        device = next(self.model.parameters()).device
        sizes = [] if self.image is None else [(self.image.height, self.image.width)]
        markup = image_markup(self.model.layout, self.template, sizes) if sizes else None
        prompt = encode_prompt(self.template, self.model.tokenizer, self.messages, markup)
        ids = torch.tensor([prompt], device=device)
        pixels = None
        if self.image is not None:
            frames = self.processor(self.image)
            pixels = (frames if self.model.config.tiling else frames[None]).to(
                device, next(self.model.parameters()).dtype
            )
        started = [False]

        def emit_stripped(piece: str) -> None:  # the reply as printed equals the stripped answer
            if not started[0]:
                piece = piece.lstrip()
                started[0] = bool(piece)
            if piece:
                emit(piece)

        streamer = ReplyStreamer(self.model.tokenizer, self.template.stop_strings, emit_stripped)
        self.model.generate(
            ids,
            torch.ones_like(ids),
            pixels,
            image_sizes=sizes,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop_strings=self.template.stop_strings,
            streamer=streamer,
        )
        answer = streamer.text().strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer
