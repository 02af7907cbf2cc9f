"""Fixtures of the CLI tests: a recording stand-in for the pipeline and a working directory with
placeholder checkpoints, a config, an image and a video."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from magi import pipeline as real_pipeline
from magi.config import preset_dict
from magi.video_io import Mp4Writer
from tests.cli.fakes import Recorder

TOKEN_FLAGS = (
    "PAD_HQ",
    "PAD_DURATION",
    "PAD_STATIC",
    "PAD_DYNAMIC",
    "PAD_BORDERNESS",
    "PAD_THREE_D_MODEL",
    "PAD_TWO_D_ANIME",
    "NEG_PROMPT",
)


@pytest.fixture
def fake_pipeline(monkeypatch):
    Recorder.calls = []
    module = types.ModuleType("magi.pipeline")
    module.MagiPipeline = Recorder
    # the CLI's checks use the pipeline's own helpers (one device check, one special-token lookup)
    for name in ("resolve_device", "check_special_tokens", "VideoWriteError"):
        setattr(module, name, getattr(real_pipeline, name))
    # the workdir's checkpoint files are placeholders: of the start-up file checks, keep the
    # special-token lookup (the weight checks are tested on real tiny checkpoints elsewhere)
    module.check_files = real_pipeline.check_special_tokens
    monkeypatch.setitem(sys.modules, "magi.pipeline", module)
    return Recorder.calls


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory with fake checkpoints, a config pointing at them, an image and a video."""
    for sub in ("ck/dit/inference_weight.distill", "ck/t5/t5-v1_1-xxl", "ck/vae"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "ck/dit/inference_weight.distill/model.safetensors").write_bytes(b"x")
    (tmp_path / "ck/t5/t5-v1_1-xxl/config.json").write_text("{}")
    (tmp_path / "ck/vae/config.json").write_text("{}")
    (tmp_path / "ck/vae/diffusion_pytorch_model.safetensors").write_bytes(b"x")
    data = preset_dict("4.5B_distill")
    data["runtime_config"].update(load="ck/dit", t5_pretrained="ck/t5", vae_pretrained="ck/vae")
    (tmp_path / "cfg.json").write_text(json.dumps(data))
    _write_ppm(tmp_path / "img.ppm", 48, 80)
    with Mp4Writer(tmp_path / "pre.mp4", 24) as writer:  # 8 frames: enough for a v2v prefix
        writer.append(torch.zeros(8, 3, 32, 32, dtype=torch.uint8))
    monkeypatch.chdir(tmp_path)
    for flag in TOKEN_FLAGS + ("SPECIAL_TOKEN_PATH", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(flag, raising=False)
    # the two tokens that are on by default read special_tokens.npz; none is here
    monkeypatch.setenv("PAD_HQ", "0")
    monkeypatch.setenv("PAD_DURATION", "0")
    return tmp_path


def _write_ppm(path: Path, height: int, width: int) -> None:
    """A binary PPM image (a format ffmpeg reads; no imaging library needed)."""
    pixels = (bytes(range(256)) * (height * width * 3 // 256 + 1))[: height * width * 3]
    path.write_bytes(f"P6 {width} {height} 255\n".encode() + pixels)
