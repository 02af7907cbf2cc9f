"""MAGI-1 configuration: frozen dataclasses read from the official JSON format.

The official config file is one JSON object with exactly three sections, ``model_config``,
``runtime_config`` and ``engine_config`` (shared/spec/config_and_cli.md). Field names here are the
official ones, so an official file loads unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class ModelConfig:
    model_name: str = "videodit_ardf"
    num_layers: int = 34
    hidden_size: int = 3072
    ffn_hidden_size: int = 12288
    num_attention_heads: int = 24
    num_query_groups: int = 8
    kv_channels: int = 128
    layernorm_epsilon: float = 1e-6
    apply_layernorm_1p: bool = True
    x_rescale_factor: float = 1.0
    half_channel_vae: bool = False
    params_dtype: str = "torch.bfloat16"
    patch_size: int = 2
    t_patch_size: int = 1
    in_channels: int = 16
    out_channels: int = 16
    cond_hidden_ratio: float = 0.25
    caption_channels: int = 4096
    caption_max_length: int = 800
    xattn_cond_hidden_ratio: float = 1.0
    cond_gating_ratio: float = 1.0
    gated_linear_unit: bool = False

    @property
    def dtype(self) -> torch.dtype:
        """params_dtype as a torch dtype ("torch.bfloat16" -> torch.bfloat16)."""
        return getattr(torch, self.params_dtype.removeprefix("torch."))


@dataclass(frozen=True)
class RuntimeConfig:
    cfg_number: int = 3
    cfg_t_range: tuple[float, ...] = (0.0, 0.0217, 0.1, 0.3, 0.999)
    prev_chunk_scales: tuple[float, ...] = (1.5, 1.5, 1.5, 1.0, 1.0)
    text_scales: tuple[float, ...] = (7.5, 7.5, 7.5, 0.0, 0.0)
    noise2clean_kvrange: tuple[int, ...] = (5, 4, 3, 2)
    clean_chunk_kvrange: int = 1
    clean_t: float = 0.9999
    seed: int = 1234
    num_frames: int = 96
    video_size_h: int = 720
    video_size_w: int = 720
    num_steps: int = 64
    window_size: int = 4
    fps: int = 24
    chunk_width: int = 6
    load: str | None = None
    t5_pretrained: str | None = None
    t5_device: str = "cpu"
    vae_pretrained: str | None = None
    scale_factor: float = 0.18215
    temporal_downsample_factor: int = 4


@dataclass(frozen=True)
class EngineConfig:
    distributed_backend: str = "nccl"
    distributed_timeout_minutes: int = 15
    pp_size: int = 1
    cp_size: int = 1
    cp_strategy: str = "none"
    ulysses_overlap_degree: int = 1
    fp8_quant: bool = False
    distill_nearly_clean_chunk_threshold: float = 0.3
    shortcut_mode: str = "8,16,16"
    distill: bool = False
    kv_offload: bool = False
    enable_cuda_graph: bool = False


@dataclass(frozen=True)
class MagiConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    source: str | None = None  # file the config was read from (for error messages)

    def replace(self, **sections: Any) -> "MagiConfig":
        """Copy with whole sections replaced, e.g. cfg.replace(runtime=new_runtime)."""
        return dataclasses.replace(self, **sections)


def _section(cls: type, data: dict[str, Any]) -> Any:
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**values)


def config_from_dict(data: dict[str, Any], source: str | None = None) -> MagiConfig:
    """Build a MagiConfig from the official three-section dict."""
    return MagiConfig(
        model=_section(ModelConfig, data["model_config"]),
        runtime=_section(RuntimeConfig, data["runtime_config"]),
        engine=_section(EngineConfig, data["engine_config"]),
        source=source,
    )


def load_config(path: str | Path) -> MagiConfig:
    """Read an official-format JSON config file."""
    path = Path(path)
    return config_from_dict(json.loads(path.read_text()), source=str(path))
