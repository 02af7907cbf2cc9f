"""fp8 module swap and the official fp8 arithmetic (quantisation quirks included)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from magi import fp8
from magi.config import ModelConfig
from magi.fp8 import (
    FP8,
    FP8_MAX,
    PerChannelFp8Linear,
    PerTensorFp8Linear,
    fp8_matmul,
    is_fp8_layer,
    quantize_input,
    swap_fp8_linears,
)
from magi.models.dit import DiT
from tests.helpers import REPO_ROOT, rel_l2


def test_quantize_rounds_to_bf16_first() -> None:
    # 1.0625 + 2**-12 lies just above the e4m3 midpoint between 1.0 and 1.125, so rounding it
    # straight to e4m3 gives 1.125; bf16 first drops the 2**-12 (1.0625 exactly, a tie), and
    # the tie then goes to the even mantissa, 1.0. The official path is the double rounding.
    x = torch.tensor([1.0625 + 2**-12])
    assert quantize_input(x, torch.ones(1)).float().item() == 1.0
    assert x.to(FP8).float().item() == 1.125


def test_quantize_clamps_to_e4m3_range() -> None:
    out = quantize_input(torch.tensor([1e6, -1e6, 3.0]), torch.tensor([1.0, 1.0, 2.0])).float()
    assert out.tolist() == [448.0, -448.0, 1.5]


def _random_linear(out_f: int = 24, in_f: int = 32) -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16).requires_grad_(False)


def test_per_tensor_divides_by_vector_but_rescales_by_first_element() -> None:
    lin = PerTensorFp8Linear(32, 24, torch.bfloat16)
    lin.set_from_weight(_random_linear().weight)
    lin.input_scale.data = torch.linspace(0.5, 2.0, 32)
    x = torch.randn(2, 5, 32).bfloat16()
    a = (x.float() / lin.input_scale).clamp(-448, 448).bfloat16().to(FP8).float()
    expected = (a @ lin.weight[0].float().t()) * (lin.input_scale[0] * lin.weight_scale)
    out = lin(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 24)
    assert torch.equal(out, expected.bfloat16())


def test_per_channel_uses_smooth_scale_and_input_scale() -> None:
    lin = PerChannelFp8Linear(32, 24, torch.bfloat16)
    lin.set_from_weight(_random_linear().weight)
    lin.smooth_scale.data = torch.linspace(0.5, 2.0, 32)[None]
    lin.input_scale.data = torch.tensor([3.0])
    x = torch.randn(7, 32).bfloat16()
    a = (x.float() / lin.smooth_scale).clamp(-448, 448).bfloat16().to(FP8).float()
    expected = (a @ lin.weight[0].float().t()) * (lin.input_scale * lin.weight_scale)
    assert torch.equal(lin(x), expected.bfloat16())


def test_quantised_linear_approximates_the_bf16_linear() -> None:
    base = _random_linear()
    lin = PerTensorFp8Linear(32, 24, torch.bfloat16)
    lin.set_from_weight(base.weight)
    x = torch.randn(64, 32).bfloat16()
    assert rel_l2(lin(x).float(), base(x).float()) < 0.1


def test_swap_replaces_seven_linears_in_inner_layers_only() -> None:
    cfg = ModelConfig(
        num_layers=4,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=2,
        num_query_groups=1,
        kv_channels=16,
        caption_channels=16,
        caption_max_length=4,
    )
    with torch.device("meta"):
        model = swap_fp8_linears(DiT(cfg), cfg.num_layers)
    kinds = [
        sum(isinstance(m, (PerTensorFp8Linear, PerChannelFp8Linear)) for m in layer.modules())
        for layer in model.videodit_blocks.layers
    ]
    assert kinds == [0, 7, 7, 0]
    attn = model.videodit_blocks.layers[1].self_attention
    assert isinstance(attn.linear_proj, PerChannelFp8Linear) and isinstance(attn.linear_qkv.qx, PerTensorFp8Linear)
    assert isinstance(attn.linear_kv_xattn, torch.nn.Linear)
    assert [is_fp8_layer(i, 4) for i in range(4)] == [False, True, True, False]


def test_random_fp8_model_runs() -> None:
    cfg = ModelConfig(
        num_layers=3,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=2,
        num_query_groups=1,
        kv_channels=16,
        caption_channels=16,
        caption_max_length=4,
    )
    torch.manual_seed(0)
    model = swap_fp8_linears(DiT(cfg), cfg.num_layers, quantize_weights=True)
    x, y = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 4, 16)
    v = model(x, torch.rand(1, 1), y, torch.ones(1, 4), torch.tensor([False]), torch.tensor([[0, 8]]))
    assert v.shape == x.shape and torch.isfinite(v).all()


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="fp8 tensor cores (sm89+) not available: the scaled_mm path is GPU-only",
)
@pytest.mark.parametrize("rows", [64, 50])  # 50: padded to a multiple of 16 for cuBLASLt
def test_scaled_mm_matches_emulation_on_gpu(rows: int) -> None:
    gen = torch.Generator().manual_seed(0)
    a = (torch.randn(rows, 128, generator=gen) * 4).to(FP8).cuda()
    w = (torch.randn(96, 128, generator=gen) * 4).to(FP8).cuda()
    scale = torch.tensor(0.01, device="cuda")
    fast = fp8_matmul(a, w, scale, torch.bfloat16)
    exact = ((a.float() @ w.float().t()) * scale).bfloat16()
    assert fast.shape == (rows, 96) and fast.dtype == torch.bfloat16
    assert rel_l2(fast.float(), exact.float()) < 1e-2


# ---------------------------------------------------------------- memory (no float32 input copies)


def _fp8_memory_script():  # the module object of scripts/fp8_memory.py
    spec = importlib.util.spec_from_file_location("fp8_memory", REPO_ROOT / "scripts" / "fp8_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_blocked_quantisation_and_gemm_change_no_number(monkeypatch: pytest.MonkeyPatch) -> None:
    lin = PerChannelFp8Linear(32, 24, torch.bfloat16)
    lin.set_from_weight(_random_linear().weight)
    lin.smooth_scale.data = torch.linspace(0.01, 0.2, 32)[None]  # large quotients: the clamp is hit
    x = torch.randn(3, 37, 32).bfloat16() * 10
    whole, codes = lin(x), quantize_input(x, lin.smooth_scale).view(torch.uint8)
    monkeypatch.setattr(fp8, "BLOCK_ELEMENTS", 64)  # two rows per block, a ragged last block
    assert torch.equal(lin(x), whole)
    assert torch.equal(quantize_input(x, lin.smooth_scale).view(torch.uint8), codes)
    assert (codes == torch.tensor(FP8_MAX).to(FP8).view(torch.uint8)).any()  # the clamp was hit


def test_fp8_mlp_activation_peak_is_at_most_bf16s(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fp8, "BLOCK_ELEMENTS", 1 << 14)  # blocks small next to the 4096-token input
    script = _fp8_memory_script()
    tokens, hidden, ffn = 4096, 96, 256
    bf16_mlp, fp8_mlp = script.build_mlps(hidden, ffn)
    assert isinstance(fp8_mlp.linear_fc2, PerChannelFp8Linear)
    h = torch.randn(tokens, 1, hidden).bfloat16()
    with torch.inference_mode():
        bf16_peak = script.peak_extra_bytes(bf16_mlp, h)
        fp8_peak = script.peak_extra_bytes(fp8_mlp, h)
        fc2_in = torch.randn(tokens, ffn).bfloat16()
        quant_peak = script.peak_extra_bytes(quantize_input, fc2_in, fp8_mlp.linear_fc2.smooth_scale)
    assert bf16_peak >= 8 * tokens * ffn  # fc1's output + SwiGLU's two temporaries (bf16): the tracker counts
    assert fp8_peak <= bf16_peak
    # Quantising holds the e4m3 result plus one float32 block (and its bf16 rounding), never a
    # float32 copy of the input (4 bytes per element).
    assert quant_peak <= tokens * ffn + 6 * fp8.BLOCK_ELEMENTS
