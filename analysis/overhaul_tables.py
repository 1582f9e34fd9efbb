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
# interval over seeds and questions (the model: `mipha_lab/analysis/__init__.py`; a side with one seed
# gets no interval unless `QUESTION_ONLY=1`, and then every table says so), the mean delta over
# benchmarks in points, and the mean z-score across benchmarks.
# Set `RUNS_ROOT` (default `runs`), `OUT` (default `analysis/output`), `DRAWS` (default 1000).

# %%
from IPython.display import Markdown, display

from mipha_lab.analysis.notebook import figure_grid, notebook_setup
from mipha_lab.analysis.study import axes
from mipha_lab.analysis.verdicts import axis_table, format_axis_table

setup = notebook_setup()

# %%
tables = {axis: axis_table(members, setup.draws, setup.question_only) for axis, members in axes(setup.cells).items()}
markdown = "\n\n".join(format_axis_table(axis, rows) for axis, rows in tables.items())
(setup.out / "overhaul_tables.md").write_text(markdown + "\n")
display(Markdown(markdown))

# %% [markdown]
# The aggregate per axis: mean z-score of each cell across benchmarks (higher is better).

# %%
fig, panels = figure_grid(len(tables))
for plot, (axis, rows) in zip(panels, tables.items(), strict=False):
    names = [r["cell"] for r in rows]
    plot.bar(
        range(len(rows)),
        [r["aggregate_z"] or 0 for r in rows],
        color=["tab:gray" if r["baseline"] else "tab:blue" for r in rows],
    )
    plot.set_xticks(range(len(rows)), names, rotation=45, ha="right", fontsize=8)
    plot.set_title(axis, fontsize=10)
    plot.axhline(0, color="black", linewidth=0.5)
panels[0].set_ylabel("mean z-score")
fig.tight_layout()
fig.savefig(setup.out / "overhaul_aggregate.png", dpi=120)
