"""Optional attention backends (FlexAttention, flash-attn) against SDPA and a float64 reference.

The range cases follow the DiT's use (spec/dit.md §6.4, §7): block-causal self-attention over
chunks with a KV cache prefix and a shrinking history, chunks as separate batch items (passes
without history), and per-chunk cross-attention to packed caption tokens.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from magi.attention import flash, flex
from tests.helpers import rel_l2

N_HEADS, N_GROUPS, HEAD_DIM = 4, 2, 16


def block_causal_ranges(
    chunk: int, n_chunks: int, slice_point: int, history: list[int]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Chunk j sees itself and history[j] - 1 earlier chunks; keys = [cache ; this call]."""
    q_ranges, k_ranges = [], []
    for j in range(n_chunks):
        end = slice_point + j + 1
        q_ranges.append([j * chunk, (j + 1) * chunk])
        k_ranges.append([max(0, end - history[j]) * chunk, end * chunk])
    return torch.tensor(q_ranges), torch.tensor(k_ranges), (slice_point + n_chunks) * chunk


def cross_ranges(chunk: int, caption_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Chunk i attends only to its own caption tokens, packed chunk after chunk."""
    starts = torch.tensor([0, *caption_lens]).cumsum(0)
    q_ranges = [[i * chunk, (i + 1) * chunk] for i in range(len(caption_lens))]
    k_ranges = [[int(starts[i]), int(starts[i + 1])] for i in range(len(caption_lens))]
    return torch.tensor(q_ranges), torch.tensor(k_ranges), int(starts[-1])


def dense_reference(q, k, v, q_ranges, k_ranges) -> torch.Tensor:
    """Masked softmax attention in float64 with an explicit [Lq, Lk] mask (no keys -> 0)."""
    lq, n, d = q.shape
    allowed = torch.zeros(lq, k.shape[0], dtype=torch.bool)
    for (q0, q1), (k0, k1) in zip(q_ranges.tolist(), k_ranges.tolist()):
        allowed[q0:q1, k0:k1] = True
    kk = k.double().repeat_interleave(n // k.shape[1], dim=1)  # [Lk, N, D]
    vv = v.double().repeat_interleave(n // k.shape[1], dim=1)
    scores = torch.einsum("qnd,knd->nqk", q.double(), kk) / d**0.5
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)  # empty rows: 0
    return torch.einsum("nqk,knd->qnd", probs, vv)


def random_qkv(lq: int, lk: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(lq, N_HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(lk, N_GROUPS, HEAD_DIM, generator=gen)
    v = torch.randn(lk, N_GROUPS, HEAD_DIM, generator=gen)
    return q, k, v


def random_ranges(seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Random segment lengths (some shorter than a tile) and arbitrary, possibly empty key ranges."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (6,), generator=gen)
    ends = lengths.cumsum(0)
    q_ranges = torch.stack([ends - lengths, ends], dim=1)
    lk = int(torch.randint(20, 150, (1,), generator=gen))
    bounds = torch.randint(0, lk + 1, (6, 2), generator=gen).sort(dim=1).values
    return q_ranges, bounds, lk


CASES = {
    # first window: 3 chunks, no cache, full history
    "first_window": block_causal_ranges(37, 3, 0, [1, 2, 3]),
    # cached call: 2 cache chunks, shipped-style shrinking history [5, 4, 3, 2] + a clean chunk (1)
    "cached_window": block_causal_ranges(37, 5, 2, [1, 5, 4, 3, 2]),
    # passes without history: every chunk attends only to itself
    "chunks_alone": block_causal_ranges(45, 3, 0, [1, 1, 1]),
    # cross-attention: 4 chunks with 5, 50, 0 (an empty key range gives 0), 23 caption tokens
    "cross": cross_ranges(37, [5, 50, 0, 23]),
    # random segment lengths and key ranges (overlapping, some empty)
    **{f"random{seed}": random_ranges(seed) for seed in range(3)},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_flex_matches_sdpa_and_reference(case: str) -> None:
    from magi.attention import attention

    q_ranges, k_ranges, lk = CASES[case]
    q, k, v = random_qkv(int(q_ranges[-1, 1]), lk, seed=len(case))
    out_flex = flex.attention(q, k, v, q_ranges, k_ranges)
    out_sdpa = attention(q, k, v, q_ranges, k_ranges, backend="sdpa")
    reference = dense_reference(q, k, v, q_ranges, k_ranges)
    assert out_flex.shape == q.shape and out_flex.dtype == torch.float32
    assert rel_l2(out_flex, out_sdpa) <= 1e-5
    assert rel_l2(out_flex, reference) <= 1e-5
    # the same call through the entry point's registry
    assert rel_l2(attention(q, k, v, q_ranges, k_ranges, backend="flex"), out_flex) == 0.0


@pytest.mark.parametrize("case", ["cached_window", "cross", "random0", "random1", "random2"])
def test_flex_block_tables_are_exact(case: str) -> None:
    """The tile tables the GPU kernel uses: a tile is listed iff it holds an allowed pair,
    and listed as full iff every pair in it is allowed (eager CPU ignores the tables)."""
    q_ranges, k_ranges, lk = CASES[case]
    lq, bs = int(q_ranges[-1, 1]), 16
    mask = flex.block_mask_from_ranges(q_ranges, k_ranges, lq, lk, "cpu", block_size=bs)
    allowed = torch.zeros(-(-lq // bs) * bs, -(-lk // bs) * bs, dtype=torch.bool)
    for (q0, q1), (k0, k1) in zip(q_ranges.tolist(), k_ranges.tolist()):
        allowed[q0:q1, k0:k1] = True
    tiles = allowed.view(allowed.shape[0] // bs, bs, allowed.shape[1] // bs, bs)
    any_allowed = tiles.any(dim=(1, 3))
    # padding query rows (beyond lq) are never stored by the kernel: they do not count
    allowed[lq:] = True
    all_allowed = tiles.all(dim=(1, 3))
    listed = mask.to_dense()[0, 0].bool()  # partial + full tiles
    full = torch.zeros_like(listed)
    for row in range(full.shape[0]):
        count = int(mask.full_kv_num_blocks[0, 0, row])
        full[row, mask.full_kv_indices[0, 0, row, :count].long()] = True
    assert torch.equal(listed, any_allowed)
    assert torch.equal(full, all_allowed)
    if case == "cached_window":
        assert int(full.sum()) > 0 and int((listed & ~full).sum()) > 0  # both kinds occur


def test_flex_block_mask_is_cached_per_ranges() -> None:
    q_ranges, k_ranges, lk = CASES["first_window"]
    lq = int(q_ranges[-1, 1])
    first = flex.block_mask_from_ranges(q_ranges, k_ranges, lq, lk, "cpu")
    again = flex.block_mask_from_ranges(q_ranges.clone(), k_ranges.clone(), lq, lk, "cpu")
    other = flex.block_mask_from_ranges(q_ranges, k_ranges, lq, lk + 1, "cpu")
    assert first is again and other is not first


def test_flex_rejects_ranges_that_do_not_tile_the_queries() -> None:
    q, k, v = random_qkv(20, 20, seed=0)
    with pytest.raises(ValueError, match="cover"):
        flex.attention(q, k, v, torch.tensor([[0, 10], [12, 20]]), torch.tensor([[0, 5], [0, 9]]))
    with pytest.raises(ValueError, match="outside"):
        flex.attention(q, k, v, torch.tensor([[0, 20]]), torch.tensor([[0, 21]]))


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, dropout_p, softmax_scale, causal):
    """flash_attn_varlen_func's math on CPU: segment i = q rows cu_q[i]: cu_q[i+1] with
    k/v rows cu_k[i]: cu_k[i+1] (used to test the packing without CUDA)."""
    assert dropout_p == 0.0 and not causal and softmax_scale == q.shape[-1] ** -0.5
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
    segments = len(cu_q) - 1
    q_ranges = torch.stack([cu_q[:-1], cu_q[1:]], dim=-1)
    k_ranges = torch.stack([cu_k[:-1], cu_k[1:]], dim=-1)
    assert q_ranges.shape == (segments, 2)
    return dense_reference(q, k, v, q_ranges, k_ranges).to(q.dtype)


@pytest.mark.parametrize("case", sorted(CASES))
def test_flash_packing_on_cpu(case: str) -> None:
    """Key gathering / cu_seqlens of the flash backend, with a reference kernel in its place."""
    q_ranges, k_ranges, lk = CASES[case]
    q, k, v = random_qkv(int(q_ranges[-1, 1]), lk, seed=7)
    # segments given out of order must be handled (sorted by query start)
    order = torch.randperm(len(q_ranges), generator=torch.Generator().manual_seed(1))
    out = flash.run_varlen(reference_varlen, q, k, v, q_ranges[order], k_ranges[order])
    assert rel_l2(out, dense_reference(q, k, v, q_ranges, k_ranges)) <= 1e-6


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn installed")
def test_flash_without_package_names_it() -> None:
    q, k, v = random_qkv(8, 8, seed=0)
    with pytest.raises(ImportError, match="flash-attn"):
        flash.attention(q, k, v, torch.tensor([[0, 8]]), torch.tensor([[0, 8]]))
    assert not flash.is_available()


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
    reason="needs CUDA and the flash-attn package",
)
@pytest.mark.parametrize("case", sorted(CASES))
def test_flash_matches_sdpa_on_cuda(case: str) -> None:
    from magi.attention import attention

    q_ranges, k_ranges, lk = CASES[case]
    q, k, v = (t.cuda().bfloat16() for t in random_qkv(int(q_ranges[-1, 1]), lk, seed=3))
    out = flash.attention(q, k, v, q_ranges, k_ranges)
    reference = attention(q, k, v, q_ranges, k_ranges, backend="sdpa")
    assert rel_l2(out.float(), reference.float()) <= 1e-2  # bf16 kernels, different order


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled FlexAttention)")
@pytest.mark.parametrize("case", sorted(CASES))
def test_flex_compiled_matches_sdpa_on_cuda(case: str) -> None:
    from magi.attention import attention

    q_ranges, k_ranges, lk = CASES[case]
    q, k, v = (t.cuda().bfloat16() for t in random_qkv(int(q_ranges[-1, 1]), lk, seed=4))
    out = flex.attention(q, k, v, q_ranges, k_ranges)
    reference = attention(q, k, v, q_ranges, k_ranges, backend="sdpa")
    assert rel_l2(out.float(), reference.float()) <= 1e-2


# ---------------------------------------------------------------- "auto" and availability checks
def test_auto_picks_by_device_dtype_and_installed_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    import magi.attention as attn

    assert attn.resolve_backend("auto", "cpu", torch.bfloat16) == "sdpa"
    assert attn.resolve_backend("flex", "cpu", torch.float32) == "flex"  # explicit names pass through
    monkeypatch.setattr(flash, "is_available", lambda: True)
    assert attn.resolve_backend("auto", "cuda", torch.bfloat16) == "flash"
    assert attn.resolve_backend("auto", "cuda", torch.float16) == "flash"
    assert attn.resolve_backend("auto", "cuda", torch.float32) == "flex"  # flash-attn has no fp32
    monkeypatch.setattr(flash, "is_available", lambda: False)
    assert attn.resolve_backend("auto", "cuda", torch.bfloat16) == "flex"
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        attn.resolve_backend("xformers", "cpu", torch.float32)


def test_check_backend_refuses_what_cannot_run_in_one_line() -> None:
    import magi.attention as attn

    assert attn.check_backend("auto", "cpu", torch.float32) == "sdpa"
    assert attn.check_backend("flex", "cpu", torch.float32) == "flex"
    with pytest.raises(ValueError, match="'flash' runs bf16/fp16 on CUDA, not torch.float32 on cpu") as err:
        attn.check_backend("flash", "cpu", torch.float32)
    assert "\n" not in str(err.value)


def test_auto_backend_gives_the_sdpa_numbers_on_cpu() -> None:
    import magi.attention as attn

    q_ranges, k_ranges, lk = block_causal_ranges(37, 3, 1, [2, 3, 2])
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3 * 37, N_HEADS, HEAD_DIM, generator=g)
    k, v = (torch.randn(lk, N_GROUPS, HEAD_DIM, generator=g) for _ in range(2))
    expected = attn.attention(q, k, v, q_ranges, k_ranges, backend="sdpa")
    assert torch.equal(attn.attention(q, k, v, q_ranges, k_ranges, backend="auto"), expected)
    previous = attn.get_backend()
    try:
        attn.set_backend("auto")
        assert attn.get_backend() == "auto"
        assert torch.equal(attn.attention(q, k, v, q_ranges, k_ranges), expected)
    finally:
        attn.set_backend(previous)
