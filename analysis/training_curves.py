# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Training curves and costs
# Loss and throughput per optimizer step for every run, one panel per axis (its baseline included),
# and per run the mean tokens/s, MFU (GPUs with a known peak) and GPU-hours. Set `RUNS_ROOT` and `OUT`.

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from mipha_lab import analysis

RUNS_ROOT = Path(os.environ.get("RUNS_ROOT", "runs"))
OUT = Path(os.environ.get("OUT", "analysis/output"))
OUT.mkdir(parents=True, exist_ok=True)
cells = analysis.study(RUNS_ROOT)
by_axis = analysis.axes(cells)

# %%
fig, grid = plt.subplots(2, len(by_axis), figsize=(3.2 * len(by_axis), 5.5), squeeze=False)
for column, (axis, members) in enumerate(by_axis.items()):
    for cell in members:
        for run in cell.runs:
            steps = [m["step"] for m in run.metrics]
            label = f"{cell.name} s{run.config.get('seed', 0)}"
            grid[0][column].plot(steps, [m["loss"] for m in run.metrics], linewidth=0.8, label=label)
            grid[1][column].plot(steps, [m["tokens_per_s"] for m in run.metrics], linewidth=0.8, label=label)
    grid[0][column].set_title(axis, fontsize=10)
    grid[0][column].legend(fontsize=6)
    grid[1][column].set_xlabel("step")
grid[0][0].set_ylabel("loss")
grid[1][0].set_ylabel("tokens/s")
fig.tight_layout()
fig.savefig(OUT / "training_curves.png", dpi=120)

# %%
costs = [analysis.run_costs(run) for cell in cells for run in cell.runs]
lines = ["| run | steps | tokens/s | MFU | GPU-hours |", "|---|---:|---:|---:|---:|"]
lines += [f"| {c['run']} | {c['steps']} | {c['tokens_per_s']:.0f} | "
          f"{'-' if c['mfu'] is None else format(c['mfu'], '.1%')} | {c['gpu_hours']:.2f} |" for c in costs]
(OUT / "costs.md").write_text("\n".join(lines) + "\n")
display(Markdown("\n".join(lines)))
