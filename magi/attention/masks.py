"""Attention ranges as data: pure builders of (q_ranges, k_ranges) int tensors.

A range table has one row per query segment: segment i is the query tokens [q0, q1) and attends
(fully, no causal mask inside) to the keys [k0, k1). MAGI-1 uses two kinds (shared/spec/dit.md §7):

* self-attention, block-causal over chunks: query segment i is chunk i of the call (batch-major),
  its key range is ``kv_range[i]`` in coordinates over [cached rows of chunks < slice_point ;
  this call's tokens]. ``block_causal_kv_range`` builds such kv ranges from per-chunk visibility.
* cross-attention: query segment i (a chunk) attends only to its own caption tokens, which are
  packed segment after segment.

Range tables come in two forms that every backend accepts: an int tensor [S, 2], or Python int
pairs (``Pairs``). The pair form is what the DiT uses: its ranges are known on the host before a
forward (the chunk plan), so the forward never reads a tensor back to Python (no device sync, no
``torch.compile`` graph break). ``range_pairs`` turns either form into pairs.

Legend: S segments (chunks x batch), c tokens per chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Pairs = tuple[tuple[int, int], ...]  # one (start, end) per segment, Python ints
Ranges = torch.Tensor | Sequence[Sequence[int]]  # [S, 2] int tensor or int pairs


def range_pairs(ranges: Ranges) -> Pairs:
    """Ranges as Python int pairs. A tensor is read back to the host here (a device sync, and a
    graph break under ``torch.compile``), so compiled code should be handed pairs."""
    if isinstance(ranges, torch.Tensor):
        if ranges.dim() != 2 or ranges.shape[-1] != 2:
            raise ValueError(f"ranges must be [S, 2], got shape {tuple(ranges.shape)}")
        ranges = ranges.tolist()
    if any(len(r) != 2 for r in ranges):
        raise ValueError(f"ranges must be (start, end) pairs, got {list(ranges)}")
    return tuple((int(r[0]), int(r[1])) for r in ranges)


def chunk_query_pairs(num_segments: int, chunk_tokens: int) -> Pairs:
    """``chunk_query_ranges`` as Python pairs: row i = (i*c, (i+1)*c)."""
    return tuple((i * chunk_tokens, (i + 1) * chunk_tokens) for i in range(num_segments))


def cross_attention_pairs(caption_counts: Sequence[int], chunk_tokens: int) -> tuple[Pairs, Pairs]:
    """``cross_attention_ranges`` as Python pairs, from host-side caption counts."""
    k_pairs, end = [], 0
    for count in caption_counts:
        k_pairs.append((end, end + int(count)))
        end += int(count)
    return chunk_query_pairs(len(k_pairs), chunk_tokens), tuple(k_pairs)


def chunk_query_ranges(num_segments: int, chunk_tokens: int) -> torch.Tensor:
    """Query ranges of consecutive equal chunks: row i = [i*c, (i+1)*c). Returns [S, 2] int64."""
    starts = torch.arange(num_segments, dtype=torch.int64) * chunk_tokens
    return torch.stack([starts, starts + chunk_tokens], dim=1)


def self_attention_ranges(kv_range: torch.Tensor, chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_ranges, k_ranges) for block-causal self-attention from the official kv_range [S, 2]."""
    kv_range = torch.as_tensor(kv_range, dtype=torch.int64).reshape(-1, 2)
    return chunk_query_ranges(kv_range.shape[0], chunk_tokens), kv_range.clone()


def block_causal_kv_range(slice_point: int, visible_chunks: Sequence[int], chunk_tokens: int) -> torch.Tensor:
    """kv_range of a call whose chunk j is absolute chunk slice_point + j (dit.md §7).

    Args:
        slice_point: absolute index of the call's first chunk.
        visible_chunks: K_j per chunk, the number of chunks chunk j sees including itself.
        chunk_tokens: tokens per chunk.

    Returns:
        [R, 2] int64, row j = [max(0, e - K_j) * c, e * c) with e = slice_point + j + 1.
    """
    rows = []
    for j, visible in enumerate(visible_chunks):
        if visible < 1:
            raise ValueError(f"chunk {j} must see at least itself, got {visible} visible chunks")
        end = slice_point + j + 1
        rows.append([max(0, end - visible) * chunk_tokens, end * chunk_tokens])
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)


def isolated_kv_range(num_segments: int, chunk_tokens: int) -> torch.Tensor:
    """kv_range where every segment sees only itself (passes without history): [S, 2]."""
    return chunk_query_ranges(num_segments, chunk_tokens)


def cross_attention_ranges(caption_counts: torch.Tensor, chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_ranges, k_ranges) for cross-attention: chunk i to its own packed caption tokens.

    Args:
        caption_counts: [S] number of valid caption tokens of each segment, in segment order.
        chunk_tokens: video tokens per segment.
    """
    counts = torch.as_tensor(caption_counts, dtype=torch.int64).reshape(-1)
    ends = torch.cumsum(counts, dim=0)
    k_ranges = torch.stack([ends - counts, ends], dim=1)
    return chunk_query_ranges(counts.numel(), chunk_tokens), k_ranges
