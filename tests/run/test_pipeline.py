"""MagiPipeline end to end: official parity, frame budget, per-chunk prompts, safe output, Ctrl-C."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import imageio_ffmpeg
import pytest
import torch
from safetensors.torch import load_file

from magi.conditioning import SpecialTokenOptions, build_caption_table, load_special_tokens
from magi.pipeline import ChunkCaptions, MagiPipeline, chunk_count, decoded_frames
from magi.prepare import Request, prepare
from magi.sampling.denoise import NULL, PROMPT
from tests.helpers import REPO_ROOT as REPO, load_fixture, rel_l2, write_tiny_config


# ------------------------------------------------------------------------------ pure helpers
def test_frame_budget_official_and_magi() -> None:
    assert decoded_frames(6, 3) == 24 and decoded_frames(4, 3) == 13 and decoded_frames(5, 3) == 20
    official = dict(compat="official")
    assert chunk_count("t2v", 96, 0, 6, **official) == 4
    assert chunk_count("t2v", 100, 0, 6, **official) == 5  # -> 120 frames officially
    assert chunk_count("i2v", 96, 1, 6, **official) == 5  # i2v adds a chunk officially
    assert chunk_count("v2v", 96, 8, 6, **official) == 6  # -> 109 frames
    assert chunk_count("t2v", 100, 0, 6) == 5  # 120 generated, trimmed to 100
    assert chunk_count("t2v", 96, 0, 6) == 4
    assert chunk_count("i2v", 96, 1, 6) == 4  # the image is frames 0..3 of the 96
    assert chunk_count("v2v", 96, 8, 6) == 6  # 13 + 4 x 24 = 109 >= 96
    assert chunk_count("v2v", 96, 24, 6) == 8  # 4 whole prefix chunks, then 4 x 24
    with pytest.raises(ValueError, match="num_frames"):
        chunk_count("t2v", 0, 0, 6)


def test_lazy_captions_equal_the_full_table(reference_dir) -> None:
    tokens = load_special_tokens(reference_dir / "special_tokens.npz")
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(3, 800, 64, generator=g)
    mask = torch.zeros(3, 800)
    mask[:, :7] = 1
    null = torch.randn(800, 64, generator=g)
    options = SpecialTokenOptions()
    chunk_num, offset = 13, 2
    chunk_prompts = [0, 1, 1, 2, 2, 2, 0, 1, 2, 2, 2]
    y, m = build_caption_table(
        emb,
        mask,
        null,
        tokens,
        chunk_num=chunk_num,
        clean_chunk_num=offset,
        chunk_prompts=chunk_prompts,
        options=options,
    )
    lazy = ChunkCaptions(emb, mask, null, tokens, options, chunk_prompts, offset)
    for kind in (PROMPT, NULL):
        chunks = list(range(offset, chunk_num)) if kind == PROMPT else list(range(chunk_num))
        ly, lm = lazy.rows([kind] * len(chunks), chunks)
        assert torch.equal(ly, y[kind, chunks]) and torch.equal(lm, m[kind, chunks])
    assert len(lazy._rows) <= 3 * 8  # bounded by prompts x duration tokens, not by chunks


# ------------------------------------------------------------------- official parity (fixtures)
@pytest.fixture
def official_env(reference_dir, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(reference_dir)  # the tiny configs' paths are relative to it
    monkeypatch.setenv("SPECIAL_TOKEN_PATH", str(reference_dir / "special_tokens.npz"))
    monkeypatch.setenv("PAD_HQ", "1")
    monkeypatch.setenv("PAD_DURATION", "1")
    return reference_dir


# t2v parity of the sampler itself is in test_denoise; these two add the image / video prefix path.
@pytest.mark.parametrize("case", ["v2v_4p5b_base", "i2v_4p5b_distill"])
def test_whole_pipeline_matches_official(official_env: Path, tmp_path: Path, case: str) -> None:
    """Real T5, ffmpeg resize, VAE encode/decode and sampler, official noise: latents and frames."""
    tensors, meta = load_fixture(official_env, f"pipeline_{case}")
    pipe = MagiPipeline.from_config(meta["config"], device="cpu", compat="official")
    inputs = {}
    if meta["image"]:
        inputs["image_path"] = str(official_env / meta["image"])
    if meta["video"]:
        inputs["prefix_video_path"] = str(official_env / meta["video"])
    out, saved = tmp_path / "out.mp4", tmp_path / "out.safetensors"
    result = pipe.generate(
        meta["mode"], meta["prompt"], output_path=out, save_tensors=saved, noise=tensors["noise.initial_x"], **inputs
    )
    got = load_file(str(saved))
    offset = meta["transport"]["chunk_num"] - len(meta["chunks"])  # v2v: whole prefix chunks
    expect = tensors["output.final_latent"][:, :, offset * 6 :]
    # the prefix goes through the bf16 VAE: <= 5e-7 on Intel, 2.6e-4 on AMD EPYC (its bf16 kernels)
    assert rel_l2(got["final_latent"], expect) <= 1e-3
    video, ref = got["video_tchw_uint8"].int(), tensors["output.video_tchw_uint8"].int()
    assert video.shape == ref.shape and result.frames_written == ref.shape[0]
    assert (video - ref).abs().max() <= 2  # bf16 VAE emulation: +-2 levels
    assert _read_back(out) == (ref.shape[0], (64, 64), 24.0)


# --------------------------------------------------------------------- tiny demo (no fixtures)
@pytest.fixture(scope="module")
def tiny_config(tiny_checkpoint: Path, tmp_path_factory) -> Path:
    """The tiny example config (4 steps per chunk, window 4) with absolute paths to the tiny checkpoint."""
    return write_tiny_config(
        tmp_path_factory.mktemp("tiny") / "config.json", tiny_checkpoint, num_steps=4, window_size=4
    )


@pytest.fixture(scope="module")
def tiny_pipe(tiny_config: Path, tiny_checkpoint: Path) -> MagiPipeline:
    os.environ["SPECIAL_TOKEN_PATH"] = str(tiny_checkpoint / "special_tokens.npz")
    return MagiPipeline.from_config(tiny_config, device="cpu")


def _read_back(path: Path) -> tuple[int, tuple[int, int], float]:
    gen = imageio_ffmpeg.read_frames(str(path))
    meta = next(gen)
    frames = sum(1 for _ in gen)
    return frames, tuple(meta["size"]), float(meta["fps"])


def test_demo_mp4_honours_the_request(tiny_pipe: MagiPipeline, tmp_path: Path) -> None:
    out = tmp_path / "demo.mp4"
    result = tiny_pipe.generate("t2v", "a red car", output_path=out, num_frames=50, seed=3)
    assert _read_back(out) == (50, (64, 64), 24.0)  # magi: exactly num_frames, trimmed chunk
    assert result.frames_written == 50 and result.chunks_done == 3 and not result.interrupted
    assert not list(tmp_path.glob(".*partial*"))


def test_stream_reproducibility_and_per_chunk_prompts(tiny_pipe: MagiPipeline) -> None:
    base = list(tiny_pipe.stream("t2v", "a red car", num_frames=30, seed=5))
    assert [c.index for c in base] == [0, 1] and [len(c.frames) for c in base] == [24, 6]
    # the seed's draw is the documented one: injecting it reproduces the run bit for bit
    rt = tiny_pipe.config.runtime
    shape = (1, 16, 12, rt.video_size_h // 8, rt.video_size_w // 8)
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(5))
    injected = list(tiny_pipe.stream("t2v", "a red car", num_frames=30, noise=noise))
    assert all(torch.equal(a.latent, b.latent) for a, b in zip(base, injected))
    # per-chunk prompts: chunk 1 gets "a dog"; chunk 0 never attends to chunk 1 (block-causal),
    # so it is unchanged while chunk 1 differs
    mixed = list(tiny_pipe.stream("t2v", ["a red car", "a dog"], num_frames=30, seed=5))
    assert torch.equal(mixed[0].latent, base[0].latent)
    assert not torch.equal(mixed[1].latent, base[1].latent)


def test_prompt_list_maps_to_chunks(tiny_pipe: MagiPipeline) -> None:
    run = prepare(tiny_pipe.engine, tiny_pipe.prompts, Request("t2v", ["a cat", "a dog"], seed=1, num_frames=96))
    assert run.plan.chunk_num == 4 and run.captions.chunk_prompts == [0, 1, 1, 1]
    cat0, _ = run.captions.row(PROMPT, 0)
    dog1, _ = run.captions.row(PROMPT, 1)
    single = prepare(tiny_pipe.engine, tiny_pipe.prompts, Request("t2v", "a cat", seed=1, num_frames=96))
    assert torch.equal(single.captions.row(PROMPT, 0)[0], cat0)
    assert not torch.equal(single.captions.row(PROMPT, 1)[0], dog1)


def test_bad_requests_fail_before_any_work(tiny_pipe: MagiPipeline, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode"):
        tiny_pipe.generate("x2v", "a", output_path=tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="image_path"):
        tiny_pipe.generate("i2v", "a", output_path=tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="prompt"):
        tiny_pipe.generate("t2v", [], output_path=tmp_path / "a.mp4")
    with pytest.raises(FileNotFoundError, match="output folder"):
        tiny_pipe.generate("t2v", "a", output_path=tmp_path / "missing" / "a.mp4")
    with pytest.raises(ValueError, match="safetensors"):
        tiny_pipe.generate("t2v", "a", output_path=tmp_path / "a.mp4", save_tensors=tmp_path / "a.pt")
    with pytest.raises(ValueError, match="noise"):
        tiny_pipe.generate("t2v", "a", num_frames=24, noise=torch.zeros(1, 16, 6, 4, 4))
    assert not list(tmp_path.iterdir())


def test_failed_run_leaves_nothing(tiny_pipe: MagiPipeline, tmp_path: Path) -> None:
    out = tmp_path / "fail.mp4"
    out_saved = tmp_path / "fail.safetensors"

    def explode(info) -> None:
        if info.step == 6:  # after the first chunk was written
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tiny_pipe.generate("t2v", "a", output_path=out, num_frames=96, callback=explode, save_tensors=out_saved)
    assert list(tmp_path.iterdir()) == []


DRIVER = textwrap.dedent(
    """
    import sys
    from magi.pipeline import MagiPipeline
    pipe = MagiPipeline.from_config(sys.argv[1], device="cpu")
    def report(info):
        if info.finished is not None:
            print("FINISHED", info.finished, flush=True)
    result = pipe.generate("t2v", "a long walk", output_path=sys.argv[2], num_frames=24 * 30,
                           callback=report)
    print(result.summary(), flush=True)
    sys.exit(130 if result.interrupted else 0)
    """
)


def test_ctrl_c_leaves_a_playable_partial_mp4(tiny_config: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "partial.mp4"
    env = dict(os.environ, PYTHONPATH=str(REPO), SPECIAL_TOKEN_PATH=str(tiny_checkpoint / "special_tokens.npz"))
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(tiny_config), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:
            if line.startswith("FINISHED 1"):  # chunk 0 is written, chunk 1 is on its way
                proc.send_signal(signal.SIGINT)
                break
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stdout
    frames, size, fps = _read_back(out)
    assert 24 <= frames < 24 * 30 and frames % 24 == 0 and size == (64, 64) and fps == 24.0
    assert not list(tmp_path.glob(".*partial*"))


def _write_ppm(path: Path, rgb: torch.Tensor) -> None:
    """A binary PPM image (a format ffmpeg reads; no imaging library needed)."""
    h, w, _ = rgb.shape
    path.write_bytes(f"P6 {w} {h} 255\n".encode() + rgb.contiguous().numpy().tobytes())


def test_magi_i2v_and_v2v_honour_num_frames(tiny_pipe: MagiPipeline, tmp_path: Path) -> None:
    from magi.video_io import Mp4Writer

    g = torch.Generator().manual_seed(0)
    image = tmp_path / "start.ppm"
    _write_ppm(image, torch.randint(0, 256, (48, 80, 3), dtype=torch.uint8, generator=g))
    clip = tmp_path / "prefix.mp4"
    with Mp4Writer(clip, 24) as writer:  # 40 frames: magi keeps the last 40 // 4 * 4 = 40
        writer.append(torch.randint(0, 256, (40, 3, 64, 64), dtype=torch.uint8, generator=g))
    i2v = tiny_pipe.generate("i2v", "a cat", image_path=image, output_path=tmp_path / "i2v.mp4", num_frames=30)
    assert i2v.chunks_total == 2 and _read_back(tmp_path / "i2v.mp4") == (30, (64, 64), 24.0)
    # v2v: P = 10 prefix latents -> 1 whole prefix chunk, chunk 1 holds 4 prefix latents
    v2v = tiny_pipe.generate("v2v", "a cat", prefix_video_path=clip, output_path=tmp_path / "v2v.mp4", num_frames=30)
    assert v2v.frames_written == 30 and _read_back(tmp_path / "v2v.mp4") == (30, (64, 64), 24.0)


# ------------------------------------------------------------- speed and memory options
def _latents(pipe: MagiPipeline) -> list[torch.Tensor]:
    return [c.latent for c in pipe.stream("t2v", "a red car", num_frames=30, seed=5)]


@pytest.mark.parametrize(
    "options, tolerance",
    [
        ({"offload_blocks": True}, 0.0),  # DiT layers streamed from host; VAE on the host too
        ({"vae_offload": True}, 0.0),
        ({"noise_spill_bytes": 0}, 0.0),  # initial noise in a temporary file, read chunk by chunk
        ({"compile": {"backend": "eager"}}, 1e-6),  # dynamo tracing of every layer
        ({"attention_backend": "flex"}, 1e-5),  # eager FlexAttention on CPU vs SDPA
    ],
    ids=["offload_blocks", "vae_offload", "noise_spill", "compile", "flex"],
)
def test_options_give_the_plain_final_latent(
    tiny_pipe: MagiPipeline, tiny_config: Path, options: dict, tolerance: float
) -> None:
    from magi import attention

    plain = _latents(tiny_pipe)
    try:
        pipe = MagiPipeline.from_config(tiny_config, device="cpu", **options)
        got = _latents(pipe)
    finally:
        attention.set_backend("auto")  # from_config sets the process-wide default
    assert len(got) == len(plain) == 2
    for a, b in zip(got, plain):
        assert torch.equal(a, b) if tolerance == 0 else rel_l2(a, b) <= tolerance
    if options.get("offload_blocks"):
        assert pipe.vae_host is not None and pipe.vae_host.loads == 2  # one decode per chunk


def test_unavailable_attention_backend_fails_before_loading(tiny_config: Path, monkeypatch) -> None:
    import magi.checkpoint

    monkeypatch.setattr(magi.checkpoint, "load_dit", lambda *a, **k: pytest.fail("loaded the DiT"))
    with pytest.raises(ValueError, match="'flash' runs bf16/fp16 on CUDA, not torch.float32 on cpu"):
        MagiPipeline.from_config(tiny_config, device="cpu", attention_backend="flash")
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        MagiPipeline.from_config(tiny_config, device="cpu", attention_backend="xformers")
    with pytest.raises(ValueError, match="compile must be"):
        MagiPipeline.from_config(tiny_config, device="cpu", compile="yes")


def test_kv_offload_reaches_the_cache_and_t5_is_freed(tiny_pipe: MagiPipeline, monkeypatch) -> None:
    import magi.generation
    from magi.models import text_encoder

    caches, t5_events = [], []

    class RecordingCache(magi.generation.KVCache):
        def __init__(self, max_chunks: int, offload: bool = False) -> None:
            super().__init__(max_chunks, offload)
            caches.append(self)

    loader, free = text_encoder.T5Encoder.from_pretrained, text_encoder.T5Encoder.free

    def recording_loader(cls, *args, **kwargs):
        t5_events.append(("load", kwargs["device"]))
        return loader(*args, **kwargs)

    def recording_free(self) -> None:
        t5_events.append(("free",))
        free(self)

    monkeypatch.setattr(magi.generation, "KVCache", RecordingCache)
    monkeypatch.setattr(text_encoder.T5Encoder, "from_pretrained", classmethod(recording_loader))
    monkeypatch.setattr(text_encoder.T5Encoder, "free", recording_free)
    plain = _latents(tiny_pipe)
    t5_events.clear()  # "a red car" may or may not have been encoded by an earlier test
    engine = dataclasses.replace(tiny_pipe.config.engine, kv_offload=True)
    monkeypatch.setattr(tiny_pipe, "config", tiny_pipe.config.replace(engine=engine))
    offloaded = list(tiny_pipe.stream("t2v", "a blue boat", num_frames=30, seed=5))
    assert [c.offload for c in caches] == [False, True]  # engine_config.kv_offload is what counts
    # a new prompt loads T5 on runtime_config.t5_device and frees it right after encoding
    assert t5_events == [("load", tiny_pipe.config.runtime.t5_device), ("free",)]
    assert len(offloaded) == len(plain) == 2
    again = list(tiny_pipe.stream("t2v", "a red car", num_frames=30, seed=5))  # host cache, same numbers
    assert all(torch.equal(a.latent, b) for a, b in zip(again, plain))


def test_spilled_noise_is_released_when_a_run_fails(tiny_config: Path, monkeypatch, tmp_path: Path) -> None:
    from magi.sampling.noise import InitialNoise

    closed = []
    close = InitialNoise.close
    monkeypatch.setattr(InitialNoise, "close", lambda self: closed.append(self.spilled) or close(self))
    pipe = MagiPipeline.from_config(tiny_config, device="cpu", noise_spill_bytes=0)

    def explode(info) -> None:
        if info.step == 6:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        pipe.generate("t2v", "a", output_path=tmp_path / "x.mp4", num_frames=96, callback=explode)
    assert closed == [True]


def test_all_memory_options_together_on_i2v(tiny_pipe: MagiPipeline, tiny_config: Path, tmp_path: Path) -> None:
    # i2v also runs the VAE encoder under vae_offload (the prefix), then one decode per chunk
    image = tmp_path / "start.ppm"
    _write_ppm(image, torch.randint(0, 256, (48, 80, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)))
    plain = list(tiny_pipe.stream("i2v", "a cat", image_path=image, num_frames=30, seed=2))
    pipe = MagiPipeline.from_config(tiny_config, device="cpu", offload_blocks=True, noise_spill_bytes=0)
    low = list(pipe.stream("i2v", "a cat", image_path=image, num_frames=30, seed=2))
    assert len(low) == len(plain) == 2
    assert all(torch.equal(a.latent, b.latent) and torch.equal(a.frames, b.frames) for a, b in zip(low, plain))
    assert pipe.vae_host.loads == 3  # 1 encode + 2 decodes, weights back on the host in between


def test_per_chunk_noise_is_seed_plus_chunk_and_documented_as_different(tiny_pipe: MagiPipeline) -> None:
    per_chunk = list(tiny_pipe.stream("t2v", "a red car", num_frames=30, seed=5, per_chunk_noise=True))
    rt = tiny_pipe.config.runtime
    shape = (1, 16, rt.chunk_width, rt.video_size_h // 8, rt.video_size_w // 8)
    pieces = [torch.randn(shape, generator=torch.Generator().manual_seed(5 + k)) for k in range(2)]
    injected = list(tiny_pipe.stream("t2v", "a red car", num_frames=30, noise=torch.cat(pieces, dim=2)))
    assert all(torch.equal(a.latent, b.latent) for a, b in zip(per_chunk, injected))
    official = _latents(tiny_pipe)  # same seed, official single draw: a different video
    assert not torch.equal(per_chunk[0].latent, official[0])
    with pytest.raises(ValueError, match="either noise or per_chunk_noise"):
        list(tiny_pipe.stream("t2v", "a", num_frames=30, noise=torch.cat(pieces, dim=2), per_chunk_noise=True))
