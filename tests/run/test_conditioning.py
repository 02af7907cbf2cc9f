"""Caption conditioning against the official caption tables of the five pipeline fixtures, plus
the special-token file, switches and per-chunk prompts (shared/spec/text.md §3-4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from magi.conditioning import (
    NULL_CAPTION_TOKENS,
    SpecialTokenOptions,
    SpecialTokens,
    build_caption_table,
    chunk_captions,
    load_special_tokens,
    special_token_path,
)
from tests.helpers import load_fixture, rel_l2

TOL = 1e-5  # the table is pure copies of float32 rows: expected error 0

CASES = {  # fixture -> DiT weight folder holding its null caption table
    "t2v_4p5b_base": "tiny_4p5b_base/inference_weight",
    "i2v_4p5b_distill": "tiny_4p5b_distill/inference_weight.distill",
    "v2v_4p5b_base": "tiny_4p5b_base/inference_weight",
    "t2v_24b_base": "tiny_24b_base/inference_weight",
    "t2v_4p5b_distill_quant": "tiny_4p5b_distill_quant/inference_weight.fp8.distill",
}


def null_table(reference_dir: Path, weights: str) -> torch.Tensor:
    """y_embedder.null_caption_embedding [Lcap, Ccap] from a tiny checkpoint, widened to float32."""
    folder = reference_dir / "checkpoints" / "magi" / weights
    key = "y_embedder.null_caption_embedding"
    shard = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][key]
    with safe_open(str(folder / shard), framework="pt") as f:
        return f.get_tensor(key).float()


@pytest.fixture(scope="module")
def tiny_tokens(reference_dir) -> SpecialTokens:
    return load_special_tokens(reference_dir / "special_tokens.npz")


def fixture_prompt(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 result of a pipeline fixture: emb [1, Lcap, C] (valid rows; padding rows are never
    read) and mask [1, Lcap]."""
    valid, mask = tensors["input.caption_embs_valid"], tensors["input.emb_masks"]
    emb = torch.zeros(1, mask.shape[1], valid.shape[1])
    emb[0, : valid.shape[0]] = valid
    return emb, mask


@pytest.mark.parametrize("case", list(CASES))
def test_caption_table_matches_official(reference_dir, tiny_tokens: SpecialTokens, case: str) -> None:
    tensors, meta = load_fixture(reference_dir, f"pipeline_{case}")
    chunk_width = meta["config_content"]["runtime_config"]["chunk_width"]
    prefix = tensors.get("input.prefix_latent")  # i2v / v2v: [1, 16, P, H, W]
    prefix_frames = 0 if prefix is None else prefix.shape[2]
    emb, mask = fixture_prompt(tensors)
    y, y_mask = build_caption_table(
        emb,
        mask,
        null_table(reference_dir, CASES[case]),
        tiny_tokens,
        chunk_num=meta["transport"]["chunk_num"],
        clean_chunk_num=prefix_frames // chunk_width,
        options=SpecialTokenOptions.from_env(meta["environment"]),
    )
    assert list(y.shape) == meta["transport"]["y_shape"]
    assert torch.equal(y_mask, tensors["transport.emb_masks"])  # masks exact
    flat_y, flat_mask = chunk_captions(y, y_mask, 0, y.shape[1])  # [2R, Lcap, C], [2R, Lcap]
    assert torch.equal(flat_mask, tensors["transport.y.mask"][:, 0])
    assert rel_l2(flat_y[flat_mask == 1], tensors["transport.y.y_valid"]) <= TOL


def test_v2v_prefix_chunk_has_no_caption(reference_dir, tiny_tokens: SpecialTokens) -> None:
    tensors, _ = load_fixture(reference_dir, "pipeline_v2v_4p5b_base")
    emb, mask = fixture_prompt(tensors)
    null = null_table(reference_dir, CASES["v2v_4p5b_base"])
    y, y_mask = build_caption_table(emb, mask, null, tiny_tokens, chunk_num=6, clean_chunk_num=1)
    assert y_mask[0, 0].sum() == 0 and torch.equal(y[0, 0], null)
    n_valid = int(mask.sum())
    assert y_mask[0, 1:].sum(-1).tolist() == [n_valid + 2] * 5  # DURATION + HQ + prompt
    # Duration counts the generated chunks only: 5, 4, 3, 2, 1 remaining.
    for i, k in enumerate([5, 4, 3, 2, 1]):
        assert torch.equal(y[0, 1 + i, 0], tiny_tokens.token(f"DURATION_TOKEN_{k}"))


