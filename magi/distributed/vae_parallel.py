"""Tile-parallel VAE decode (shared/spec/parallel.md §5): each tile decoded once, by one rank.

The tiles of ``magi.models.vae.tiled_decode`` are ordered by size (largest first, ties in raster
order) and dealt round-robin over the ranks; every rank decodes its share, one all-gather gives
every rank every raw tile, and then the ordinary single-device ``tiled_decode`` runs with a
stand-in VAE that hands back those tiles instead of decoding. Blending and assembly are therefore
the single-device code itself, and the result is bit-identical to a single-process decode.
(Official: each rank also blends its own tiles and a second gather shares them; blending is cheap
elementwise work, so magi keeps one gather.)

Legend: B batch, C channels, T latent frames, H W latent size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from magi.models.vae import TileSpec, ViTVAE, tile_spec_for_fps, tiled_decode

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
        tile = self._tiles.pop(_key(z), None)
        if tile is None:
            raise RuntimeError(
                f"tile-parallel decode: window {tuple(z.shape)} at offset {z.storage_offset()} was "
                "not pre-decoded; magi.models.vae.tiled_decode's tiling and decode_windows disagree"
            )
        return tile


def _world(group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _decode_share(
    vae: ViTVAE, z: torch.Tensor, spec: TileSpec, autocast: bool, group: Any
) -> dict[WindowKey, torch.Tensor]:
    """Decode this rank's tiles, exchange them, return every tile keyed by its window."""
    windows = decode_windows(z, spec, vae)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = deal_tiles([w.numel() for w in windows], world)[rank]
    decoded = {i: vae.decode(windows[i], autocast) for i in mine}
    tiles = _all_gather_tiles(decoded, group, world)
    return {_key(windows[i]): tile.to(z.device) for i, tile in tiles.items()}


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
