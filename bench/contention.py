r"""Two training jobs side by side on the same cores: how much each slows, with libgomp's default spin and
with the short spin mipha-lab sets (`GOMP_SPINCOUNT`, mipha_lab/__init__.py).

PyTorch's CPU kernels run on OpenMP threads, and libgomp lets a thread that has finished its share spin
for 300,000 iterations before it sleeps. Alone, that saves a wake-up; next to another busy process the
spinning threads hold the cores the other process needs, and both slow far beyond the 2x of sharing
them. Each job here is the demo's stage-2 step (its tiny model, 32 samples of an image and ~100 text
tokens, forward, backward and AdamW) in its own process, timed alone and then two at once, first with
libgomp's default and then with mipha-lab's (alone: the two interleaved, twice, the best of each).
Reported: seconds per step alone and paired, and the slowdown (paired over alone) of each.

    python bench/contention.py [--smoke] [--out DIR]
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import mipha_lab  # noqa: F401  (first: it sets the spin count before torch loads libgomp)
from bench._common import parser
from bench._results import report

LIBGOMP_DEFAULT = "300000"
DEMO = REPO / "experiments" / "demo_shapes.yaml"


def worker(steps: int) -> None:
    """Run `steps` demo stage-2 steps after two of warm-up; print the median seconds per step."""
    import torch

    from mipha_lab.config import load_experiment
    from mipha_lab.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from mipha_lab.data.batching import collate_padded, sample_item
    from mipha_lab.model import build_model
    from mipha_lab.train.policy import apply_policy
    from mipha_lab.train.step import batch_forward

    experiment = load_experiment(DEMO)
    stage = experiment.stages[-1]
    torch.manual_seed(0)
    model = build_model(experiment, with_tokenizer=False).train()
    groups, _ = apply_policy(model, stage, experiment.model.llm, experiment.quirks)
    optimizer = torch.optim.AdamW([p for g in groups for p in g["params"]], lr=1e-4)
    size = model.vision_tower.image_spec.size
    generator = torch.Generator().manual_seed(0)
    items = []
    for index in range(stage.micro_batch):
        ids = torch.randint(3, model.lm.vocab_size, (100,), generator=generator)
        ids[0] = IMAGE_TOKEN_INDEX
        labels = ids.clone()
        labels[:60] = IGNORE_INDEX
        pixels = torch.randn(1, 3, size, size, generator=generator)
        items.append(sample_item(str(index), ids, labels, pixels, [model.num_image_tokens]))
    batch = collate_padded(items)
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        batch_forward(model, batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - start)
    print(f"{statistics.median(times):.6f}")


def jobs(count: int, steps: int, spin: str | None) -> list[float]:
    """`count` workers at once; each one's median seconds per step."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if spin is not None:
        env["GOMP_SPINCOUNT"] = spin
    command = [sys.executable, __file__, "--worker", str(steps)]
    running = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(count)]
    outputs = [p.communicate()[0] for p in running]
    if any(p.returncode for p in running):
        raise SystemExit(f"a worker failed: {outputs}")
    return [float(out.strip().splitlines()[-1]) for out in outputs]


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]))
        return 0
    args = parser(__doc__, "a few steps per job (what CI runs)").parse_args()
    steps = 3 if args.smoke else 60
    figures: dict = {"smoke": args.smoke, "steps": steps, "cores": os.cpu_count(), "policies": {}}
    policies = (("libgomp default", LIBGOMP_DEFAULT), ("mipha-lab", None))
    # alone: the policies interleaved, twice, best of each (one run alone moves by 20% on a shared machine)
    alone: dict[str, float] = {}
    for _ in range(2):
        for name, spin in policies:
            alone[name] = min(alone.get(name, math.inf), jobs(1, steps, spin)[0])
    for name, spin in policies:
        paired = jobs(2, steps, spin)
        figures["policies"][name] = {
            "GOMP_SPINCOUNT": spin or os.environ.get("GOMP_SPINCOUNT") or "mipha-lab's default",
            "alone_s_per_step": alone[name],
            "paired_s_per_step": paired,
            "slowdown": max(paired) / alone[name],
        }
        print(f"{name}: alone {alone[name]:.3f} s/step, paired {paired[0]:.3f} / {paired[1]:.3f}", file=sys.stderr)
    ours, default = figures["policies"]["mipha-lab"], figures["policies"]["libgomp default"]
    summary = (
        f"paired slowdown {ours['slowdown']:.2f}x with mipha-lab's spin vs {default['slowdown']:.2f}x with "
        f"libgomp's default; alone {ours['alone_s_per_step']:.3f} vs {default['alone_s_per_step']:.3f} s/step"
    )
    return report("contention", figures, args.out, summary)


if __name__ == "__main__":
    sys.exit(main())
