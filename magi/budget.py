"""What a request needs in memory and on disk, checked before any model loads.

Pure arithmetic on the config: ``chunk_count`` / ``decoded_frames`` are the frame budget the
pipeline uses (chunks a request needs, frames a chunk decodes to), ``estimate`` sizes a request (the initial noise, one chunk's latent,
decoded frames and DiT activations), ``check_budget`` compares those sizes with the free space of
the temporary folder and the machine's memory, and ``check_request`` does both with this machine's
numbers. A request that cannot fit (a 100000 px frame, ten million frames, a million-frame
chunk) is refused in one line naming the numbers instead of filling the disk or the memory hours
later. The sizes are buffers the run itself allocates (v2v: for the longest possible prefix), so a
refused request could not have run.

Shapes: C latent channels, T latent frames, H x W pixels (latent H/8 x W/8).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace

from magi.config import MagiConfig
from magi.request import shown_path

TEMPORAL_FACTOR = 4  # VAE temporal compression
OFFICIAL_PREFIX_FRAMES = 32  # the official v2v reads exactly this many frames from the start
SPILL_BYTES = 4 * 2**20  # initial noise above this lives in a temporary file (over 1 chunk at 720x720)

GIB = 2**30
FLOAT32 = 4  # bytes


@dataclass(frozen=True)
class Estimate:
    """Sizes of one request (upper bounds on chunk counts, so valid requests always fit)."""

    video_size_h: int
    video_size_w: int
    num_frames: int
    chunk_width: int  # latent frames per chunk
    chunks: int  # latent chunks, prefix chunks included: the noise covers chunks * chunk_width
    generated_chunks: int  # chunks denoised and written; per-chunk prompts index these
    latent_channels: int
    noise_bytes: int  # float32 [1, C, chunks * chunk_width, H/8, W/8]
    noise_spill_bytes: int  # noise above this lives in a temporary file, below it in memory
    chunk_latent_bytes: int  # float32 [1, C, chunk_width, H/8, W/8]
    frames_per_chunk: int  # video frames one chunk decodes to
    chunk_frame_bytes: int  # float32 [3, frames_per_chunk, H, W] out of the VAE decode
    chunk_tokens: int  # DiT tokens of one chunk
    chunk_activation_bytes: int  # float32 [chunk_tokens, max(hidden, ffn_hidden)]: one layer's widest


def tile_frames(fps: int, compat: str = "magi") -> int:
    """Frames of one temporal VAE tile. The official tile is fps // 2 frames, which drops frames
    when that is not a multiple of 4; magi rounds it down to a multiple of 4 (same at 24 fps)."""
    frames = fps // 2
    if compat == "magi":
        return max(4, frames // 4 * 4)
    if compat != "official":
        raise ValueError(f"compat must be 'magi' or 'official', got {compat!r}")
    return frames


def visible_prefix_frames(
    noise2clean_kvrange: Sequence[int], chunk_width: int, temporal_factor: int = TEMPORAL_FACTOR
) -> int:
    """Pixel frames of history a new chunk can still attend to: (max(kv range) - 1) chunks."""
    return (max(noise2clean_kvrange) - 1) * chunk_width * temporal_factor


def decoded_frames(latent_frames: int, tile_latents: int) -> int:
    """Video frames the tiled VAE decode gives for n latent frames (a lone tile frame -> 1)."""
    full, rest = divmod(latent_frames, tile_latents)
    tail = 0 if rest == 0 else (1 if rest == 1 else 4 * rest)
    return full * 4 * tile_latents + tail


def chunk_count(
    mode: str,
    num_frames: int,
    prefix_frames: int,
    chunk_width: int,
    *,
    compat: str = "magi",
    temporal_factor: int = 4,
    tile_latents: int = 3,
) -> int:
    """How many latent chunks (prefix chunks included) a request needs.

    Args:
        mode: "t2v", "i2v" or "v2v".
        num_frames: requested video frames.
        prefix_frames: P, prefix latent frames (0, 1, or the encoded v2v length).
        chunk_width: latent frames per chunk.
        compat: "official" uses ceil((num_frames // 4 + P) / chunk_width); "magi" the fewest
            chunks whose output covers num_frames exactly.
        temporal_factor: VAE temporal compression (4).
        tile_latents: latent frames per temporal VAE decode tile (fps // 2 // 4).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if compat == "official":
        return math.ceil((num_frames // temporal_factor + prefix_frames) / chunk_width)
    if mode != "v2v":  # whole chunks from chunk 0 (i2v: the image is the first latent frame)
        latents = max(math.ceil(num_frames / temporal_factor), prefix_frames)
        return math.ceil(latents / chunk_width)
    # v2v: the first generated chunk may be partly prefilled; its remainder decodes on its own.
    offset = prefix_frames // chunk_width
    first = (offset + 1) * chunk_width - prefix_frames
    have = decoded_frames(first, tile_latents)
    per_chunk = decoded_frames(chunk_width, tile_latents)
    return offset + 1 + max(0, math.ceil((num_frames - have) / per_chunk))


def prefix_frames_upper_bound(cfg: MagiConfig, mode: str, compat: str = "magi") -> int:
    """Most prefix latent frames a request can have: t2v 0, i2v 1 (the image), v2v the visible
    prefix (official: its first 32 frames) over the VAE's temporal factor, rounded up."""
    if mode == "t2v":
        return 0
    if mode == "i2v":
        return 1
    rt = cfg.runtime
    frames = visible_prefix_frames(rt.noise2clean_kvrange or (8,), rt.chunk_width, rt.temporal_downsample_factor)
    if compat == "official":
        frames = OFFICIAL_PREFIX_FRAMES
    return math.ceil(frames / rt.temporal_downsample_factor)


def estimate(
    cfg: MagiConfig,
    mode: str,
    num_frames: int,
    prefix_frames_upper_bound: int,
    *,
    compat: str = "magi",
    noise_spill_bytes: int | None = None,
) -> Estimate:
    """Size a request from the config alone.

    Args:
        cfg: the run's config (video size, chunk_width, latent channels from it).
        mode: "t2v", "i2v" or "v2v".
        num_frames: requested video frames.
        prefix_frames_upper_bound: the prefix latent frames P, or an upper bound on them
            (``prefix_frames_upper_bound()``); the exact P gives exact chunk counts.
        compat: "magi" or "official" (chunk count and VAE tile rules).
        noise_spill_bytes: the pipeline's threshold above which the noise is a temporary file
            (default SPILL_BYTES).
    """
    if noise_spill_bytes is None:
        noise_spill_bytes = SPILL_BYTES
    rt, m = cfg.runtime, cfg.model
    cw, tf = rt.chunk_width, rt.temporal_downsample_factor
    tile = tile_frames(rt.fps, compat) // tf
    chunks, generated = _chunk_bounds(
        mode, num_frames, prefix_frames_upper_bound, cw, compat=compat, temporal_factor=tf, tile_latents=tile
    )
    c = m.in_channels // 2 if m.half_channel_vae else m.in_channels
    lat_h, lat_w = rt.video_size_h // 8, rt.video_size_w // 8
    frames = decoded_frames(cw, tile)
    tokens = math.ceil(cw / m.t_patch_size) * math.ceil(lat_h / m.patch_size) * math.ceil(lat_w / m.patch_size)
    return Estimate(
        rt.video_size_h,
        rt.video_size_w,
        num_frames,
        cw,
        chunks,
        generated,
        c,
        noise_bytes=c * chunks * cw * lat_h * lat_w * FLOAT32,
        noise_spill_bytes=noise_spill_bytes,
        chunk_latent_bytes=c * cw * lat_h * lat_w * FLOAT32,
        frames_per_chunk=frames,
        chunk_frame_bytes=3 * frames * rt.video_size_h * rt.video_size_w * FLOAT32,
        chunk_tokens=tokens,
        chunk_activation_bytes=tokens * max(m.hidden_size, m.ffn_hidden_size) * FLOAT32,
    )


def _chunk_bounds(mode: str, num_frames: int, p_max: int, cw: int, **kwargs) -> tuple[int, int]:
    """(chunks, generated chunks), exact for t2v / i2v, upper bounds over every v2v P <= p_max.

    v2v: generated chunks depend only on the partly prefilled first chunk, most with the longest
    partial prefix P = min(p_max, cw - 1); all chunks are at most the whole prefix chunks plus that.
    """
    p = p_max if mode != "v2v" else max(1, min(p_max, cw - 1))
    generated = chunk_count(mode, num_frames, p, cw, **kwargs) - p // cw
    if mode != "v2v":
        return generated + p // cw, generated
    return p_max // cw + generated, generated


def check_budget(
    est: Estimate,
    free_tmp_bytes: int | None,
    ram_bytes: int | None,
    *,
    tmp_dir: str | None = None,
    flag_prefix: str = "",
) -> None:
    """Refuse a request whose chunk or initial noise cannot fit; None skips that check.

    Args:
        est: from ``estimate``.
        free_tmp_bytes: free space of the temporary folder the noise file goes to.
        ram_bytes: the machine's memory.
        tmp_dir: that folder, for the message.
        flag_prefix: "--" names the settings as command-line flags.

    Raises:
        ValueError: one line naming the sizes and what to lower.
    """
    f = flag_prefix
    what = f"{est.video_size_w}x{est.video_size_h} px, {est.num_frames} frames"  # one line of <= 200 characters
    if ram_bytes is not None:
        _check_chunk(est, ram_bytes, what)
    if est.noise_bytes > est.noise_spill_bytes:  # the pipeline spills it to a temporary file
        folder = shown_path(tmp_dir or "the temporary folder", 30)
        room, where = free_tmp_bytes, f"in TMPDIR ({folder}: {_gib(free_tmp_bytes)} free)"
    else:
        room, where = ram_bytes, f"in memory ({_gib(ram_bytes)})"
    if room is not None and est.noise_bytes > room:
        raise ValueError(
            f"{what}: the initial noise ({est.chunks} chunks) needs {_gib(est.noise_bytes)} {where}; "
            f"lower {f}num_frames or the size"
        )


def _check_chunk(est: Estimate, ram_bytes: int, what: str) -> None:
    parts = {
        "latent": est.chunk_latent_bytes,
        "decoded frames": est.chunk_frame_bytes,
        "DiT activations": est.chunk_activation_bytes,  # (est.chunk_tokens tokens x the widest layer)
    }
    part, size = max(parts.items(), key=lambda kv: kv[1])
    if size > ram_bytes:
        raise ValueError(
            f"{what}: one chunk ({est.chunk_width} latent, {est.frames_per_chunk} video frames) needs "
            f"{_gib(size)} for its {part}, over this machine's {_gib(ram_bytes)}; lower the size or "
            "runtime_config.chunk_width"
        )


def check_request(
    cfg: MagiConfig,
    mode: str,
    num_frames: int,
    prefix_frames_upper_bound: int,
    *,
    compat: str = "magi",
    noise_spill_bytes: int | None = None,
    draw_noise: bool = True,
    flag_prefix: str = "",
) -> Estimate:
    """``estimate`` the request and ``check_budget`` it against this machine; returns the estimate.

    Args:
        cfg, mode, num_frames, prefix_frames_upper_bound, compat, noise_spill_bytes: see ``estimate``.
        draw_noise: False when the caller supplies the noise (or draws it per chunk): no noise check.
        flag_prefix: see ``check_budget``.

    Raises:
        ValueError: the request cannot fit.
    """
    est = estimate(cfg, mode, num_frames, prefix_frames_upper_bound, compat=compat, noise_spill_bytes=noise_spill_bytes)
    if not draw_noise:
        est = replace(est, noise_bytes=0)
    tmp = tempfile.gettempdir()
    check_budget(est, free_tmp_bytes(tmp), ram_bytes(), tmp_dir=tmp, flag_prefix=flag_prefix)
    return est


def free_tmp_bytes(folder: str | None = None) -> int | None:
    """Free bytes in ``folder`` (default the temporary folder); None where it cannot be read."""
    try:
        return shutil.disk_usage(folder or tempfile.gettempdir()).free
    except OSError:
        return None


def ram_bytes() -> int | None:
    """Physical memory of this machine; None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GIB:.1f} GiB"
