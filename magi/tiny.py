"""Write a tiny random MAGI-1 checkpoint set in exactly the official layout, for offline demos and tests.

    python scripts/make_tiny_checkpoint.py --out example/tiny/checkpoints   (python -m magi.demo uses it too)

Everything is random (seeded, so the files are the same on every run) and small (seconds on a CPU):

    <out>/magi/tiny/inference_weight/   model-0000{1,2}-of-00002.safetensors + model.safetensors.index.json
                                        (magi's own DiT class, the model_config of the tiny config, bf16
                                        like the released files)
    <out>/t5/t5-v1_1-xxl/               Hugging Face T5 encoder files (T5Config / T5EncoderModel, width
                                        = caption_channels) + a sentencepiece tokenizer trained here on
                                        generated text, with T5's 100 <extra_id_*> tokens
    <out>/vae/                          config.json (_class_name ViTVAE, ddconfig) +
                                        diffusion_pytorch_model.safetensors (magi's ViTVAE, bf16)
    <out>/special_tokens.npz            caption_token [1, C], logo_token [1, C], other_tokens [100, C]

So the same loaders read the tiny and the real checkpoints. The DiT size comes from the config
(default ``TINY_CONFIG``, the model / runtime / engine config of example/tiny/config.json); its
runtime_config paths should point at <out> (``tiny_config_dict(out)``).
"""

from __future__ import annotations

import io
import json
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from magi.config import MagiConfig, config_from_dict, load_config

# The tiny demo's config (example/tiny/config.json without its paths): 3 layers, 128 wide, 64x64 video.
TINY_CONFIG: dict = {
    "model_config": {
        "model_name": "videodit_ardf",
        "num_layers": 3,
        "hidden_size": 128,
        "ffn_hidden_size": 512,
        "num_attention_heads": 4,
        "num_query_groups": 2,
        "kv_channels": 32,
        "layernorm_epsilon": 1e-06,
        "apply_layernorm_1p": True,
        "x_rescale_factor": 1,
        "half_channel_vae": False,
        "params_dtype": "torch.float32",
        "patch_size": 2,
        "t_patch_size": 1,
        "in_channels": 16,
        "out_channels": 16,
        "cond_hidden_ratio": 0.25,
        "caption_channels": 64,
        "caption_max_length": 800,
        "xattn_cond_hidden_ratio": 1.0,
        "cond_gating_ratio": 1.0,
        "gated_linear_unit": False,
    },
    "runtime_config": {
        "cfg_number": 3,
        "cfg_t_range": [0.0, 0.0217, 0.1, 0.3, 0.999],
        "prev_chunk_scales": [1.5, 1.5, 1.5, 1.0, 1.0],
        "text_scales": [7.5, 7.5, 7.5, 0.0, 0.0],
        "noise2clean_kvrange": [5, 4, 3, 2],
        "clean_chunk_kvrange": 1,
        "clean_t": 0.9999,
        "seed": 1234,
        "num_frames": 96,
        "video_size_h": 64,
        "video_size_w": 64,
        "num_steps": 8,
        "window_size": 4,
        "fps": 24,
        "chunk_width": 6,
        "t5_device": "cpu",
        "scale_factor": 0.18215,
        "temporal_downsample_factor": 4,
    },
    "engine_config": {
        "distributed_backend": "gloo",
        "distributed_timeout_minutes": 15,
        "pp_size": 1,
        "cp_size": 1,
        "cp_strategy": "none",
        "ulysses_overlap_degree": 1,
        "fp8_quant": False,
        "distill_nearly_clean_chunk_threshold": 0.3,
        "shortcut_mode": "8,16,16",
        "distill": False,
        "kv_offload": False,
        "enable_cuda_graph": False,
    },
}


def tiny_config_dict(checkpoints: str | Path) -> dict:
    """TINY_CONFIG with its runtime_config paths at a tiny checkpoint folder (absolute)."""
    root = Path(checkpoints).resolve()
    data = json.loads(json.dumps(TINY_CONFIG))  # a deep copy
    data["runtime_config"].update(
        load=str(root / "magi" / "tiny"), t5_pretrained=str(root / "t5"), vae_pretrained=str(root / "vae")
    )
    return data


SP_PIECES = 400  # sentencepiece vocabulary (pad, eos, unk + learned pieces)
EXTRA_IDS = 100  # T5's sentinel tokens <extra_id_0> .. <extra_id_99>
T5_VOCAB = 512  # embedding rows: SP_PIECES + EXTRA_IDS, rounded up as T5 checkpoints do
MAX_DIT_PARAMS = 50_000_000  # a real model_config (billions) would take minutes and gigabytes
TINY_VAE_DDCONFIG = {
    "video_size": 32,
    "video_length": 16,
    "patch_size": 8,
    "patch_length": 4,
    "in_chans": 3,
    "z_chans": 16,
    "double_z": True,
    "embed_dim": 256,
    "depth": 2,
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
_WORDS = (
    "a the of and in on with under over near by from into through across small large red "
    "blue green golden silver dark bright quiet busy old young happy slow fast cat dog bird "
    "horse fish child woman man robot car train boat plane city forest river ocean mountain "
    "street garden kitchen window sky sun moon rain snow wind light shadow cloud tree flower "
    "field road bridge tower house door table chair book camera runs walks flies swims jumps "
    "dances sings looks turns smiles waves falls rises shines glows moves stands sits sleeps "
    "plays eats drinks reads writes opens closes good boy girl video scene shot close wide "
    "slowly gently suddenly together alone morning evening night summer winter spring autumn"
).split()


def _sentences(seed: int, count: int = 3000) -> list[str]:
    """Deterministic pseudo-captions to train the tiny tokenizer on."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words = rng.choices(_WORDS, k=rng.randint(4, 14))
        number = f" {rng.randint(0, 999)}" if rng.random() < 0.2 else ""
        out.append(" ".join(words).capitalize() + number + rng.choice([".", "!", ",", ""]))
    return out


def write_tokenizer(folder: Path, seed: int) -> None:
    """spiece.model (unigram, pad 0 / eos 1 / unk 2 as T5) + the HF tokenizer JSON files."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sentences(seed)),
        model_writer=model,
        vocab_size=SP_PIECES,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        seed_sentencepiece_size=100000,
        minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())
    extras = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    specials = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "additional_special_tokens": extras}
    tokenizer_config = {
        **specials,
        "extra_ids": EXTRA_IDS,
        "model_max_length": 512,
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=4) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=4) + "\n")


