"""What every notebook in analysis/ starts from, and its figure layout."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

from mipha_lab.analysis.study import Cell, study


class Setup(NamedTuple):
    """What a notebook works on: the study's cells, the output folder, resamples per interval, question-only."""

    cells: list[Cell]
    out: Path
    draws: int
    question_only: bool


def notebook_setup() -> Setup:
    """The cells under $RUNS_ROOT (default runs), the output folder $OUT (default analysis/output, created),
    $DRAWS resamples per interval (default 1000), and $QUESTION_ONLY=1 for question-only intervals (seed
    variance left out; labelled in every table)."""
    import matplotlib  # the `analysis` extra: only for the notebooks

    matplotlib.use("Agg")
    root = Path(os.environ.get("RUNS_ROOT", "runs"))
    out = Path(os.environ.get("OUT", "analysis/output"))
    out.mkdir(parents=True, exist_ok=True)
    cells = study(root)
    print(f"{sum(len(c.runs) for c in cells)} runs in {len(cells)} cells under {root}")
    return Setup(cells, out, int(os.environ.get("DRAWS", "1000")), os.environ.get("QUESTION_ONLY", "0") == "1")


def figure_grid(panels: int, columns: int = 4, size: tuple[float, float] = (3.4, 3.0)):
    """A matplotlib figure with `panels` axes wrapped into rows of `columns` (spare axes hidden)."""
    import matplotlib.pyplot as plt  # the `analysis` extra: only for the notebooks

    rows = max(1, math.ceil(panels / columns))
    cols = min(columns, max(panels, 1))
    fig, grid = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    flat = [ax for row in grid for ax in row]
    for spare in flat[panels:]:
        spare.set_visible(False)
    return fig, flat[:panels]
