"""python -m magi.infer --save_state / --resume: SIGTERM and kill -9, then resume to the same result
and one playable mp4 (joined from the per-chunk segments in STATE.chunks/)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import imageio_ffmpeg
import torch
from safetensors.torch import load_file

from magi.state import GenerationState
from tests.helpers import infer_argv, infer_env

FRAMES = 8 * 24


def _start(tiny: Path, tmp: Path) -> tuple[subprocess.Popen, Path, Path]:
    out, state = tmp / "out.mp4", tmp / "run.state"
    proc = subprocess.Popen(
        infer_argv(
            tiny,
            "--mode",
            "t2v",
            "--prompt",
            "a fox",
            "--num_frames",
            str(FRAMES),
            "--seed",
            "5",
            "--output_path",
            str(out),
            "--save_state",
            str(state),
        ),
        env=infer_env(tiny),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, out, state


def _wait_for_chunks(state: Path, proc: subprocess.Popen, n: int) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and GenerationState.load(state).meta["chunks_done"] >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no state with {n} chunks (exit {proc.poll()}): {proc.stderr.read()[-2000:]}")


def _reference(tiny: Path, tmp: Path) -> dict[str, torch.Tensor]:
    path = tmp / "whole.safetensors"
    subprocess.run(
        infer_argv(
            tiny,
            "--mode",
            "t2v",
            "--prompt",
            "a fox",
            "--num_frames",
            str(FRAMES),
            "--seed",
            "5",
            "--output_path",
            str(tmp / "whole.mp4"),
            "--save_tensors",
            str(path),
        ),
        env=infer_env(tiny),
        check=True,
        capture_output=True,
    )
    return load_file(str(path))


def test_sigterm_then_resume_gives_one_file_equal_to_the_plain_run(tiny: Path, tmp_path: Path) -> None:
    reference = _reference(tiny, tmp_path)
    proc, out, state = _start(tiny, tmp_path)
    try:
        _wait_for_chunks(state, proc, 2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr[-2000:]
    saved = GenerationState.load(state).meta
    assert imageio_ffmpeg.count_frames_and_secs(str(out))[0] == saved["frames_done"] > 0
    tail = tmp_path / "tail.safetensors"
    done = subprocess.run(
        infer_argv(tiny, "--resume", str(state), "--output_path", str(out), "--save_tensors", str(tail)),
        env=infer_env(tiny),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = load_file(str(tail))["final_latent"]
    cw = got.shape[2] // (8 - saved["chunks_done"])
    assert torch.equal(got, reference["final_latent"][:, :, saved["chunks_done"] * cw :])
    assert imageio_ffmpeg.count_frames_and_secs(str(out))[0] == FRAMES
    again = subprocess.run(
        infer_argv(tiny, "--resume", str(state), "--output_path", str(out)),
        env=infer_env(tiny),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 2 and "finished run" in again.stderr
    # ... and extended from its exact latents, appended to the same file
    more = subprocess.run(
        infer_argv(
            tiny, "--extend", str(state), "--prompt", "the fox sleeps", "--num_frames", "48", "--output_path", str(out)
        ),
        env=infer_env(tiny),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert more.returncode == 0, more.stderr[-2000:]
    assert imageio_ffmpeg.count_frames_and_secs(str(out))[0] == FRAMES + 48


def test_kill_9_then_resume_from_the_last_saved_state(tiny: Path, tmp_path: Path) -> None:
    reference = _reference(tiny, tmp_path)
    proc, out, state = _start(tiny, tmp_path)
    try:
        _wait_for_chunks(state, proc, 3)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    saved = GenerationState.load(state).meta  # the last state written before the kill
    assert not saved["finished"]
    tail = tmp_path / "tail.safetensors"
    done = subprocess.run(
        infer_argv(tiny, "--resume", str(state), "--output_path", str(out), "--save_tensors", str(tail)),
        env=infer_env(tiny),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = load_file(str(tail))["final_latent"]
    cw = got.shape[2] // (8 - saved["chunks_done"])
    assert torch.equal(got, reference["final_latent"][:, :, saved["chunks_done"] * cw :])
    # The killed run never closed an mp4, but its chunks are segments in run.state.chunks/: the
    # resumed run joins the ones the state covers with the rest into one playable file.
    assert "does not hold the earlier" not in done.stderr
    assert sorted(p.name for p in (tmp_path / "run.state.chunks").iterdir()) == [f"{k:05d}.mp4" for k in range(8)]
    assert imageio_ffmpeg.count_frames_and_secs(str(out))[0] == FRAMES
    frames = [
        imageio_ffmpeg.count_frames_and_secs(str(p))[0] for p in sorted((tmp_path / "run.state.chunks").iterdir())
    ]
    assert frames == [24] * 8
