"""Nothing is kept per chunk: the live tensors and Python objects of a run after chunk k and
after chunk k + 10 are the same (tiny model, CPU), also with ``save_tensors`` (its chunks go to
spill files on disk). Returned frames (``output_type``) are kept until the end by design."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest
import torch

from magi.generation import Control
from magi.pipeline import MagiPipeline
from tests.helpers import write_tiny_config

CHUNK = 24  # frames per chunk of the tiny config
# 28 chunks: the window (4 chunks) never reaches the last 8, whose duration tokens differ, before
# chunk 15 is done; the measurements are taken after chunks 5 and 15 (the state's tail of the
# last 4 clean chunks is full by then).
CHUNKS, FIRST, LAST = 28, 5, 15
SLACK = 1000  # Python memory blocks allowed to differ (97 seen over 10 chunks, not yet explained; see the report)


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> MagiPipeline:
    """A CPU pipeline on the shared tiny checkpoint, 4 steps per chunk, window 4."""
    config = write_tiny_config(
        tmp_path_factory.mktemp("memory") / "config.json", tiny_checkpoint, num_steps=4, window_size=4
    )
    os.environ["SPECIAL_TOKEN_PATH"] = str(tiny_checkpoint / "special_tokens.npz")
    return MagiPipeline.from_config(config, device="cpu")


def live_bytes() -> tuple[int, int]:
    """(bytes of every live CPU tensor storage, Python memory blocks allocated and not freed)."""
    gc.collect()
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            try:
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            except RuntimeError:  # a fake tensor (magi.plan's, left by another test): holds no memory
                continue
    return sum(storages.values()), sys.getallocatedblocks()


def _measure(pipe: MagiPipeline, tmp_path: Path, steer: bool, **kwargs: object) -> dict[int, tuple[int, int]]:
    seen: dict[int, tuple[int, int]] = {}
    done = [0]
    control = Control() if steer else None

    def on_chunk(chunk: object) -> None:
        done[0] += 1
        if control is not None and done[0] + 4 < CHUNKS:  # a steering edit per chunk, alternating two prompts
            control.set_prompt(done[0] + 4, "a red fox" if done[0] % 2 else "a quiet street")
        if done[0] in (FIRST, LAST):
            seen[done[0]] = live_bytes()

    result = pipe.generate(
        "t2v",
        "a quiet street",
        output_path=tmp_path / "out.mp4",
        num_frames=CHUNKS * CHUNK,
        seed=3,
        on_chunk=on_chunk,
        control=control,
        **kwargs,
    )
    assert result.frames_written == CHUNKS * CHUNK
    return seen


@pytest.mark.parametrize("case", ["plain", "state_segments_steer_tensors"])
def test_nothing_is_kept_per_chunk(pipe: MagiPipeline, tmp_path: Path, case: str) -> None:
    kwargs: dict[str, object] = {}
    if case != "plain":  # the serve worker's path (state + per-chunk segments, steered) and save_tensors
        kwargs = {
            "save_state": tmp_path / "run.state",
            "segments": tmp_path / "segments",
            "save_tensors": tmp_path / "t.safetensors",
        }
    seen = _measure(pipe, tmp_path, steer=case != "plain", **kwargs)
    (tensors_k, python_k), (tensors_k10, python_k10) = seen[FIRST], seen[LAST]
    assert tensors_k10 == tensors_k, f"live tensors grew by {tensors_k10 - tensors_k} bytes over 10 chunks"
    assert python_k10 - python_k <= SLACK, f"Python objects grew by {python_k10 - python_k} blocks over 10 chunks"


def test_the_measure_sees_a_chunk_kept(pipe: MagiPipeline, tmp_path: Path) -> None:
    """The guard is not blind: keeping each chunk's frames (returned as output_type "pt") is caught."""
    seen = _measure(pipe, tmp_path, steer=False, output_type="pt")
    frames = CHUNK * 3 * 64 * 64  # uint8 frames of a chunk
    assert seen[LAST][0] - seen[FIRST][0] == 10 * frames


def test_a_long_videos_noise_is_not_held_in_memory() -> None:
    """The initial noise grows with the video; only a small one is held in memory (the rest is read
    from a temporary file chunk by chunk): 100 chunks at 192 x 192 are 22 MB, 1 chunk 0.2 MB."""
    from magi.sampling.noise import InitialNoise

    def shape(chunks: int) -> tuple[int, ...]:
        return (1, 16, 6 * chunks, 24, 24)  # [1, C, T, H/8, W/8] latent noise of a 192 x 192 video

    with InitialNoise.draw(shape(100), 0, 6) as long, InitialNoise.draw(shape(1), 0, 6) as short:
        assert long.spilled and not short.spilled
        with InitialNoise.draw(shape(100), 0, 6, spill_bytes=2**40) as held:  # same values either way
            assert torch.equal(long.chunk(57), held.chunk(57))
