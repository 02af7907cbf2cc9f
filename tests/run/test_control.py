"""``generate(control=...)`` and ``segments=``: steer and stop a generate call from its hooks, and
continue it from a state older than its segments (what a kill -9 leaves) into one playable mp4."""

from __future__ import annotations

import shutil
from pathlib import Path

import imageio_ffmpeg
import pytest
import torch
from safetensors.torch import load_file

from magi.generation import Control, StepInfo, VideoChunk
from magi.pipeline import MagiPipeline

CHUNKS = 6
FRAMES = 24 * CHUNKS  # 24 frames per chunk in the tiny config


def _frames(path: Path) -> int:
    return imageio_ffmpeg.count_frames_and_secs(str(path))[0]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_control_steers_a_generate_call(pipe: MagiPipeline, tmp_path: Path) -> None:
    """set_prompt from the step callback, while chunk 3 has not entered: the latents equal a run
    started with that timeline, and differ from the unsteered run (the edit did something)."""
    control = Control()

    def callback(info: StepInfo) -> None:
        if info.step == 0:
            control.set_prompt(3, "a blue bird over the sea")

    pipe.generate(
        "t2v",
        "a red fox in the snow",
        num_frames=FRAMES,
        callback=callback,
        control=control,
        save_tensors=tmp_path / "steered.safetensors",
    )
    timeline = ["a red fox in the snow"] * 3 + ["a blue bird over the sea"]
    pipe.generate("t2v", timeline, num_frames=FRAMES, save_tensors=tmp_path / "timeline.safetensors")
    pipe.generate("t2v", "a red fox in the snow", num_frames=FRAMES, save_tensors=tmp_path / "plain.safetensors")
    steered, planned, plain = (
        _tensors(tmp_path / f"{n}.safetensors")["final_latent"] for n in ("steered", "timeline", "plain")
    )
    assert torch.equal(steered, planned)
    per_chunk = steered.shape[2] // CHUNKS
    assert torch.equal(steered[:, :, : 3 * per_chunk], plain[:, :, : 3 * per_chunk])  # chunks 0-2 untouched
    assert not torch.equal(steered[:, :, 3 * per_chunk :], plain[:, :, 3 * per_chunk :])
    with pytest.raises(ValueError, match="already steers a run"):
        pipe.generate("t2v", "x", num_frames=24, control=control)
    with pytest.raises(ValueError, match=r"from_chunk 6 is outside this video's chunks 0 \.\. 5"):
        control.set_prompt(CHUNKS, "too late")


def test_stop_then_resume_from_an_older_state_joins_one_video(pipe: MagiPipeline, tmp_path: Path) -> None:
    """stop() from on_chunk keeps the chunks done (joined mp4, state); resuming from an older
    state (as after a kill -9 between saves) drops the segments it does not cover and ends with
    one mp4 whose frames equal the uninterrupted run's."""
    prompt = "a red fox in the snow"
    pipe.generate("t2v", prompt, num_frames=FRAMES, save_tensors=tmp_path / "whole.safetensors")
    whole = _tensors(tmp_path / "whole.safetensors")["video_tchw_uint8"]

    def stop_after(n: int, control: Control):
        seen: list[int] = []

        def on_chunk(chunk: VideoChunk) -> None:
            seen.append(chunk.index)
            if len(seen) == n:
                control.stop()

        return on_chunk, seen

    out, seg, state = tmp_path / "fox.mp4", tmp_path / "fox.chunks", tmp_path / "fox.state"
    control = Control()
    on_chunk, seen = stop_after(2, control)
    first = pipe.generate(
        "t2v",
        prompt,
        num_frames=FRAMES,
        output_path=out,
        segments=seg,
        save_state=state,
        control=control,
        on_chunk=on_chunk,
        save_tensors=tmp_path / "a.safetensors",
    )
    assert first.interrupted and first.chunks_done == 2 and seen == [0, 1]
    assert sorted(p.name for p in seg.glob("*.mp4")) == ["00000.mp4", "00001.mp4"]
    assert _frames(out) == 48  # the chunks done, joined and playable
    older = tmp_path / "older.state"
    shutil.copy(state, older)

    control = Control()
    on_chunk, _ = stop_after(1, control)
    second = pipe.resume(state, out, segments=seg, control=control, on_chunk=on_chunk)
    assert second.interrupted and second.chunks_done == 3 and (seg / "00002.mp4").is_file()
    stale = (seg / "00002.mp4").stat().st_mtime_ns

    # Resume the older state (2 chunks): segment 00002, written after it, is stale and goes.
    last = pipe.resume(older, out, segments=seg, save_tensors=tmp_path / "b.safetensors")
    assert not last.interrupted and last.chunks_done == CHUNKS
    assert sorted(p.name for p in seg.glob("*.mp4")) == [f"{k:05d}.mp4" for k in range(CHUNKS)]
    assert (seg / "00002.mp4").stat().st_mtime_ns != stale  # written again by this run
    assert _frames(out) == FRAMES
    pieces = torch.cat([_tensors(tmp_path / f"{n}.safetensors")["video_tchw_uint8"] for n in ("a", "b")])
    assert torch.equal(pieces, whole)


def test_generated_chunk_indices_skip_the_v2v_prefix(pipe: MagiPipeline, tmp_path: Path) -> None:
    """set_prompt(k, generated=True) (the CLI's --steer file and the HTTP API) counts the chunks
    after the v2v prefix, as prompt lists do: it equals the timeline run, queued before the run
    starts or made during it."""
    prefix = torch.randn(1, 16, 6, 8, 8, generator=torch.Generator().manual_seed(5))  # one clean chunk
    timeline = ["a red fox in the snow"] * 2 + ["a blue bird over the sea"]
    pipe.generate(
        "v2v", timeline, num_frames=4 * 24, prefix_latent=prefix, save_tensors=tmp_path / "timeline.safetensors"
    )
    before = Control()
    before.set_prompt(2, "a blue bird over the sea", generated=True)  # queued: the plan is unknown yet
    pipe.generate(
        "v2v",
        "a red fox in the snow",
        num_frames=4 * 24,
        prefix_latent=prefix,
        control=before,
        save_tensors=tmp_path / "before.safetensors",
    )
    during = Control()

    def callback(info: StepInfo) -> None:
        if info.step == 0:
            during.set_prompt(2, "a blue bird over the sea", generated=True)
            with pytest.raises(ValueError, match=r"outside this video's generated chunks 0 \.\. 3"):
                during.set_prompt(4, "x", generated=True)

    pipe.generate(
        "v2v",
        "a red fox in the snow",
        num_frames=4 * 24,
        prefix_latent=prefix,
        control=during,
        callback=callback,
        save_tensors=tmp_path / "during.safetensors",
    )
    want = _tensors(tmp_path / "timeline.safetensors")["final_latent"]
    for name in ("before", "during"):
        assert torch.equal(_tensors(tmp_path / f"{name}.safetensors")["final_latent"], want), name