def small_case(tokens: SpecialTokens, length: int = 64) -> tuple[torch.Tensor, ...]:
    """A synthetic prompt [1, length, C] with 5 valid tokens and a null table [length, C]."""
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(1, length, tokens.width, generator=gen)
    mask = torch.zeros(1, length, dtype=torch.long)
    mask[0, :5] = 1
    null = torch.randn(length, tokens.width, generator=gen)
    return emb, mask, null


def test_token_order_with_every_switch(tiny_tokens: SpecialTokens) -> None:
    emb, mask, null = small_case(tiny_tokens)
    every = SpecialTokenOptions(
        static_first_frames=True,
        dynamic_first_frames=True,
        borderness=True,
        three_d_model=True,
        two_d_anime=True,
        negative_prompt=True,
    )
    y, y_mask = build_caption_table(emb, mask, null, tiny_tokens, chunk_num=2, options=every)
    # Applied STATIC, DYNAMIC, BORDERNESS, HQ, 3D, 2D, DURATION: each prepends, last ends first.
    order = [
        "DURATION_TOKEN_2",
        "TWO_D_ANIME_TOKEN",
        "THREE_D_MODEL_TOKEN",
        "HQ_TOKEN",
        "BORDERNESS_TOKEN",
        "DYNAMIC_FIRST_FRAMES_TOKEN",
        "STATIC_FIRST_FRAMES_TOKEN",
    ]
    expected = torch.cat([torch.stack([tiny_tokens.token(n) for n in order]), emb[0]])[:64]
    assert torch.equal(y[0, 0], expected)
    assert torch.equal(y_mask[0, 0, :12], torch.ones(12)) and y_mask[0, 0, 12:].sum() == 0
    # NEG_PROMPT: [BORDERNESS, TRANS, LOGO, CAPTION, null...], mask not extended (50 ones).
    negatives = ["BORDERNESS_TOKEN", "TRANS_TOKEN", "LOGO_TOKEN", "CAPTION_TOKEN"]
    expected_null = torch.cat([torch.stack([tiny_tokens.token(n) for n in negatives]), null])[:64]
    assert torch.equal(y[1, 1], expected_null)
    assert y_mask[1].sum(-1).tolist() == [NULL_CAPTION_TOKENS] * 2


def test_no_tokens_and_truncation(tiny_tokens: SpecialTokens) -> None:
    emb, mask, null = small_case(tiny_tokens)
    mask[0, :] = 1  # a full-length prompt: the two prepended tokens push the last rows out
    y, y_mask = build_caption_table(emb, mask, null, tiny_tokens, chunk_num=1)
    assert torch.equal(y[0, 0, 2:], emb[0, :-2]) and y_mask[0, 0].sum() == 64
    off = SpecialTokenOptions(hq=False, duration=False)
    y, y_mask = build_caption_table(emb, mask, null, tiny_tokens, chunk_num=1, options=off)
    assert torch.equal(y[0, 0], emb[0]) and torch.equal(y[1, 0], null)


def test_duration_capped_at_8(tiny_tokens: SpecialTokens) -> None:
    emb, mask, null = small_case(tiny_tokens)
    y, _ = build_caption_table(emb, mask, null, tiny_tokens, chunk_num=10)
    for i in range(10):
        assert torch.equal(y[0, i, 0], tiny_tokens.duration(min(10 - i, 8)))
        assert torch.equal(y[0, i, 1], tiny_tokens.token("HQ_TOKEN"))


def test_per_chunk_prompts(tiny_tokens: SpecialTokens) -> None:
    emb_a, mask, null = small_case(tiny_tokens)
    emb_b = emb_a.flip(-1)
    two = torch.cat([emb_a, emb_b])
    masks = mask.expand(2, -1)
    y, _ = build_caption_table(
        two, masks, null, tiny_tokens, chunk_num=5, clean_chunk_num=1, chunk_prompts=[0, 1, 1, 0]
    )
    for chunk, emb in zip(range(1, 5), [emb_a, emb_b, emb_b, emb_a]):
        assert torch.equal(y[0, chunk, 2:], emb[0, :-2])
    # One prompt per generated chunk needs no index list; a list of tensors works as well.
    y_list, _ = build_caption_table([emb_a[0], emb_b[0]], [mask[0], mask[0]], null, tiny_tokens, chunk_num=2)
    y_idx, _ = build_caption_table(two, masks, null, tiny_tokens, chunk_num=2, chunk_prompts=[0, 1])
    assert torch.equal(y_list, y_idx)
    with pytest.raises(ValueError, match="2 prompts for 3 generated chunks"):
        build_caption_table(two, masks, null, tiny_tokens, chunk_num=3)
    with pytest.raises(ValueError, match="chunk_prompts must list 3"):
        build_caption_table(two, masks, null, tiny_tokens, chunk_num=3, chunk_prompts=[0, 2, 1])


