"""Golden strings and golden label masks for every chat template."""

from __future__ import annotations

import pytest

from mipha_lab.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mipha_lab.data.templates import TEMPLATES, MaskError, Template, check_tokenizer, encode, get_template
from mipha_lab.model.language import LLM, load_tokenizer

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
CONVERSATION = [
    {"role": "user", "content": "<image>\nWhat is shown?"},
    {"role": "assistant", "content": "A cat"},
    {"role": "user", "content": "Color?"},
    {"role": "assistant", "content": "red"},
]
GOLDEN_PROMPTS = {  # the inference prompt for the first three messages (mipha-reference.md section 5)
    "phi": f"{SYSTEM} USER: <image>\nWhat is shown? ASSISTANT: A cat<|endoftext|>USER: Color? ASSISTANT:",
    "gemma": f"<bos>{SYSTEM} USER: <image>\nWhat is shown? ASSISTANT: A cat<eos>USER: Color? ASSISTANT:",
    "phi-3": "<|system|>You are a helpful AI assistant.<|end|><|user|><image>\nWhat is shown?<|end|>"
    "<|assistant|>A cat<|end|><|user|>Color?<|end|><|assistant|>",
    "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is shown?"
    "<|im_end|>\n<|im_start|>assistant\nA cat<|im_end|>\n<|im_start|>user\nColor?<|im_end|>\n"
    "<|im_start|>assistant\n",
}
# Golden masks with the tiny byte-level BPE (Ġ = a space merged into the next word): the supervised
# tokens of the whole four-message sample, in order.
GOLDEN_SUPERVISED = {
    "phi": ["ĠA", "Ġcat", "<|endoftext|>", "Ġred", "<|endoftext|>"],
    "gemma": ["ĠA", "Ġcat", "<eos>", "Ġred", "<eos>"],
    "phi-3": ["A", "Ġcat", "<|end|>", "re", "d", "<|end|>"],
    "chatml": ["A", "Ġcat", "<|im_end|>", "re", "d", "<|im_end|>"],
}
LM_FOR = {"phi": "tiny-phi-2", "gemma": "tiny-gemma-2b", "phi-3": "tiny-phi-2", "chatml": "tiny-qwen2.5-0.5b"}


def tokens(tokenizer, ids):
    return ["<image>" if i == IMAGE_TOKEN_INDEX else tokenizer.convert_ids_to_tokens(i) for i in ids]


@pytest.mark.parametrize("name", GOLDEN_PROMPTS)
def test_golden_prompt_strings(name):
    assert get_template(name).prompt(CONVERSATION[:3]) == GOLDEN_PROMPTS[name]


@pytest.mark.parametrize("name", GOLDEN_SUPERVISED)
def test_golden_label_masks(name):
    tokenizer = load_tokenizer(LLM.get(LM_FOR[name]))
    encoded = encode(get_template(name), tokenizer, CONVERSATION)
    toks = tokens(tokenizer, encoded.input_ids)
    supervised = [t for t, label in zip(toks, encoded.labels, strict=True) if label != IGNORE_INDEX]
    assert supervised == GOLDEN_SUPERVISED[name]
    # labels equal the ids where supervised; the image is masked and marked with the sentinel
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(encoded.input_ids, encoded.labels, strict=True))
    assert encoded.input_ids.count(IMAGE_TOKEN_INDEX) == 1
    assert encoded.labels[encoded.input_ids.index(IMAGE_TOKEN_INDEX)] == IGNORE_INDEX


def test_phi_mask_token_by_token_shows_the_boundary_rule():
    """'ASSISTANT: red': the tag's trailing space is merged into 'Ġred', which is supervised."""
    tokenizer = load_tokenizer(LLM.get("tiny-phi-2"))
    encoded = encode(get_template("phi"), tokenizer, CONVERSATION[2:])
    toks = tokens(tokenizer, encoded.input_ids)
    tail = list(zip(toks, [label != IGNORE_INDEX for label in encoded.labels], strict=True))[-5:]
    assert tail == [("?", False), ("ĠASSISTANT", False), (":", False), ("Ġred", True), ("<|endoftext|>", True)]


def test_a_separate_space_token_before_the_answer_is_learnt():
    """The tiny BPE has no 'ĠYes': ' Yes' is 'Ġ' + 'Yes'. Prompts end with 'ASSISTANT:', so the model
    must emit the space itself: it is supervised."""
    tokenizer = load_tokenizer(LLM.get("tiny-phi-2"))
    messages = [{"role": "user", "content": "Is it red?"}, {"role": "assistant", "content": "Yes"}]
    encoded = encode(get_template("phi"), tokenizer, messages)
    supervised = [
        t
        for t, label in zip(tokens(tokenizer, encoded.input_ids), encoded.labels, strict=True)
        if label != IGNORE_INDEX
    ]
    assert supervised == ["Ġ", "Yes", "<|endoftext|>"]


