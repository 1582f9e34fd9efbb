"""Heavy optional dependencies are imported where they are used, not at package import."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("deepspeed", "submitit", "wandb", "timm", "open_clip", "peft")


def test_model_and_data_code_import_without_heavy_dependencies():
    code = (
        "import sys, torch, mipha_lab, mipha_lab.model, mipha_lab.model.image_processing, mipha_lab.registry\n"
        "from mipha_lab.model import build_vlm\n"
        "m = build_vlm('tiny-siglip-so400m-384', 'tiny-phi-2')\n"
        "ids = torch.tensor([[5, -200, 6]]); m(ids, torch.ones_like(ids), torch.randn(1, 3, 32, 32))\n"
        f"print(','.join(k for k in {HEAVY!r} if k in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
