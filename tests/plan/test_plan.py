"""magi.plan: the fake-tensor simulation against a real CPU run and a hand count (tiny model)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from magi import plan as magi_plan
from magi.attention import sdpa
from magi.config import load_config
from magi.media.latents import decode_to_uint8
from magi.models.dit import DiT
from magi.models.vae import VAEConfig, ViTVAE
from magi.sampling.denoise import SamplerSettings, denoise
from magi.tiny import TINY_VAE_DDCONFIG

TINY = "example/tiny/config.json"


@pytest.fixture(scope="module")
def cfg():
    return load_config(TINY)


@pytest.fixture(scope="module")
def tiny_plan(cfg):
    return magi_plan.estimate(cfg, kv_offload=False, t5_on_gpu=False, cp_size=1)


class _Measured(nn.Module):
    """The real tiny DiT; each call's new-storage peak measured with the same byte tracker."""

    def __init__(self, dit: DiT) -> None:
        super().__init__()
        self.dit, self.config, self.peak = dit, dit.config, 0

    def forward(self, *args, **kwargs):
        with magi_plan.LiveBytes() as live:
            out = self.dit(*args, **kwargs)
        self.peak = max(self.peak, live.peak)
        return out


def test_planning_attention_equals_the_sdpa_backend():
    torch.manual_seed(0)
    q, k, v = torch.randn(40, 4, 8), torch.randn(30, 2, 8), torch.randn(30, 2, 8)
    qr = torch.tensor([[0, 10], [10, 25], [25, 40], [40, 40]])
    kr = torch.tensor([[0, 10], [0, 30], [10, 20], [0, 5]])
    torch.testing.assert_close(magi_plan.attention(q, k, v, qr, kr), sdpa.attention(q, k, v, qr, kr))


def test_weights_are_the_real_models_bytes(cfg, tiny_plan):
    dit = DiT(cfg.model).promote_precision()
    real = sum(p.nbytes for p in dit.parameters()) + sum(b.nbytes for b in dit.buffers())
    assert tiny_plan.weights_bytes == real


def test_activation_peak_matches_a_real_cpu_run_within_5_percent(cfg, tiny_plan):
    torch.manual_seed(0)
    m, rt = cfg.model, cfg.runtime
    model = _Measured(DiT(m).promote_precision().eval())
    settings = SamplerSettings.from_config(cfg, prev_chunks_scale_value=0.7)
    plan = settings.plan(tiny_plan.chunks)
    h, w = rt.video_size_h // 8, rt.video_size_w // 8
    noise = torch.randn(1, m.in_channels, plan.chunk_num * rt.chunk_width, h, w)
    caps = magi_plan.FullCaptions(m.caption_max_length, m.caption_channels)
    with magi_plan.planning_attention():  # the fused-kernel path the plan simulates
        chunks = [c for c, _ in denoise(model, plan, settings, caps, noise)]
    assert chunks == list(range(plan.chunk_num))
    assert model.peak > 0
    assert abs(tiny_plan.activation_peak_bytes - model.peak) / model.peak < 0.05


