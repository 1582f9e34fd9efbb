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
# # The paper's conclusions against our runs
# Each claim of the Mipha paper is a test on one axis, judged on the mean over benchmarks of the paired
# deltas (points) with its 95% bootstrap interval: supported, contradicted, or inconclusive given the
# interval ("similar" claims use a margin of 1 point). Set `RUNS_ROOT` and `OUT`.

# %%
import json

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from mipha_lab import analysis

cells, OUT, DRAWS = analysis.notebook_setup()
rows = analysis.claims_table(cells, DRAWS)

# %%
lines = ["| axis | claim | verdict | evidence (delta, 95% interval) |", "|---|---|---|---|"]
lines += [f"| {r['axis']} | {r['claim']} | {r['verdict']} | {r['evidence']} |" for r in rows]
(OUT / "claims.md").write_text("\n".join(lines) + "\n")
(OUT / "claims.json").write_text(json.dumps(rows, indent=2) + "\n")
display(Markdown("\n".join(lines)))

# %%
colours = {"supported": "tab:green", "contradicted": "tab:red", "inconclusive": "tab:orange", "not run": "tab:gray"}
fig, plot = plt.subplots(figsize=(7, 0.5 + 0.45 * len(rows)))
plot.barh(range(len(rows)), [1] * len(rows), color=[colours[r["verdict"]] for r in rows])
plot.set_yticks(range(len(rows)), [f"{r['axis']}: {r['verdict']}" for r in rows], fontsize=8)
plot.set_xticks([])
plot.invert_yaxis()
fig.tight_layout()
fig.savefig(OUT / "claims.png", dpi=120)
