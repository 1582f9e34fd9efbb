"""`python -m mipha_lab.export FORMAT SOURCE OUT_DIR`: a model (a run folder's final/, a saved model, or a
released Mipha / LLaVA-Phi checkpoint) written in another format.

- `mipha-lab`: our format (config.json with resolved cards, one safetensors file, tokenizer,
  preprocessor) - for a released checkpoint, converted once so that later loads skip the checks;
- `hf-llava`: transformers' `LlavaForConditionalGeneration` + `LlavaProcessor` (the door to vLLM,
  SGLang and the wider ecosystem); an anyres model becomes `LlavaNextForConditionalGeneration` +
  `LlavaNextProcessor`;
- `merged`: our format with every LoRA adapter folded into its base weights.

hf-llava needs a Hugging Face vision tower (SigLIP or CLIP) at its native resolution and the
`mlp2x_gelu` projector. The processor carries our chat template (list-content messages render exactly
our prompt) and a `LlavaImageProcessor` with `do_pad` (LLaVA's expand-to-square on the mean colour,
then the tower's resize), and the generation config stops at the template's end token.
Weights are read from safetensors; pickle files only with --allow-pickle.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
)

from mipha_lab.config import AnyresTiling, SplitTiling
from mipha_lab.constants import IMAGE_TOKEN
from mipha_lab.data.templates import PlainTemplate, get_template
from mipha_lab.errors import ConfigError, exit_status
from mipha_lab.model import load_model
from mipha_lab.model.adapters import merge_lora
from mipha_lab.model.embedding_scale import measured_factors
from mipha_lab.model.image_processing import ImageProcessor
from mipha_lab.model.projectors import MLP2xGeluProjector
from mipha_lab.model.vision_backends import TransformersVisionTower
from mipha_lab.output_folder import check_output, write_folder

# tower model_type -> (Llava's feature strategy for our `patch` selection, extra tokens before the patches)
LLAVA_TOWERS: dict[str, tuple[Literal["default", "full"], int]] = {
    "siglip_vision_model": ("full", 0),
    "clip_vision_model": ("default", 1),
}


def _checked(model: Any) -> tuple[Literal["default", "full"], int, Any]:
    """(feature strategy, additional image tokens, the template) of a model Llava can express, else a refusal."""

    tower = model.vision_tower
    kind = getattr(getattr(tower, "backbone", None), "config", None)
    kind = getattr(kind, "model_type", None)
    if not isinstance(tower, TransformersVisionTower) or kind not in LLAVA_TOWERS:
        raise ConfigError(
            f"hf-llava export needs a transformers SigLIP or CLIP vision tower; this model has "
            f"{model.config.vision.name} ({type(tower).__name__}, {kind})"
        )
    if type(model.projector) is not MLP2xGeluProjector:
        raise ConfigError(
            f"hf-llava export needs the mlp2x_gelu projector (Llava's own); this model has "
            f"{model.config.projector.name}"
        )
    if tower.image_size != tower.backbone.config.image_size:
        raise ConfigError(
            f"hf-llava export needs the tower at its native {tower.backbone.config.image_size} px; this "
            f"model interpolates it to {tower.image_size} px, which Llava does not do"
        )
    template = get_template(model.config.template or "")
    if isinstance(template, PlainTemplate):
        raise ConfigError("hf-llava export needs a chat template; this model uses 'plain' (stage-1 captions only)")
    strategy, extra = LLAVA_TOWERS[kind]
    if tower.select == "cls_patch":
        strategy = "full"
    return strategy, extra, template


def final_norm(body: Any) -> Any:
    """The LM body's last normalisation (Phi: `final_layernorm`, most others: `norm`)."""
    norm = getattr(body, "final_layernorm", None) or getattr(body, "norm", None)
    if norm is None:
        raise ConfigError(f"{type(body).__name__}: no final norm found")
    return norm


