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
# Each claim of the Mipha paper is a test on one axis, judged on the mean over benchmarks of the deltas
# (0-100 points each) with its 95% interval over seeds and questions: supported, contradicted, or
# inconclusive given the interval ("similar" claims use a margin of 1 point). Each comparison states
# the seeds and questions behind it and the smallest mean delta it would detect (80% power), so an
# "inconclusive" says how large an effect was ruled out. A side with one seed gets no verdict
# ("one seed: seed variance unmeasured") unless `QUESTION_ONLY=1`, and then every verdict is labelled.
# Set `RUNS_ROOT`, `OUT` and `DRAWS`.

# %%
import json

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from mipha_lab.analysis.notebook import notebook_setup
from mipha_lab.analysis.verdicts import claims_table, format_claims

setup = notebook_setup()
rows = claims_table(setup.cells, setup.draws, setup.question_only)

# %%
markdown = format_claims(rows)
(setup.out / "claims.md").write_text(markdown + "\n")
(setup.out / "claims.json").write_text(json.dumps(rows, indent=2) + "\n")
display(Markdown(markdown))

# %%
colours = {"supported": "tab:green", "contradicted": "tab:red", "inconclusive": "tab:orange"}
fig, plot = plt.subplots(figsize=(7, 0.5 + 0.45 * len(rows)))
plot.barh(range(len(rows)), [1] * len(rows), color=[colours.get(r["verdict"].split(" (")[0], "tab:gray") for r in rows])
plot.set_yticks(range(len(rows)), [f"{r['axis']}: {r['verdict']}" for r in rows], fontsize=8)
plot.set_xticks([])
plot.invert_yaxis()
fig.tight_layout()
fig.savefig(setup.out / "claims.png", dpi=120)
