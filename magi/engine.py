"""The loaded models of a pipeline and what the run does with them: the DiT (whole, streamed from
host memory, or parallel under torchrun), the VAE (optionally host-resident), where they run, and
the start-up checks made before minutes of loading.

Legend: C latent channels, T latent frames, H W latent size, F video frames.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from magi import checkpoint
from magi.budget import SPILL_BYTES, visible_prefix_frames
from magi.conditioning import check_special_tokens_file
from magi.config import MagiConfig
from magi.media import latents, read
from magi.models.text_encoder import check_t5_folder
from magi.models.vae import ViTVAE, load_vae
from magi.prompts import check_special_tokens


def resolve_device(device: torch.device | str | None, label: str = "device") -> torch.device:
    """The device a pipeline runs on, checked to exist on this machine.

    Args:
        device: "cuda", "cuda:N", "cpu" or a ``torch.device``; None picks CUDA when available.
        label: how the caller names the setting in the error ("device", "--device").

    Raises:
        ValueError: one line naming the device and what to use instead.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{label} {device} is not a device; use cuda, cuda:N or cpu") from None
    if found.type not in ("cuda", "cpu"):
        raise ValueError(f"{label} {device}: magi runs on cuda, cuda:N or cpu")
    if found.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{label} {device}: CUDA is not available on this machine; use cpu")
    if found.type == "cuda" and found.index is not None and found.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"{label} {device}: this machine has {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})")
    return found


def check_files(cfg: MagiConfig) -> None:
    """Start-up check of every file a run reads, before minutes of loading (headers only).

    Special tokens (when switched on), the DiT checkpoint (index, keys, shapes, dtypes) and the
    T5 folder; each fault is one ``ValueError`` / ``FileNotFoundError`` line naming the file.
    """
    tokens = check_special_tokens(cfg)
    if tokens is not None:
        check_special_tokens_file(tokens)
    checkpoint.check_dit_checkpoint(cfg)
    if cfg.runtime.t5_pretrained:
        check_t5_folder(cfg.runtime.t5_pretrained)


def check_memory(cfg: MagiConfig, device: torch.device, offload_blocks: bool = False) -> None:
    """On a CUDA device, refuse before loading a run whose DiT cannot fit the GPU's memory, in one
    line naming the settings that would (``magi.plan.check_fits``: the model run on fake tensors).
    Streamed layers (``offload_blocks``) are not modelled there, so they skip the check."""
    if device.type != "cuda" or offload_blocks:
        return
    from magi.plan import check_fits

    check_fits(cfg, torch.cuda.get_device_properties(device).total_memory)


def is_distributed(cfg: MagiConfig) -> bool:
    return cfg.engine.pp_size * cfg.engine.cp_size > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1


def check_options(
    cfg: MagiConfig, device: torch.device, attention_backend: str, offload_blocks: bool, compile: bool | dict
) -> None:
    """Fail on a bad option before any model loads; set the attention backend."""
    from magi import attention

    attention.check_backend(attention_backend, device, cfg.model.dtype)
    if offload_blocks and is_distributed(cfg):
        raise ValueError(
            "offload_blocks works in a single process only; drop it for pp_size * "
            "cp_size > 1 (each rank already holds only its share of the layers)"
        )
    if not isinstance(compile, (bool, dict)):
        raise ValueError(f"compile must be True, False or a dict of torch.compile keywords, got {compile!r}")
    attention.set_backend(attention_backend)


def build_dit(
    cfg: MagiConfig, device: torch.device, offload_blocks: bool
) -> tuple[nn.Module, object | None, torch.device]:
    """(DiT, mesh or None, compute device): parallel under torchrun, else whole or streamed."""
    if is_distributed(cfg):
        from magi.distributed import init_from_env
        from magi.distributed.parallelize import build_parallel_dit

        mesh = init_from_env(cfg.engine, device)  # "cuda" -> this rank's GPU; "cpu" stays cpu
        return build_parallel_dit(cfg, mesh), mesh, mesh.device
    if offload_blocks:
        from magi.offload import offload_blocks as stream_blocks

        dit = checkpoint.load_dit(cfg, torch.device("cpu"))  # the layer stack never sits on the device
        stream_blocks(dit, device)
        return dit, None, device
    return checkpoint.load_dit(cfg, device), None, device


