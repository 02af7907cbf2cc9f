"""Fixtures shared across the test folders, one copy each.

- ``reference_dir``: the official reference fixtures; skips where the folder is absent.
- ``tiny_checkpoint``: scripts/make_tiny_checkpoint.py's tiny set (seed 0), written once per
  session into ``<tmp>/tiny/checkpoints``. Shared read-only: tests that damage files copy it.
- ``tiny`` / ``pipe``: the tiny config with 8 steps per chunk and window 4 (two steps per stage,
  so resume points and mid-stage steps both occur) and a CPU pipeline on it, one per module.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# plain helper modules holding asserts: rewrite them as pytest does test modules (before import)
pytest.register_assert_rewrite("tests.helpers", "tests.models.helpers", "tests.distributed.ranks")

import torch  # noqa: E402

from magi.pipeline import MagiPipeline  # noqa: E402
from tests.helpers import REFERENCE_DIR, make_tiny, write_tiny_config  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Folder of the official reference fixtures; skips the test where it is absent."""
    if not (REFERENCE_DIR / "README.md").is_file():
        pytest.skip(
            f"reference fixtures not found at {REFERENCE_DIR} "
            "(set MAGI_REFERENCE_DIR to the shared/reference folder to run parity tests)"
        )
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint folder (official layout); do not modify it, copy it first."""
    return make_tiny(tmp_path_factory.mktemp("tiny") / "checkpoints")


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Config file of the tiny model with 8 steps per chunk, window 4, on the shared checkpoint;
    sets SPECIAL_TOKEN_PATH to its special tokens."""
    root = tmp_path_factory.mktemp("state")
    os.environ["SPECIAL_TOKEN_PATH"] = str(tiny_checkpoint / "special_tokens.npz")
    return write_tiny_config(root / "config.json", tiny_checkpoint, num_steps=8, window_size=4)


@pytest.fixture(scope="module")
def pipe(tiny: Path) -> MagiPipeline:
    """A CPU pipeline on ``tiny`` (8 steps per chunk, window 4)."""
    return MagiPipeline.from_config(tiny, device="cpu")
