"""Test settings: offline hub, caches in a scratch folder, and small shared helpers."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SCRATCH = Path(tempfile.mkdtemp(prefix="mipha-lab-tests-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", str(_SCRATCH / "hf"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_SCRATCH / "torch_extensions"))
os.environ.setdefault("WANDB_DIR", str(_SCRATCH / "wandb"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_fixtures() -> Path:
    """The golden data beside the clone (read in place, never copied into the repository)."""
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(f"golden fixtures not found at {SHARED_FIXTURES} (they sit beside the clone in CI)")
    return SHARED_FIXTURES
