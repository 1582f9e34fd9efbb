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
# # The overhaul study: one table per axis
# Every axis of the Mipha study against its baseline (the base recipe): the mean score of each cell
# over its seeds per benchmark (the paper's column order), the delta against the baseline with a 95%
# interval from a paired bootstrap over questions and seeds, and the mean z-score across benchmarks.
# Set `RUNS_ROOT` (default `runs`) and `OUT` (default `analysis/output`).

# %%
from IPython.display import Markdown, display

from mipha_lab import analysis

cells, OUT, DRAWS = analysis.notebook_setup()

# %%
tables = {axis: analysis.axis_table(members, DRAWS) for axis, members in analysis.axes(cells).items()}
markdown = "\n\n".join(analysis.format_axis_table(axis, rows) for axis, rows in tables.items())
(OUT / "overhaul_tables.md").write_text(markdown + "\n")
display(Markdown(markdown))

# %% [markdown]
# The aggregate per axis: mean z-score of each cell across benchmarks (higher is better).

# %%
fig, panels = analysis.figure_grid(len(tables))
for plot, (axis, rows) in zip(panels, tables.items()):
    names = [r["cell"] for r in rows]
    plot.bar(range(len(rows)), [r["aggregate_z"] or 0 for r in rows],
             color=["tab:gray" if r["baseline"] else "tab:blue" for r in rows])
    plot.set_xticks(range(len(rows)), names, rotation=45, ha="right", fontsize=8)
    plot.set_title(axis, fontsize=10)
    plot.axhline(0, color="black", linewidth=0.5)
panels[0].set_ylabel("mean z-score")
fig.tight_layout()
fig.savefig(OUT / "overhaul_aggregate.png", dpi=120)
