"""python -m magi.infer --resume STATE --num_frames N: the stopped run continues to the new length
(the rule is the library's, magi.prepare.resume_length; tests/run/test_resume_length.py checks the
frames), appended to the video the stopped run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import pytest

from magi.demo import CONFIG_NAME, tiny_folder
from magi.generation import Control
from magi.infer import prepare
from magi.state import GenerationState

TOKEN_ENV = ("SPECIAL_TOKEN_PATH", "PAD_HQ", "PAD_DURATION")  # the tiny folder holds its own tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny config (4 steps per chunk) beside its checkpoint and special tokens."""
    folder = tiny_folder(tmp_path_factory.mktemp("resume") / "tiny")
    config = folder / CONFIG_NAME
    data = json.loads(config.read_text())
    data["runtime_config"]["num_steps"] = 4
    config.write_text(json.dumps(data))
    return config


def _stopped_after_one_chunk(tiny: Path, out: Path, state: Path, frames: int) -> None:
    from magi.pipeline import MagiPipeline

    with pytest.MonkeyPatch.context() as mp:
        for name in TOKEN_ENV:
            mp.delenv(name, raising=False)
        control = Control()
        MagiPipeline.from_config(tiny, device="cpu").generate(
            "t2v",
            "a fox",
            num_frames=frames,
            seed=5,
            output_path=out,
            save_state=state,
            control=control,
            on_chunk=lambda chunk: control.stop(),
        )
    assert GenerationState.load(state).meta["chunks_done"] == 1


def test_resume_with_more_frames_continues_to_the_new_length(tiny: Path, tmp_path: Path) -> None:
    out, state = tmp_path / "out.mp4", tmp_path / "run.state"
    _stopped_after_one_chunk(tiny, out, state, 5 * 24)  # resume point: chunks 0..3 have entered, 5 planned
    argv = ["--config", str(tiny), "--device", "cpu", "--resume", str(state), "--output_path", str(out)]
    _, _, args = prepare([*argv, "--num_frames", str(6 * 24)])  # checked before any model loads
    assert args.num_frames == 6 * 24
    env = {k: v for k, v in os.environ.items() if k not in TOKEN_ENV}
    run = subprocess.run(
        [sys.executable, "-m", "magi.infer", *argv, "--num_frames", str(6 * 24)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert imageio_ffmpeg.count_frames_and_secs(str(out))[0] == 6 * 24  # the stopped run's chunk, then 5 more
    saved = GenerationState.load(state).meta
    assert saved["finished"] and saved["chunk_num"] == 6 and saved["noise_parts"] == [[5, 1]]
