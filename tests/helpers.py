"""Plain helpers the tests share (no fixtures here: those live in conftest.py).

Where the repository and the official reference fixtures are, a relative-error measure, the one
loader of scripts/make_tiny_checkpoint.py, and a free loopback port. The reference fixtures
(official MAGI-1 code run on tiny random weights) are read in place from ``../shared/reference``
next to the checkout, or from ``$MAGI_REFERENCE_DIR``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from magi.config import load_config, save_config

if TYPE_CHECKING:
    from magi.pipeline import StepInfo

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO_ROOT / "example" / "tiny" / "config.json"
CHUNK = 24  # frames per chunk of the tiny config (6 latent frames)
REFERENCE_DIR = Path(os.environ.get("MAGI_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference")).resolve()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error ||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def load_fixture(reference_dir: Path, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Load <name>.safetensors and <name>.json from the reference folder."""
    from safetensors.torch import load_file

    tensors = load_file(str(reference_dir / f"{name}.safetensors"))
    meta = json.loads((reference_dir / f"{name}.json").read_text())
    return tensors, meta


def tiny_script() -> ModuleType:
    """scripts/make_tiny_checkpoint.py as a module (scripts/ is not a package)."""
    path = REPO_ROOT / "scripts" / "make_tiny_checkpoint.py"
    spec = importlib.util.spec_from_file_location("make_tiny_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tiny(out: Path, config: Path = TINY_CONFIG) -> Path:
    """Write the tiny checkpoint set (seed 0) for `config` into `out`; returns `out`."""
    return tiny_script().make_tiny_checkpoint(out, config, seed=0)


def write_tiny_config(path: Path, ck: Path, **runtime: object) -> Path:
    """The tiny example config with its paths pointing at checkpoint folder `ck`, saved to `path`.

    `runtime` overrides further runtime_config fields (num_steps, window_size, ...).
    """
    cfg = load_config(TINY_CONFIG)
    paths = dict(load=str(ck / "magi" / "tiny"), t5_pretrained=str(ck / "t5"), vae_pretrained=str(ck / "vae"))
    save_config(cfg.replace(runtime=dataclasses.replace(cfg.runtime, **{**paths, **runtime})), path)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def infer_argv(config: Path, *args: str) -> list[str]:
    """``python -m magi.infer --config CONFIG --device cpu ARGS`` as a subprocess argv."""
    return [sys.executable, "-m", "magi.infer", "--config", str(config), "--device", "cpu", *args]


def infer_env(config: Path) -> dict[str, str]:
    """The environment for `infer_argv`: this checkout importable, the special tokens of the
    checkpoint that `config` loads (they sit beside its t5 folder)."""
    tokens = Path(load_config(config).runtime.t5_pretrained).parent / "special_tokens.npz"
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), SPECIAL_TOKEN_PATH=str(tokens))


def stop_at(n: int) -> Callable[[StepInfo], None]:
    """A step callback: Ctrl-C when the (n+1)-th generated chunk turns clean: n chunks are
    written, it is not."""
    finished: list[int] = []

    def hook(info: StepInfo) -> None:
        if info.finished is not None:
            finished.append(info.finished)
            if len(finished) == n + 1:
                raise KeyboardInterrupt

    return hook


def decode_mp4(path: Path) -> torch.Tensor:
    """The frames of the mp4 at ``path`` as uint8 [T, H, W, 3], decoded by ffmpeg."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    w, h = next(reader)["size"]
    return torch.stack([torch.frombuffer(bytearray(f), dtype=torch.uint8).reshape(h, w, 3) for f in reader])


def mp4_frames(path: Path) -> int:
    """Frames in the mp4 at `path`, counted by ffmpeg."""
    import imageio_ffmpeg

    return imageio_ffmpeg.count_frames_and_secs(str(path))[0]
