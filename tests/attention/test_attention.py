"""Range attention entry point, SDPA backend and the pure range builders."""

from __future__ import annotations

import pytest
import torch

import magi.attention as attn
from magi.attention import attention
from magi.attention.masks import (
    block_causal_kv_range,
    chunk_query_ranges,
    cross_attention_ranges,
    isolated_kv_range,
    self_attention_ranges,
)
from tests.helpers import rel_l2


def dense_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qr: torch.Tensor, kr: torch.Tensor
) -> torch.Tensor:
    """Masked softmax attention over the full score matrix in float64 (repeat K/V per head)."""
    n, g = q.shape[1], k.shape[1]
    k64 = k.double().repeat_interleave(n // g, dim=1)
    v64 = v.double().repeat_interleave(n // g, dim=1)
    allowed = torch.zeros(q.shape[0], k.shape[0], dtype=torch.bool)
    for (q0, q1), (k0, k1) in zip(qr.tolist(), kr.tolist()):
        allowed[q0:q1, k0:k1] = True
    scores = torch.einsum("qnd,knd->nqk", q.double(), k64) / q.shape[-1] ** 0.5
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return torch.einsum("nqk,knd->qnd", probs, v64)


def _qkv(lq: int, lk: int, n: int = 4, g: int = 2, d: int = 8) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(lq, n, d, generator=gen),
        torch.randn(lk, g, d, generator=gen),
        torch.randn(lk, g, d, generator=gen),
    )


def test_sdpa_matches_dense_reference_with_gqa_and_overlapping_key_ranges() -> None:
    q, k, v = _qkv(12, 20)
    qr = torch.tensor([[0, 4], [4, 8], [8, 12]])
    kr = torch.tensor([[0, 8], [4, 16], [12, 20]])
    out = attention(q, k, v, qr, kr, backend="sdpa")
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_l2(out, dense_reference(q, k, v, qr, kr)) < 1e-6


def test_empty_key_range_gives_zeros() -> None:
    """A chunk without caption tokens gets a zero cross-attention output (as flash varlen)."""
    q, k, v = _qkv(8, 6)
    out = attention(q, k, v, torch.tensor([[0, 4], [4, 8]]), torch.tensor([[0, 6], [6, 6]]))
    assert torch.equal(out[4:], torch.zeros_like(out[4:]))
    assert out[:4].abs().sum() > 0


def test_bf16_inputs_keep_dtype() -> None:
    q, k, v = (x.bfloat16() for x in _qkv(8, 8))
    out = attention(q, k, v, torch.tensor([[0, 8]]), torch.tensor([[0, 8]]))
    assert out.dtype == torch.bfloat16
    assert rel_l2(out.float(), dense_reference(q, k, v, torch.tensor([[0, 8]]), torch.tensor([[0, 8]]))) < 1e-2


def test_backend_selection_and_errors() -> None:
    q, k, v = _qkv(4, 4)
    ranges = torch.tensor([[0, 4]])
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        attention(q, k, v, ranges, ranges, backend="nope")
    with pytest.raises(ValueError, match="multiple of K/V heads"):
        attention(q[:, :3], k, v, ranges, ranges)
    with pytest.raises(ValueError, match="must both be"):
        attention(q, k, v, ranges, torch.tensor([[0, 4], [0, 4]]))
    previous = attn.get_backend()
    try:
        attn.set_backend("sdpa")
        assert attn.get_backend() == "sdpa"
        with pytest.raises(ValueError, match="unknown attention backend"):
            attn.set_backend("nope")
        assert attn.get_backend() == "sdpa"
    finally:
        attn.set_backend(previous)


def test_missing_backend_module_fails_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(attn.BACKENDS, "ghost", "magi.attention.does_not_exist")
    with pytest.raises(ImportError, match="attention backend 'ghost' is unavailable"):
        attn.set_backend("ghost")


# ---------------------------------------------------------------- masks


def test_block_causal_kv_range_matches_official_fixture_rows() -> None:
    # pipeline_t2v_4p5b_base call "cached": slice 1, 3 chunks, 96 tokens, all history visible.
    assert block_causal_kv_range(1, [2, 3, 4], 96).tolist() == [[0, 192], [0, 288], [0, 384]]
    # call "cached_extra": the extra clean chunk sees only itself, the next ones 2 and 3 chunks.
    assert block_causal_kv_range(1, [1, 2, 3], 96).tolist() == [[96, 192], [96, 288], [96, 384]]
    assert block_causal_kv_range(5, [1, 5], 10).tolist() == [[50, 60], [20, 70]]
    with pytest.raises(ValueError, match="at least itself"):
        block_causal_kv_range(0, [0], 10)


def test_query_and_isolated_ranges() -> None:
    assert chunk_query_ranges(3, 4).tolist() == [[0, 4], [4, 8], [8, 12]]
    assert isolated_kv_range(2, 5).tolist() == [[0, 5], [5, 10]]
    qr, kr = self_attention_ranges(torch.tensor([[0, 8], [0, 16]], dtype=torch.int32), 8)
    assert qr.tolist() == [[0, 8], [8, 16]] and kr.tolist() == [[0, 8], [0, 16]] and kr.dtype == torch.int64


def test_cross_attention_ranges_pack_captions_per_chunk() -> None:
    qr, kr = cross_attention_ranges(torch.tensor([3, 0, 5]), 4)
    assert qr.tolist() == [[0, 4], [4, 8], [8, 12]]
    assert kr.tolist() == [[0, 3], [3, 3], [3, 8]]