@torch.no_grad()
def fold_head_bias(norm: Any, target: Any, head: Any) -> None:
    """Llava's head has no bias, Phi's has one: fold it in exactly. After a LayerNorm the features n sum to
    zero, so logits W(n*w + b) + c equal W'(n + 1) with W' = W diag(w) + a 1^T, a = (W b + c - W w) / H:
    the norm's weight and bias become ones and the head absorbs the rest (computed in float64)."""
    if not isinstance(norm, torch.nn.LayerNorm):
        raise ConfigError(
            f"the LM head has a bias and its final norm is {type(norm).__name__}, not a LayerNorm: "
            "Llava (whose head has no bias) cannot express it exactly"
        )
    weight, bias = head.weight.double(), head.bias.double()
    scale, shift = norm.weight.double(), norm.bias.double()
    scaled = weight * scale
    offset = (weight @ shift + bias - scaled.sum(dim=1)) / weight.shape[1]
    target.weight.copy_(scaled + offset[:, None])
    norm.weight.fill_(1.0)
    norm.bias.fill_(1.0)


@torch.no_grad()
def fold_feature_scale(model: Any, llava: Any) -> float:
    """Llava splices the projector's output into the text embeddings after they are looked up; an LM that
    scales at lookup (Gemma under transformers 5) would leave the features unscaled there. The factor
    they still need is folded into the projector's last linear layer (weight and bias), exactly as the
    model scales them (embedding_scale.py). Returns the factor folded (1.0: nothing to do)."""

    ours, theirs = measured_factors(model.language_model), measured_factors(llava)
    if ours is None or theirs is None:
        return 1.0
    target = ours[0] * ours[1]  # what text and features get in our model (checked against the card when built)
    factor = 1.0 if abs(theirs[1] - target) <= 1e-2 * target else target / theirs[1]
    if factor != 1.0:
        last = llava.model.multi_modal_projector.linear_2
        last.weight.mul_(factor)
        last.bias.mul_(factor)
    return factor


def llava_tokenizer(tokenizer: Any) -> Any:
    """A copy that returns only what Llava's forward takes (`generate(**processor(...))` in transformers 4
    refuses the `token_type_ids` some tokenizers add)."""

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    tokenizer.init_kwargs["model_input_names"] = tokenizer.model_input_names  # saved in tokenizer_config.json
    return tokenizer


def _pil_image_processor(anyres: bool) -> Any:
    """Llava's or LlavaNext's PIL image processor class: transformers 5 names it apart, transformers 4's
    default class is the PIL one."""
    if anyres:
        try:
            from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
        except ImportError:
            from transformers import LlavaNextImageProcessor as LlavaNextImageProcessorPil  # type: ignore[assignment]  # 4.x
        return LlavaNextImageProcessorPil
    try:
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    except ImportError:
        from transformers import LlavaImageProcessor as LlavaImageProcessorPil  # type: ignore[assignment]  # 4.x
    return LlavaImageProcessorPil


def to_llava(model: Any) -> tuple[Any, Any]:
    """(LlavaForConditionalGeneration with our weights, LlavaProcessor) for a MultimodalModel; an anyres model
    becomes LlavaNextForConditionalGeneration + LlavaNextProcessor (the same grids, newline and unpadding)."""
    merge_lora(model)
    strategy, extra, template = _checked(model)
    if isinstance(model.config.tiling, SplitTiling):
        raise ConfigError(
            "hf-llava export: transformers' Llava models have no split tiling (Idefics3's); this model has it"
        )
    anyres = isinstance(model.config.tiling, AnyresTiling)
    tower, lm, tokenizer = model.vision_tower, model.lm, model.tokenizer
    if tokenizer is None:
        raise ConfigError("hf-llava export needs the model's tokenizer (saved with the model)")
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id >= lm.config.vocab_size:
        raise ConfigError(
            f"the tokenizer's {IMAGE_TOKEN} id {image_id} is outside the LM's {lm.config.vocab_size} "
            "embeddings; Llava looks it up there, so this model cannot be exported as is"
        )
    settings: dict[str, Any] = {
        "vision_config": tower.backbone.config.to_dict(),
        "text_config": lm.config.to_dict(),
        "image_token_index": image_id,
        "image_seq_length": model.num_image_tokens,
        "projector_hidden_act": "gelu",
        "vision_feature_select_strategy": strategy,
        "vision_feature_layer": tower.feature_layer,
        "multimodal_projector_bias": True,
        "tie_word_embeddings": bool(lm.config.tie_word_embeddings),
    }
    end_id = tokenizer.convert_tokens_to_ids(template.end)
    llava: Any
    if anyres:
        pinpoints = [list(pinpoint) for pinpoint in model.layout.pinpoints]
        config: Any = LlavaNextConfig(**settings, image_grid_pinpoints=pinpoints)
        llava = LlavaNextForConditionalGeneration(config).eval()
    else:
        config = LlavaConfig(**settings)
        llava = LlavaForConditionalGeneration(config).eval()
    parts = llava.model
    if anyres:
        with torch.no_grad():
            parts.image_newline.copy_(model.tiles.newline)
    parts.vision_tower.load_state_dict(tower.backbone.state_dict())
    parts.multi_modal_projector.linear_1.load_state_dict(model.projector[0].state_dict())
    parts.multi_modal_projector.linear_2.load_state_dict(model.projector[2].state_dict())
    parts.language_model.load_state_dict(lm.decoder.state_dict())
    head = lm.head
    if head.bias is None:
        llava.lm_head.load_state_dict(head.state_dict())
    else:
        fold_head_bias(final_norm(parts.language_model), llava.lm_head, head)
    fold_feature_scale(model, llava)
    llava.generation_config = GenerationConfig(
        eos_token_id=end_id,
        pad_token_id=end_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id,
        bos_token_id=lm.config.bos_token_id,
        do_sample=False,
    )
    images = ImageProcessor(tower.image_spec).hf_config()
    images.pop("image_processor_type")
    if anyres:  # tiles and the whole view are squashed, never padded to a square (model/tiling.py)
        side = tower.image_size  # LlavaNext's processor cuts tiles of crop_size, cropping or not
        images.update(image_grid_pinpoints=config.image_grid_pinpoints, do_pad=True)
        images.setdefault("crop_size", {"height": side, "width": side})
    else:
        images.update(do_pad=True)  # LLaVA's expand-to-square
    processor = (LlavaNextProcessor if anyres else LlavaProcessor)(
        image_processor=_pil_image_processor(anyres)(**images),
        tokenizer=llava_tokenizer(tokenizer),
        patch_size=tower.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra,
        chat_template=template.jinja(),
        image_token=IMAGE_TOKEN,
    )
    return llava, processor