@dataclass
class Engine:
    """The loaded models and where they run (see ``MagiPipeline`` for the arguments)."""

    config: MagiConfig
    dit: nn.Module
    vae: ViTVAE
    device: torch.device
    compat: str = "magi"
    mesh: object | None = None
    vae_host: object | None = None  # magi.offload.HostResident when the VAE stays in host memory
    noise_spill_bytes: int = SPILL_BYTES

    @classmethod
    def load(
        cls,
        cfg: MagiConfig,
        device: torch.device,
        compat: str,
        *,
        attention_backend: str = "auto",
        offload_blocks: bool = False,
        compile: bool | dict = False,
        vae_offload: bool | None = None,
        noise_spill_bytes: int = SPILL_BYTES,
        memory_check: bool = True,
    ) -> Engine:
        """Check the options, files and (CUDA) memory, then load the DiT and the VAE (see
        ``MagiPipeline.from_config``)."""
        check_options(cfg, device, attention_backend, offload_blocks, compile)
        check_files(cfg)
        if memory_check:
            check_memory(cfg, device, offload_blocks)
        dit, mesh, device = build_dit(cfg, device, offload_blocks)
        if compile:
            from magi.compile import compile_blocks

            compile_blocks(dit, **(compile if isinstance(compile, dict) else {}))
        keep_vae_on_host = offload_blocks if vae_offload is None else vae_offload
        vae = load_vae(
            cfg.runtime.vae_pretrained, torch.device("cpu") if keep_vae_on_host else device, dtype=torch.bfloat16
        )
        return cls.assemble(cfg, dit, vae, device, compat, mesh, keep_vae_on_host, noise_spill_bytes)

    @classmethod
    def assemble(
        cls,
        cfg: MagiConfig,
        dit: nn.Module,
        vae: ViTVAE,
        device: torch.device | str,
        compat: str,
        mesh: object | None,
        vae_offload: bool,
        noise_spill_bytes: int,
    ) -> Engine:
        """An engine over models that are already loaded."""
        device = torch.device(device)
        host = None
        if vae_offload:
            from magi.offload import HostResident

            host = HostResident(vae, device)
        return cls(cfg, dit, vae, device, compat, mesh, host, noise_spill_bytes)

    @property
    def is_writer(self) -> bool:
        """Whether this process writes the outputs (rank 0 of a multi-GPU run, or the only one)."""
        if self.mesh is None:
            return True
        from magi.distributed import is_writer_rank

        return is_writer_rank()

    @property
    def latent_channels(self) -> int:
        m = self.config.model
        return m.in_channels // 2 if m.half_channel_vae else m.in_channels

    @property
    def null_caption(self) -> torch.Tensor:
        """The DiT's null caption table [Lcap, Ccap] (the unconditional rows)."""
        return self.dit.y_embedder.null_caption_embedding.detach()

    def vae_on_device(self) -> AbstractContextManager:
        """Context in which the VAE has its weights on the device (see ``vae_offload``)."""
        return nullcontext() if self.vae_host is None else self.vae_host.on_device()

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Clean latents [1, C, T, H, W] -> uint8 frames [F, 3, 8H, 8W]."""
        rt = self.config.runtime
        kwargs = dict(fps=rt.fps, scale_factor=rt.scale_factor, compat=self.compat)
        if self.mesh is not None:
            from magi.distributed.vae_parallel import decode_to_uint8
        else:
            decode_to_uint8 = latents.decode_to_uint8
        with self.vae_on_device():
            return decode_to_uint8(self.vae, latent, **kwargs)

    def encode_prefix(
        self, mode: str, image_path: str | Path | None, prefix_video_path: str | Path | None
    ) -> torch.Tensor | None:
        """i2v: the encoded image [1, C, 1, H, W]; v2v: the encoded prefix clip; t2v: None."""
        rt = self.config.runtime
        size = (rt.video_size_w, rt.video_size_h)
        if mode == "i2v":
            frames = read.load_image(image_path, size, compat=self.compat)
        elif mode == "v2v":
            visible = visible_prefix_frames(
                rt.noise2clean_kvrange or (8,), rt.chunk_width, rt.temporal_downsample_factor
            )
            frames = read.load_prefix_video(prefix_video_path, rt.fps, size, visible, compat=self.compat)
        else:
            return None
        with self.vae_on_device():
            return latents.encode_prefix(
                self.vae, frames, fps=rt.fps, scale_factor=rt.scale_factor, compat=self.compat
            ).to(self.device)
