"""DiT: official state-dict layout at the released sizes, and forward parity per official pass.

The parity cases rebuild each recorded pass of the t2v fixtures (``call.<tag>.pass<k>``) from
the call inputs exactly as the official dispatcher does (pass 0: prompt captions; pass 1: null
captions, writes the cache; pass 2: the denoising chunks as a batch, null captions, no cache;
distill: one pass with a copy of the first denoising chunk appended) and compare with the
recorded pass output.
"""

from __future__ import annotations

import dataclasses
import json
from functools import cache
from pathlib import Path

import pytest
import torch

from magi.config import MagiConfig, ModelConfig
from magi.fp8 import swap_fp8_linears
from magi.models.dit import DiT
from magi.models.kv_cache import KVCache
from tests.helpers import load_fixture, rel_l2
from tests.models.helpers import OFFICIAL_4P5B, OFFICIAL_24B, dit_inputs, reference_config, small_config

FP32_TOL = 1e-5  # float32 fixtures: exact math up to accumulation order
# The fp8 run emulates bf16 + fp8 GPU arithmetic. It agrees bit for bit (rel L2 0.0: every pass
# output and every layer's cache rows) once bf16 attention rounds like the flash kernels. Any
# one-ulp bf16 difference would show as ~1e-2 here, because the next layer's e4m3 re-quantisation
# amplifies it. On an Intel CPU every pass is exact; on an AMD EPYC (measured 2026-12-04) the CPU
# bf16 kernels round a few values differently and one pass (cached_extra) is 6.5e-3 off, so the
# bound admits such one-ulp flips.
FP8_TOL = 2e-2


# ---------------------------------------------------------------- state-dict layout (meta device)


@pytest.mark.parametrize(
    ("name", "model_config", "fp8"),
    [
        ("4.5B_base", OFFICIAL_4P5B, False),
        ("24B_base", OFFICIAL_24B, False),
        ("4.5B_distill_quant", OFFICIAL_4P5B, True),
        ("24B_distill_quant", OFFICIAL_24B, True),
    ],
)
def test_state_dict_matches_official_manifest(
    reference_dir: Path, name: str, model_config: ModelConfig, fp8: bool
) -> None:
    manifest = json.loads((reference_dir / "manifests" / f"official_dit_{name}.json").read_text())
    with torch.device("meta"):
        model = DiT(model_config)
        if fp8:
            swap_fp8_linears(model, model_config.num_layers)
    got = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()}
    assert list(got) == list(manifest["state_dict"])  # same keys in the same order
    assert got == manifest["state_dict"]
    assert sum(v.numel() for v in model.state_dict().values()) == manifest["num_params"]


def test_promote_precision_follows_official_map() -> None:
    with torch.device("meta"):
        model = DiT(dataclasses.replace(OFFICIAL_4P5B, num_layers=2)).promote_precision()
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    assert dtypes["videodit_blocks.final_layernorm.weight"] == torch.float32
    assert dtypes["videodit_blocks.layers.1.self_attention.q_layernorm.bias"] == torch.float32
    assert dtypes["videodit_blocks.layers.1.mlp_post_norm.weight"] == torch.float32
    assert dtypes["videodit_blocks.layers.1.self_attention.q_layernorm_xattn.weight"] == torch.bfloat16
    assert dtypes["videodit_blocks.layers.1.mlp.linear_fc1.weight"] == torch.bfloat16


# ---------------------------------------------------------------- forward parity


@cache
def _model(reference_dir: Path, config_name: str) -> tuple[DiT, MagiConfig]:
    from magi.checkpoint import load_dit

    cfg = reference_config(reference_dir, config_name)
    return load_dit(cfg, "cpu"), cfg


@cache
def _fixture(reference_dir: Path, case: str) -> tuple[dict, dict]:
    return load_fixture(reference_dir, f"pipeline_{case}")


def distill_step(num_steps: int, interval: float) -> float:
    """Step size d of the distill embedding (dit.md §5.1)."""
    return 4 / interval * 2 if num_steps == 12 else num_steps / 2