def export_hf_llava(source: Path, out: Path, allow_pickle: bool = False, overwrite: bool = False) -> Path:

    check_output(out, source, overwrite)
    llava, processor = to_llava(load_model(source, allow_pickle=allow_pickle))

    def write(folder: Path) -> None:
        llava.save_pretrained(folder)
        processor.save_pretrained(folder)

    return write_folder(out, write)


def export_mipha_lab(source: Path, out: Path, allow_pickle: bool = False, overwrite: bool = False) -> Path:
    """Our format, as loaded (a released checkpoint's layout recognised and checked once, here)."""
    check_output(out, source, overwrite)
    return write_folder(out, load_model(source, allow_pickle=allow_pickle).save_pretrained)


def export_merged(source: Path, out: Path, allow_pickle: bool = False, overwrite: bool = False) -> tuple[Path, int]:
    """Our format with every LoRA adapter folded into its base weights (the same outputs, plain layers)."""

    check_output(out, source, overwrite)
    model = load_model(source, allow_pickle=allow_pickle)
    merged = merge_lora(model)
    return write_folder(out, model.save_pretrained), merged


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mipha_lab.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("format", choices=["mipha-lab", "hf-llava", "merged"])
    parser.add_argument("source", type=Path, help="a run folder (its final/), a saved model or a released checkpoint")
    parser.add_argument("out", type=Path, help="the folder to write")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read .bin/.pt weights (torch.load with weights_only=True); refused otherwise",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT_DIR when it is not empty or is the model being read (refused otherwise)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)

    def run() -> int:
        if not args.source.exists():
            raise ConfigError(f"{args.source}: no such run folder or model folder")
        if args.format == "mipha-lab":
            print(f"wrote {export_mipha_lab(args.source, args.out, args.allow_pickle, args.overwrite)}: our format")
        elif args.format == "hf-llava":
            out = export_hf_llava(args.source, args.out, args.allow_pickle, args.overwrite)
            (model_class,) = json.loads((out / "config.json").read_text())["architectures"]
            processor_class = model_class.replace("ForConditionalGeneration", "Processor")
            print(
                f"wrote {out}: {model_class} + {processor_class} (load with "
                f"{model_class}.from_pretrained('{out}') and AutoProcessor.from_pretrained('{out}'))"
            )
        else:
            out, merged = export_merged(args.source, args.out, args.allow_pickle, args.overwrite)
            print(f"wrote {out}: {merged} LoRA layer(s) merged into their base weights")
        return 0

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
