"""FlexAttention backend: the whole range-masked attention call in one kernel.

Every query segment [q0, q1) attends to its key range [k0, k1) (contract in docs/ARCHITECTURE.md).
The mask is handed to ``torch.nn.attention.flex_attention`` twice over:

* as a ``mask_mod`` reading two per-query lookup tables (k0 and k1 of the query's segment), which
  is what the kernel evaluates inside partially covered tiles, and
* as block tables built directly from the ranges (``BlockMask.from_kv_blocks``), so the kernel
  skips empty tiles and runs full tiles without evaluating the mask. Building the tables from the
  ranges costs O(tiles); ``create_block_mask`` would evaluate the mask on every (q, k) pair, which
  at 720p (5e9 to 2e10 pairs per call) is far too slow without compilation.

The block mask of a call is cached by its ranges, so the layers of one DiT forward share it.
Inside a ``torch.compile``d caller (ranges given as Python pairs) the mask is built in the traced
code instead, without the cache: its tables then depend only on the static ranges.
On CUDA the kernel is ``torch.compile``d (eager FlexAttention materialises the full score matrix);
on CPU the eager path is used, which evaluates ``mask_mod`` densely and is meant for tests.

Legend: L tokens, N query heads, G K/V heads, D head dim, S segments, nQ / nK query / key tiles.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch
from einops import rearrange
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from magi.attention.masks import Ranges, range_pairs

# Tile edge of the FlexAttention kernels (their default); tables are built for this size.
BLOCK_SIZE = 128
_CACHE_SIZE = 16

_mask_cache: OrderedDict[tuple, BlockMask] = OrderedDict()
_compiled_flex: Callable[..., torch.Tensor] | None = None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_ranges: Ranges,
    k_ranges: Ranges,
) -> torch.Tensor:
    """Range-masked attention with FlexAttention (same contract as ``magi.attention.attention``).

    Args:
        q: [Lq, N, D] queries.
        k: [Lk, G, D] keys, N % G == 0 (query head h reads K/V head h // (N // G)).
        v: [Lk, G, D] values.
        q_ranges: [S, 2] int tensor or int pairs, disjoint query segments covering [0, Lq).
        k_ranges: same form, the key range each query segment attends to (no mask inside).

    Returns:
        [Lq, N, D] attention output in q's dtype, softmax scale 1/sqrt(D).
    """
    lq, n, d = q.shape
    lk, g, _ = k.shape
    if n % g != 0:
        raise ValueError(f"flex attention: {n} query heads are not a multiple of {g} K/V heads")
    mask = block_mask_from_ranges(q_ranges, k_ranges, lq, lk, q.device)
    qb = rearrange(q, "l n d -> 1 n l d")
    kb = rearrange(k, "l g d -> 1 g l d")
    vb = rearrange(v, "l g d -> 1 g l d")
    kwargs = {"block_mask": mask, "scale": d**-0.5, "enable_gqa": n != g}
    if torch.compiler.is_compiling():  # traced by the caller's compile: the kernel is fused there
        out = flex_attention(qb, kb, vb, **kwargs)
    else:
        with warnings.catch_warnings():
            # The eager (CPU) path warns that it is unfused; that is the intended test path.
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = _flex_fn(q.device)(qb, kb, vb, **kwargs)
    return rearrange(out, "1 n l d -> l n d").to(q.dtype)


def _flex_fn(device: torch.device) -> Callable[..., torch.Tensor]:
    """The compiled kernel on CUDA (built once), eager FlexAttention elsewhere."""
    global _compiled_flex
    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        # dynamic=None: the first new shape recompiles with symbolic lengths, so the few
        # window sizes of a run (1..5 chunks, growing cache) do not each trigger a compile.
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def block_mask_from_ranges(
    q_ranges: Ranges,
    k_ranges: Ranges,
    lq: int,
    lk: int,
    device: torch.device | str,
    block_size: int = BLOCK_SIZE,
) -> BlockMask:
    """BlockMask of "segment [q0, q1) sees keys [k0, k1)", cached by its ranges.

    Args:
        q_ranges: [S, 2] int tensor or int pairs, disjoint query segments covering [0, lq).
        k_ranges: same form, key range of each segment, within [0, lk].
        lq: number of queries.
        lk: number of keys.
        device: where the tables and the lookup tensors live (the attention's device).
        block_size: tile edge of the kernel.
    """
    segments = _validated_segments(q_ranges, k_ranges, lq, lk)
    if torch.compiler.is_compiling():
        return _build_block_mask(segments, lq, lk, torch.device(device), block_size)
    key = (segments, lq, lk, str(device), block_size)
    mask = _mask_cache.get(key)
    if mask is None:
        mask = _build_block_mask(segments, lq, lk, torch.device(device), block_size)
        _mask_cache[key] = mask
        if len(_mask_cache) > _CACHE_SIZE:
            _mask_cache.popitem(last=False)
    else:
        _mask_cache.move_to_end(key)
    return mask


def _validated_segments(q_ranges: Ranges, k_ranges: Ranges, lq: int, lk: int) -> tuple[tuple[int, int, int, int], ...]:
    """(q0, q1, k0, k1) per segment sorted by q0; ValueError unless they tile [0, lq)."""
    q_pairs, k_pairs = range_pairs(q_ranges), range_pairs(k_ranges)
    if len(q_pairs) != len(k_pairs):
        raise ValueError(f"q_ranges and k_ranges must both be [S, 2], got {len(q_pairs)} and {len(k_pairs)} rows")
    rows = sorted((q0, q1, k0, k1) for (q0, q1), (k0, k1) in zip(q_pairs, k_pairs))
    expected_start = 0
    for q0, q1, k0, k1 in rows:
        if q0 != expected_start or q1 <= q0:
            raise ValueError(
                f"query ranges must be disjoint, non-empty and cover [0, {lq}) in order; got {[r[:2] for r in rows]}"
            )
        if not 0 <= k0 <= k1 <= lk:
            raise ValueError(f"key range [{k0}, {k1}) is outside [0, {lk}]")
        expected_start = q1
    if expected_start != lq:
        raise ValueError(f"query ranges end at {expected_start}, but q has {lq} tokens")
    return tuple(rows)


def _build_block_mask(
    segments: tuple[tuple[int, int, int, int], ...],
    lq: int,
    lk: int,
    device: torch.device,
    block_size: int,
) -> BlockMask:
    """Block tables and mask_mod for the segments (see the module docstring)."""
    n_qb, n_kb = -(-lq // block_size), -(-lk // block_size)
    padded_q = n_qb * block_size
    # Per-query key bounds; padding rows (beyond lq) see no key.
    k_lo = torch.zeros(padded_q, dtype=torch.int32)
    k_hi = torch.zeros(padded_q, dtype=torch.int32)
    for q0, q1, k0, k1 in segments:
        k_lo[q0:q1], k_hi[q0:q1] = k0, k1
    touched, full = _tile_tables(segments, k_lo, k_hi, lq, lk, n_qb, n_kb, block_size)
    partial = touched & ~full
    k_lo_dev, k_hi_dev = k_lo.to(device), k_hi.to(device)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor):
        return (kv_idx >= k_lo_dev[q_idx]) & (kv_idx < k_hi_dev[q_idx])

    return BlockMask.from_kv_blocks(
        *_ordered(partial, device),
        *_ordered(full, device),
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(lq, lk),
        compute_q_blocks=False,  # only the backward pass needs the transposed tables
    )


def _tile_tables(
    segments: tuple[tuple[int, int, int, int], ...],
    k_lo: torch.Tensor,
    k_hi: torch.Tensor,
    lq: int,
    lk: int,
    n_qb: int,
    n_kb: int,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[nQ, nK] bool: tiles holding any allowed pair, and tiles where every pair is allowed."""
    touched = torch.zeros(n_qb, n_kb, dtype=torch.bool)
    for q0, q1, k0, k1 in segments:
        if k1 > k0:
            q_tiles = slice(q0 // block_size, (q1 - 1) // block_size + 1)
            k_tiles = slice(k0 // block_size, (k1 - 1) // block_size + 1)
            touched[q_tiles, k_tiles] = True
    # A tile is full when every real query row of it covers the whole key tile; the last key
    # tile is never full when lk is not a multiple of the tile (its padding columns are masked).
    rows = torch.arange(n_qb * block_size).view(n_qb, block_size)
    real = rows < lq
    lo_max = torch.where(real, k_lo.view(n_qb, block_size), 0).amax(-1)  # [nQ]
    hi_min = torch.where(real, k_hi.view(n_qb, block_size), lk).amin(-1)  # [nQ]
    tile_start = torch.arange(n_kb) * block_size
    tile_end = tile_start + block_size
    full = (lo_max[:, None] <= tile_start) & (hi_min[:, None] >= tile_end) & (tile_end <= lk)
    return touched, full & touched


def _ordered(dense: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[nQ, nK] bool -> (count [1, 1, nQ], indices [1, 1, nQ, nK]) with selected tiles first."""
    counts = dense.sum(-1, dtype=torch.int32)
    # Stable sort puts the selected tiles first, in ascending key order.
    indices = torch.argsort((~dense).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[None, None].to(device), indices[None, None].to(device)
