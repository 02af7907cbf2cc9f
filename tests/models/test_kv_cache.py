"""Bounded KV cache: eviction, absolute coordinates, clear errors, CPU offload, use by the DiT."""

from __future__ import annotations

import pytest
import torch

from magi.attention.masks import block_causal_kv_range
from magi.config import ModelConfig
from magi.models.dit import DiT
from magi.models.kv_cache import KVCache

C = 4  # tokens per chunk in these tests


def _rows(chunk: int, n: int = 1) -> torch.Tensor:
    """[n*C, 2, 6] rows whose value encodes the chunk index."""
    return torch.arange(chunk, chunk + n).repeat_interleave(C).float()[:, None, None].expand(n * C, 2, 6).clone()


def test_cache_never_holds_more_than_max_chunks_over_many_windows() -> None:
    cache = KVCache(max_chunks=4)
    for chunk in range(50):  # one clean chunk per window, as the sampler's K/V refresh does
        for layer in range(3):
            cache.write(layer, chunk, _rows(chunk), C)
            assert len(cache.chunks(layer)) <= 4
            assert cache.chunks(layer) == list(range(max(0, chunk - 3), chunk + 1))
    # multi-chunk writes are bounded too
    cache.write(0, 60, _rows(60, 6), C)
    assert cache.chunks(0) == [62, 63, 64, 65]


def test_read_returns_absolute_chunks_in_order() -> None:
    cache = KVCache(max_chunks=3)
    cache.write(0, 10, _rows(10, 3), C)
    got = cache.read(0, 11, 13, torch.device("cpu"))
    assert got.shape == (2 * C, 2, 6)
    assert got[:C].unique().tolist() == [11.0] and got[C:].unique().tolist() == [12.0]


def test_reading_an_evicted_chunk_raises_naming_it() -> None:
    cache = KVCache(max_chunks=2)
    for chunk in range(5):
        cache.write(0, chunk, _rows(chunk), C)
    with pytest.raises(ValueError, match=r"no rows for chunk\(s\) \[1, 2\].*holds chunks 3\.\.4.*max_chunks=2"):
        cache.read(0, 1, 4, torch.device("cpu"))
    with pytest.raises(ValueError, match="holds nothing"):
        cache.read(7, 0, 1, torch.device("cpu"))


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="max_chunks >= 1"):
        KVCache(0)
    with pytest.raises(ValueError, match="whole number"):
        KVCache(2).write(0, 0, torch.zeros(5, 2, 6), C)


def test_offload_keeps_rows_on_cpu_and_copies_them() -> None:
    cache = KVCache(max_chunks=2, offload=True)
    rows = _rows(0)
    cache.write(0, 0, rows, C)
    rows.zero_()  # the cache holds its own copy
    got = cache.read(0, 0, 1, torch.device("cpu"))
    assert got.device.type == "cpu" and got.unique().tolist() == [0.0]
    cache.write(0, 1, _rows(1), C)
    assert cache.read(0, 1, 2, torch.device("cpu")).unique().tolist() == [1.0]
    cache.clear()
    assert cache.chunks(0) == []


def _tiny_dit() -> DiT:
    torch.manual_seed(0)
    cfg = ModelConfig(
        num_layers=2,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=2,
        num_query_groups=1,
        kv_channels=16,
        caption_channels=16,
        caption_max_length=4,
        params_dtype="torch.float32",
    )
    return DiT(cfg)


def test_dit_with_bounded_cache_equals_full_history_call() -> None:
    """Reading chunks 3..4 from a cache that evicted 0..2 equals attending to them in-call."""
    model = _tiny_dit()
    c = 2 * 2 * 2  # 2 latent frames per chunk, 2x2 patches
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 12, 4, 4, generator=gen)  # 6 chunks
    t = torch.full((1, 6), 0.9999)
    y, mask, drop = torch.randn(6, 4, 16, generator=gen), torch.ones(6, 4), torch.tensor([True])
    # Reference: the whole video in one call, chunk 5 sees chunks 3..5.
    visible = [1, 1, 1, 1, 1, 3]
    full = model(x, t, y, mask, drop, block_causal_kv_range(0, visible, c))
    # Bounded cache: write chunks one call at a time; max_chunks 2 evicts chunks 0..2.
    cache = KVCache(max_chunks=2)
    for chunk in range(5):
        xs = x[:, :, 2 * chunk : 2 * chunk + 2]
        model(
            xs,
            t[:, :1],
            y[chunk : chunk + 1],
            mask[:1],
            drop,
            block_causal_kv_range(chunk, [1], c),
            slice_point=chunk,
            kv_cache=cache,
            cache_write_chunks=1,
        )
    assert cache.chunks(0) == [3, 4]
    last = model(
        x[:, :, 10:], t[:, :1], y[5:], mask[:1], drop, block_causal_kv_range(5, [3], c), slice_point=5, kv_cache=cache
    )
    assert torch.allclose(last, full[:, :, 10:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no rows for chunk"):
        model(
            x[:, :, 10:],
            t[:, :1],
            y[5:],
            mask[:1],
            drop,
            block_causal_kv_range(5, [4], c),
            slice_point=5,
            kv_cache=cache,
        )
