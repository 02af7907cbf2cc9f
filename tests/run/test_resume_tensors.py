"""save_tensors on a resumed run: the interrupted run's file is continued, so final_latent and
the frames hold the whole video, equal to the uninterrupted run's; a file that is not the
interrupted run's gives one warning and only the chunks generated after the resume. The file is
written chunk by chunk through spill files (bounded memory), yet holds the bytes
``safetensors.torch.save`` writes for the whole tensors, and appears only when complete."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from magi.pipeline import MagiPipeline
from tests.helpers import stop_at

CHUNK, CW = 24, 6  # frames and latent frames per chunk of the tiny config
CHUNKS, STOP = 6, 2  # a 6-chunk video stopped once 2 chunks are done


@pytest.fixture(scope="module")
def whole(pipe: MagiPipeline, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    path = tmp_path_factory.mktemp("whole") / "whole.safetensors"
    pipe.generate("t2v", "a fox", num_frames=CHUNKS * CHUNK, seed=5, save_tensors=path)
    return load_file(str(path))


def _interrupted(pipe: MagiPipeline, folder: Path) -> tuple[Path, Path]:
    state, tensors = folder / "run.state", folder / "run.safetensors"
    result = pipe.generate(
        "t2v",
        "a fox",
        num_frames=CHUNKS * CHUNK,
        seed=5,
        save_tensors=tensors,
        save_state=state,
        callback=stop_at(STOP),
    )
    assert result.interrupted and result.chunks_done == STOP
    assert load_file(str(tensors))["final_latent"].shape[2] == STOP * CW
    return state, tensors


def test_resume_continues_the_interrupted_runs_tensors(
    pipe: MagiPipeline, tmp_path: Path, whole: dict[str, torch.Tensor]
) -> None:
    state, tensors = _interrupted(pipe, tmp_path)
    pipe.resume(state, save_tensors=tensors)
    got = load_file(str(tensors))
    assert got["final_latent"].shape == whole["final_latent"].shape == (1, 16, CHUNKS * CW, 8, 8)
    assert torch.equal(got["final_latent"], whole["final_latent"])
    assert torch.equal(got["video_tchw_uint8"], whole["video_tchw_uint8"])


@pytest.mark.parametrize("earlier", ["missing", "another_run", "truncated"])
def test_resume_with_another_file_warns_and_keeps_the_new_chunks(
    pipe: MagiPipeline,
    tmp_path: Path,
    whole: dict[str, torch.Tensor],
    earlier: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    state, tensors = _interrupted(pipe, tmp_path)
    if earlier == "missing":  # e.g. after kill -9, when nothing was written
        tensors.unlink()
    else:
        t = load_file(str(tensors))
        if earlier == "another_run":  # same shapes, other values
            t["final_latent"] = t["final_latent"] + 1
        else:  # one chunk short
            t = {
                "final_latent": t["final_latent"][:, :, :CW].contiguous(),
                "video_tchw_uint8": t["video_tchw_uint8"][:CHUNK],
            }
        save_file(t, str(tensors))
    with caplog.at_level(logging.WARNING, logger="magi.sinks"):
        pipe.resume(state, save_tensors=tensors)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "magi.sinks"]
    assert len(warnings) == 1 and f"is not the stopped run's file of its first {STOP} chunks" in warnings[0]
    assert len(warnings[0]) <= 200
    got = load_file(str(tensors))
    assert torch.equal(got["final_latent"], whole["final_latent"][:, :, STOP * CW :])
    assert torch.equal(got["video_tchw_uint8"], whole["video_tchw_uint8"][STOP * CHUNK :])


def test_the_file_appears_complete_with_the_in_memory_writers_bytes(
    pipe: MagiPipeline, tmp_path: Path, whole: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "t.safetensors"
    during: list[list[str]] = []
    pipe.generate(
        "t2v",
        "a fox",
        num_frames=CHUNKS * CHUNK,
        seed=5,
        save_tensors=path,
        on_chunk=lambda chunk: during.append(sorted(p.name for p in tmp_path.iterdir())),
    )
    assert len(during) == CHUNKS and all(path.name not in names for names in during)
    assert path.read_bytes() == save(whole)  # byte for byte what save_file writes for the whole tensors
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no spill or partial file is left


def test_a_resumed_file_has_the_uninterrupted_runs_bytes(
    pipe: MagiPipeline, tmp_path: Path, whole: dict[str, torch.Tensor]
) -> None:
    state, tensors = _interrupted(pipe, tmp_path)
    assert tensors.read_bytes() == save(load_file(str(tensors)))
    pipe.resume(state, save_tensors=tensors)
    assert tensors.read_bytes() == save(whole)
    assert not [p.name for p in tmp_path.iterdir() if "magi-partial" in p.name]
