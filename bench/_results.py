"""Where benchmark results go, with the machine and versions they were measured on."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def write_result(name: str, figures: dict, out_dir: Path | None = None) -> Path:
    folder = out_dir or RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"name": name, "machine": machine(), **figures}, indent=2) + "\n")
    return path


def report(name: str, figures: dict, out_dir: Path | None, summary: str) -> int:
    """Write the results and print the benchmark's line, `<name>: <ratio> (<what over what>) -> <file>`;
    returns the exit status."""
    path = write_result(name, figures, out_dir)
    print(f"{name}: {summary} -> {path}")
    return 0