def write_t5(folder: Path, width: int, seed: int) -> None:
    """A 2-layer T5 v1.1-style encoder (gated GELU) of width `width`, saved as HF files."""
    from transformers import T5Config, T5EncoderModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    config = T5Config(
        vocab_size=T5_VOCAB,
        d_model=width,
        d_kv=16,
        d_ff=2 * width,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=max(1, width // 16),
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        architectures=["T5EncoderModel"],
    )
    torch.manual_seed(seed)
    T5EncoderModel(config).save_pretrained(str(folder))
    write_tokenizer(folder, seed)


def _save_sharded(state: dict[str, torch.Tensor], folder: Path, shards: int = 2) -> None:
    """model-0000k-of-0000n.safetensors + model.safetensors.index.json, like the released DiTs."""
    from safetensors.torch import save_file

    keys = list(state)
    per = -(-len(keys) // shards)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i * per : (i + 1) * per]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def dit_parameter_count(cfg: MagiConfig) -> int:
    """Parameters of the DiT that cfg.model_config describes (built on the meta device: no memory)."""
    from magi.models.dit import DiT

    with torch.device("meta"):
        return sum(p.numel() for p in DiT(cfg.model).parameters())


def write_dit(folder: Path, cfg: MagiConfig, seed: int) -> None:
    """magi's DiT with cfg.model_config, random init, stored in bf16 as the released checkpoints."""
    from magi.models.dit import DiT

    torch.manual_seed(seed)
    model = DiT(cfg.model)
    state = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
    _save_sharded(state, folder)


def write_vae(folder: Path, seed: int) -> None:
    """magi's ViTVAE with a tiny ddconfig, random init, diffusers-style folder, bf16."""
    from safetensors.torch import save_file

    from magi.models.vae import ViTVAE

    torch.manual_seed(seed)
    model = ViTVAE(dict(TINY_VAE_DDCONFIG))
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    config = {
        "_class_name": "ViTVAE",
        "_diffusers_version": "0.29.2",
        "ddconfig": TINY_VAE_DDCONFIG,
        "model_type": "vit",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_special_tokens(path: Path, width: int, seed: int) -> None:
    """Random float64 token vectors of L2 norm 8 (like the official ones), official array names."""
    rng = np.random.default_rng(seed)

    def rows(n: int) -> np.ndarray:
        v = rng.standard_normal((n, width))
        return 8.0 * v / np.linalg.norm(v, axis=1, keepdims=True)

    np.savez(path, caption_token=rows(1), logo_token=rows(1), other_tokens=rows(100))


def make_tiny_checkpoint(out: str | Path, config: str | Path | None = None, seed: int = 0, force: bool = False) -> Path:
    """Write the tiny checkpoint set into `out` (built in a temporary folder, then moved in place).

    Args:
        out: target folder; must not exist unless force.
        config: official-format config whose model_config sizes the DiT (caption_channels sizes
            T5 and the special tokens); its engine flags choose the weight folder name
            (default: ``TINY_CONFIG``).
        seed: base seed; each component uses its own offset.
        force: replace an existing `out`.

    Returns:
        `out` as a Path.
    """
    cfg = config_from_dict(tiny_config_dict(out), source="TINY_CONFIG") if config is None else load_config(config)
    if cfg.engine.fp8_quant:
        raise ValueError(f"{config}: fp8_quant tiny checkpoints are not supported; use a bf16/float32 config")
    params = dit_parameter_count(cfg)
    if params > MAX_DIT_PARAMS:
        raise ValueError(
            f"{config} describes a {params / 1e6:,.0f}M-parameter DiT; tiny checkpoints "
            f"allow at most {MAX_DIT_PARAMS / 1e6:.0f}M (use a small model_config such as "
            "example/tiny/config.json)"
        )
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    blocking = next((p for p in (out.parent, *out.parent.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"{blocking} is a file, not a folder; choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a parent is a file, or not writable
        raise ValueError(f"cannot create {out.parent} ({err.strerror or err}); choose another --out") from None
    width = cfg.model.caption_channels
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        root = Path(tmp) / "ckpt"
        dirs = {
            name: root / sub
            for name, sub in (
                ("dit", f"magi/tiny/{cfg.engine.weight_subdir}"),
                ("t5", "t5/t5-v1_1-xxl"),
                ("vae", "vae"),
            )
        }
        for d in dirs.values():
            d.mkdir(parents=True)
        write_dit(dirs["dit"], cfg, seed)
        write_t5(dirs["t5"], width, seed + 1)
        write_vae(dirs["vae"], seed + 2)
        write_special_tokens(root / "special_tokens.npz", width, seed + 3)
        for path in root.rglob("*"):  # temporary-folder files are private; these are for sharing
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out)
        root.rename(out)  # appears complete or not at all
    return out
