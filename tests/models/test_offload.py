"""Memory and speed switches applied from outside the DiT: block streaming (magi.offload), the
host-side KV cache (KVCache(offload=True)) and regional torch.compile (magi.compile).

Each must leave the numbers unchanged: a tiny float32 DiT with random weights runs a first-window
call that writes the KV cache and a cached call that reads it, with and without the switch.
"""

from __future__ import annotations

import pytest
import torch

from magi.compile import compile_blocks, is_compiled, uncompile_blocks
from magi.config import ModelConfig
from magi.models.dit import DiT
from magi.models.kv_cache import KVCache
from magi.offload import offload_blocks

TINY = ModelConfig(
    num_layers=3,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_query_groups=2,
    kv_channels=16,
    caption_channels=32,
    params_dtype="torch.float32",
)
CHUNK_TOKENS = 6 * 4 * 4  # 6 latent frames x 4 x 4 patches (8 x 8 latents)


@pytest.fixture(scope="module")
def model() -> DiT:
    torch.manual_seed(0)
    dit = DiT(TINY).promote_precision().eval().requires_grad_(False)
    with torch.no_grad():
        for p in dit.parameters():  # non-trivial norms, gates and RoPE bands too
            p.add_(0.05 * torch.randn_like(p))
    return dit


def call_inputs(chunks: int, slice_point: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    counts = torch.tensor([7, 30, 1][:chunks])
    y_mask = (torch.arange(800)[None] < counts[:, None]).long()
    ends = torch.arange(slice_point + 1, slice_point + chunks + 1)
    return dict(
        x=torch.randn(1, 16, 6 * chunks, 8, 8, generator=gen),
        t=torch.rand(1, chunks, generator=gen),
        y=torch.randn(chunks, 800, TINY.caption_channels, generator=gen),
        y_mask=y_mask,
        text_dropped=torch.tensor([False]),
        kv_range=torch.stack([torch.zeros_like(ends), ends], dim=1) * CHUNK_TOKENS,
        slice_point=slice_point,
    )


def two_calls(model: DiT, kv_offload: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """First window (writes chunk 0's K/V), then a cached call over chunks 1-2 reading it."""
    cache = KVCache(max_chunks=2, offload=kv_offload)
    with torch.inference_mode():
        first = model(**call_inputs(2, 0, seed=1), kv_cache=cache, cache_write_chunks=1)
        cached = model(**call_inputs(2, 1, seed=2), kv_cache=cache)
    return first, cached


def test_block_offload_forward_equals_plain_forward(model: DiT) -> None:
    expected = two_calls(model)
    offloader = offload_blocks(model, "cpu", prefetch=True)
    seen: list[list[int]] = []
    probe = model.videodit_blocks.layers[1].register_forward_pre_hook(
        lambda mod, args: seen.append(offloader.resident_layers())
    )
    try:
        got = two_calls(model)
        assert offloader.resident_layers() == []  # every layer released after the pass
    finally:
        probe.remove()
        offloader.remove()
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    # layer 1's own pre-hook (registered first) loaded it before the probe ran; CPU never prefetches
    assert seen == [[1], [1]]
    assert offloader.loads == 2 * len(model.videodit_blocks.layers)
    for a, b in zip(two_calls(model), expected):  # hooks removed: plain model again
        assert torch.equal(a, b)


def test_block_offload_moves_non_layer_modules_and_keeps_names(model: DiT) -> None:
    keys = list(model.state_dict())
    offloader = offload_blocks(model, "cpu")
    try:
        assert list(model.state_dict()) == keys
        assert model.x_embedder.weight.device.type == "cpu"
        assert len(offloader._host) == len(model.videodit_blocks.layers)
    finally:
        offloader.remove()


def test_kv_cache_on_host_equals_device_cache(model: DiT) -> None:
    for a, b in zip(two_calls(model, kv_offload=True), two_calls(model, kv_offload=False)):
        assert torch.equal(a, b)


def test_regional_compile_keeps_the_numbers(model: DiT) -> None:
    """Dynamo tracing with graph breaks around attention (backend "eager": no codegen on CPU)."""
    expected = two_calls(model)
    torch._dynamo.reset()
    compile_blocks(model, backend="eager")
    try:
        assert all(is_compiled(layer) for layer in model.videodit_blocks.layers)
        got = two_calls(model)
    finally:
        uncompile_blocks(model)
    assert not any(is_compiled(layer) for layer in model.videodit_blocks.layers)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory, side stream)")
def test_block_offload_on_cuda_matches_and_saves_memory(model: DiT) -> None:
    device = torch.device("cuda")
    resident = DiT(TINY).promote_precision().eval().requires_grad_(False)
    resident.load_state_dict(model.state_dict())
    resident.to(device)
    cache_inputs = [call_inputs(2, 0, 1), call_inputs(2, 1, 2)]
    moved = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in c.items()} for c in cache_inputs]

    def run(m: DiT) -> list[torch.Tensor]:
        cache = KVCache(max_chunks=2)
        with torch.inference_mode():
            return [m(**moved[0], kv_cache=cache, cache_write_chunks=1), m(**moved[1], kv_cache=cache)]

    expected = run(resident)
    del resident
    torch.cuda.empty_cache()
    streamed = DiT(TINY).promote_precision().eval().requires_grad_(False)
    streamed.load_state_dict(model.state_dict())
    offloader = offload_blocks(streamed, device)
    assert streamed.videodit_blocks.layers[0].mlp.linear_fc1.weight.is_pinned()
    got = run(streamed)
    offloader.remove(resident=False)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def _host_resident_check(device: str) -> None:
    from magi.offload import HostResident

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(5, 8)
    expected = module(x)
    holder = HostResident(module.to(device), device)
    host = [p.data for p in module.parameters()]
    assert all(p.device.type == "cpu" for p in module.parameters())
    with holder.on_device() as on:
        assert all(p.device.type == torch.device(device).type for p in on.parameters())
        assert all(b.device.type == torch.device(device).type for b in on.buffers())
        got = on(x.to(device)).cpu()
    # back on the host copies, no copy made: the same storage as before the block
    assert [p.data.data_ptr() for p in module.parameters()] == [t.data_ptr() for t in host]
    assert holder.loads == 1
    if device == "cpu":
        assert torch.equal(got, expected)
    else:  # cuBLAS vs CPU GEMM: rounding-level differences only
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_host_resident_module_moves_in_only_inside_the_block() -> None:
    _host_resident_check("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pinned host copies, async copy)")
def test_host_resident_module_on_cuda() -> None:
    _host_resident_check("cuda")
