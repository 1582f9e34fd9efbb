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
from IPython.display import Markdown, display

from mipha_lab.analysis.notebook import figure_grid, notebook_setup
from mipha_lab.analysis.study import axes, run_costs

setup = notebook_setup()
by_axis = axes(setup.cells)

# %%
for metric, label in (("loss", "loss"), ("tokens_per_s", "tokens/s")):
    fig, panels = figure_grid(len(by_axis))
    for plot, (axis, members) in zip(panels, by_axis.items(), strict=False):
        for cell in members:
            for run in cell.runs:
                plot.plot(
                    [m["step"] for m in run.metrics],
                    [m[metric] for m in run.metrics],
                    linewidth=0.8,
                    label=f"{cell.name} s{run.config.get('seed', 0)}",
                )
        plot.set_title(axis, fontsize=10)
        plot.set_xlabel("step")
        plot.set_ylabel(label)
        plot.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(setup.out / f"training_curves_{metric}.png", dpi=100)

# %%
costs = [run_costs(run) for cell in setup.cells for run in cell.runs]
lines = ["| run | steps | tokens/s | MFU | GPU-hours |", "|---|---:|---:|---:|---:|"]
lines += [
    f"| {c['run']} | {c['steps']} | {c['tokens_per_s']:.0f} | "
    f"{'-' if c['mfu'] is None else format(c['mfu'], '.1%')} | {c['gpu_hours']:.2f} |"
    for c in costs
]
(setup.out / "costs.md").write_text("\n".join(lines) + "\n")
display(Markdown("\n".join(lines)))
