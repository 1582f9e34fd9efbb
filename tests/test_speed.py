"""The performance levers (train/speed.py, model/fused_loss.py, the engine's fused AdamW) change nothing
that is computed: each is checked against the plain path - the same transformers modules without the
lever, or PyTorch's own cross-entropy and AdamW - on padded and packed batches of the tiny model, and
each is checked to be in effect (a lever that silently does nothing would pass an equality test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mipha_lab.config import CompileConfig, load_experiment
from mipha_lab.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mipha_lab.data.batching import collate_packed, collate_padded, sample_item
from mipha_lab.errors import ConfigError
from mipha_lab.model import build_model
from mipha_lab.model.fused_loss import supervised_loss_sum
from mipha_lab.train.engine import TorchEngine
from mipha_lab.train.memory import RECOMPUTE_ORDER, estimate_gib
from mipha_lab.train.policy import apply_policy
from mipha_lab.train.speed import apply_speed, lm_recompute, micro_batch_tokens, set_layers
from mipha_lab.train.step import batch_forward

REPO = Path(__file__).resolve().parents[1]
MICRO = REPO / "experiments" / "micro.yaml"


def experiment(*overrides: str):
    return load_experiment(MICRO, list(overrides))


def items(model, count: int = 5, seed: int = 0) -> list[dict[str, Any]]:
    """Dataset items as the collators take them: an image (all but the last), then text whose last
    tokens are supervised."""
    gen = torch.Generator().manual_seed(seed)
    size = model.vision_tower.image_spec.size
    out = []
    for index in range(count):
        text = 6 + 3 * index
        ids = torch.randint(3, model.lm.vocab_size, (text,), generator=gen)
        labels = ids.clone()
        labels[: text // 2] = IGNORE_INDEX
        pixels = None
        if index < count - 1:
            ids = torch.cat([torch.tensor([IMAGE_TOKEN_INDEX]), ids])
            labels = torch.cat([torch.tensor([IGNORE_INDEX]), labels])
            pixels = torch.randn(1, 3, size, size, generator=gen)
        out.append(sample_item(f"s{index}", ids, labels, pixels, [model.num_image_tokens] * (pixels is not None)))
    return out


@pytest.fixture(scope="module")
def setup():
    exp = experiment()
    torch.manual_seed(0)
    model = build_model(exp, with_tokenizer=False).train()
    stage = exp.stages[1]  # everything trains
    apply_policy(model, stage, exp.model.llm, exp.quirks)
    return exp, model, stage


def loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = batch_forward(model, batch)
    out.loss_sum.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(out.loss_sum.detach()), grads


def assert_same(got, want, tol: float = 1e-5) -> None:
    assert got[0] == pytest.approx(want[0], rel=tol, abs=tol)
    assert got[1].keys() == want[1].keys() and got[1]
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=tol, atol=tol * max(1.0, float(grad.abs().max())))


def count_calls(cls: type, monkeypatch) -> list[int]:
    """Calls of a module class's forward, recomputation included (checkpointing calls the forward itself,
    past the module's hooks)."""
    calls, original = [0], cls.forward

    def forward(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", forward)
    return calls


def checkpointing_on(lm) -> bool:
    """transformers 5.2x renamed `is_gradient_checkpointing` (kept, deprecated)."""
    name = "is_activation_checkpointing" if hasattr(lm, "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(lm, name))


@pytest.mark.parametrize("collate", [collate_padded, collate_packed], ids=["padded", "packed"])
def test_recomputation_whole_or_selective_leaves_loss_and_gradients_unchanged(setup, collate, monkeypatch):
    _, model, stage = setup
    batch = collate(items(model))
    set_layers(model, stage, "none")
    plain = loss_and_grads(model, batch)
    layers = len(model.lm.layers)
    for option, sub_block, runs in (("attention", "self_attn", 2), ("mlp", "mlp", 2), ("none", "mlp", 1)):
        with monkeypatch.context() as patch:
            calls = count_calls(type(getattr(model.lm.layers[0], sub_block)), patch)
            set_layers(model, stage, option)
            assert_same(loss_and_grads(model, batch), plain)
        # recomputed sub-blocks run again in backward; switching back to none undoes the previous stage's choice
        assert calls[0] == runs * layers, (option, calls[0])
    set_layers(model, stage, "full")
    assert checkpointing_on(model.language_model)
    assert_same(loss_and_grads(model, batch), plain)
    set_layers(model, stage, "none")
    assert not checkpointing_on(model.language_model)


def test_auto_recomputation_is_the_least_that_fits_the_budget(setup):
    exp, model, stage = setup
    lm = model.lm
    tokens = micro_batch_tokens(stage, model)
    estimates = [estimate_gib(model, lm.width, len(lm.layers), tokens, o, "torch") for o in RECOMPUTE_ORDER]
    assert estimates == sorted(estimates, reverse=True) and len(set(estimates)) == 4  # each option saves memory
    for index, option in enumerate(RECOMPUTE_ORDER):
        auto = stage.model_copy(
            update={
                "activation_checkpointing": stage.activation_checkpointing.model_copy(
                    update={"lm": "auto", "memory_budget_gib": estimates[index] * 1.0001}
                )
            }
        )
        assert lm_recompute(model, auto, exp, 1, None) == option
    below_all = auto.activation_checkpointing.model_copy(update={"memory_budget_gib": estimates[-1] / 2})
    assert lm_recompute(model, auto.model_copy(update={"activation_checkpointing": below_all}), exp, 1, None) == "full"
    no_budget = auto.activation_checkpointing.model_copy(update={"memory_budget_gib": None})
    cpu = auto.model_copy(update={"activation_checkpointing": no_budget})
    assert lm_recompute(model, cpu, exp, 1, None) == "none"  # the CPU: memory is not the limit
    assert lm_recompute(model, cpu, exp, 1, 2 * estimates[0] / 0.9) == "none"  # a GPU with room to spare


def test_checkpointing_modes_are_read_from_yaml_and_bad_ones_named():
    exp = experiment("stages.1.activation_checkpointing.lm=mlp")
    assert exp.stages[1].activation_checkpointing.lm == "mlp"
    with pytest.raises(ConfigError, match=r"lm"):
        experiment("stages.1.activation_checkpointing.lm=layers")


def test_chunked_loss_equals_pytorch_cross_entropy():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    hidden = torch.randn(11, 16, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    results = []
    for run in (
        lambda: F.cross_entropy(head(hidden).float(), targets, reduction="sum"),
        lambda: supervised_loss_sum(head, hidden, targets, "chunked", rows=3),
    ):
        head.zero_grad()
        hidden.grad = None
        loss = run()
        loss.backward()
        results.append([loss.detach(), hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want)


def test_chunked_loss_in_the_model_equals_the_plain_one(setup):
    _, model, stage = setup
    batch = collate_packed(items(model))
    set_layers(model, stage, "none")
    plain = loss_and_grads(model, batch)
    model.fused_loss = "chunked"
    try:
        assert_same(loss_and_grads(model, batch), plain)
    finally:
        model.fused_loss = "off"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger-Kernel's fused loss needs a CUDA GPU")
def test_liger_loss_equals_pytorch_cross_entropy():
    pytest.importorskip("liger_kernel")
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 1000, bias=False).cuda()
    hidden = torch.randn(37, 64, device="cuda", requires_grad=True)
    targets = torch.randint(0, 1000, (37,), device="cuda")
    want = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    got = supervised_loss_sum(head, hidden, targets, "liger")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


def test_fused_adamw_updates_as_adamw(setup):
    """After one step (the same gradients) the updates agree to rounding; after three, to a small share
    of the learning rate (the gradients differ by that rounding, and Adam divides by their size)."""
    _, model, stage = setup
    batch = collate_padded(items(model))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    after: dict[bool, list[dict[str, torch.Tensor]]] = {}
    for fused in (False, True):
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(start[name])
        fused_stage = stage.model_copy(update={"speed": stage.speed.model_copy(update={"fused_optimizer": fused})})
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "name": "all"}]
        engine = TorchEngine(model, groups, fused_stage, total_steps=3)
        assert engine.optimizer.defaults["fused"] == (True if fused else None)
        after[fused] = []
        for _ in range(3):
            batch_forward(model, batch).loss.backward()
            engine.step()
            after[fused].append({n: p.detach() - start[n] for n, p in model.named_parameters()})
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(start[name])
    lr = stage.optimizer.lr
    assert max(float(u.abs().max()) for u in after[False][0].values()) > 0.5 * lr  # the step moved the weights
    for name in start:
        torch.testing.assert_close(after[True][0][name], after[False][0][name], rtol=1e-4, atol=1e-4 * lr)
        torch.testing.assert_close(after[True][2][name], after[False][2][name], rtol=1e-2, atol=1e-2 * lr)


def test_regional_compilation_matches_eager_without_graph_breaks(setup):
    from torch._dynamo.utils import counters

    _, model, stage = setup
    batches = [collate_padded(items(model)), collate_packed(items(model, count=4, seed=1))]
    set_layers(model, stage, "none")
    plain = [loss_and_grads(model, batch) for batch in batches]
    compiled = stage.model_copy(update={"speed": stage.speed.model_copy(update={"compile": CompileConfig(lm=True)})})
    counters.clear()
    try:
        set_layers(model, compiled, "none")
        assert all("forward" in vars(layer.mlp) for layer in model.lm.layers)
        for batch, want in zip(batches, plain, strict=True):  # two lengths: one graph for any number of tokens
            assert_same(loss_and_grads(model, batch), want, tol=1e-4)
        assert not counters["graph_break"], dict(counters["graph_break"])
        # one graph per batch shape class (a packed row is one row), shared by every layer: not one per layer
        assert 1 <= counters["stats"]["unique_graphs"] <= len(batches) < 2 * len(model.lm.layers)
    finally:
        set_layers(model, stage, "none")
    assert not any("forward" in vars(layer.mlp) for layer in model.lm.layers)


def test_a_forward_another_library_set_is_kept_under_the_wrapper(setup):
    _, model, stage = setup
    mlp = model.lm.layers[0].mlp
    seen = []
    class_forward = mlp.forward

    def library_forward(*args, **kwargs):  # as accelerate's hooks replace an instance's forward
        seen.append(1)
        return class_forward(*args, **kwargs)

    mlp.forward = library_forward
    try:
        batch = collate_padded(items(model))
        set_layers(model, stage, "mlp")
        loss_and_grads(model, batch)
        assert len(seen) == 2  # forward, and again when backward recomputes it
        set_layers(model, stage, "none")
        assert vars(mlp)["forward"] is library_forward
    finally:
        del mlp.forward


def test_frozen_tower_runs_without_autograd_in_bf16():
    """Stage 1 (the tower frozen): its features carry no autograd graph, and under the engine's bf16 autocast
    its matmuls run in bf16."""
    exp = experiment()
    model = build_model(exp, with_tokenizer=False).train()
    stage = exp.stages[0]
    apply_policy(model, stage, exp.model.llm, exp.quirks)
    apply_speed(model, stage, exp, torch.device("cpu"), 1)
    size = model.vision_tower.image_spec.size
    dtypes = set()
    for module in model.vision_tower.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.vision_tower(torch.randn(2, 3, size, size))
    assert features.grad_fn is None and not features.requires_grad
    assert dtypes == {torch.bfloat16}


def test_importing_mipha_lab_shortens_openmps_spin_unless_set():
    """Set before torch loads libgomp (bench/contention.py measures why); the user's own value wins."""
    code = "import mipha_lab, os; print(os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    ours = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    theirs = subprocess.run(
        [sys.executable, "-c", code], env={**env, "GOMP_SPINCOUNT": "5"}, capture_output=True, text=True, check=True
    )
    assert int(ours.stdout) < 300_000 and theirs.stdout.strip() == "5"


