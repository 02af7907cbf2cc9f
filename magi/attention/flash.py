"""flash-attn backend: ``flash_attn_varlen_func`` over the query segments of a call.

flash-attn's varlen kernel takes packed sequences: query segment i is rows
[cu_q[i], cu_q[i+1]) of q and its keys are rows [cu_k[i], cu_k[i+1]) of k, so key segments must
be laid out back to back. Block-causal self-attention ranges overlap (chunk j and chunk j+1 both
see chunk j), so in general the keys of every segment are gathered into a packed copy first
(memory: the sum of the key-range lengths, e.g. 15 chunks' worth of K/V for a refresh call over
5 chunks seeing 1, 2, 3, 4, 5 chunks, instead of the 5 chunks of the call). Calls whose key ranges already follow each other
(cross-attention, passes without history) run on k/v as they are.

The package is optional: importing it happens on first use and fails with one line naming it.
Legend: L tokens, N query heads, G K/V heads, D head dim, S segments.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from magi.attention.masks import Ranges, range_pairs

_INSTALL_HINT = (
    "the 'flash' attention backend needs the flash-attn package (pip install flash-attn "
    "--no-build-isolation, CUDA only); use backend='flex' or 'sdpa' instead"
)


def is_available() -> bool:
    """True when flash-attn imports and a CUDA device is present."""
    try:
        _varlen_fn()
    except ImportError:
        return False
    return torch.cuda.is_available()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_ranges: Ranges,
    k_ranges: Ranges,
) -> torch.Tensor:
    """Range-masked attention with flash-attn varlen (same contract as ``magi.attention.attention``).

    Args:
        q: [Lq, N, D] queries, fp16 or bf16 on a CUDA device.
        k: [Lk, G, D] keys, N % G == 0 (flash-attn maps query head h to K/V head h // (N // G)).
        v: [Lk, G, D] values.
        q_ranges: [S, 2] int, disjoint query segments covering [0, Lq).
        k_ranges: [S, 2] int, the key range each query segment attends to (no mask inside).

    Returns:
        [Lq, N, D] attention output in q's dtype, softmax scale 1/sqrt(D).
    """
    varlen = _varlen_fn()
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"the 'flash' backend runs fp16/bf16 on CUDA, got {q.dtype} on {q.device.type}; "
            "use backend='sdpa' or 'flex' for this input"
        )
    return run_varlen(varlen, q, k, v, q_ranges, k_ranges)


def run_varlen(
    varlen: Callable[..., torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_ranges: Ranges,
    k_ranges: Ranges,
) -> torch.Tensor:
    """Pack the call for a flash-attn-style varlen kernel and run it (kernel passed in for tests)."""
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"flash attention: {q.shape[1]} query heads not a multiple of {k.shape[1]}")
    segments = _sorted_segments(q_ranges, k_ranges, q.shape[0])
    k_packed, v_packed, k_lens = _packed_keys(k, v, segments)
    q_lens = [q1 - q0 for q0, q1, _, _ in segments]
    out = varlen(
        q,
        k_packed,
        v_packed,
        _cumulative(q_lens, q.device),
        _cumulative(k_lens, q.device),
        max(q_lens),
        max(k_lens),
        dropout_p=0.0,
        softmax_scale=q.shape[-1] ** -0.5,
        causal=False,
    )
    return out.to(q.dtype)


def _varlen_fn() -> Callable[..., torch.Tensor]:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    return flash_attn_varlen_func


def _sorted_segments(q_ranges: Ranges, k_ranges: Ranges, lq: int) -> list[tuple[int, int, int, int]]:
    """(q0, q1, k0, k1) sorted by q0; ValueError unless the query segments tile [0, lq)."""
    rows = sorted(
        (q0, q1, k0, k1) for (q0, q1), (k0, k1) in zip(range_pairs(q_ranges), range_pairs(k_ranges), strict=True)
    )
    ends = [0] + [q1 for _, q1, _, _ in rows]
    if [q0 for q0, _, _, _ in rows] != ends[:-1] or ends[-1] != lq:
        raise ValueError(f"query ranges must be disjoint and cover [0, {lq}) in order: {rows}")
    return rows


def _packed_keys(
    k: torch.Tensor, v: torch.Tensor, segments: list[tuple[int, int, int, int]]
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """K/V with each segment's key range stored back to back ([sum of lengths, G, D])."""
    k_lens = [k1 - k0 for _, _, k0, k1 in segments]
    first, last = segments[0][2], segments[-1][3]
    if all(a[3] == b[2] for a, b in zip(segments, segments[1:])):
        return k[first:last], v[first:last], k_lens  # already packed: a view, no copy
    index = torch.cat([torch.arange(k0, k1) for _, _, k0, k1 in segments]).to(k.device)
    return k.index_select(0, index), v.index_select(0, index), k_lens


def _cumulative(lengths: list[int], device: torch.device) -> torch.Tensor:
    """[S + 1] int32 prefix sums, the cu_seqlens layout flash-attn expects."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return cu.to(device)