def test_input_errors(reference_dir, tiny_tokens: SpecialTokens) -> None:
    emb, mask, null = small_case(tiny_tokens)
    with pytest.raises(ValueError, match="no valid token"):
        build_caption_table(emb, torch.zeros_like(mask), null, tiny_tokens, chunk_num=1)
    with pytest.raises(ValueError, match="null_caption_embedding"):
        build_caption_table(emb, mask, null[:10], tiny_tokens, chunk_num=1)
    with pytest.raises(ValueError, match="clean_chunk_num"):
        build_caption_table(emb, mask, null, tiny_tokens, chunk_num=2, clean_chunk_num=2)
    official = load_special_tokens(reference_dir / "official_special_tokens.npz")
    with pytest.raises(ValueError, match="4096 wide but captions 64"):
        build_caption_table(emb, mask, null, official, chunk_num=1)


def test_float16_rounding_is_numpy_straight_from_float64(reference_dir) -> None:
    path = reference_dir / "official_special_tokens.npz"
    tokens = load_special_tokens(path)
    raw = np.load(path)["other_tokens"]
    expected = torch.from_numpy(raw.astype(np.float16).astype(np.float32))
    assert torch.equal(tokens.other_tokens, expected)
    # torch's float64 -> float16 rounds through float32: it must not be what we use.
    via_torch = torch.from_numpy(raw).to(torch.float16).float()
    assert not torch.equal(via_torch[13], tokens.token("DURATION_TOKEN_7"))
    assert tokens.width == 4096 and tokens.caption_token.shape == (1, 4096)


def test_env_switches() -> None:
    assert SpecialTokenOptions.from_env({}) == SpecialTokenOptions()  # run.sh defaults
    assert SpecialTokenOptions().prompt_tokens() == ["HQ_TOKEN", "DURATION_TOKEN"]
    opts = SpecialTokenOptions.from_env(
        {"PAD_HQ": "0", "PAD_DURATION": "off", "PAD_STATIC": "Enabled", "NEG_PROMPT": "Y", "PAD_TWO_D_ANIME": " 1"}
    )  # no strip, as official
    assert opts == SpecialTokenOptions(hq=False, duration=False, static_first_frames=True, negative_prompt=True)


def test_special_token_lookup(reference_dir, tmp_path: Path, monkeypatch) -> None:
    tiny = reference_dir / "special_tokens.npz"
    monkeypatch.delenv("SPECIAL_TOKEN_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    default_missing = r"example/assets/special_tokens\.npz.*magi\.download"
    with pytest.raises(FileNotFoundError, match=default_missing):
        special_token_path()
    assets = tmp_path / "example" / "assets"
    assets.mkdir(parents=True)
    (assets / "special_tokens.npz").symlink_to(tiny)  # read in place, as the official cwd lookup
    assert special_token_path() == assets / "special_tokens.npz"
    monkeypatch.setenv("SPECIAL_TOKEN_PATH", str(reference_dir / "official_special_tokens.npz"))
    assert load_special_tokens().width == 4096  # the env var wins over the default
    assert load_special_tokens(tiny).width == 64  # an explicit path wins over both
    monkeypatch.setenv("SPECIAL_TOKEN_PATH", str(tmp_path / "nope.npz"))
    with pytest.raises(FileNotFoundError, match=r"nope\.npz \(\$SPECIAL_TOKEN_PATH\)"):
        load_special_tokens()
    with pytest.raises(FileNotFoundError, match="given path"):
        load_special_tokens(tmp_path / "missing.npz")


def test_bad_special_token_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, caption_token=np.zeros((1, 8)), logo_token=np.zeros((1, 8)))
    with pytest.raises(ValueError, match="no array 'other_tokens'"):
        load_special_tokens(bad)
    np.savez(bad, caption_token=np.zeros((1, 8)), logo_token=np.zeros((1, 8)), other_tokens=np.zeros((5, 8)))
    with pytest.raises(ValueError, match="other_tokens has shape"):
        load_special_tokens(bad)