KEPT_AFTER_FREE = """
import ctypes, sys
libc = ctypes.CDLL("libc.so.6")
if sys.argv[1] == "keep":
    from mipha_lab.train.host import keep_freed_memory
    assert keep_freed_memory()
class MallInfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(name, ctypes.c_size_t) for name in names.split()]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
block = libc.malloc(20 << 20)  # an activation-sized block, written, then freed
ctypes.memset(block, 1, 20 << 20)
libc.free(block)
print(libc.mallinfo2().fordblks)  # bytes the process keeps free for reuse
"""

GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_training_keeps_freed_memory_instead_of_faulting_it_in_every_step():
    """glibc's default gives a freed activation-sized block back to the kernel, so the next step faults it in
    again page by page; after keep_freed_memory() (what the trainer calls first) the process keeps it."""
    run = [sys.executable, "-c", KEPT_AFTER_FREE]
    kept = {
        mode: int(subprocess.run([*run, mode], capture_output=True, text=True, check=True).stdout)
        for mode in ("default", "keep")
    }
    assert kept["default"] < 20 << 20 <= kept["keep"]


def test_fused_loss_under_zero3_is_refused_by_name():
    """DeepSpeed ZeRO-3 keeps the head's weight partitioned outside the head's forward; the chunked loss's
    recomputation in backward then sees an empty weight (a CheckpointError deep in the step), so the stage
    refuses the combination before training."""
    exp = experiment("engine.zero_stage=3", "stages.1.speed.fused_loss=chunked")
    model = build_model(exp, with_tokenizer=False)
    with pytest.raises(ConfigError, match=r"stage 'instruct': speed.fused_loss: chunked does not work under ZeRO-3"):
        apply_speed(model, exp.stages[1], exp, torch.device("cpu"), 2)
    apply_speed(model, exp.stages[1], exp, torch.device("cpu"), 1)  # one process trains without DeepSpeed
