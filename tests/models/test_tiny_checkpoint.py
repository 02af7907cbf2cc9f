"""scripts/make_tiny_checkpoint.py: official layout, loads back through magi's own loaders, seeded."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from magi.config import check_paths, load_config
from tests.helpers import TINY_CONFIG, tiny_script


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint: Path) -> Path:
    """The session's tiny checkpoint: make_tiny_checkpoint(out, TINY_CONFIG, seed=0)."""
    return tiny_checkpoint


def _cfg(root: Path):
    cfg = load_config(TINY_CONFIG)
    runtime = dataclasses.replace(
        cfg.runtime, load=str(root / "magi" / "tiny"), t5_pretrained=str(root / "t5"), vae_pretrained=str(root / "vae")
    )
    return cfg.replace(runtime=runtime)


def test_official_layout(tiny):
    files = sorted(str(p.relative_to(tiny)) for p in tiny.rglob("*") if p.is_file())
    assert files == [
        "magi/tiny/inference_weight/model-00001-of-00002.safetensors",
        "magi/tiny/inference_weight/model-00002-of-00002.safetensors",
        "magi/tiny/inference_weight/model.safetensors.index.json",
        "special_tokens.npz",
        "t5/t5-v1_1-xxl/config.json",
        "t5/t5-v1_1-xxl/model.safetensors",
        "t5/t5-v1_1-xxl/special_tokens_map.json",
        "t5/t5-v1_1-xxl/spiece.model",
        "t5/t5-v1_1-xxl/tokenizer_config.json",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    check_paths(_cfg(tiny))
    index = json.loads((tiny / "magi/tiny/inference_weight/model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}


def test_dit_loads_back_and_equals_the_seeded_init(tiny):
    checkpoint = pytest.importorskip("magi.checkpoint")
    from magi.models.dit import DiT

    cfg = _cfg(tiny)
    model = checkpoint.load_dit(cfg, "cpu")
    torch.manual_seed(0)
    fresh = DiT(cfg.model).state_dict()
    loaded = model.state_dict()
    assert set(loaded) == set(fresh) and len(loaded) > 50
    for key, value in fresh.items():
        # Stored in bf16 like the released files; the float32 config widens them back exactly.
        assert torch.equal(loaded[key].float(), value.to(torch.bfloat16).float()), key


def test_vae_loads_back_and_runs(tiny):
    from magi.models.vae import ViTVAE, load_vae

    vae = load_vae(tiny / "vae", "cpu", torch.float32)
    assert vae.config.embed_dim == 256 and vae.config.z_chans == 16
    torch.manual_seed(2)  # the script's VAE seed (base seed + 2)
    fresh = ViTVAE(dict(tiny_script().TINY_VAE_DDCONFIG)).state_dict()
    for key, value in vae.state_dict().items():
        assert torch.equal(value, fresh[key].to(torch.bfloat16).float()), key
    torch.manual_seed(0)
    frames = torch.rand(1, 3, 4, 32, 32) * 2 - 1  # [B, C, T, H, W]
    with torch.no_grad():
        latent = vae.encode(frames)
    assert latent.shape == (1, 16, 1, 4, 4)
    assert torch.isfinite(latent).all() and latent.std() > 0


def test_t5_and_tokenizer_load_back(tiny):
    from magi.models.text_encoder import T5Encoder

    t5 = T5Encoder.from_pretrained(tiny / "t5")
    tok = t5.tokenizer
    assert len(tok) == 500
    assert tok.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>", "<pad>", "</s>"]) == [499, 400, 0, 1]
    ids, mask = t5.tokenize(["Good Boy"])
    assert tok.convert_ids_to_tokens(ids[0, :3].tolist()) == ["▁good", "▁boy", "</s>"]
    emb, mask = t5.encode(["Good Boy", "a red cat runs across the street"])
    assert emb.shape == (2, 800, 64)
    assert mask.sum(1).tolist()[0] == 3
    assert torch.isfinite(emb).all()


def test_special_tokens(tiny):
    data = np.load(tiny / "special_tokens.npz")
    assert {k: data[k].shape for k in data.files} == {
        "caption_token": (1, 64),
        "logo_token": (1, 64),
        "other_tokens": (100, 64),
    }
    assert data["other_tokens"].dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(data["other_tokens"], axis=1), 8.0, rtol=1e-12)


def test_seeded_and_refuses_to_overwrite(tiny, tmp_path):
    module = tiny_script()
    # The special tokens and the VAE do not depend on the DiT config: a second run reproduces them.
    module.write_special_tokens(tmp_path / "st.npz", 64, seed=3)
    again, first = np.load(tmp_path / "st.npz"), np.load(tiny / "special_tokens.npz")
    assert all(np.array_equal(again[k], first[k]) for k in first.files)
    with pytest.raises(FileExistsError, match="pass --force"):
        module.make_tiny_checkpoint(tiny, TINY_CONFIG)
    assert module.main(["--out", str(tiny)]) == 2


def test_tiny_config_passes_the_cli_checks(tiny, monkeypatch, tmp_path):
    from magi import infer

    data = json.loads(TINY_CONFIG.read_text())
    data["runtime_config"].update(
        load=str(tiny / "magi/tiny"), t5_pretrained=str(tiny / "t5"), vae_pretrained=str(tiny / "vae")
    )
    (tmp_path / "c.json").write_text(json.dumps(data))
    monkeypatch.setenv("SPECIAL_TOKEN_PATH", str(tiny / "special_tokens.npz"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg, request, _ = infer.prepare(
        [
            "--config",
            str(tmp_path / "c.json"),
            "--mode",
            "t2v",
            "--prompt",
            "Good Boy",
            "--output_path",
            str(tmp_path / "o.mp4"),
            "--device",
            "cpu",
        ]
    )
    assert cfg.model.num_layers == 3 and request.prompt == "Good Boy"


def test_cli_generates_an_mp4_from_the_tiny_checkpoint(tiny, monkeypatch, tmp_path):
    pytest.importorskip("magi.pipeline", reason="magi.pipeline is not part of this build yet")
    import imageio.v3 as iio

    from magi import infer

    data = json.loads(TINY_CONFIG.read_text())
    data["runtime_config"].update(
        load=str(tiny / "magi/tiny"), t5_pretrained=str(tiny / "t5"), vae_pretrained=str(tiny / "vae")
    )
    (tmp_path / "c.json").write_text(json.dumps(data))
    monkeypatch.setenv("SPECIAL_TOKEN_PATH", str(tiny / "special_tokens.npz"))
    monkeypatch.setenv("PAD_HQ", "1")
    monkeypatch.setenv("PAD_DURATION", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "out.mp4"
    argv = [
        "--config",
        str(tmp_path / "c.json"),
        "--mode",
        "t2v",
        "--prompt",
        "Good Boy",
        "--prompt",
        "Bad Cat",
        "--num_frames",
        "48",
        "--output_path",
        str(out),
        "--device",
        "cpu",
    ]
    assert infer.main(argv) == 0
    frames = iio.imread(out)  # [F, H, W, 3]
    assert frames.shape == (48, 64, 64, 3) and frames.dtype.name == "uint8"
    assert frames.std() > 0  # random weights: noise, but not a blank video
