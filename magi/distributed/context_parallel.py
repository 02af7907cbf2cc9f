"""Ulysses context parallelism (shared/spec/parallel.md §2): sequence split + head all-to-alls.

Legend: B batch, S full sequence (tokens per batch item), s this rank's tokens, W group size,
F features per (token, destination rank). Sequence splits follow the official rule
(shared/spec/parallel.md §2.1): rank r gets floor(S/W) tokens plus one if r < S mod W, contiguous,
no padding. All functions are no-ops for a group of one (``group=None`` and W = 1).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from einops import rearrange


def split_sizes(length: int, parts: int) -> list[int]:
    """Contiguous split of ``length`` items over ``parts`` ranks; the first ``length % parts`` get one more."""
    base, extra = divmod(length, parts)
    return [base + (1 if r < extra else 0) for r in range(parts)]


def split_bounds(length: int, parts: int, rank: int) -> tuple[int, int]:
    """[start, end) of ``rank``'s piece in ``split_sizes(length, parts)``."""
    sizes = split_sizes(length, parts)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def group_size(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


def heads_to_sequence(x: torch.Tensor, group: Any, seq_sizes: list[int]) -> torch.Tensor:
    """All-to-all "all heads, local tokens" -> "local heads, all tokens".

    Args:
        x: [B, s, W, F] this rank's tokens; slot w holds the features destined to rank w
            (its head group).
        group: the CP process group (W ranks).
        seq_sizes: tokens held by each rank, ``split_sizes(S, W)``.

    Returns:
        [B, S, F]: this rank's head group for the whole sequence, tokens in global order.
    """
    world = group_size(group)
    if world == 1:
        return x[:, :, 0]
    batch, _, _, features = x.shape
    send = rearrange(x, "b s w f -> (w b s) f").contiguous()
    recv = send.new_empty(batch * sum(seq_sizes), features)
    dist.all_to_all_single(
        recv, send, [batch * n for n in seq_sizes], [send.shape[0] // world] * world, group=group
    )
    pieces = recv.split([batch * n for n in seq_sizes])  # piece r: [(B s_r), F] from rank r
    return torch.cat([p.view(batch, -1, features) for p in pieces], dim=1)


def sequence_to_heads(x: torch.Tensor, group: Any, seq_sizes: list[int], rank: int) -> torch.Tensor:
    """Inverse of ``heads_to_sequence``: "local heads, all tokens" -> "all heads, local tokens".

    Args:
        x: [B, S, F] this rank's head group for the whole sequence.
        group: the CP process group (W ranks).
        seq_sizes: tokens held by each rank.
        rank: this rank's index in the group (to size the receive buffer).

    Returns:
        [B, s, W, F]: this rank's tokens, slot w = head group of rank w.
    """
    world = group_size(group)
    if world == 1:
        return x.unsqueeze(2)
    batch, _, features = x.shape
    send = torch.cat([p.reshape(-1, features) for p in x.split(seq_sizes, dim=1)])
    local = seq_sizes[rank]
    recv = send.new_empty(world * batch * local, features)
    dist.all_to_all_single(
        recv, send, [batch * local] * world, [batch * n for n in seq_sizes], group=group
    )
    return rearrange(recv, "(w b s) f -> b s w f", w=world, b=batch)


def gather_sequence(x: torch.Tensor, group: Any, seq_sizes: list[int], dim: int = 1) -> torch.Tensor:
    """All-gather uneven contiguous pieces along ``dim``; every rank gets the full tensor."""
    world = group_size(group)
    if world == 1:
        return x
    longest = max(seq_sizes)
    moved = x.movedim(dim, 0)
    padded = moved.new_zeros(longest, *moved.shape[1:])
    padded[: moved.shape[0]] = moved
    buffers = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(buffers, padded.contiguous(), group=group)
    full = torch.cat([b[:n] for b, n in zip(buffers, seq_sizes)])
    return full.movedim(0, dim)
