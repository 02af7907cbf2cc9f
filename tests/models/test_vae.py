"""ViTVAE parity with the official fixtures (vae.safetensors) and loader / input checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from einops import rearrange
from safetensors.torch import load_file, save_file

from magi.models.vae import (
    TileSpec,
    ViTVAE,
    load_vae,
    tile_spec_for_fps,
    tiled_decode,
    tiled_encode,
)
from tests.helpers import load_fixture, rel_l2

SCALE = 0.18215
FP32_TOL = 1e-5  # float32 reimplementation vs float32 reference: accumulation order only
# bf16 emulation: bit-identical on an Intel CPU, 5.4e-3 on an AMD EPYC (its bf16 kernels round
# differently; one bf16 ulp is 7.8e-3 relative), so the tolerance is about one ulp
BF16_TOL = 1e-2

TINY_DDCONFIG = {
    "video_size": 32,
    "video_length": 16,
    "patch_size": 8,
    "patch_length": 4,
    "in_chans": 3,
    "z_chans": 16,
    "double_z": True,
    "embed_dim": 256,
    "depth": 1,
    "num_heads": 4,
    "mlp_ratio": 2.0,
    "qkv_bias": True,
    "qk_scale": None,
    "ln_in_attn": True,
    "with_cls_token": True,
    "conv_last_layer": True,
    "use_rope": False,
    "use_final_proj": False,
    "norm_code": False,
    "drop_rate": 0.0,
    "attn_drop_rate": 0.0,
    "drop_path_rate": 0.0,
}


@pytest.fixture(scope="module")
def fixture(reference_dir: Path) -> dict[str, torch.Tensor]:
    return load_fixture(reference_dir, "vae")[0]


@pytest.fixture(scope="module")
def vae32(reference_dir: Path) -> ViTVAE:
    return load_vae(reference_dir / "checkpoints" / "vae", dtype=torch.float32)


@pytest.fixture(scope="module")
def vae16(reference_dir: Path) -> ViTVAE:
    return load_vae(reference_dir / "checkpoints" / "vae", dtype=torch.bfloat16)


def test_fp32_encode_decode(fixture: dict, vae32: ViTVAE) -> None:
    x = fixture["fp32.video_uint8"].float() / 127.5 - 1
    assert rel_l2(vae32.encode_moments(x), fixture["fp32.moments"]) <= FP32_TOL
    assert rel_l2(vae32.encode(x), fixture["fp32.posterior_mean"]) <= FP32_TOL
    decoded = vae32.decode(fixture["fp32.posterior_mean"])
    assert decoded.shape == (1, 3, 8, 48, 64)
    assert rel_l2(decoded, fixture["fp32.decoded"]) <= FP32_TOL


def test_fp32_single_image(fixture: dict, vae32: ViTVAE) -> None:
    x = fixture["fp32.video_uint8"][:, :, :1].float() / 127.5 - 1
    latent = vae32.encode(x)
    assert latent.shape == (1, 16, 1, 6, 8)
    assert rel_l2(latent, fixture["fp32.image_latent"]) <= FP32_TOL
    decoded = vae32.decode(fixture["fp32.image_latent"])
    assert decoded.shape == (1, 3, 1, 48, 64)  # one latent frame -> one pixel frame
    assert rel_l2(decoded, fixture["fp32.image_decoded"]) <= FP32_TOL


def test_bf16_qkv_changes_fp32_result(fixture: dict, vae32: ViTVAE) -> None:
    # the official hard-coded bf16 q/k/v is a real (small) perturbation of exact fp32
    x = fixture["fp32.video_uint8"].float() / 127.5 - 1
    vae32.bf16_qkv = True
    try:
        err = rel_l2(vae32.encode(x), fixture["fp32.posterior_mean"])
    finally:
        vae32.bf16_qkv = False
    assert 1e-5 < err < 5e-2


def test_pipe_encode_decode_bf16(fixture: dict, vae16: ViTVAE) -> None:
    video = rearrange(fixture["pipe.video_thwc_uint8"], "t h w c -> 1 c t h w")
    latent = tiled_encode(vae16, (video.float() / 127.5 - 1).bfloat16(), TileSpec()) * SCALE
    assert latent.dtype == torch.bfloat16 and latent.shape == (1, 16, 6, 8, 8)
    assert rel_l2(latent, fixture["pipe.latent_scaled"]) <= BF16_TOL
    decoded = tiled_decode(vae16, fixture["pipe.latent_scaled"].float() / SCALE, TileSpec())
    frames = rearrange((decoded * 127.5 + 127.5).clamp(0, 255).to(torch.uint8), "b c t h w -> (b t) c h w")
    diff = (frames.int() - fixture["pipe.decoded_tchw_uint8"].int()).abs()
    assert frames.shape == (24, 3, 64, 64) and diff.max() <= 2


def test_tiled_blending_bf16(fixture: dict, vae16: ViTVAE) -> None:
    spec = TileSpec(size=64, frames=12)  # 96x80 px -> 2x2 blended tiles; 16 frames -> 12 + 4
    x = (fixture["tiled.video_ncthw_uint8"].float() / 127.5 - 1).bfloat16()
    latent = tiled_encode(vae16, x, spec)
    assert latent.shape == (1, 16, 4, 12, 10)
    assert rel_l2(latent, fixture["tiled.latent"]) <= BF16_TOL
    decoded = rearrange(tiled_decode(vae16, fixture["tiled.latent"].float(), spec), "b c t h w -> (b t) c h w")
    assert decoded.shape == (13, 3, 96, 80)  # official quirk: 3 + 1 latents -> 12 + 1 frames
    assert rel_l2(decoded, fixture["tiled.decoded_float"]) <= BF16_TOL


def test_tiled_equals_untiled_when_one_tile(vae32: ViTVAE) -> None:
    torch.manual_seed(0)
    x = torch.rand(1, 3, 12, 48, 64) * 2 - 1
    assert torch.equal(tiled_encode(vae32, x, TileSpec()), vae32.encode(x))
    z = torch.randn(1, 16, 3, 6, 8)
    assert torch.allclose(tiled_decode(vae32, z, TileSpec(), autocast=False), vae32.decode(z))


def test_tiled_any_resolution_fp32(vae32: ViTVAE) -> None:
    # 3x3 spatial tiles with a short trailing tile; output size follows the input exactly
    torch.manual_seed(1)
    x = torch.rand(1, 3, 4, 136, 144) * 2 - 1
    latent = tiled_encode(vae32, x, TileSpec(size=64))
    assert latent.shape == (1, 16, 1, 17, 18) and torch.isfinite(latent).all()
    video = tiled_decode(vae32, latent, TileSpec(size=64), autocast=False)
    assert video.shape == (1, 3, 1, 136, 144)
    # the first tile's kept corner is never blended: it is that tile encoded alone
    assert torch.equal(latent[..., :6, :6], vae32.encode(x[..., :64, :64])[..., :6, :6])
    # the seam rows are the ramp between the two stored tiles
    above, below = vae32.encode(x[..., :64, :64]), vae32.encode(x[..., 48:112, :64])
    w = torch.tensor([0.0, 0.5]).view(2, 1)
    ramp = above[..., 6:8, :6] * (1 - w) + below[..., :2, :6] * w
    assert torch.allclose(latent[..., 6:8, :6], ramp, atol=1e-6)


def test_tile_spec_for_fps() -> None:
    assert tile_spec_for_fps(24) == tile_spec_for_fps(24, "official") == TileSpec(frames=12)
    assert tile_spec_for_fps(30, "official").frames == 15
    assert tile_spec_for_fps(30).frames == 12
    with pytest.raises(ValueError, match="compat"):
        tile_spec_for_fps(24, "other")
    with pytest.raises(ValueError, match="at least 4 frames"):
        tile_spec_for_fps(6, "official")
    assert tile_spec_for_fps(6).frames == 4
    with pytest.raises(ValueError, match="multiple of 8"):
        TileSpec(size=60)


def test_random_init_tiny_model() -> None:
    vae = ViTVAE(TINY_DDCONFIG, bf16_qkv=False).eval()
    x = torch.rand(1, 3, 8, 32, 48) * 2 - 1
    z = vae.encode(x)
    assert z.shape == (1, 16, 2, 4, 6) and z.std() > 1e-3
    assert vae.decode(z).shape == (1, 3, 8, 32, 48)
    assert vae.encode(x[:, :, :1]).shape == (1, 16, 1, 4, 6)
    vae.reset_parameters(seed=3)
    first = vae.encoder.pos_embed.clone()
    vae.reset_parameters(seed=3)
    assert torch.equal(first, vae.encoder.pos_embed)


def test_input_checks() -> None:
    vae = ViTVAE(TINY_DDCONFIG)
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 4, 30, 32))
    with pytest.raises(ValueError, match="1 or at least 4 frames"):
        vae.encode(torch.zeros(1, 3, 2, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 16, T, H, W\]"):
        vae.decode(torch.zeros(1, 8, 1, 4, 4))
    with pytest.raises(ValueError, match="unknown field"):
        ViTVAE({**TINY_DDCONFIG, "bogus": 1})
    with pytest.raises(ValueError, match="use_rope"):
        ViTVAE({**TINY_DDCONFIG, "use_rope": True})


def _copy_vae(reference_dir: Path, dst: Path) -> Path:
    shutil.copytree(reference_dir / "checkpoints" / "vae", dst)
    return dst


def test_load_vae_errors(reference_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(tmp_path / "nowhere")
    folder = _copy_vae(reference_dir, tmp_path / "vae")
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state.pop("decoder.norm.bias")
    state["encoder.extra"] = torch.zeros(1)
    state["encoder.cls_token"] = torch.zeros(1, 1, 8)
    save_file(state, str(weights))
    with pytest.raises(
        ValueError,
        match=r"missing \['decoder.norm.bias'\].*encoder.extra.*"
        r"encoder.cls_token",
    ):
        load_vae(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="ViTVAE"):
        load_vae(folder)
    weights.unlink()
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_vae(folder)


def test_load_vae_dtype_and_keys(reference_dir: Path, vae16: ViTVAE) -> None:
    assert vae16.dtype == torch.bfloat16 and vae16.bf16_qkv
    assert not load_vae(reference_dir / "checkpoints" / "vae").bf16_qkv
    weights = reference_dir / "checkpoints/vae/diffusion_pytorch_model.safetensors"
    keys = set(load_file(str(weights)))
    assert set(vae16.state_dict()) == keys
