"""The command-line chat: one-shot and interactive answers equal the evaluation path's greedy answers,
streaming shows exactly the final reply, sampling options are honoured, bad input is refused clearly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mipha_lab.data.templates import get_template
from mipha_lab.serve.chat import Conversation, ReplyStreamer, open_image
from mipha_lab.serve.cli import EXAMPLE_IMAGE

QUESTION = "What color is the shape on the left?"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from mipha_lab.model import build_vlm

    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("model")
    build_vlm("tiny-siglip-so400m-384", "tiny-phi-2").save_pretrained(folder)
    return folder


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mipha_lab.serve.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def eval_path_answer(model_dir: Path, text: str, max_new_tokens: int) -> str:
    """The same question through the batched evaluation code (an independent path to the same answer)."""
    from mipha_lab.eval.benchmarks import Question
    from mipha_lab.eval.generate import answer_questions
    from mipha_lab.model import load_model

    model = load_model(model_dir)
    question = Question(question_id=0, text=text, image=lambda: open_image(str(EXAMPLE_IMAGE)))
    answers = answer_questions(
        model, get_template(model.config.template), [question], max_new_tokens=max_new_tokens, progress=False
    )
    return answers[0]["text"]


def test_prompt_prints_only_the_greedy_reply(model_dir):
    out = cli("--model-path", str(model_dir), "--prompt", QUESTION, "--temperature", "0", "--max-new-tokens", "12")
    assert out.returncode == 0, out.stderr
    assert out.stdout == eval_path_answer(model_dir, QUESTION, 12) + "\n"


def test_interactive_session_streams_the_same_replies_and_obeys_commands(model_dir):
    args = ("--model-path", str(model_dir), "--temperature", "0", "--max-new-tokens", "8")
    first = cli(*args, "--prompt", QUESTION).stdout.strip()
    out = cli(*args, stdin=f"{QUESTION}\nand the other one?\n/reset\n{QUESTION}\n/image {EXAMPLE_IMAGE}\n\n")
    assert out.returncode == 0, out.stderr
    replies = [line.split("ASSISTANT: ", 1)[1] for line in out.stdout.splitlines() if "ASSISTANT: " in line]
    assert len(replies) == 3
    assert replies[0].strip() == first and replies[2].strip() == first  # /reset starts the conversation over
    assert "(conversation cleared)" in out.stderr and "(new image; conversation cleared)" in out.stderr


def test_sampling_options_are_honoured(model_dir):
    from mipha_lab.model import load_model

    model = load_model(model_dir)
    talk = Conversation(model, get_template("phi"), temperature=0.0, max_new_tokens=5)
    talk.set_image(open_image(str(EXAMPLE_IMAGE)))
    tokens: list[int] = []
    original = model.generate

    def counting(*a, **k):
        out = original(*a, **k)
        tokens.append(out.shape[1])
        return out

    model.generate = counting
    greedy = []
    for _ in range(2):
        talk.reset()
        greedy.append(talk.reply(QUESTION))
    assert greedy[0] == greedy[1] and max(tokens) <= 5  # greedy is deterministic; max-new-tokens honoured
    sampled = set()
    for seed in range(4):
        torch.manual_seed(seed)
        hot = Conversation(model, get_template("phi"), temperature=1.5, top_p=0.95, max_new_tokens=8)
        hot.set_image(open_image(str(EXAMPLE_IMAGE)))
        sampled.add(hot.reply(QUESTION))
    assert len(sampled) > 1  # temperature is applied (the original parsed and ignored it)


def test_streamer_never_shows_a_stop_string():
    from mipha_lab.model.tiny_tokenizer import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    shown: list[str] = []
    streamer = ReplyStreamer(tokenizer, ["<|endoftext|>"], shown.append)
    for piece in ["The", " circle", " is", " red", ".", "<|endoftext|>", " more"]:
        streamer.put(torch.tensor(tokenizer(piece, add_special_tokens=False)["input_ids"]))
    streamer.end()
    assert "".join(shown) == streamer.text() == "The circle is red."


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model-path", "/nonexistent/model"], "no such file or folder"),
        (["--load-8bit"], "need a CUDA GPU"),
        (["--image-file", "/nonexistent.png"], "cannot read the image /nonexistent.png"),
    ],
)
def test_bad_input_is_refused_clearly(model_dir, args, message):
    base = ["--model-path", str(model_dir), "--prompt", "hi", "--device", "cpu"]
    out = cli(*base, *args)
    assert out.returncode == 2 and message in out.stderr and out.stdout == ""


def test_a_folder_that_is_not_a_model_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llava"}')
    out = cli("--model-path", str(tmp_path), "--prompt", "hi")
    assert out.returncode == 2 and "unknown model format" in out.stderr and "mipha_phi" in out.stderr


def test_conv_mode_override_warns(model_dir):
    out = cli(
        "--model-path",
        str(model_dir),
        "--prompt",
        "hi",
        "--conv-mode",
        "chatml",
        "--max-new-tokens",
        "2",
        "--temperature",
        "0",
    )
    assert out.returncode == 0 and "differs from the template the model was trained with (phi)" in out.stderr


def test_pickle_weights_are_refused_unless_allowed(model_dir, tmp_path):
    """A folder whose weights are a pickle file: refused by default, read with weights_only=True when allowed."""
    import shutil

    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(model_dir, pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    args = ("--prompt", QUESTION, "--temperature", "0", "--max-new-tokens", "6")
    refused = cli("--model-path", str(pickled), *args)
    assert (
        refused.returncode == 2
        and "pickle files (pytorch_model.bin)" in refused.stderr
        and "--allow-pickle" in refused.stderr
    )
    allowed = cli("--model-path", str(pickled), "--allow-pickle", *args)
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout == cli("--model-path", str(model_dir), *args).stdout  # the same weights, the same reply
