"""Tile-parallel VAE (shared/spec/parallel.md §5): each tile encoded / decoded once, by one rank.

The tiles of ``magi.models.vae.tiled_decode`` (or ``tiled_encode``) are ordered by size (largest
first, ties in raster order) and dealt round-robin over the ranks; every rank runs the VAE on its
share, one all-gather gives every rank every raw tile, and then the ordinary single-device
``tiled_decode`` / ``tiled_encode`` runs with a stand-in VAE that hands back those tiles instead
of computing them. Blending and assembly are therefore the single-device code itself, and the
result is bit-identical to a single-process run. (Official decode: each rank also blends its own
tiles and a second gather shares them; blending is cheap elementwise work, so magi keeps one.)

Legend: B batch, C channels, T frames, H W height / width (latent or pixel, as stated).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from magi.models.vae import TileSpec, ViTVAE, tile_spec_for_fps, tiled_decode, tiled_encode

WindowKey = tuple[int, tuple[int, ...], tuple[int, ...]]


def _key(window: torch.Tensor) -> WindowKey:
    # Tiles are views of one latent: offset + shape + strides name a window uniquely.
    return window.storage_offset(), tuple(window.shape), tuple(window.stride())


def decode_windows(z: torch.Tensor, spec: TileSpec, vae: ViTVAE) -> list[torch.Tensor]:
    """The latent windows ``tiled_decode`` decodes, in its raster order (time, row, column)."""
    cfg = vae.config
    side = spec.size // cfg.patch_size
    stride = int(side * (1 - spec.overlap))
    frames = spec.frames // cfg.patch_length
    _, _, t, h, w = z.shape
    return [
        z[:, :, t0 : t0 + frames, h0 : h0 + side, w0 : w0 + side]
        for t0 in range(0, t, frames)
        for h0 in range(0, h, stride)
        for w0 in range(0, w, stride)
    ]


def encode_windows(x: torch.Tensor, spec: TileSpec) -> list[torch.Tensor]:
    """The pixel windows ``tiled_encode`` encodes, in its raster order (time, row, column)."""
    stride = int(spec.size * (1 - spec.overlap))
    _, _, t, h, w = x.shape
    return [
        x[:, :, t0 : t0 + spec.frames, h0 : h0 + spec.size, w0 : w0 + spec.size]
        for t0 in range(0, t, spec.frames)
        for h0 in range(0, h, stride)
        for w0 in range(0, w, stride)
    ]


def deal_tiles(sizes: list[int], world: int) -> list[list[int]]:
    """Tile indices per rank: sorted by size, largest first (stable), dealt round-robin."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    return [order[r::world] for r in range(world)]


class _TileReplay:
    """Stands in for the VAE inside ``tiled_decode``: returns tiles decoded beforehand."""

    def __init__(self, vae: ViTVAE, tiles: dict[WindowKey, torch.Tensor]) -> None:
        self.config = vae.config
        self.device, self.dtype = vae.device, vae.dtype
        self._tiles = tiles

    def decode(self, z: torch.Tensor, autocast: bool = False) -> torch.Tensor:
        return self._take(z)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._take(x)

    def _take(self, window: torch.Tensor) -> torch.Tensor:
        tile = self._tiles.pop(_key(window), None)
        if tile is None:
            raise RuntimeError(
                f"tile-parallel VAE: window {tuple(window.shape)} at offset {window.storage_offset()} "
                "was not computed beforehand; magi.models.vae's tiling and magi.distributed."
                "vae_parallel's windows disagree"
            )
        return tile


