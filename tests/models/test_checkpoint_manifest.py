"""The DiT manifest (expected keys / shapes without a build), the build-free start-up check, and the
refusal of MAGI-1.1 stacked-layer checkpoints before any tensor is read."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import magi.checkpoint as ckpt
from magi.checkpoint import check_dit_checkpoint, dit_manifest, load_dit
from magi.config import ModelConfig, load_config
from tests.models.helpers import SMALL, random_state, small_cfg, write_sharded

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO.parent / "shared" / "reference" / "manifests"
GATED = dataclasses.replace(SMALL, gated_linear_unit=True, cond_gating_ratio=0.5, xattn_cond_hidden_ratio=0.5)


def built(model: ModelConfig, fp8: bool, layers: list[int] | None) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    cfg = small_cfg(Path("/unused"), model, fp8=fp8)
    numbers = list(range(model.num_layers)) if layers is None else layers
    meta = ckpt._meta_model(cfg, numbers)
    return [(k, tuple(v.shape), v.dtype) for k, v in meta.state_dict().items()]


@pytest.mark.parametrize("model", [SMALL, GATED], ids=["small", "gated"])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("layers", [None, [1, 2], [0]])
def test_manifest_equals_a_meta_build(model: ModelConfig, fp8: bool, layers: list[int] | None) -> None:
    got = [(k, *v) for k, v in dit_manifest(model, fp8=fp8, layer_numbers=layers).items()]
    assert got == built(model, fp8, layers)  # keys, order, shapes and dtypes


@pytest.mark.parametrize("name", ["4.5B_base", "4.5B_distill_quant", "24B_base", "24B_distill_quant"])
def test_manifest_matches_the_official_manifests(name: str) -> None:
    path = MANIFESTS / f"official_dit_{name}.json"
    if not path.is_file():
        pytest.skip(f"official manifest {path} not present (shared reference fixtures absent)")
    official = json.loads(path.read_text())
    cfg = load_config(REPO / official["config"])
    ours = dit_manifest(cfg.model, fp8=cfg.engine.fp8_quant)
    # Shapes and key order only: the official dtypes are those at construction, before the
    # loader promotes modules to float32 (magi's manifest has the dtypes after promotion).
    theirs = [(k, tuple(v[0])) for k, v in official["state_dict"].items()]
    assert [(k, v[0]) for k, v in ours.items()] == theirs
    assert len(ours) == official["num_tensors"]


def test_check_builds_no_model_and_load_builds_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = random_state()
    write_sharded(tmp_path / "inference_weight", state)
    builds = []
    real = ckpt._meta_model
    monkeypatch.setattr(ckpt, "_meta_model", lambda *a: builds.append(1) or real(*a))
    cfg = small_cfg(tmp_path)
    assert check_dit_checkpoint(cfg) == tmp_path / "inference_weight"
    assert builds == []
    model = load_dit(cfg, "cpu")
    assert builds == [1]
    assert torch.equal(model.state_dict()["rope.bands"], state["rope.bands"])


def test_check_finds_mis_shaped_key_from_the_manifest(tmp_path: Path) -> None:
    state = random_state()
    key = "videodit_blocks.layers.1.mlp.linear_fc2.weight"
    state[key] = torch.zeros(32, 65, dtype=state[key].dtype)
    write_sharded(tmp_path / "inference_weight", state)
    with pytest.raises(
        ValueError,
        match=r"1 mis-shaped key\(s\): videodit_blocks\.layers\.1\.mlp\.linear_fc2\.weight "
        r"\[32, 65\] \(model \[32, 64\]\)",
    ):
        check_dit_checkpoint(small_cfg(tmp_path))


# ---------------------------------------------------------------- MAGI-1.1 (stacked layers)


def stacked_state(num_layers: int = 4, hidden: int = 8) -> dict[str, torch.Tensor]:
    """A fake MAGI-1.1-like file: the non-layer MAGI-1 keys plus ``videodit_blocks.layers.<name>``
    tensors with a leading layer dimension (fused qkv as one projection)."""
    state = {k: v for k, v in random_state().items() if not k.startswith("videodit_blocks.layers.")}
    state["videodit_blocks.layers.self_attention.linear_qkv.weight"] = torch.zeros(num_layers, 3 * hidden, hidden)
    state["videodit_blocks.layers.mlp.linear_fc1.weight"] = torch.zeros(num_layers, 4 * hidden, hidden)
    return state


@pytest.mark.parametrize("single_file", [False, True])
@pytest.mark.parametrize("entry", ["check", "load"])
def test_magi_1_1_checkpoint_refused_before_reading_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, single_file: bool, entry: str
) -> None:
    folder = tmp_path / "inference_weight"
    if single_file:
        folder.mkdir()
        save_file(stacked_state(num_layers=48), str(folder / "model.safetensors"))
    else:
        write_sharded(folder, stacked_state(num_layers=48))

    def no_tensor_reads(*args: object, **kwargs: object) -> None:
        raise AssertionError("a tensor was read or the model key check ran")

    monkeypatch.setattr(ckpt, "_read_tensors", no_tensor_reads)
    monkeypatch.setattr(ckpt, "_match_keys", no_tensor_reads)
    run = check_dit_checkpoint if entry == "check" else (lambda cfg: load_dit(cfg, "cpu"))
    with pytest.raises(ValueError) as excinfo:
        run(small_cfg(tmp_path))
    message = str(excinfo.value)
    assert "\n" not in message and len(message) <= 200
    message = message.removeprefix(f"{tmp_path.name}/")
    assert message == (
        "inference_weight is a MAGI-1.1 checkpoint (2 stacked videodit_blocks.layers.<name> "
        "tensors, 48 layers); MAGI-1.1 is not supported yet: use MAGI-1 (v1.0) weights"
    )


def test_numbered_layer_keys_are_not_taken_for_stacked() -> None:
    assert ckpt._STACKED_KEY.match("videodit_blocks.layers.mlp.linear_fc1.weight")
    assert not ckpt._STACKED_KEY.match("videodit_blocks.layers.12.mlp.linear_fc1.weight")
    assert not ckpt._STACKED_KEY.match("videodit_blocks.final_layernorm.weight")
