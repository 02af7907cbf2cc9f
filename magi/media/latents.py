"""Frames <-> latents for MAGI-1: the VAE prefix encode and the decode to uint8 frames, tiled as
the official code (shared/spec/vae.md §5-§6).

Frame layouts: THWC uint8 in (as ``magi.media.read`` gives them), [F, 3, H, W] uint8 out (what
``magi.media.mp4.Mp4Writer`` takes).

``compat="official"`` restores official behaviour where magi deliberately differs:
* decoded frames: official converts to uint8 in bf16 and truncates; magi rounds in float32;
* VAE temporal tile: official fps // 2 frames; magi rounds it down to a multiple of 4.
"""

from __future__ import annotations

import torch
from einops import rearrange

from magi.models.vae import ViTVAE, tile_spec_for_fps, tiled_decode, tiled_encode
from magi.request import check_compat

SCALE_FACTOR = 0.18215  # runtime_config.scale_factor of every released config


def encode_prefix(
    vae: ViTVAE, frames: torch.Tensor, *, fps: int = 24, scale_factor: float = SCALE_FACTOR, compat: str = "magi"
) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] (or one image [H, W, 3]) -> prefix latent [1, z, T', H/8, W/8].

    Posterior mean x scale_factor, tiled as the official ``encode_prefix_video`` (256 px tiles,
    fps // 2-frame temporal tiles); a single image is encoded as one repeated frame (T' = 1).
    The result is in the VAE's dtype (bf16 in the pipeline) on its device.

    Args:
        vae: loaded VAE.
        frames: RGB uint8, H and W multiples of 8; T = 1 or T >= 4.
        fps: runtime fps (sets the temporal tile length).
        scale_factor: runtime_config.scale_factor.
        compat: "magi" or "official" (temporal tile length at fps where fps // 2 % 4 != 0).
    """
    if frames.dtype != torch.uint8 or frames.ndim not in (3, 4) or frames.shape[-1] != 3:
        raise ValueError(
            f"encode_prefix expects uint8 frames [T, H, W, 3] or [H, W, 3], got {frames.dtype} {tuple(frames.shape)}"
        )
    if frames.ndim == 3:
        frames = frames[None]
    x = rearrange(frames.to(vae.device), "t h w c -> 1 c t h w")
    x = (x.float() / 127.5 - 1).to(vae.dtype)
    return tiled_encode(vae, x, tile_spec_for_fps(fps, compat)) * scale_factor


def decode_to_uint8(
    vae: ViTVAE, latent: torch.Tensor, *, fps: int = 24, scale_factor: float = SCALE_FACTOR, compat: str = "magi"
) -> torch.Tensor:
    """Scaled latent [1, z, T', H', W'] -> uint8 frames [F, 3, 8H', 8W'] on the CPU.

    Divides by scale_factor, tiled decode under the (emulated) bf16 autocast. A trailing lone
    latent frame of a temporal tile gives one frame (official: 3q+1 latents -> 12q+1 frames).

    Args:
        vae: loaded VAE.
        latent: the DiT-space latent (float32 or bf16).
        fps: runtime fps (sets the temporal tile length).
        scale_factor: runtime_config.scale_factor.
        compat: "official" converts in bf16 (v * 127.5 + 127.5, clamp, truncate) as the
            official code; "magi" rounds to the nearest level in float32.
    """
    check_compat(compat)
    if latent.ndim != 5 or latent.shape[0] != 1:
        raise ValueError(f"decode_to_uint8 expects a latent [1, C, T, H, W], got {tuple(latent.shape)}")
    z = latent.to(vae.device).float() / scale_factor
    video = tiled_decode(vae, z, tile_spec_for_fps(fps, compat), autocast=True)
    if compat == "official":
        frames = (video * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)
    else:
        frames = ((video.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return rearrange(frames, "b c t h w -> (b t) c h w").cpu()
