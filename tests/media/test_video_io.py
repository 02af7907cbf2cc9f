"""Media I/O: official resize / prefix parity with the pipeline fixtures, the VAE helpers, input
errors, image-mode conversion and the streaming mp4 writer. Test media are made with the ffmpeg
binary of imageio-ffmpeg in tmp_path."""

from __future__ import annotations

import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from magi.budget import visible_prefix_frames
from magi.media.latents import decode_to_uint8, encode_prefix
from magi.media.mp4 import Mp4Writer
from magi.media.read import (
    load_image,
    load_prefix_video,
    load_video,
    probe,
    select_prefix_frames,
)
from magi.models.vae import ViTVAE, load_vae
from tests.helpers import load_fixture, rel_l2

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def ffmpeg(*args: str) -> None:
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def make_png(path: Path, pix_fmt: str, source: str = "testsrc=size=40x24:rate=1") -> Path:
    ffmpeg("-f", "lavfi", "-i", source, "-frames:v", "1", "-pix_fmt", pix_fmt, str(path))
    return path


def make_video(path: Path, seconds: float = 2, rate: int = 30, size: str = "80x48") -> Path:
    ffmpeg(
        "-f", "lavfi", "-i", f"testsrc=size={size}:rate={rate}", "-t", str(seconds), "-pix_fmt", "yuv420p", str(path)
    )
    return path


@pytest.fixture(scope="module")
def vae16(reference_dir: Path) -> ViTVAE:
    return load_vae(reference_dir / "checkpoints" / "vae", dtype=torch.bfloat16)


# ------------------------------------------------------------------ official parity (fixtures)
def test_official_image_resize_matches_fixture(reference_dir: Path) -> None:
    tensors, _ = load_fixture(reference_dir, "pipeline_i2v_4p5b_distill")
    image = load_image(reference_dir / "example/assets/image.jpeg", (64, 64), compat="official")
    # same ffmpeg scale filter as the official ffmpeg_i2v: bit identical
    assert torch.equal(image, tensors["input.prefix_frames_thwc_uint8"][0])


def test_official_prefix_video_matches_fixture(reference_dir: Path) -> None:
    tensors, _ = load_fixture(reference_dir, "pipeline_v2v_4p5b_base")
    frames = load_prefix_video(
        reference_dir / "example/assets/prefix_video.mp4", 24, (64, 64), visible_frames=96, compat="official"
    )
    assert torch.equal(frames, tensors["input.prefix_frames_thwc_uint8"])  # first 32, exact


@pytest.mark.parametrize("case", ["pipeline_i2v_4p5b_distill", "pipeline_v2v_4p5b_base"])
def test_encode_prefix_matches_fixture(reference_dir: Path, vae16: ViTVAE, case: str) -> None:
    tensors, _ = load_fixture(reference_dir, case)
    frames = tensors["input.prefix_frames_thwc_uint8"]
    latent = encode_prefix(vae16, frames[0] if len(frames) == 1 else frames, compat="official")
    assert latent.dtype == torch.bfloat16
    assert latent.shape == tensors["input.prefix_latent"].shape
    assert rel_l2(latent, tensors["input.prefix_latent"]) <= 1e-2  # bf16: bit identical on Intel, 3.7e-3 on AMD EPYC


def test_decode_to_uint8_official_matches_fixture(reference_dir: Path, vae16: ViTVAE) -> None:
    tensors, _ = load_fixture(reference_dir, "vae")
    frames = decode_to_uint8(vae16, tensors["pipe.latent_scaled"].float(), compat="official")
    assert frames.dtype == torch.uint8 and frames.shape == (24, 3, 64, 64)
    assert (frames.int() - tensors["pipe.decoded_tchw_uint8"].int()).abs().max() <= 2
    rounded = decode_to_uint8(vae16, tensors["pipe.latent_scaled"].float())
    diff = rounded.int() - frames.int()  # rounding vs truncation: same or one level up
    assert diff.min() >= 0 and diff.max() <= 1 and (diff > 0).any()


def test_v2v_first_chunk_decodes_to_13_frames(reference_dir: Path, vae16: ViTVAE) -> None:
    tensors, _ = load_fixture(reference_dir, "pipeline_v2v_4p5b_base")
    latent = tensors["output.final_latent"][:, :, 8:12]  # chunk 1 minus the 2 prefix latents
    frames = decode_to_uint8(vae16, latent, compat="official")
    assert frames.shape == (13, 3, 64, 64)  # official quirk: 3 + 1 latents -> 12 + 1 frames
    assert (frames.int() - tensors["output.video_tchw_uint8"][:13].int()).abs().max() <= 2


