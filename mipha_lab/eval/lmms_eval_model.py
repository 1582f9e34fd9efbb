"""A mipha-lab model inside lmms-eval: `python -m lmms_eval --model mipha_lab --model_args pretrained=RUN`.

Registered through the `lmms_eval.models` entry point (pyproject.toml) by `manifest`; needs the
`lmms-eval` extra. Each document's images go in as that many images (`<image>` tags where the task put
them, else one per image before the text, as our own `eval run` does), through the model's own template,
left-padded batches and greedy decoding unless the task's `gen_kwargs` ask for a temperature; the
task's `until` strings stop generation beside the template's. `loglikelihood` scores a continuation after
the templated prompt (multiple-choice tasks).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.utils import simple_parse_args_string
from PIL import Image

from mipha_lab.constants import IGNORE_INDEX, IMAGE_TOKEN
from mipha_lab.data.image_placement import image_markup
from mipha_lab.data.templates import Template, encode_prompt, get_template
from mipha_lab.errors import ConfigError
from mipha_lab.eval.generate import generate_batch
from mipha_lab.model import load_model


def manifest() -> Any:
    """The entry point's payload. A function, imported late: lmms-eval loads its entry points while its
    model registry initialises, which importing ModelManifest here at module level would re-enter."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="mipha_lab", simple_class_path="mipha_lab.eval.lmms_eval_model.MiphaLab")


class MiphaLab(lmms):
    """model_args: `pretrained` (a run folder or model folder), `batch_size`, `conv_template` (default:
    the model's own), `image_strategy` (default `pad`, as `eval run`), `device` (default: CUDA if present)."""

    def __init__(
        self,
        pretrained: str,
        batch_size: int | str = 16,
        conv_template: str | None = None,
        image_strategy: str = "pad",
        device: str | None = None,
        max_new_tokens: int | str = 128,
        **unused: Any,
    ) -> None:
        super().__init__()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if self.device.type == "cuda" else None
        self.model = load_model(pretrained, dtype=dtype).to(self.device).eval()
        self.template: Template = get_template(conv_template or self.model.config.template or "plain")
        self.processor = self.model.image_processor(image_strategy)  # type: ignore[arg-type]
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> MiphaLab:
        """`--model_args` win over the command line's `--batch_size` / `--device` (which lmms-eval always
        passes, so a batch size in the model args would otherwise be given twice)."""
        args = simple_parse_args_string(arg_string)
        extra = {
            key: value
            for key, value in (additional_config or {}).items()
            if key in ("batch_size", "device") and value is not None and key not in args
        }
        return cls(**args, **extra)

    def _inputs(self, context: str, visuals: Sequence[Any]) -> tuple[list[int], list[torch.Tensor], list[Any]]:
        """The templated prompt's ids, each image's frames and each image's (height, width)."""
        images = [v for v in visuals or [] if v is not None]
        if not all(isinstance(v, Image.Image) for v in images):
            kinds = sorted({type(v).__name__ for v in images})
            raise ConfigError(f"mipha_lab takes images; this task gives {', '.join(kinds)}")
        images = [image.convert("RGB") for image in images]
        tags = context.count(IMAGE_TOKEN)
        text = context if tags == len(images) else f"{IMAGE_TOKEN}\n" * len(images) + context.replace(IMAGE_TOKEN, "")
        frames = [self.processor(image) for image in images]
        pixels = [f if self.model.config.tiling else f[None] for f in frames]
        sizes = [(image.height, image.width) for image in images]
        markup = image_markup(self.model.layout, self.template, sizes) if images else None
        messages = [{"role": "user", "content": text}]
        return encode_prompt(self.template, self.model.tokenizer, messages, markup), pixels, sizes

    def _visuals(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> list[Any]:
        return list(doc_to_visual(self.task_dict[task][split][doc_id]) or [])

    @torch.no_grad()
    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: dict[int, str] = {}
        groups: dict[str, list[tuple[int, list[int], list[torch.Tensor], list[Any]]]] = {}
        settings: dict[str, dict[str, Any]] = {}
        for index, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            prompt, pixels, sizes = self._inputs(context, self._visuals(doc_to_visual, doc_id, task, split))
            key = json.dumps(gen_kwargs, sort_keys=True, default=str)
            settings[key] = dict(gen_kwargs)
            groups.setdefault(key, []).append((index, prompt, pixels, sizes))
        for key, items in groups.items():
            kwargs = settings[key]
            until = kwargs.get("until") or []
            stops = [s for s in ([until] if isinstance(until, str) else until) if s]
            items.sort(key=lambda item: len(item[1]))
            for start in range(0, len(items), self.batch_size):
                chunk = items[start : start + self.batch_size]
                texts = generate_batch(
                    self.model,
                    self.template,
                    [prompt for _, prompt, _, _ in chunk],
                    [p for _, _, pixels, _ in chunk for p in pixels],
                    [s for _, _, _, sizes in chunk for s in sizes],
                    int(kwargs.get("max_new_tokens") or self.max_new_tokens),
                    stops,
                    temperature=float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample", True) else 0.0,
                    top_p=float(kwargs.get("top_p") or 1.0),
                )
                answers.update({index: text for (index, _, _, _), text in zip(chunk, texts, strict=True)})
        return [answers[i] for i in range(len(requests))]

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results = []
        for request in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target(doc) if callable(doc_to_target) else doc_to_target
            prompt, pixels, sizes = self._inputs(context, self._visuals(doc_to_visual, doc_id, task, split))
            target = self.model.tokenizer(str(continuation), add_special_tokens=False).input_ids
            ids = torch.tensor([prompt + target], device=self.device)
            labels = torch.tensor([[IGNORE_INDEX] * len(prompt) + target], device=self.device)
            out = self.model(
                ids,
                torch.ones_like(ids),
                torch.cat(pixels).to(self.device) if pixels else None,
                labels,
                image_sizes=sizes or None,
            )
            supervised = out.spliced.labels[:, 1:] != IGNORE_INDEX
            greedy = bool((out.logits[:, :-1][supervised].argmax(-1) == out.spliced.labels[:, 1:][supervised]).all())
            results.append((-float(out.loss_sum), greedy))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("mipha_lab: multi-round generation tasks are not supported yet")