def run_pass(
    model: DiT, cfg: MagiConfig, tensors: dict, meta: dict, tag: str, k: int
) -> tuple[torch.Tensor, KVCache | None, int]:
    """Rebuild pass k of call <tag> from the call inputs and run it; returns (out, cache, slice_point)."""
    pre, cw = f"call.{tag}.pass{k}", cfg.runtime.chunk_width
    info, kwargs = meta["passes"][pre], meta["passes"][pre]["kwargs"]
    x0, mask, y_valid = (tensors[f"call.{tag}.in.{n}"] for n in ("x0", "mask", "y_valid"))
    y = torch.zeros(*mask.shape, y_valid.shape[-1])
    y[mask == 1] = y_valid
    r = x0.shape[2] // cw
    t, kv_range = tensors[f"{pre}.in.t"], tensors[f"{pre}.in.kv_range"]
    if k == 2:  # unconditional: the last t.shape[0] chunks as a batch, null captions
        nb = t.shape[0]
        x = torch.stack(x0[0].split(cw, dim=1)[r - nb :])
        ys, ms = y[r:][r - nb :], mask[r:][r - nb :]
    else:
        x, ys, ms = x0, (y[:r] if k == 0 else y[r:]), (mask[:r] if k == 0 else mask[r:])
        if info["x_shape"][2] > x0.shape[2]:  # distill: copy of the first denoising chunk appended
            j = int(kwargs["fwd_extra_1st_chunk"])
            x = torch.cat([x0, x0[:, :, j * cw : (j + 1) * cw]], dim=2)
            ys, ms = torch.cat([ys, ys[j : j + 1]]), torch.cat([ms, ms[j : j + 1]])
    sp = kwargs["slice_point"]
    cache = None
    if info["uses_kv_cache"]:
        cache = KVCache(max_chunks=4)
        for layer in range(len(model.videodit_blocks.layers)):
            rows = tensors.get(f"call.{tag}.kv_cache_before.layer{layer}")
            if rows is not None and rows.shape[0]:
                cache.write(layer, 0, rows, rows.shape[0] // sp)
    writes = 0
    if info["update_kv_cache"] and (kwargs["fwd_extra_1st_chunk"] or sp > 0):
        writes = x.shape[2] // cw - int(bool(kwargs["distill_nearly_clean_chunk"]) and cfg.engine.distill)
    d = distill_step(kwargs["num_steps"], kwargs["distill_interval"]) if cfg.engine.distill else None
    drop = tensors[f"{pre}.in.caption_dropout_mask"]
    out = model(x, t, ys, ms, drop, kv_range, slice_point=sp, kv_cache=cache, cache_write_chunks=writes, distill_step=d)
    return out, cache, sp


BASE_PASSES = [
    (case, config, tag, k)
    for case, config, tags in (
        ("t2v_4p5b_base", "tiny_4p5b_base", ("first_window", "cached", "cached_extra")),
        ("t2v_24b_base", "tiny_24b_base", ("first_window", "cached_extra")),
    )
    for tag in tags
    for k in range(3)
]


@pytest.mark.parametrize(("case", "config", "tag", "k"), BASE_PASSES)
def test_forward_parity_fp32(reference_dir: Path, case: str, config: str, tag: str, k: int) -> None:
    model, cfg = _model(reference_dir, config)
    tensors, meta = _fixture(reference_dir, case)
    out, cache, sp = run_pass(model, cfg, tensors, meta, tag, k)
    ref = tensors[f"call.{tag}.pass{k}.out"]
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_l2(out, ref) <= FP32_TOL
    if (
        meta["passes"][f"call.{tag}.pass{k}"]["update_kv_cache"]
        and f"call.{tag}.kv_cache_after_clean_chunk.layer0" in tensors
    ):
        for layer in range(len(model.videodit_blocks.layers)):
            got = cache.read(layer, sp, sp + 1, torch.device("cpu"))
            assert rel_l2(got, tensors[f"call.{tag}.kv_cache_after_clean_chunk.layer{layer}"]) <= FP32_TOL


@pytest.mark.parametrize("tag", ["first_window", "cached_extra"])
def test_forward_parity_fp8(reference_dir: Path, tag: str) -> None:
    model, cfg = _model(reference_dir, "tiny_4p5b_distill_quant")
    tensors, meta = _fixture(reference_dir, "t2v_4p5b_distill_quant")
    out, cache, sp = run_pass(model, cfg, tensors, meta, tag, 0)
    ref = tensors[f"call.{tag}.pass0.out"]
    assert rel_l2(out, ref) <= FP8_TOL
    if tag == "cached_extra":
        cached = [cache.read(i, sp, sp + 1, torch.device("cpu")) for i in range(3)]
        refs = [tensors[f"call.{tag}.kv_cache_after_clean_chunk.layer{i}"] for i in range(3)]
        assert all(rel_l2(c, r) <= FP8_TOL for c, r in zip(cached, refs))


# ---------------------------------------------------------------- random init and input checks


def test_random_init_runs_and_is_finite() -> None:
    model = DiT(
        small_config(
            gated_linear_unit=True, half_channel_vae=True, in_channels=32, out_channels=32, x_rescale_factor=0.1
        )
    )
    x, t, y, mask = dit_inputs()
    kv_range = torch.tensor([[0, 8], [0, 16]])
    v = model(x, t, y, mask, torch.tensor([False]), kv_range)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all() and v.abs().sum() > 0


def test_block_causal_mask_is_respected() -> None:
    """Chunk 0 sees only itself: changing chunk 1's latent must not change chunk 0's output."""
    model = DiT(small_config())
    x, t, y, mask = dit_inputs()
    kv_range = torch.tensor([[0, 8], [0, 16]])
    v1 = model(x, t, y, mask, torch.tensor([True]), kv_range)
    x2 = x.clone()
    x2[:, :, 2:] += 1.0
    v2 = model(x2, t, y, mask, torch.tensor([True]), kv_range)
    assert torch.equal(v1[:, :, :2], v2[:, :, :2])
    assert not torch.allclose(v1[:, :, 2:], v2[:, :, 2:])


def test_bad_inputs_fail_with_one_line() -> None:
    model = DiT(small_config())
    x, t, y, mask = dit_inputs()
    drop = torch.tensor([False])
    with pytest.raises(ValueError, match="kv_range must be"):
        model(x, t, y, mask, drop, torch.tensor([[0, 8]]))
    with pytest.raises(ValueError, match="DiT expects x"):
        model(x[:, :8], t, y, mask, drop, torch.tensor([[0, 8], [0, 16]]))
    with pytest.raises(ValueError, match="text_dropped must have 1 or B=1 flags"):
        model(x, t, y, mask, torch.tensor([True, False]), torch.tensor([[0, 8], [0, 16]]))
    with pytest.raises(ValueError, match="no kv_cache was given"):
        model(x, t, y, mask, drop, torch.tensor([[0, 16], [0, 24]]), slice_point=1)