def _hand_count(cfg, r: int, keys: list[int], caption: int) -> int:
    """FLOPs of one tiny pass, every GEMM written out (docs/PERFORMANCE.md, "magi.plan")."""
    m, rt = cfg.model, cfg.runtime
    d, f, hd, n, g = m.hidden_size, m.ffn_hidden_size, m.kv_channels, m.num_attention_heads, m.num_query_groups
    dc, dx = int(d * m.cond_hidden_ratio), int(d * m.xattn_cond_hidden_ratio)
    patch = m.t_patch_size * m.patch_size**2
    c = (
        rt.chunk_width
        // m.t_patch_size
        * (rt.video_size_h // 8 // m.patch_size)
        * (rt.video_size_w // 8 // m.patch_size)
    )
    s, ntok = r * c, r * caption
    fc1 = 2 * f if m.gated_linear_unit else f
    layer = 2 * s * (2 * d * n * hd + 2 * d * g * hd + 2 * n * hd * d + d * fc1 + f * d)
    layer += 2 * ntok * dx * 2 * g * hd + 2 * r * dc * 2 * d  # linear_kv_xattn, adaLN gates
    layer += 4 * c * (sum(keys) + ntok) * n * hd  # self + cross attention
    total = m.num_layers * layer + 2 * s * m.in_channels * patch * d + 2 * s * d * patch * m.out_channels
    total += 2 * r * (256 * dc + dc * dc) + 2 * ntok * m.caption_channels * dx + 2 * m.caption_channels * dc
    return total


@pytest.mark.parametrize("chunks, history", [(1, 0), (4, 0), (3, 2)])
def test_pass_flops_match_the_hand_count_within_1_percent(cfg, chunks, history):
    _, flops = magi_plan.pass_cost(cfg, chunks, history, caption_tokens=40)
    c = 6 * 4 * 4  # tiny 64x64: 8x8 latents, 2x2 patches, 6 frames
    keys = [(history + j + 1) * c for j in range(chunks)]
    expected = _hand_count(cfg, chunks, keys, 40)
    assert abs(flops - expected) / expected < 0.01


def test_totals_kv_and_fit(cfg, tiny_plan):
    assert tiny_plan.dit_passes > 0 and tiny_plan.flops_total >= tiny_plan.flops_per_window_step > 0
    m = cfg.model
    row = 96 * m.num_query_groups * 2 * m.kv_channels * 4  # one chunk, one layer, float32
    assert tiny_plan.kv_cache_device_bytes == m.num_layers * row  # 1 cached chunk
    off = magi_plan.estimate(cfg, kv_offload=True, t5_on_gpu=False, cp_size=1)
    assert off.kv_cache_device_bytes == 0 and off.kv_cache_host_bytes == tiny_plan.kv_cache_device_bytes
    resident = tiny_plan.weights_bytes + tiny_plan.vae_weights_bytes + tiny_plan.kv_cache_device_bytes
    during = max(tiny_plan.activation_peak_bytes, tiny_plan.vae_decode_peak_bytes)
    assert tiny_plan.vae_weights_bytes > 0 and tiny_plan.vae_decode_peak_bytes > 0
    assert tiny_plan.peak_bytes == resident + during
    fit = magi_plan.estimate(cfg, gpu_memory_bytes=tiny_plan.peak_bytes)
    assert fit.fits


def test_check_fits_refuses_in_one_line_naming_a_setting(cfg):
    small = replace(cfg, engine=replace(cfg.engine, kv_offload=False), runtime=replace(cfg.runtime, t5_device="cuda"))
    t5 = magi_plan.t5_bytes(True)
    with pytest.raises(ValueError) as err:
        magi_plan.check_fits(small, t5)  # T5 alone fills it; T5 on the CPU fits
    msg = str(err.value)
    assert "\n" not in msg and len(msg) <= 200 and "t5_device cpu" in msg
    assert magi_plan.check_fits(cfg, 10 * 2**30).fits


def test_cli_json(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "magi.plan", "--config_file", TINY, "--gpu_mem", "8GiB", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    got = json.loads(out)
    for key in ("weights_bytes", "peak_bytes", "flops_per_window_step", "flops_total", "fits", "vae_decode_peak_bytes"):
        assert key in got
    assert got["fits"] is True


def _flash_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """The fused CPU kernel's FLOPs for the real run: QKᵀ and PV, 2·b·h·l·m·(D + Dv)."""
    b, h, lq, d = q_shape
    return 2 * b * h * lq * k_shape[2] * (d + v_shape[3])


def test_video_flops_equal_a_real_cpu_runs_count(cfg, tiny_plan):
    """The plan measures one pass per shape and adds attention from the ranges; a real run of the
    whole tiny loop, every pass through torch's FLOP counter, gives the same number."""
    torch.manual_seed(0)
    m, rt = cfg.model, cfg.runtime
    dit = DiT(m).promote_precision().eval()
    settings = SamplerSettings.from_config(cfg, prev_chunks_scale_value=0.7)
    plan = settings.plan(tiny_plan.chunks)
    noise = torch.randn(1, m.in_channels, plan.chunk_num * rt.chunk_width, rt.video_size_h // 8, rt.video_size_w // 8)
    caps = magi_plan.FullCaptions(m.caption_max_length, m.caption_channels)
    rules = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _flash_flops}
    with magi_plan.planning_attention(), FlopCounterMode(display=False, custom_mapping=rules) as counter:
        for _ in denoise(dit, plan, settings, caps, noise):
            pass
    assert tiny_plan.flops_total == counter.get_total_flops()


def test_fp8_activation_peak_is_at_most_bf16s(cfg):
    """On fake tensors the fp8 Linears take the GPU path (``_scaled_mm``), whose only extra
    memory is the e4m3 input copy: no float32 copies of weights or inputs."""
    bf16 = magi_plan.pass_cost(cfg, 5, 1)[0]
    fp8 = magi_plan.pass_cost(replace(cfg, engine=replace(cfg.engine, fp8_quant=True)), 5, 1)[0]
    assert 0 < fp8 <= bf16


def test_vae_decode_peak_matches_a_real_cpu_decode_within_5_percent(cfg):
    """One chunk's tiled decode (2 x 2 spatial tiles, 2 temporal tiles) of a 4-block bf16 VAE:
    the fake run (2 blocks, each tile shape decoded once) against the real decode's tracked peak."""
    torch.manual_seed(0)
    vae_cfg = replace(VAEConfig.from_dict(TINY_VAE_DDCONFIG), depth=4)
    video = magi_plan.with_video(cfg, video_size_h=320, video_size_w=384)
    rt = video.runtime
    predicted = magi_plan.vae_decode_peak(video, vae_cfg)
    vae = ViTVAE(vae_cfg).to(torch.bfloat16).eval()
    latent = torch.randn(1, 16, rt.chunk_width, rt.video_size_h // 8, rt.video_size_w // 8)
    with magi_plan.LiveBytes() as live:
        frames = decode_to_uint8(vae, latent, fps=rt.fps, scale_factor=rt.scale_factor)
    assert frames.shape == (24, 3, 320, 384)
    assert abs(predicted - live.peak) / live.peak < 0.05


def test_t5_encode_peak_matches_a_real_cpu_encode_within_5_percent():
    """One prompt's encode (800 tokens, float32, eager attention, as ``T5Encoder.encode``) of a
    4-layer T5 v1.1 encoder: the fake run (2 layers) against the real run's tracked peak."""
    transformers = pytest.importorskip("transformers")
    d, f, n, h, dk, vocab = 64, 128, 4, 4, 16, 512
    predicted = magi_plan.t5_encode_peak(d, f, n, h, dk, vocab, 800)
    config = transformers.T5Config(vocab_size=vocab, d_model=d, d_kv=dk, d_ff=f, num_layers=n, num_heads=h,
                                   feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(config).eval()
    ids, mask = torch.randint(2, vocab, (1, 800)), torch.ones(1, 800, dtype=torch.long)
    mask[:, 300:] = 0
    with torch.no_grad(), magi_plan.LiveBytes() as live:
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    assert out.shape == (1, 800, d) and predicted > 0
    assert abs(predicted - live.peak) / live.peak < 0.05
