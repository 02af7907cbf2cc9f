"""Generation state of distilled models: resume bit for bit, refused across base and distill.

tests/run/test_state.py covers the base (3-pass CFG) sampler; this file runs the same stop-and-resume
check with the distill sampler (one pass, step-size embedding, nearly-clean blend) on the 12-step
shortcut schedule of the official distill configs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from magi.config import load_config, save_config
from magi.pipeline import MagiPipeline
from magi.state import GenerationState, StateError
from tests.helpers import CHUNK, TINY_CONFIG, make_tiny, mp4_frames, stop_at

STEPS = 12  # the distill shortcut schedule: step intervals 2,1,1 repeated, so step sizes vary


@pytest.fixture(scope="module")
def tiny_distill(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Tiny distill config (cfg_number 1, distill true) with 12 steps per chunk, window 4: three
    steps per stage, so resume points (stage boundaries) and mid-stage steps both occur."""
    root = tmp_path_factory.mktemp("state_distill")
    ck = root / "checkpoints"
    cfg = load_config(TINY_CONFIG)
    runtime = dataclasses.replace(
        cfg.runtime,
        load=str(ck / "magi" / "tiny"),
        t5_pretrained=str(ck / "t5"),
        vae_pretrained=str(ck / "vae"),
        num_steps=STEPS,
        window_size=4,
        cfg_number=1,
    )
    engine = dataclasses.replace(cfg.engine, distill=True)
    save_config(cfg.replace(runtime=runtime, engine=engine), root / "config.json")
    make_tiny(ck, root / "config.json")  # its engine flags name the folder: inference_weight.distill
    assert (ck / "magi" / "tiny" / "inference_weight.distill").is_dir()
    before = os.environ.get("SPECIAL_TOKEN_PATH")
    os.environ["SPECIAL_TOKEN_PATH"] = str(ck / "special_tokens.npz")
    yield root / "config.json"
    if before is None:
        os.environ.pop("SPECIAL_TOKEN_PATH", None)
    else:
        os.environ["SPECIAL_TOKEN_PATH"] = before


@pytest.fixture(scope="module")
def distill(tiny_distill: Path) -> MagiPipeline:
    return MagiPipeline.from_config(tiny_distill, device="cpu")


@pytest.fixture(scope="module")
def base(distill: MagiPipeline) -> MagiPipeline:
    """The base sampler on the same weights and checkpoint folder: only the distill settings differ."""
    cfg = distill.config
    runtime = dataclasses.replace(cfg.runtime, cfg_number=3)
    engine = dataclasses.replace(cfg.engine, distill=False)
    return MagiPipeline(cfg.replace(runtime=runtime, engine=engine), distill.dit, distill.vae, device="cpu")


def _blend_scale(pipe: MagiPipeline) -> float:
    """The distill blend weight a run of `pipe` records (env ``prev_chunks_scale``, default 0.7)."""
    from magi.sampling.denoise import SamplerSettings

    return SamplerSettings.from_config(pipe.config).prev_chunks_scale


@pytest.mark.parametrize("mode", ["t2v", "i2v", "v2v"])
def test_distill_stop_after_4_of_8_chunks_and_resume_is_bit_identical(
    distill: MagiPipeline, media, tmp_path: Path, mode: str
) -> None:
    pipe = distill
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
    settings = saved.meta["settings"]  # the resume runs the recorded sampler: the distill one
    assert settings["distill"] is True and settings["cfg_number"] == 1 and settings["num_steps"] == STEPS
    assert settings["shortcut_mode"] == "8,16,16" and settings["prev_chunks_scale"] == _blend_scale(pipe)
    assert saved.next_step % (STEPS // 4) == 0  # a stage boundary
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


def test_distill_and_base_states_refuse_each_other(distill: MagiPipeline, base: MagiPipeline, tmp_path: Path) -> None:
    assert distill.identity()["checkpoint_hash"] == base.identity()["checkpoint_hash"]
    assert distill.identity()["config_hash"] != base.identity()["config_hash"]
    states = {}
    for name, pipe in (("distill", distill), ("base", base)):
        states[name] = tmp_path / f"{name}.state"
        run = pipe.generate(
            "t2v",
            "a",
            num_frames=3 * CHUNK,
            seed=5,
            output_path=tmp_path / f"{name}.mp4",
            save_state=states[name],
            callback=stop_at(1),
            save_tensors=tmp_path / f"{name}.safetensors",
        )
        assert run.interrupted and run.chunks_done == 1
        assert GenerationState.load(states[name]).meta["settings"]["distill"] is (name == "distill")
    # the two really sample differently (same weights, seed and prompt)
    latents = [load_file(str(tmp_path / f"{n}.safetensors"))["final_latent"] for n in states]
    assert latents[0].shape == latents[1].shape and not torch.equal(*latents)
    with pytest.raises(StateError, match="another config"):
        base.resume(states["distill"], tmp_path / "distill.mp4")
    with pytest.raises(StateError, match="another config"):
        distill.resume(states["base"], tmp_path / "base.mp4")
    # each is still resumed by its own kind of pipeline
    assert distill.resume(states["distill"], tmp_path / "distill.mp4").chunks_done == 3
    assert GenerationState.load(states["distill"]).meta["finished"]
