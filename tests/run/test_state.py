"""Generation state: save at resume points, resume bit for bit, refuse what cannot be resumed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from magi.pipeline import MagiPipeline
from magi.sampling.chunks import ChunkPlan
from magi.state import GenerationState, StateError
from tests.helpers import CHUNK, mp4_frames, stop_at


def test_resume_points_of_the_plan() -> None:
    plan = ChunkPlan(8, 8, 4, 6, 0)
    assert plan.carried_cache_rows(10) == ()  # a stage boundary: nothing carried
    assert plan.carried_cache_rows(9) == (0,)  # mid-stage: chunk 0's refreshed K/V is still read


@pytest.mark.parametrize("mode", ["t2v", "i2v", "v2v"])
def test_stop_after_4_of_8_chunks_and_resume_is_bit_identical(
    pipe: MagiPipeline, media, tmp_path: Path, mode: str
) -> None:
    inputs = media[mode]
    prompts = ["a walk", "a run", "a jump"]
    whole = tmp_path / "whole.safetensors"
    pipe.generate(mode, prompts, **inputs, num_frames=8 * CHUNK, seed=11, save_tensors=whole)
    reference = load_file(str(whole))
    out, state = tmp_path / "out.mp4", tmp_path / "run.state"
    first = pipe.generate(
        mode,
        prompts,
        **inputs,
        num_frames=8 * CHUNK,
        seed=11,
        output_path=out,
        save_state=state,
        save_every=3,
        callback=stop_at(4),
        save_tensors=tmp_path / "a.safetensors",
    )
    assert first.interrupted and first.chunks_done == 4
    saved = GenerationState.load(state)
    assert saved.meta["chunks_done"] == 4 and not saved.meta["finished"]
    done = pipe.resume(state, out, save_tensors=tmp_path / "b.safetensors")
    assert not done.interrupted and done.chunks_done == done.chunks_total
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    joined = torch.cat([a["final_latent"], b["final_latent"]], dim=2)
    assert torch.equal(joined, reference["final_latent"])  # bit for bit, CPU float32
    frames = torch.cat([a["video_tchw_uint8"], b["video_tchw_uint8"]])
    assert torch.equal(frames, reference["video_tchw_uint8"])
    assert mp4_frames(out) == len(reference["video_tchw_uint8"])  # one playable file, earlier chunks copied
    assert GenerationState.load(state).meta["finished"]
    with pytest.raises(StateError, match="finished run"):
        pipe.resume(state, tmp_path / "again.mp4")


def test_refusals(pipe: MagiPipeline, tiny: Path, tmp_path: Path) -> None:
    out, state = tmp_path / "out.mp4", tmp_path / "s.state"
    pipe.generate("t2v", "a", num_frames=6 * CHUNK, output_path=out, save_state=state, callback=stop_at(3))
    raw = bytearray(state.read_bytes())
    (tmp_path / "cut.state").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(StateError, match="damaged or not a state file"):
        pipe.resume(tmp_path / "cut.state", tmp_path / "x.mp4")
    raw[-5] ^= 0xFF  # a latent value edited
    (tmp_path / "edited.state").write_bytes(bytes(raw))
    with pytest.raises(StateError, match="checksum"):
        pipe.resume(tmp_path / "edited.state", tmp_path / "x.mp4")
    official = MagiPipeline(pipe.config, pipe.dit, pipe.vae, device="cpu", compat="official")
    with pytest.raises(StateError, match="another compat mode"):
        official.resume(state, tmp_path / "x.mp4")
    other = dataclasses.replace(pipe.config.runtime, clean_t=0.999)
    changed = MagiPipeline(pipe.config.replace(runtime=other), pipe.dit, pipe.vae, device="cpu")
    with pytest.raises(StateError, match="another config"):
        changed.resume(state, tmp_path / "x.mp4")
    # The output already continued past the state (resumed twice into it): refused, kept.
    copy = tmp_path / "copy.state"
    copy.write_bytes(state.read_bytes())
    pipe.resume(state, out)
    before = out.read_bytes()
    with pytest.raises(StateError, match="resumed into this output already"):
        pipe.resume(copy, out)
    assert out.read_bytes() == before


def test_extend_equals_v2v_from_the_same_latents(pipe: MagiPipeline, tmp_path: Path) -> None:
    out, state = tmp_path / "first.mp4", tmp_path / "first.state"
    pipe.generate(
        "t2v",
        "a calm lake",
        num_frames=5 * CHUNK,
        seed=2,
        output_path=out,
        save_state=state,
        save_tensors=tmp_path / "first.safetensors",
    )
    saved = GenerationState.load(state)
    assert saved.meta["finished"] and sorted(int(k.split(".")[1]) for k in saved.extra) == [1, 2, 3, 4]
    first = load_file(str(tmp_path / "first.safetensors"))["final_latent"]
    with pytest.raises(StateError, match="not a finished run"):
        unfinished = tmp_path / "u.state"
        pipe.generate("t2v", "a", num_frames=6 * CHUNK, save_state=unfinished, callback=stop_at(3))
        pipe.extend(unfinished, "x", 48)
    ext = pipe.extend(
        state, "a storm comes", 3 * CHUNK, output_path=out, seed=9, save_tensors=tmp_path / "ext.safetensors"
    )
    direct = tmp_path / "direct.safetensors"
    pipe.generate(
        "v2v", "a storm comes", prefix_latent=first[:, :, 6:], num_frames=3 * CHUNK, seed=9, save_tensors=direct
    )
    got, want = load_file(str(tmp_path / "ext.safetensors")), load_file(str(direct))
    assert torch.equal(got["final_latent"], want["final_latent"])
    assert torch.equal(got["video_tchw_uint8"], want["video_tchw_uint8"])
    # the continuation was appended to the finished video: one file
    assert ext.frames_written == 3 * CHUNK and mp4_frames(out) == 5 * CHUNK + 3 * CHUNK
