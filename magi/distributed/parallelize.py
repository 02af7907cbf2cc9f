"""The single place that applies context and pipeline parallelism to a built DiT.

``parallelize(model, mesh, engine_config)`` changes the model in place through the seams that
magi/models/dit.py exposes, never by re-implementing its forward:

* CP (Ulysses, parallel.md §2): ``model.embed`` is followed by ``shard_call`` (this rank's
  contiguous tokens), every ``self_attention.core_attention`` is wrapped in ``UlyssesAttention``
  (all-to-all heads <-> sequence), and ``model.head`` is preceded by the sequence all-gather.
* PP (parallel.md §4): the model holds only this stage's layers (``build_parallel_dit`` loads
  just those); a pre-hook on the first layer swaps the stage's own embedding for the previous
  stage's hidden states, a hook on the last layer sends them on, and ``model.head`` runs on the
  last stage only, whose velocity is broadcast to every stage.

After ``parallelize`` every rank calls ``model(...)`` exactly as on one device and gets the full
velocity, so the sampler loop runs unchanged (and redundantly) on every rank.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from magi.config import EngineConfig, MagiConfig
from magi.distributed.context_parallel import (
    UlyssesAttention,
    check_context_parallel,
    gather_call,
    shard_call,
)
from magi.distributed.mesh import Mesh, check_same_config, fail_fast
from magi.distributed.pipeline_parallel import (
    broadcast_from_last_stage,
    recv_from_previous_stage,
    send_to_next_stage,
    stage_layers,
)
from magi.models.dit import DiT, DiTContext

logger = logging.getLogger(__name__)

_MARK = "_magi_parallelized"


def parallelize(model: DiT, mesh: Mesh, engine_config: EngineConfig) -> DiT:
    """Apply Ulysses CP and pipeline stages to ``model`` (in place; also returned).

    Args:
        model: a built DiT holding this pipeline stage's layers (all layers when pp_size is 1).
        mesh: from ``init_from_env``; its pp_size / cp_size must match ``engine_config``.
        engine_config: cp_size, pp_size, cp_strategy ("cp_shuffle_overlap" runs the Ulysses
            exchange: the same math with a different token layout, parallel.md §3).
    """
    if getattr(model, _MARK, False):
        raise ValueError("parallelize() was already applied to this model; call it once")
    if (engine_config.cp_size, engine_config.pp_size) != (mesh.cp_size, mesh.pp_size):
        raise ValueError(
            f"engine_config cp_size {engine_config.cp_size} / pp_size {engine_config.pp_size} "
            f"do not match the mesh ({mesh.cp_size} / {mesh.pp_size}); build the mesh from this config"
        )
    if engine_config.cp_strategy == "cp_shuffle_overlap" and mesh.cp_size > 1:
        logger.warning("[magi] cp_strategy cp_shuffle_overlap runs as Ulysses (identical math, parallel.md §3)")
    if mesh.cp_size > 1:
        apply_context_parallel(model, mesh)
    if mesh.pp_size > 1:
        apply_pipeline_parallel(model, mesh)
    setattr(model, _MARK, True)
    return model


def apply_context_parallel(model: DiT, mesh: Mesh) -> None:
    """Ulysses over ``mesh.cp_group``: shard after embed, all-to-all around attention, gather at the head."""
    cfg = model.config
    check_context_parallel(cfg.num_attention_heads, cfg.num_query_groups, mesh.cp_size)
    for layer in model.videodit_blocks.layers:
        attn = layer.self_attention
        core = attn.core_attention
        attn.core_attention = UlyssesAttention(core, mesh.cp_group, mesh.cp_size, mesh.cp_rank)
    embed, head = model.embed, model.head

    def sharded_embed(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, DiTContext]:
        hidden, ctx = embed(*args, **kwargs)
        return shard_call(hidden, ctx, mesh.cp_size, mesh.cp_rank)

    def gathered_head(hidden: torch.Tensor, ctx: Any, x_shape: torch.Size) -> torch.Tensor:
        return head(gather_call(hidden, ctx, mesh.cp_group), ctx, x_shape)

    _override(model, "embed", sharded_embed)
    _override(model, "head", gathered_head)


def apply_pipeline_parallel(model: DiT, mesh: Mesh) -> None:
    """Chain the stages over ``mesh.pp_group``; the last stage's velocity reaches every stage."""
    layers = model.videodit_blocks.layers
    owned = stage_layers(model.config.num_layers, mesh.pp_size, mesh.pp_rank)
    held = [layer.layer_number for layer in layers]
    if held != list(owned):
        raise ValueError(
            f"pipeline stage {mesh.pp_rank} owns layers {owned.start}..{owned.stop - 1} but the model "
            f"holds {held[:1] + held[-1:] if held else 'none'}; build it with build_parallel_dit(cfg, mesh)"
        )
    if not mesh.is_first_stage:
        layers[0].register_forward_pre_hook(_receive_hook(mesh))
    if not mesh.is_last_stage:
        layers[-1].register_forward_hook(_send_hook(mesh))
    head, cfg = model.head, model.config
    channels = cfg.out_channels // 2 if cfg.half_channel_vae else cfg.out_channels

    def staged_head(hidden: torch.Tensor, ctx: Any, x_shape: torch.Size) -> torch.Tensor:
        if mesh.is_last_stage:
            velocity = head(hidden, ctx, x_shape)
        else:  # no final norm here: receive the last stage's result instead
            b, _, t, h, w = x_shape
            velocity = torch.empty(b, channels, t, h, w, dtype=torch.float32, device=hidden.device)
        return broadcast_from_last_stage(velocity, mesh)

    _override(model, "head", staged_head)


def _receive_hook(mesh: Mesh) -> Callable[..., tuple]:
    def hook(module: nn.Module, args: tuple) -> tuple:
        hidden, *rest = args  # this stage's own embedding only gives the shape
        return (recv_from_previous_stage(hidden, mesh), *rest)

    return hook


def _send_hook(mesh: Mesh) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        send_to_next_stage(output, mesh)

    return hook


def _override(model: nn.Module, name: str, fn: Callable[..., Any]) -> None:
    # An instance attribute shadows the class method: DiT.forward calls self.embed / self.head.
    object.__setattr__(model, name, fn)


def build_parallel_dit(config: MagiConfig, mesh: Mesh) -> DiT:
    """Check every rank has the same config, load this stage's layers only, parallelize.

    A loading error on one rank (e.g. a shard missing on one node) stops every rank at once.

    Args:
        config: the run's config (runtime.load names the checkpoint).
        mesh: from ``init_from_env(config.engine)``.
    """
    from magi.checkpoint import load_dit

    with fail_fast():
        check_same_config(config, mesh)
        layers = stage_layers(config.model.num_layers, mesh.pp_size, mesh.pp_rank)
        model = load_dit(config, mesh.device, layers=None if mesh.pp_size == 1 else list(layers))
        return parallelize(model, mesh, config.engine)