def test_quirk_mask_first_answer_token():
    tokenizer = load_tokenizer(LLM.get("tiny-phi-2"))
    encoded = encode(get_template("phi"), tokenizer, CONVERSATION, mask_first_answer_token=True)
    supervised = [
        t
        for t, label in zip(tokens(tokenizer, encoded.input_ids), encoded.labels, strict=True)
        if label != IGNORE_INDEX
    ]
    assert supervised == ["Ġcat", "<|endoftext|>", "<|endoftext|>"]


def test_plain_template_supervises_caption_and_newline():
    tokenizer = load_tokenizer(LLM.get("tiny-phi-2"))
    messages = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "A red circle."}]
    template = get_template("plain")
    assert "".join(s.text for s in template.render(messages)) == "<image>A red circle.\n"
    encoded = encode(template, tokenizer, messages)
    assert encoded.input_ids[0] == IMAGE_TOKEN_INDEX and encoded.labels[0] == IGNORE_INDEX
    assert tokenizer.decode([label for label in encoded.labels if label != IGNORE_INDEX]) == "A red circle.\n"


def test_gemma_bos_is_first_and_masked():
    tokenizer = load_tokenizer(LLM.get("tiny-gemma-2b"))
    encoded = encode(get_template("gemma"), tokenizer, CONVERSATION)
    assert encoded.input_ids[0] == tokenizer.bos_token_id and encoded.labels[0] == IGNORE_INDEX


def test_in_sequence_end_tokens_are_real_tokens_even_when_pad_equals_eos():
    """Phi-2 has no pad token; the original set pad = eos and masked the in-sequence <|endoftext|>.
    Here masks come from lengths: both end tokens are supervised and attended."""
    import torch

    from mipha_lab.data.batching import collate_padded, sample_item

    tokenizer = load_tokenizer(LLM.get("tiny-phi-2"))
    encoded = encode(get_template("phi"), tokenizer, CONVERSATION)
    short = encode(get_template("phi"), tokenizer, CONVERSATION[2:])
    items = [
        sample_item(str(i), torch.tensor(e.input_ids), torch.tensor(e.labels), None)
        for i, e in enumerate([encoded, short])
    ]
    batch = collate_padded(items)
    assert batch["attention_mask"].sum(1).tolist() == [len(encoded.input_ids), len(short.input_ids)]
    eos = tokenizer.eos_token_id
    assert int(((batch["input_ids"][0] == eos) & (batch["attention_mask"][0] == 1)).sum()) == 2


def test_aliases_and_registry():
    assert {"plain", "phi", "v0", "phi-2", "phi-1.5", "gemma", "phi-3", "chatml"} <= set(TEMPLATES.names())
    assert get_template("v0") is get_template("phi")
    for card in LLM:  # every LM card names a registered template
        assert card.obj.template in TEMPLATES


def test_a_split_end_token_is_refused():
    tokenizer = load_tokenizer(LLM.get("tiny-phi-2"))
    custom = Template(
        name="x",
        description="",
        system=None,
        system_format="",
        user_format="{content}",
        assistant_tag="",
        generation_tag="",
        end="<|not-a-token|>",
    )
    with pytest.raises(MaskError, match=r"splits '<\|not-a-token\|>' into \d+ tokens"):
        check_tokenizer(custom, tokenizer)


def test_an_answer_no_token_covers_is_refused():
    tokenizer = load_tokenizer(LLM.get("tiny-phi-2"))
    custom = Template(
        name="x",
        description="",
        system=None,
        system_format="",
        user_format="{content}",
        assistant_tag="",
        generation_tag="",
        end="",
    )
    with pytest.raises(MaskError, match="sample s1: no token covers the answer"):
        encode(
            custom, tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}], sample_id="s1"
        )


def test_roles_must_alternate():
    from mipha_lab.errors import InputError

    with pytest.raises(InputError, match="expected 'assistant'"):
        get_template("phi").render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


@pytest.mark.parametrize("name", ["phi", "gemma", "phi-3", "chatml"])
def test_jinja_chat_template_renders_exactly_our_prompt(name):
    """The exported chat template: transformers' apply_chat_template with list content == our prompt."""
    from mipha_lab.model.tiny_tokenizer import tiny_tokenizer

    template = get_template(name)
    tokenizer = tiny_tokenizer(eos=template.end)
    tokenizer.chat_template = template.jinja()
    listed = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": "And the shape?"},
    ]
    ours = [
        {"role": "user", "content": "<image>\nWhat colour?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And the shape?"},
    ]
    system = [{"role": "system", "content": "Answer briefly."}]
    for a, b in ((listed, ours), (system + listed, system + ours)):
        assert tokenizer.apply_chat_template(a, add_generation_prompt=True, tokenize=False) == template.prompt(b)
    answered = listed[:2]
    rendered = "".join(s.text for s in template.render(ours[:2]))
    assert tokenizer.apply_chat_template(answered, tokenize=False) == rendered