# ---------------------------------------------------------------------------- resizing, prefix
def _bands(tmp_path: Path) -> Path:
    # 128x64: four 32-px vertical bands black | red | green | white
    src = (
        "color=black:s=32x64[a];color=red:s=32x64[b];color=lime:s=32x64[c];color=white:s=32x64[d];[a][b][c][d]hstack=4"
    )
    path = tmp_path / "bands.png"
    ffmpeg("-f", "lavfi", "-i", src, "-frames:v", "1", "-pix_fmt", "rgb24", str(path))
    return path


def test_magi_resize_keeps_aspect_official_stretches(tmp_path: Path) -> None:
    path = _bands(tmp_path)
    magi = load_image(path, (64, 64)).int()  # cover (no-op here) + centre crop: red | green
    assert magi.shape == (64, 64, 3)
    assert (magi[:, 4:28] - torch.tensor([255, 0, 0])).abs().max() <= 2
    assert (magi[:, 36:60] - torch.tensor([0, 255, 0])).abs().max() <= 2
    official = load_image(path, (64, 64), compat="official").int()  # all four, 16 px each
    assert (official[:, 2:14]).abs().max() <= 2
    assert (official[:, 50:62] - 255).abs().max() <= 2
    assert load_image(path).shape == (64, 128, 3)


def test_load_video_resamples_fps(tmp_path: Path) -> None:
    path = make_video(tmp_path / "v30.mp4", seconds=2, rate=30)
    assert probe(path).fps == 30
    frames = load_video(path, 24, (64, 48))
    assert frames.shape == (48, 48, 64, 3) and frames.dtype == torch.uint8
    assert load_video(path, 24, max_frames=5).shape == (5, 48, 80, 3)
    last = load_video(path, 24, (64, 48), max_frames=7, keep="last")
    assert torch.equal(last, frames[-7:])


def test_select_prefix_frames() -> None:
    frames = torch.arange(50).view(50, 1, 1, 1).expand(50, 2, 2, 3)
    magi = select_prefix_frames(frames, visible_frames=24)
    assert magi[:, 0, 0, 0].tolist() == list(range(26, 50))  # the end, capped by visibility
    short = select_prefix_frames(frames[:11], visible_frames=24)
    assert short[:, 0, 0, 0].tolist() == list(range(3, 11))  # multiple of 4, latest frames
    official = select_prefix_frames(frames, visible_frames=24, compat="official")
    assert official[:, 0, 0, 0].tolist() == list(range(32))  # first 32 (official bug)
    with pytest.raises(ValueError, match="at least 4"):
        select_prefix_frames(frames[:3], visible_frames=24)
    assert visible_prefix_frames([5, 4, 3, 2], chunk_width=6) == 96


def test_load_prefix_video_magi_takes_the_end(tmp_path: Path) -> None:
    path = make_video(tmp_path / "v.mp4", seconds=2, rate=24)
    every = load_video(path, 24, (64, 48))
    prefix = load_prefix_video(path, 24, (64, 48), visible_frames=24)
    assert torch.equal(prefix, every[-24:])


# ------------------------------------------------------------------------------ input errors
def test_image_modes_are_converted(tmp_path: Path) -> None:
    rgb = load_image(make_png(tmp_path / "rgb.png", "rgb24")).int()
    gray = load_image(make_png(tmp_path / "gray.png", "gray"))
    assert gray.shape == (24, 40, 3) and torch.equal(gray[..., 0], gray[..., 2])
    deep = load_image(make_png(tmp_path / "deep.png", "rgb48be")).int()
    assert (deep - rgb).abs().max() <= 1
    pal = load_image(make_png(tmp_path / "pal.png", "pal8")).int()
    assert pal.shape == (24, 40, 3) and (pal - rgb).abs().float().mean() < 8
    # half-transparent red over white -> pink
    half_red = "color=red@0.5:s=16x16,format=rgba"
    rgba = load_image(make_png(tmp_path / "rgba.png", "rgba", half_red))
    assert (rgba.int() - torch.tensor([255, 127, 127])).abs().max() <= 2
    ya = load_image(make_png(tmp_path / "ya.png", "ya8", "color=black@0.0:s=16x16,format=rgba"))
    assert (ya.int() - 255).abs().max() <= 1  # fully transparent -> white


