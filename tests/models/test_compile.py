"""The DiT traces into single torch.compile graphs on CPU when its host-side arguments are given.

``host_call_args`` turns the call's kv_range / y_mask into Python ints once, outside any compiled
region; with them a layer and the whole forward (cache read and write included) must show zero
graph breaks, and fullgraph compilation must reproduce the eager numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from magi.attention import attention, check_backend
from magi.compile import compile_blocks, uncompile_blocks
from magi.models.dit import DiT, host_call_args
from magi.models.kv_cache import KVCache
from tests.models.helpers import dit_inputs, small_config

DROP = torch.tensor([False])
FIRST_KV = torch.tensor([[0, 8], [0, 16]])  # 2 chunks of 8 tokens, block-causal
CACHED_KV = ((8, 24), (8, 32))  # chunks 2..3 seeing one cached chunk (chunk 1) and themselves


@pytest.fixture(scope="module")
def model() -> DiT:
    torch.manual_seed(0)
    return DiT(small_config(num_layers=1, gated_linear_unit=True))  # one layer: tracing is slow on CPU


def _cache_after_first_window(model: DiT) -> KVCache:
    """A cache holding chunks 0 and 1, written by an eager first-window call."""
    x, t, y, mask = dit_inputs()
    cache = KVCache(max_chunks=4)
    model(x, t, y, mask, DROP, FIRST_KV, kv_cache=cache, cache_write_chunks=2)
    return cache


def _explain(fn, *args, **kwargs):  # thin wrapper over dynamo's report
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args, **kwargs)


def test_one_layer_has_no_graph_breaks(model: DiT) -> None:
    x, t, y, mask = dit_inputs()
    hidden, ctx = model.embed(x, t, y, mask, DROP, **host_call_args(FIRST_KV, mask))
    report = _explain(model.videodit_blocks.layers[0], hidden, ctx)
    assert report.graph_break_count == 0, report.break_reasons
    assert report.graph_count == 1


def test_whole_forward_has_no_graph_breaks(model: DiT) -> None:
    """A cached window: history read, cache write and both attentions inside the one graph."""
    x, t, y, mask = dit_inputs()
    cache = _cache_after_first_window(model)
    args = host_call_args(CACHED_KV, mask)
    report = _explain(model, x, t, y, mask, DROP, **args, slice_point=2, kv_cache=cache, cache_write_chunks=1)
    assert report.graph_break_count == 0, report.break_reasons
    assert report.graph_count == 1


def test_fullgraph_compile_equals_eager_with_cache(model: DiT) -> None:
    x, t, y, mask = dit_inputs()
    args = host_call_args(CACHED_KV, mask)
    eager_cache, compiled_cache = _cache_after_first_window(model), _cache_after_first_window(model)
    eager = model(x, t, y, mask, DROP, **args, slice_point=2, kv_cache=eager_cache, cache_write_chunks=1)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x, t, y, mask, DROP, **args, slice_point=2, kv_cache=compiled_cache, cache_write_chunks=1)
    assert out.abs().sum() > 0
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    for layer in range(len(model.videodit_blocks.layers)):
        assert compiled_cache.chunks(layer) == eager_cache.chunks(layer) == [0, 1, 2]
        written = compiled_cache.read(layer, 2, 3, torch.device("cpu"))
        torch.testing.assert_close(written, eager_cache.read(layer, 2, 3, torch.device("cpu")), rtol=1e-6, atol=1e-6)


def test_host_arguments_give_the_tensor_path_numbers(model: DiT) -> None:
    x, t, y, mask = dit_inputs()
    mask[1] = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1.0])  # holes: valid slots are not a prefix
    eager = model(x, t, y, mask, DROP, FIRST_KV)
    assert torch.equal(model(x, t, y, mask, DROP, **host_call_args(FIRST_KV, mask)), eager)
    # The same valid tokens packed to the front of segment 1 give the same velocity.
    packed_y, packed_mask = y.clone(), torch.zeros_like(mask)
    packed_y[1, :4], packed_mask[0, :3], packed_mask[1, :4] = y[1, mask[1] > 0], 1, 1
    packed_y[0] = y[0]
    assert torch.equal(model(x, t, packed_y, packed_mask, DROP, FIRST_KV), eager)


def test_wrong_caption_counts_fail_with_one_line(model: DiT) -> None:
    x, t, y, mask = dit_inputs()
    with pytest.raises(ValueError, match="caption_counts must give 0..8 tokens for each of the 2"):
        model(x, t, y, mask, DROP, ((0, 8), (0, 16)), caption_counts=(3,))


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_attention_backends_compile_without_breaks(backend: str) -> None:
    check_backend(backend, "cpu", torch.float32)  # imports it, as the pipeline does before loading
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(200, 4, 16, generator=g),
        torch.randn(300, 2, 16, generator=g),
        torch.randn(300, 2, 16, generator=g),
    )
    q_pairs, k_pairs = ((0, 100), (100, 200)), ((0, 100), (50, 300))

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, q_pairs, k_pairs, backend=backend)

    assert _explain(call, q, k, v).graph_break_count == 0
    torch._dynamo.reset()
    out = torch.compile(call, fullgraph=True, backend="aot_eager")(q, k, v)
    ref = attention(q, k, v, torch.tensor(q_pairs), torch.tensor(k_pairs), backend="sdpa")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _windows(model: DiT, count: int, after_each: Callable[[int], None] = lambda sp: None) -> list[torch.Tensor]:
    """``count`` consecutive calls of two chunks each, every chunk seeing up to two chunks back."""
    x, t, y, mask = dit_inputs()
    cache, outs = KVCache(max_chunks=4), []
    for sp in range(count):
        kv = torch.tensor([[max(0, sp - 2) * 8, (sp + 1) * 8], [max(0, sp - 1) * 8, (sp + 2) * 8]])
        outs.append(model(x, t, y, mask, DROP, kv, slice_point=sp, kv_cache=cache, cache_write_chunks=1))
        after_each(sp)
    return outs


def test_regional_compile_stops_recompiling_once_windows_repeat(model: DiT) -> None:
    """compile_blocks keeps the cache I/O eager, so steady-state windows reuse their graphs (with
    the cache inside the graph every window would recompile, up to dynamo's limit of 8)."""
    from torch._dynamo.utils import counters

    expected = _windows(model, 7)
    torch._dynamo.reset()
    counters.clear()
    graphs: list[int] = []
    compile_blocks(model, backend="eager")
    try:
        got = _windows(model, 7, lambda sp: graphs.append(counters["stats"]["unique_graphs"]))
    finally:
        uncompile_blocks(model)
    assert graphs[0] > 0 and graphs[3:] == [graphs[3]] * 4, graphs  # nothing new after the fourth window
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
