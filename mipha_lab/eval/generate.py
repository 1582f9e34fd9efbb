"""Batched greedy answers in LLaVA's answer-file format: prompts sorted by length into batches, left
padding after splicing and a KV cache (MultimodalModel.generate), stop strings, answers in question
order. Answers are appended to a partial file after each batch, so a restarted run can skip them."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mipha_lab.data.image_placement import image_markup
from mipha_lab.data.templates import Template, encode_prompt
from mipha_lab.model.image_processing import Strategy

log = logging.getLogger(__name__)


def answer_key(question_id: Any, prompt: str) -> str:
    """Question ids repeat in some files (MME: two questions per image), so the prompt is part of the key."""
    return json.dumps([question_id, prompt])


def answer_questions(
    model: Any,
    template: Template,
    questions: Sequence[Any],
    *,
    strategy: Strategy = "pad",
    batch_size: int = 16,
    max_new_tokens: int = 16,
    model_id: str = "mipha-lab",
    partial: Path | None = None,
    desc: str = "answering",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Answers in question order: {question_id, prompt, text, answer_id, model_id, metadata}.
    `questions` are eval.benchmarks.Question objects; an unreadable image is counted, reported and
    answered with an empty string; `partial` receives each batch's answers as soon as they exist."""
    processor = model.image_processor(strategy)
    tokenizer = model.tokenizer
    done: dict[str, dict[str, Any]] = {}
    todo = list(questions)

    def messages(q: Any) -> list[dict[str, str]]:
        return [{"role": "user", "content": ("<image>\n" if q.image else "") + q.text}]

    prompts = {id(q): encode_prompt(template, tokenizer, messages(q)) for q in todo}
    todo.sort(key=lambda q: len(prompts[id(q)]))  # similar lengths batch together: little padding
    unreadable = []
    bar = tqdm(total=len(todo), desc=desc, unit="question", dynamic_ncols=True, disable=not progress)
    for start in range(0, len(todo), batch_size):
        chunk = list(todo[start : start + batch_size])
        pixels, sizes = [], []
        for q in [q for q in chunk if q.image is not None]:
            try:
                image = q.image()
                frames = processor(image)
                pixels.append(frames if model.config.tiling else frames[None])
                sizes.append((image.height, image.width))
                markup = image_markup(model.layout, template, sizes[-1:])
                if markup is not None:  # a split image's tiles and markers
                    prompts[id(q)] = encode_prompt(template, tokenizer, messages(q), markup)
            except (OSError, ValueError) as err:
                unreadable.append(f"{q.question_id} ({err})")
                done[answer_key(q.question_id, q.text)] = _record(q, "", model_id, {"error": "unreadable image"})
                chunk.remove(q)
                if partial is not None:
                    with partial.open("a") as handle:
                        handle.write(json.dumps(done[answer_key(q.question_id, q.text)]) + "\n")
        if chunk:
            for q, text in zip(
                chunk,
                generate_batch(model, template, [prompts[id(q)] for q in chunk], pixels, sizes, max_new_tokens),
                strict=False,
            ):
                done[answer_key(q.question_id, q.text)] = _record(q, text, model_id)
            if partial is not None:
                with partial.open("a") as handle:
                    handle.writelines(json.dumps(done[answer_key(q.question_id, q.text)]) + "\n" for q in chunk)
        bar.update(batch_size if start + batch_size <= len(todo) else len(todo) - start)
    bar.close()
    if unreadable:
        log.warning("%s: %d unreadable image(s), answered empty: %s", desc, len(unreadable), "; ".join(unreadable[:5]))
    return [done[answer_key(q.question_id, q.text)] for q in questions]


def _record(question: Any, text: str, model_id: str, metadata: dict | None = None) -> dict[str, Any]:
    return {
        "question_id": question.question_id,
        "prompt": question.text,
        "text": text,
        "answer_id": uuid.uuid4().hex,
        "model_id": model_id,
        "metadata": metadata or {},
    }


def generate_batch(
    model: Any,
    template: Template,
    prompts: list[list[int]],
    pixels: list[torch.Tensor],
    sizes: list[tuple[int, int]],
    max_new_tokens: int,
    stops: Sequence[str] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> list[str]:
    """Answers to a batch of prompts; `pixels` holds each image's frames, `sizes` each image's (height, width);
    each answer ends before the template's stop strings and `stops`."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)], mask[row, : len(prompt)] = torch.tensor(prompt), 1
    device = next(model.parameters()).device
    out = model.generate(
        ids.to(device),
        mask.to(device),
        torch.cat(pixels).to(device) if pixels else None,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        image_sizes=sizes,
        stop_strings=[*template.stop_strings, *stops],
    )
    texts = []
    for tokens in out:
        text = model.tokenizer.decode(tokens, skip_special_tokens=True)
        for stop in [*template.stop_strings, *stops]:
            text = text.split(stop)[0]
        texts.append(text.strip())
    return texts