def test_unreadable_inputs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="not a file"):
        load_video(tmp_path, 24)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_video(tmp_path / "empty.mp4", 24)
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(ValueError, match="cannot decode video"):
        load_video(tmp_path / "junk.mp4", 24)
    video = make_video(tmp_path / "v.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(video[: len(video) // 3])  # index at the end is lost
    with pytest.raises(ValueError, match="cannot decode video"):
        load_video(tmp_path / "cut.mp4", 24)
    ffmpeg("-f", "lavfi", "-i", "sine=d=0.5", str(tmp_path / "audio.m4a"))
    with pytest.raises(ValueError, match="cannot use image .*audio.m4a: it has no decodable frames"):
        load_image(tmp_path / "audio.m4a")


def test_zero_frame_video(tmp_path: Path) -> None:
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=64x48:rate=24",
        "-frames:v",
        "0",
        "-c:v",
        "libx264",
        str(tmp_path / "zero.mp4"),
    )
    with pytest.raises(ValueError, match="no decodable frames"):
        load_video(tmp_path / "zero.mp4", 24)


def test_bad_sizes_and_arguments(tmp_path: Path) -> None:
    tiny = make_png(tmp_path / "tiny.png", "rgb24", "testsrc=size=6x6:rate=1")
    with pytest.raises(ValueError, match="at least 8x8"):
        load_image(tiny)
    png = make_png(tmp_path / "ok.png", "rgb24")
    with pytest.raises(ValueError, match="multiples of 8"):
        load_image(png, (60, 48))
    with pytest.raises(ValueError, match="compat"):
        load_image(png, (64, 48), compat="fast")
    with pytest.raises(ValueError, match="fps"):
        load_video(png, 0)


# ------------------------------------------------------------------------------------- writer
def _frames(n: int, w: int = 64, h: int = 48) -> torch.Tensor:
    gen = torch.Generator().manual_seed(n)
    base = torch.randint(0, 256, (1, 3, h // 8, w // 8), generator=gen, dtype=torch.uint8)
    return base.repeat_interleave(8, 2).repeat_interleave(8, 3).repeat(n, 1, 1, 1)


def test_writer_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    with Mp4Writer(out, fps=24) as writer:
        writer.append(_frames(7))
        writer.append(_frames(5))
        assert not out.exists()  # only the temp file exists while writing
    assert out.is_file() and writer.frames_written == 12
    assert list(tmp_path.iterdir()) == [out]  # no temp file left
    info = probe(out)
    assert (info.width, info.height, info.fps, info.codec) == (64, 48, 24, "h264")
    back = load_video(out, 24)
    assert back.shape == (12, 48, 64, 3)
    first = _frames(7)[0].permute(1, 2, 0).float()
    assert (back[0].float() - first).abs().mean() < 8  # lossy yuv420p, blocky content


def test_writer_failure_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    out.write_bytes(b"previous result")
    with pytest.raises(RuntimeError, match="boom"):
        with Mp4Writer(out, fps=24) as writer:
            writer.append(_frames(3))
            raise RuntimeError("boom")
    assert out.read_bytes() == b"previous result"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]
    writer = Mp4Writer(tmp_path / "other.mp4", fps=24)
    writer.append(_frames(2))
    writer.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]


def test_interrupted_writer_is_finalised(tmp_path: Path) -> None:
    out = tmp_path / "partial.mp4"
    with pytest.raises(KeyboardInterrupt):
        with Mp4Writer(out, fps=24, keep_partial=True) as writer:
            writer.append(_frames(6))
            raise KeyboardInterrupt
    assert load_video(out, 24).shape == (6, 48, 64, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial.mp4"]


def test_writer_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="output folder does not exist"):
        Mp4Writer(tmp_path / "nope" / "x.mp4", fps=24)
    with pytest.raises(ValueError, match=r"\.mp4"):
        Mp4Writer(tmp_path / "x.avi", fps=24)
    writer = Mp4Writer(tmp_path / "x.mp4", fps=24)
    with pytest.raises(ValueError, match="uint8 frames"):
        writer.append(torch.zeros(2, 48, 64, 3, dtype=torch.uint8))
    writer.append(_frames(1))
    with pytest.raises(ValueError, match="differs"):
        writer.append(_frames(1, w=32))
    writer.abort()
    with pytest.raises(ValueError, match="even"):
        Mp4Writer(tmp_path / "y.mp4", fps=24).append(torch.zeros(1, 3, 5, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="no frames"):
        Mp4Writer(tmp_path / "z.mp4", fps=24).close()
    assert list(tmp_path.iterdir()) == []


def test_vae_helper_argument_errors(vae16: ViTVAE) -> None:
    with pytest.raises(ValueError, match="uint8 frames"):
        encode_prefix(vae16, torch.zeros(4, 64, 64, 3))
    with pytest.raises(ValueError, match="multiples of 8"):
        encode_prefix(vae16, torch.zeros(4, 60, 64, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"latent \[1, C, T, H, W\]"):
        decode_to_uint8(vae16, torch.zeros(16, 1, 8, 8))
    with pytest.raises(ValueError, match="compat"):
        decode_to_uint8(vae16, torch.zeros(1, 16, 1, 8, 8), compat="exact")
