"""Test settings: offline hub, caches in a scratch folder, and small shared helpers."""

from __future__ import annotations

import os
import subprocess
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


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """The golden data beside the clone (read in place, never copied into the repository)."""
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(f"golden fixtures not found at {SHARED_FIXTURES} (they sit beside the clone in CI)")
    return SHARED_FIXTURES


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """The synthetic shapes data, generated once for the session (tests only read it)."""
    from mipha_lab.data.synthetic import generate

    root = tmp_path_factory.mktemp("data")
    generate(root / "shapes", n_train=2000, n_eval=200, progress=False)
    return root


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real single-node Slurm cluster for the session (tests/local_slurm.py); SLURM_CONF points at it.
    A cluster that cannot start fails the tests that need it, with the reason: never a skip."""
    from tests.local_slurm import LocalSlurm, SlurmUnavailable

    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except (SlurmUnavailable, OSError, subprocess.SubprocessError) as err:
        pytest.fail(f"could not start the local Slurm cluster: {err}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    yield cluster
    cluster.stop()
    if previous is None:
        os.environ.pop("SLURM_CONF")
    else:
        os.environ["SLURM_CONF"] = previous
