"""Shared test fixtures: where the official reference fixtures live, and a relative-error helper.

The reference fixtures (official MAGI-1 code run on tiny random weights) are read in place from
``../shared/reference`` next to the checkout, or from ``$MAGI_REFERENCE_DIR``. Tests that need them
skip with a stated reason where the folder is absent (as in a user's clone).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(
    os.environ.get("MAGI_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference")
).resolve()

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error ||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Folder of the official reference fixtures; skips the test where it is absent."""
    if not (REFERENCE_DIR / "README.md").is_file():
        pytest.skip(
            f"reference fixtures not found at {REFERENCE_DIR} "
            "(set MAGI_REFERENCE_DIR to the shared/reference folder to run parity tests)"
        )
    return REFERENCE_DIR


def load_fixture(reference_dir: Path, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Load <name>.safetensors and <name>.json from the reference folder."""
    from safetensors.torch import load_file

    tensors = load_file(str(reference_dir / f"{name}.safetensors"))
    meta = json.loads((reference_dir / f"{name}.json").read_text())
    return tensors, meta
