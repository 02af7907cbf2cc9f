"""Ulysses context parallelism (shared/spec/parallel.md §2): sequence split + head all-to-alls.

Legend: B batch, S full sequence (tokens per batch item), s this rank's tokens, W group size,
F features per (token, destination rank). Sequence splits follow the official rule
(shared/spec/parallel.md §2.1): rank r gets floor(S/W) tokens plus one if r < S mod W, contiguous,
no padding. All functions are no-ops for a group of one (``group=None`` and W = 1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from einops import rearrange
from torch import nn

from magi.models.dit import DiTContext


def split_sizes(length: int, parts: int) -> list[int]:
    """Contiguous split of ``length`` items over ``parts`` ranks; the first ``length % parts`` get one more."""
    base, extra = divmod(length, parts)
    return [base + (1 if r < extra else 0) for r in range(parts)]


def split_bounds(length: int, parts: int, rank: int) -> tuple[int, int]:
    """[start, end) of ``rank``'s piece in ``split_sizes(length, parts)``."""
    sizes = split_sizes(length, parts)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def _group_size(group: Any) -> int:
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
    world = _group_size(group)
    if world == 1:
        return x[:, :, 0]
    batch, _, _, features = x.shape
    send = rearrange(x, "b s w f -> (w b s) f").contiguous()
    recv = send.new_empty(batch * sum(seq_sizes), features)
    dist.all_to_all_single(recv, send, [batch * n for n in seq_sizes], [send.shape[0] // world] * world, group=group)
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
    world = _group_size(group)
    if world == 1:
        return x.unsqueeze(2)
    batch, _, features = x.shape
    send = torch.cat([p.reshape(-1, features) for p in x.split(seq_sizes, dim=1)])
    local = seq_sizes[rank]
    recv = send.new_empty(world * batch * local, features)
    dist.all_to_all_single(recv, send, [batch * local] * world, [batch * n for n in seq_sizes], group=group)
    return rearrange(recv, "(w b s) f -> b s w f", w=world, b=batch)


def gather_sequence(x: torch.Tensor, group: Any, seq_sizes: list[int], dim: int = 1) -> torch.Tensor:
    """All-gather uneven contiguous pieces along ``dim``; every rank gets the full tensor."""
    world = _group_size(group)
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


# ---------------------------------------------------------------------------------------------
# Ulysses applied to the DiT seams (magi/models/dit.py): embed -> shard, core attention wrapped
# in all-to-alls, head <- gather. Legend additionally: N query heads, G K/V heads, D head dim,
# n / g the heads one rank holds after the exchange.


# How shard_call treats every DiTContext field: cut to the local tokens, or kept whole.
_PER_TOKEN = {"rope_cos", "rope_sin", "condition_map", "xattn_q_ranges", "xattn_k_ranges"}
_WHOLE = {
    "condition",
    "y_xattn",
    "caption_counts",
    "self_q_ranges",
    "self_k_ranges",
    "chunk_tokens",
    "batch",
    "slice_point",
    "kv_cache",
    "cache_write_chunks",
}


@dataclass
class ShardedContext(DiTContext):
    """A ``DiTContext`` whose token fields hold only this rank's contiguous sequence piece."""

    seq_sizes: list[int] = dataclasses.field(default_factory=list)  # tokens per CP rank, per item
    cp_rank: int = 0


def shard_call(
    hidden: torch.Tensor, ctx: DiTContext, cp_size: int, cp_rank: int
) -> tuple[torch.Tensor, ShardedContext]:
    """Keep this rank's tokens of the embedded call (parallel.md §2.1).

    Args:
        hidden: [S, B, D] the full call after ``DiT.embed``.
        ctx: its context; RoPE rows, condition_map and cross-attention query ranges are cut to
            the local tokens, self-attention ranges stay global (attention sees all tokens).

    Returns:
        hidden [s, B, D] and the matching ``ShardedContext``.
    """
    seq = hidden.shape[0]
    sizes = split_sizes(seq, cp_size)
    start, end = split_bounds(seq, cp_size, cp_rank)
    q_ranges, k_ranges = _local_query_ranges(ctx.xattn_q_ranges, ctx.xattn_k_ranges, seq, start, end)
    fields = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(DiTContext)}
    unknown = sorted(set(fields) - _PER_TOKEN - _WHOLE)
    if unknown:  # a new field might be per token: slicing it wrongly would be a silent error
        raise RuntimeError(
            f"DiTContext has field(s) {unknown} that magi.distributed.context_parallel does not "
            "know; add them to _PER_TOKEN or _WHOLE there"
        )
    fields.update(
        rope_cos=ctx.rope_cos[start:end],
        rope_sin=ctx.rope_sin[start:end],
        condition_map=ctx.condition_map[start:end],
        xattn_q_ranges=q_ranges,
        xattn_k_ranges=k_ranges,
    )
    return hidden[start:end], ShardedContext(**fields, seq_sizes=sizes, cp_rank=cp_rank)


def _local_query_ranges(
    q_ranges: Any, k_ranges: Any, seq: int, start: int, end: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-express "(b s)" query ranges over the local "(b s_local)" tokens; drop empty segments.

    Each local token keeps attending to the key range of the segment (chunk) it belongs to.
    """
    q_ranges = torch.as_tensor(q_ranges, dtype=torch.int64).reshape(-1, 2)  # pairs from DiT.embed
    k_ranges = torch.as_tensor(k_ranges, dtype=torch.int64).reshape(-1, 2)
    local = end - start
    batch = q_ranges[:, 0] // seq
    lo = (q_ranges[:, 0] - batch * seq).clamp(start, end) - start
    hi = (q_ranges[:, 1] - batch * seq).clamp(start, end) - start
    keep = hi > lo
    offset = batch * local
    local_q = torch.stack([lo + offset, hi + offset], dim=1)[keep]
    return local_q, k_ranges[keep]


def gather_call(hidden: torch.Tensor, ctx: ShardedContext, group: Any) -> torch.Tensor:
    """All-gather the layers' output along the sequence: [s, B, D] -> [S, B, D] (parallel.md §2.6)."""
    return gather_sequence(hidden, group, ctx.seq_sizes, dim=0)


class UlyssesAttention(nn.Module):
    """All-to-all around the parameter-free self-attention core (parallel.md §2.2-2.4).

    Receives q [(B s), N, D], k/v [(B s), G, D] for all heads of the local tokens; the core sees
    q [(B S), n, D], k/v [(B S), g, D] for this rank's heads over the whole sequence, so its KV
    cache reads and writes hold only the local K/V heads. When W > G every K/V head is repeated
    W / G times first, so each rank gets one. q, k and v travel in one all-to-all.
    """

    def __init__(self, core: nn.Module, group: Any, cp_size: int, cp_rank: int) -> None:
        super().__init__()
        self.core = core
        self.group, self.cp_size, self.cp_rank = group, cp_size, cp_rank

    # Eager even inside a compiled layer (magi.compile): collectives and the host-side ranges.
    @torch.compiler.disable
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ShardedContext) -> torch.Tensor:
        w, batch = self.cp_size, ctx.batch
        if k.shape[1] < w:
            k, v = (x.repeat_interleave(w // x.shape[1], dim=1) for x in (k, v))
        n, g, dim = q.shape[1] // w, k.shape[1] // w, q.shape[2]
        # [(B s), (W heads), D] -> [B, s, W, heads*D] per tensor, packed along the last dim.
        packed = torch.cat([rearrange(x, "(b s) (w h) d -> b s w (h d)", b=batch, w=w) for x in (q, k, v)], dim=-1)
        full = heads_to_sequence(packed, self.group, ctx.seq_sizes)  # [B, S, (n + 2g) * D]
        qf, kf, vf = (
            rearrange(x, "b s (h d) -> (b s) h d", d=dim).contiguous()  # kernels want dense q/k/v
            for x in full.split([n * dim, g * dim, g * dim], dim=-1)
        )
        out = self.core(qf, kf, vf, ctx)  # [(B S), n, D]
        out = rearrange(out, "(b s) h d -> b s (h d)", b=batch)
        local = sequence_to_heads(out, self.group, ctx.seq_sizes, self.cp_rank)  # [B, s, W, n*D]
        return rearrange(local, "b s w (h d) -> (b s) (w h) d", d=dim)


def check_context_parallel(num_heads: int, num_groups: int, cp_size: int) -> None:
    """Ulysses head constraints (parallel.md §2): N % W == 0 and (G % W == 0 or W % G == 0)."""
    if num_heads % cp_size:
        raise ValueError(f"cp_size {cp_size} must divide num_attention_heads {num_heads} (Ulysses splits heads)")
    if num_groups % cp_size and cp_size % num_groups:
        raise ValueError(
            f"cp_size {cp_size} and num_query_groups {num_groups}: one must divide the other "
            "(K/V heads are split, or repeated when cp_size > num_query_groups)"
        )
