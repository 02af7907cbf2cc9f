"""Pipeline parallelism (shared/spec/parallel.md §4): contiguous layer stages and their p2p traffic.

Stage r of ``pp`` owns a contiguous block of layers; hidden states travel stage to stage with
point-to-point sends inside the rank's PP group (ranks sharing a cp_rank). Unlike the official code,
the last stage's velocity is broadcast to *every* stage, so all ranks keep an identical working
latent (the official send to stage 0 only lets middle stages drift when pp > 2).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from magi.distributed.context_parallel import split_sizes
from magi.distributed.mesh import Mesh


def stage_layers(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """Global indices of the layers stage ``pp_rank`` owns (contiguous; earlier stages take the remainder).

    With ``num_layers % pp_size == 0`` this is the official split [r*L/pp, (r+1)*L/pp).
    """
    if pp_size > num_layers:
        raise ValueError(
            f"engine_config pp_size {pp_size} exceeds num_layers {num_layers}; every pipeline "
            "stage needs at least one layer"
        )
    sizes = split_sizes(num_layers, pp_size)
    start = sum(sizes[:pp_rank])
    return range(start, start + sizes[pp_rank])


def send_to_next_stage(hidden: torch.Tensor, mesh: Mesh) -> None:
    """Send this stage's output hidden states to the next stage of the PP group."""
    dist.send(hidden.contiguous(), dst=mesh.pp_ranks[mesh.pp_rank + 1], group=mesh.pp_group)


def recv_from_previous_stage(like: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """Receive the previous stage's hidden states (same shape and dtype as ``like``)."""
    buffer = torch.empty_like(like, memory_format=torch.contiguous_format)
    dist.recv(buffer, src=mesh.pp_ranks[mesh.pp_rank - 1], group=mesh.pp_group)
    return buffer


def broadcast_from_last_stage(value: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """Every stage gets the last stage's ``value`` (others pass a buffer of the same shape/dtype)."""
    if mesh.pp_size == 1:
        return value
    value = value.contiguous()
    dist.broadcast(value, src=mesh.pp_ranks[-1], group=mesh.pp_group)
    return value
