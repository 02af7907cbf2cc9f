"""Tile-parallel VAE decode / encode equal the single-process tiled runs bit for bit (tiny VAE, gloo)."""

from __future__ import annotations

from pathlib import Path

import torch

from magi import video_io
from magi.distributed.vae_parallel import (
    deal_tiles,
    decode_to_uint8,
    decode_windows,
    encode_prefix,
    tile_parallel_decode,
    tile_parallel_encode,
)
from magi.models.vae import TileSpec, ViTVAE, tiled_decode, tiled_encode
from tests.distributed.ranks import assert_all_ok, engine, run_ranks, single_thread

DDCONFIG = {
    "video_size": 32,
    "video_length": 16,
    "patch_size": 8,
    "patch_length": 4,
    "in_chans": 3,
    "z_chans": 16,
    "double_z": True,
    "embed_dim": 256,
    "depth": 1,
    "num_heads": 4,
    "mlp_ratio": 2.0,
    "qkv_bias": True,
    "qk_scale": None,
    "ln_in_attn": True,
    "with_cls_token": True,
    "conv_last_layer": True,
    "use_rope": False,
    "use_final_proj": False,
    "norm_code": False,
    "drop_rate": 0.0,
    "attn_drop_rate": 0.0,
    "drop_path_rate": 0.0,
}
SMALL_TILES = TileSpec(size=32, frames=12)  # 4x4-latent tiles, 3 latent frames: many tiles


def tiny_vae() -> ViTVAE:
    vae = ViTVAE(DDCONFIG)
    vae.reset_parameters(seed=0)
    return vae.eval()


def latents() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    small = torch.randn(1, 16, 4, 7, 7, generator=gen)  # 2 x 3 x 3 tiles, lone last frame
    big = torch.randn(1, 16, 2, 34, 34, generator=gen) * 0.18215  # 256-px tiles at fps 8: 8 tiles
    return small, big


def pixels() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    clip = torch.rand(1, 3, 8, 48, 40, generator=gen) * 2 - 1  # 2 x 2 x 2 tiles of 32 px, 4 frames
    frames = torch.randint(0, 256, (8, 64, 72, 3), generator=gen, dtype=torch.uint8)
    return clip, frames


def test_tiles_are_dealt_largest_first_round_robin() -> None:
    assert deal_tiles([4, 9, 9, 1, 6], 2) == [[1, 4, 3], [2, 0]]
    z = torch.zeros(1, 16, 4, 7, 7)
    windows = decode_windows(z, SMALL_TILES, tiny_vae())
    assert len(windows) == 18 and tuple(windows[-1].shape) == (1, 16, 1, 1, 1)


def _vae_rank(rank: int, world: int, out: str) -> None:
    from magi.distributed import fail_fast, init_from_env, shutdown

    init_from_env(engine(cp_size=world, cp_strategy="cp_ulysses"))
    with fail_fast():
        vae, (small, big) = tiny_vae(), latents()
        video = tile_parallel_decode(vae, small, SMALL_TILES)
        frames = decode_to_uint8(vae, big, fps=8)
        clip, pixel_frames = pixels()
        latent = tile_parallel_encode(vae, clip, TileSpec(size=32, frames=4))
        prefix = encode_prefix(vae, pixel_frames, fps=8)
        results = {"video": video, "frames": frames, "latent": latent, "prefix": prefix}
        torch.save(results, f"{out}.rank{rank}.pt")
    shutdown()


def test_tile_parallel_vae_equals_single_process(tmp_path: Path) -> None:
    vae, (small, big) = tiny_vae(), latents()
    clip, pixel_frames = pixels()
    with single_thread():  # bit-equality needs the ranks' matmul reduction order
        expected = {
            "video": tiled_decode(vae, small, SMALL_TILES, autocast=True),
            "frames": video_io.decode_to_uint8(vae, big, fps=8),
            "latent": tiled_encode(vae, clip, TileSpec(size=32, frames=4)),
            "prefix": video_io.encode_prefix(vae, pixel_frames, fps=8),
        }
    out = str(tmp_path / "out")
    assert_all_ok(run_ranks(_vae_rank, 3, tmp_path, out))
    for rank in range(3):
        got = torch.load(f"{out}.rank{rank}.pt")
        for key, value in expected.items():
            assert torch.equal(got[key], value), f"rank {rank}: {key} differs from the single process"
