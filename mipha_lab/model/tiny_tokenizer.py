"""A small byte-level BPE tokenizer for the tiny language-model cards, built offline and deterministically.

Like GPT-2's, its pre-tokenizer attaches a leading space to the following word ("Ġcat"), so label
masking is exercised on tokens that straddle a template boundary. It carries the special tokens of
every template the project ships, so any tiny LM card can use it.
"""

from __future__ import annotations

import functools
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<pad>",
    "<bos>",
    "<eos>",
    "<|im_start|>",
    "<|im_end|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<image>",
]
VOCAB_SIZE = 1024

_WORDS = [
    "a",
    "an",
    "the",
    "is",
    "are",
    "of",
    "in",
    "on",
    "at",
    "to",
    "and",
    "or",
    "with",
    "what",
    "which",
    "where",
    "how",
    "many",
    "color",
    "colour",
    "shape",
    "shapes",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "white",
    "black",
    "gray",
    "cyan",
    "magenta",
    "brown",
    "pink",
    "circle",
    "circles",
    "square",
    "squares",
    "triangle",
    "triangles",
    "star",
    "stars",
    "ellipse",
    "rectangle",
    "left",
    "right",
    "top",
    "bottom",
    "center",
    "middle",
    "upper",
    "lower",
    "corner",
    "there",
    "image",
    "picture",
    "photo",
    "shown",
    "show",
    "shows",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "zero",
    "yes",
    "no",
    "not",
    "answer",
    "question",
    "using",
    "single",
    "word",
    "phrase",
    "option",
    "letter",
    "from",
    "given",
    "choices",
    "directly",
    "chat",
    "between",
    "curious",
    "user",
    "artificial",
    "intelligence",
    "assistant",
    "gives",
    "helpful",
    "detailed",
    "polite",
    "answers",
    "questions",
    "cat",
    "dog",
    "person",
    "car",
    "tree",
    "sky",
    "this",
    "that",
    "it",
    "its",
    "has",
    "have",
    "count",
    "number",
    "small",
    "large",
    "big",
    "tiny",
    "bright",
    "dark",
    "background",
    "above",
    "below",
    "next",
    "describe",
    "caption",
    "scene",
    "object",
    "objects",
]
_FIXED = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions.",
    "USER: ASSISTANT: Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly. A. B. C. D.",
    "You are a helpful AI assistant. system user assistant model",
]


def _corpus(seed: int = 0, lines: int = 1500) -> list[str]:
    rng = random.Random(seed)
    text = list(_FIXED)
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99)))
        sentence = " ".join(words)
        text.append(sentence[0].upper() + sentence[1:] + rng.choice([".", "?", "!", ",", ":"]))
    return text


@functools.lru_cache(maxsize=1)
def _trained() -> str:
    """The trained tokenizer as JSON (so every caller gets an independent copy)."""

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return tok.to_str()


def tiny_tokenizer(eos: str = "<|endoftext|>", bos: str | None = None, pad: str | None = None):
    """A `PreTrainedTokenizerFast` with the given special tokens (all of them exist in its vocabulary)."""

    for token in (eos, bos, pad):
        if token is not None and token not in SPECIAL_TOKENS:
            raise ValueError(f"the tiny tokenizer has no special token {token!r} (it has {SPECIAL_TOKENS})")
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained()),
        eos_token=eos,
        bos_token=bos,
        pad_token=pad,
        model_max_length=1 << 20,
    )
