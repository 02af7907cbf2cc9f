"""python -m magi.demo: the offline tiny demo from any directory, no checkout paths, no env vars."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg

from magi.tiny import TINY_CONFIG, tiny_config_dict

REPO = Path(__file__).resolve().parents[2]


def test_packaged_tiny_config_is_the_example_one() -> None:
    example = json.loads((REPO / "example" / "tiny" / "config.json").read_text())
    for key in ("load", "t5_pretrained", "vae_pretrained"):
        example["runtime_config"].pop(key)
    assert example == TINY_CONFIG
    paths = tiny_config_dict("/x/ck")["runtime_config"]
    assert (paths["load"], paths["t5_pretrained"], paths["vae_pretrained"]) == (
        "/x/ck/magi/tiny",
        "/x/ck/t5",
        "/x/ck/vae",
    )


def test_demo_runs_from_any_directory(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("SPECIAL_TOKEN_PATH", "PAD_HQ", "PAD_DURATION")}
    env["MAGI_CACHE"] = str(tmp_path / "cache")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cmd = [sys.executable, "-m", "magi.demo", "--num_frames", "20", "--num_steps", "4", "--seed", "5"]
    proc = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = elsewhere / "magi_tiny_t2v.mp4"
    gen = imageio_ffmpeg.read_frames(str(out))
    meta = next(gen)
    assert sum(1 for _ in gen) == 20 and tuple(meta["size"]) == (64, 64)
    tiny = tmp_path / "cache" / "tiny"
    assert (tiny / "special_tokens.npz").is_file() and (tiny / "magi" / "tiny" / "inference_weight").is_dir()
    assert json.loads((tiny / "tiny_config.json").read_text())["runtime_config"]["load"] == str(
        tiny.resolve() / "magi" / "tiny"
    )
    assert "done: 20 frames" in proc.stdout + proc.stderr
