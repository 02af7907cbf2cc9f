"""Resume with another num_frames (magi.prepare.resume_length): a stopped run continues to the new
length; what the frames then equal (docs/CLI.md) and what is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from magi.pipeline import MagiPipeline
from magi.prepare import added_noise_seed, resume_length
from magi.request import RequestError
from magi.state import GenerationState
from tests.helpers import CHUNK, rel_l2, stop_at

CW, LAT = 6, 8  # the tiny config's chunk width and latent size (64 / 8)


@pytest.fixture
def no_duration(monkeypatch: pytest.MonkeyPatch) -> None:
    """PAD_DURATION off: a chunk's caption then does not depend on the video's length."""
    monkeypatch.setenv("PAD_DURATION", "0")


def _latents(result) -> torch.Tensor:
    return result.frames  # output_type="latent": [1, C, T, H, W] of the chunks of this call


def _stopped(pipe: MagiPipeline, tmp: Path, chunks: int, done: int, **kwargs) -> tuple[Path, torch.Tensor]:
    """A t2v run of ``chunks`` chunks stopped after ``done`` of them: (its state, their latents)."""
    state = tmp / "run.state"
    first = pipe.generate(
        "t2v",
        "a fox",
        num_frames=chunks * CHUNK,
        seed=3,
        save_state=state,
        callback=stop_at(done),
        output_type="latent",
        **kwargs,
    )
    assert first.interrupted and first.chunks_done == done
    return state, _latents(first)


def _noise_of_the_longer_run(seed: int, chunks: int, more: int) -> torch.Tensor:
    """The documented noise of a run of ``chunks`` chunks resumed to ``chunks + more``: the first
    run's whole-video draw, then the added chunks' own draw from seed + chunks."""
    first = torch.randn((1, 16, chunks * CW, LAT, LAT), generator=torch.Generator().manual_seed(seed))
    added_seed = added_noise_seed(seed, chunks)
    added = torch.randn((1, 16, more * CW, LAT, LAT), generator=torch.Generator().manual_seed(added_seed))
    return torch.cat([first, added], dim=2)


def test_more_frames_on_resume(pipe: MagiPipeline, tmp_path: Path, no_duration: None) -> None:
    whole = _latents(pipe.generate("t2v", "a fox", num_frames=6 * CHUNK, seed=3, output_type="latent"))
    state, done = _stopped(pipe, tmp_path, 6, 1)  # resume point: chunks 0..3 have entered
    twice = tmp_path / "twice.state"
    shutil.copy(state, twice)
    longer = pipe.resume(state, num_frames=7 * CHUNK, output_type="latent")
    assert longer.frames_written == 7 * CHUNK and longer.chunks_total == 7 and not longer.interrupted
    video = torch.cat([done, _latents(longer)], dim=2)
    assert video.shape[2] == 7 * CW
    # the chunks of the 6-chunk run that finish before its last window shrinks: bit for bit
    assert torch.equal(video[:, :, : 3 * CW], whole[:, :, : 3 * CW])
    # its last ones ran there in smaller DiT calls: the same up to float rounding
    assert rel_l2(video[:, :, 3 * CW : 6 * CW], whole[:, :, 3 * CW :]) < 1e-5
    # the whole video is a fresh 7-chunk run given the documented noise
    fresh = pipe.generate(
        "t2v", "a fox", num_frames=7 * CHUNK, noise=_noise_of_the_longer_run(3, 6, 1), output_type="latent"
    )
    assert torch.equal(video, _latents(fresh))
    # deterministic, also when the longer run is itself stopped and resumed (its state keeps the added draw)
    again = pipe.resume(twice, num_frames=7 * CHUNK, callback=stop_at(2), output_type="latent")
    assert again.interrupted
    assert GenerationState.load(twice).meta["noise_parts"] == [[6, 1]]
    rest = pipe.resume(twice, output_type="latent")
    assert rest.frames_written == 7 * CHUNK
    assert torch.equal(torch.cat([done, _latents(again), _latents(rest)], dim=2), video)


def test_per_chunk_noise_resumed_longer_is_the_longer_run(
    pipe: MagiPipeline, tmp_path: Path, no_duration: None
) -> None:
    state, done = _stopped(pipe, tmp_path, 4, 1, per_chunk_noise=True)
    longer = pipe.resume(state, num_frames=5 * CHUNK, output_type="latent")
    fresh = pipe.generate("t2v", "a fox", num_frames=5 * CHUNK, seed=3, per_chunk_noise=True, output_type="latent")
    assert torch.equal(torch.cat([done, _latents(longer)], dim=2), _latents(fresh))


def test_lengths_a_stopped_run_cannot_take(pipe: MagiPipeline, tmp_path: Path) -> None:
    state, _ = _stopped(pipe, tmp_path, 4, 2)  # resume point: the 4-chunk plan's window has begun to shrink
    out = tmp_path / "out.mp4"
    with pytest.raises(RequestError, match=r"^num_frames 144: the stopped run had begun the steps that end") as err:
        pipe.resume(state, out, num_frames=6 * CHUNK)
    assert "extend" in str(err.value) and err.value.param == "num_frames"
    with pytest.raises(RequestError, match=r"^num_frames 47: the stopped run has written 48 frames already"):
        pipe.resume(state, out, num_frames=47)
    with pytest.raises(RequestError, match=r"^num_frames 72: the stopped run has started more chunks than"):
        pipe.resume(state, out, num_frames=3 * CHUNK)  # chunk 3 has entered: a 3-chunk plan differs
    assert not out.exists()  # refused before any output was opened
    # its own length, or one that needs no other chunk (the last chunk trimmed), goes on
    saved, runtime = GenerationState.load(state), pipe.config.runtime
    assert resume_length(saved, runtime) == resume_length(saved, runtime, 4 * CHUNK) == (4, 4 * CHUNK)
    assert resume_length(saved, runtime, 4 * CHUNK - 5) == (4, 4 * CHUNK - 5)
