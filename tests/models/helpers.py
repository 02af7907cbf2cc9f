"""Plain helpers of the model and checkpoint tests: the official model sizes, the tiny reference
configs, and small random DiT checkpoints written in the official sharded layout."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from magi.config import EngineConfig, MagiConfig, ModelConfig, RuntimeConfig, load_config
from magi.fp8 import swap_fp8_linears
from magi.models.dit import DiT

OFFICIAL_4P5B = ModelConfig(
    num_layers=34,
    hidden_size=3072,
    ffn_hidden_size=12288,
    num_attention_heads=24,
    num_query_groups=8,
    kv_channels=128,
    x_rescale_factor=1.0,
    half_channel_vae=False,
    in_channels=16,
    out_channels=16,
    gated_linear_unit=False,
    caption_channels=4096,
)
OFFICIAL_24B = ModelConfig(
    num_layers=48,
    hidden_size=6144,
    ffn_hidden_size=16384,
    num_attention_heads=48,
    num_query_groups=8,
    kv_channels=128,
    x_rescale_factor=0.1,
    half_channel_vae=True,
    in_channels=32,
    out_channels=32,
    gated_linear_unit=True,
    caption_channels=4096,
)


def reference_config(reference_dir: Path, name: str) -> MagiConfig:
    """A tiny reference config with its checkpoint path made absolute."""
    cfg = load_config(reference_dir / "configs" / f"{name}.json")
    load = Path(cfg.runtime.load)
    return cfg.replace(
        runtime=dataclasses.replace(cfg.runtime, load=str(load if load.is_absolute() else reference_dir / load))
    )


SMALL = ModelConfig(
    num_layers=3,
    hidden_size=32,
    ffn_hidden_size=64,
    num_attention_heads=2,
    num_query_groups=1,
    kv_channels=16,
    caption_channels=16,
    caption_max_length=4,
)


def small_cfg(root: Path, model: ModelConfig = SMALL, fp8: bool = False, distill: bool = False) -> MagiConfig:
    return MagiConfig(
        model=model,
        runtime=RuntimeConfig(load=str(root)),
        engine=EngineConfig(fp8_quant=fp8, distill=distill),
    )


def random_state(model: ModelConfig = SMALL, fp8: bool = False) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    dit = DiT(model)
    if fp8:
        swap_fp8_linears(dit, model.num_layers, quantize_weights=True)
    return {k: v.contiguous() for k, v in dit.state_dict().items()}


def write_sharded(folder: Path, state: dict[str, torch.Tensor], shards: int = 2) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def assert_loaded_equals(model: DiT, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key].float(), value.float()), key


def small_config(**overrides: object) -> ModelConfig:
    base = dict(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=16,
        caption_channels=32,
        caption_max_length=8,
        params_dtype="torch.float32",
    )
    return ModelConfig(**{**base, **overrides})


def dit_inputs(b: int = 1, r: int = 2, caption: int = 32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 16, 2 * r, 4, 4, generator=g)
    t = torch.rand(b, r, generator=g)
    y = torch.randn(b * r, 8, caption, generator=g)
    mask = torch.zeros(b * r, 8)
    mask[:, :3] = 1
    return x, t, y, mask