def _world(group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _share_tiles(
    windows: list[torch.Tensor], run: Callable[[torch.Tensor], torch.Tensor], group: Any
) -> dict[WindowKey, torch.Tensor]:
    """Run the VAE on this rank's tiles, exchange them, return every tile keyed by its window."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = deal_tiles([w.numel() for w in windows], world)[rank]
    tiles = _all_gather_tiles({i: run(windows[i]) for i in mine}, group, world)
    return {_key(windows[i]): tile.to(windows[i].device) for i, tile in tiles.items()}


def _decode_share(
    vae: ViTVAE, z: torch.Tensor, spec: TileSpec, autocast: bool, group: Any
) -> dict[WindowKey, torch.Tensor]:
    return _share_tiles(decode_windows(z, spec, vae), lambda w: vae.decode(w, autocast), group)


def _all_gather_tiles(mine: dict[int, torch.Tensor], group: Any, world: int) -> dict[int, torch.Tensor]:
    """One flat byte all-gather of every rank's tiles (any dtype travels bit-exactly)."""
    meta = [(i, tuple(t.shape), t.dtype) for i, t in mine.items()]
    metas: list[Any] = [None] * world
    dist.all_gather_object(metas, meta, group=group)
    device = next(iter(mine.values())).device if mine else torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    flat = [t.contiguous().view(-1).view(torch.uint8) for t in mine.values()]
    payload = torch.cat(flat).to(device) if flat else torch.empty(0, dtype=torch.uint8, device=device)
    sizes = [sum(_nbytes(shape, dtype) for _, shape, dtype in m) for m in metas]
    padded = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    buffers = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(buffers, padded, group=group)
    tiles = {}
    for buffer, rank_meta in zip(buffers, metas):
        offset = 0
        for i, shape, dtype in rank_meta:
            n = _nbytes(shape, dtype)
            tiles[i] = buffer[offset : offset + n].view(dtype).view(shape)
            offset += n
    return tiles


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()


def tile_parallel_decode(
    vae: ViTVAE, z: torch.Tensor, spec: TileSpec = TileSpec(), autocast: bool = True, group: Any = None
) -> torch.Tensor:
    """``tiled_decode(vae, z, spec, autocast)`` with the tiles spread over the ranks of ``group``.

    Every rank of ``group`` must call it with the same ``z``; every rank gets the whole video.

    Args:
        vae: the loaded VAE (the same weights on every rank).
        z: latent [B, C, T, H, W] (unscaled).
        spec: tiling, as for ``tiled_decode``.
        autocast: as for ``tiled_decode``.
        group: process group (None: the default group; without torch.distributed, local decode).
    """
    if _world(group) == 1:
        return tiled_decode(vae, z, spec, autocast)
    tiles = _decode_share(vae, z, spec, autocast, group)
    return tiled_decode(_TileReplay(vae, tiles), z, spec, autocast)  # type: ignore[arg-type]


def decode_to_uint8(
    vae: ViTVAE,
    latent: torch.Tensor,
    *,
    fps: int = 24,
    scale_factor: float | None = None,
    compat: str = "magi",
    group: Any = None,
) -> torch.Tensor:
    """Drop-in for ``magi.video_io.decode_to_uint8`` with the tiles spread over ``group``.

    Args:
        vae: loaded VAE; latent: scaled latent [1, C, T, H, W]; fps, scale_factor, compat: as
            ``video_io.decode_to_uint8``; group: as ``tile_parallel_decode``.

    Returns:
        uint8 frames [F, 3, 8H, 8W] on the CPU, on every rank of ``group``.
    """
    from magi import video_io

    scale = video_io.SCALE_FACTOR if scale_factor is None else scale_factor
    kwargs = dict(fps=fps, scale_factor=scale, compat=compat)
    if _world(group) == 1:
        return video_io.decode_to_uint8(vae, latent, **kwargs)
    spec = tile_spec_for_fps(fps, compat)
    if latent.ndim != 5 or latent.shape[0] != 1:
        raise ValueError(f"decode_to_uint8 expects a latent [1, C, T, H, W], got {tuple(latent.shape)}")
    # video_io scales the latent the same way: the windows it asks for match these keys.
    z = latent.to(vae.device).float() / scale
    tiles = _decode_share(vae, z, spec, True, group)
    return video_io.decode_to_uint8(_TileReplay(vae, tiles), latent, **kwargs)  # type: ignore[arg-type]


def tile_parallel_encode(vae: ViTVAE, x: torch.Tensor, spec: TileSpec = TileSpec(), group: Any = None) -> torch.Tensor:
    """``tiled_encode(vae, x, spec)`` with the tiles spread over the ranks of ``group``.

    Every rank of ``group`` must call it with the same ``x``; every rank gets the whole latent.

    Args:
        vae: the loaded VAE; x: video [B, 3, T, H, W] in [-1, 1]; spec: tiling, as for
            ``tiled_encode``; group: as ``tile_parallel_decode``.
    """
    if _world(group) == 1:
        return tiled_encode(vae, x, spec)
    tiles = _share_tiles(encode_windows(x, spec), vae.encode, group)
    return tiled_encode(_TileReplay(vae, tiles), x, spec)  # type: ignore[arg-type]


def encode_prefix(
    vae: ViTVAE,
    frames: torch.Tensor,
    *,
    fps: int = 24,
    scale_factor: float | None = None,
    compat: str = "magi",
    group: Any = None,
) -> torch.Tensor:
    """Drop-in for ``magi.video_io.encode_prefix`` with the tiles spread over ``group``.

    Args:
        vae: loaded VAE; frames: uint8 [T, H, W, 3] or [H, W, 3]; fps, scale_factor, compat: as
            ``video_io.encode_prefix``; group: as ``tile_parallel_decode``.

    Returns:
        The prefix latent [1, z, T', H/8, W/8] in the VAE's dtype, on every rank of ``group``.
    """
    from einops import rearrange

    from magi import video_io

    scale = video_io.SCALE_FACTOR if scale_factor is None else scale_factor
    kwargs = dict(fps=fps, scale_factor=scale, compat=compat)
    if _world(group) == 1 or frames.dtype != torch.uint8 or frames.ndim not in (3, 4):
        return video_io.encode_prefix(vae, frames, **kwargs)  # (its own errors for bad input)
    clip = frames[None] if frames.ndim == 3 else frames
    # video_io builds the pixel tensor the same way: the windows it asks for match these keys.
    x = rearrange(clip.to(vae.device), "t h w c -> 1 c t h w")
    x = (x.float() / 127.5 - 1).to(vae.dtype)
    tiles = _share_tiles(encode_windows(x, tile_spec_for_fps(fps, compat)), vae.encode, group)
    return video_io.encode_prefix(_TileReplay(vae, tiles), frames, **kwargs)  # type: ignore[arg-type]
