"""DiT checkpoint loader: official layouts, pipeline-stage slicing, zstd shards, strict errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import magi.checkpoint as ckpt
from magi.checkpoint import load_dit, weight_folder
from magi.config import RuntimeConfig
from tests.models.helpers import (
    OFFICIAL_4P5B,
    SMALL,
    assert_loaded_equals,
    random_state,
    reference_config,
    small_cfg,
    write_sharded,
)

# ---------------------------------------------------------------- successful loads


def test_sharded_checkpoint_round_trip_with_precision_map(tmp_path: Path) -> None:
    state = random_state()
    write_sharded(tmp_path / "inference_weight", state)
    model = load_dit(small_cfg(tmp_path), "cpu")
    assert_loaded_equals(model, state)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    assert dtypes["videodit_blocks.layers.0.mlp.linear_fc1.weight"] == torch.bfloat16
    assert dtypes["videodit_blocks.layers.0.self_attn_post_norm.weight"] == torch.float32  # promoted
    assert dtypes["videodit_blocks.final_layernorm.bias"] == torch.float32
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_single_file_checkpoint(tmp_path: Path) -> None:
    state = random_state()
    folder = tmp_path / "inference_weight.distill"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    assert_loaded_equals(load_dit(small_cfg(tmp_path, distill=True), "cpu"), state)


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd command-line tool not installed")
def test_zstd_shard_takes_precedence(tmp_path: Path) -> None:
    state = random_state()
    folder = tmp_path / "inference_weight"
    write_sharded(folder, state)
    shard = folder / "model-00001-of-00002.safetensors"
    subprocess.run(["zstd", "-q", str(shard), "-o", f"{shard}.zst"], check=True)
    shard.write_bytes(b"not a safetensors file")  # must be ignored: the .zst wins
    assert_loaded_equals(load_dit(small_cfg(tmp_path), "cpu"), state)


def test_pipeline_stage_loads_only_its_layers_renumbered(tmp_path: Path) -> None:
    state = random_state(fp8=True)
    write_sharded(tmp_path / "inference_weight.fp8", state)
    model = load_dit(small_cfg(tmp_path, fp8=True), "cpu", layers=[1, 2])
    loaded = model.state_dict()
    assert len(model.videodit_blocks.layers) == 2
    assert [layer.layer_number for layer in model.videodit_blocks.layers] == [1, 2]
    # global layer 1 is quantised (fp8), global layer 2 is the last one (bf16)
    key = "self_attention.linear_qkv.q.weight"
    assert loaded[f"videodit_blocks.layers.0.{key}"].dtype == torch.float8_e4m3fn
    assert torch.equal(
        loaded[f"videodit_blocks.layers.0.{key}"].float(), state[f"videodit_blocks.layers.1.{key}"].float()
    )
    assert torch.equal(loaded[f"videodit_blocks.layers.1.{key}"], state[f"videodit_blocks.layers.2.{key}"])
    assert not any(k.startswith("videodit_blocks.layers.2.") for k in loaded)


@pytest.mark.parametrize(
    ("config", "subdir", "widened"),
    [
        ("tiny_4p5b_base", "inference_weight", True),
        ("tiny_4p5b_distill", "inference_weight.distill", True),
        ("tiny_4p5b_distill_quant", "inference_weight.fp8.distill", False),
        ("tiny_24b_base", "inference_weight", True),
    ],
)
def test_reference_tiny_checkpoints_load(reference_dir: Path, config: str, subdir: str, widened: bool) -> None:
    cfg = reference_config(reference_dir, config)
    assert weight_folder(cfg).name == subdir
    model = load_dit(cfg, "cpu")
    loaded = model.state_dict()
    raw: dict[str, torch.Tensor] = {}
    for shard in weight_folder(cfg).glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            raw.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(raw) == set(loaded)
    for key, value in raw.items():
        assert loaded[key].shape == value.shape
        assert torch.equal(loaded[key].float(), value.float()), key
    if widened:  # float32 configs: every bf16 tensor widened to float32, as the reference run did
        assert all(v.dtype == torch.float32 for v in loaded.values())
    else:
        assert sum(v.dtype == torch.float8_e4m3fn for v in loaded.values()) == 7


# ---------------------------------------------------------------- errors, each with its message


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"inference_weight\.fp8 does not exist .*fp8/distill flags"):
        load_dit(small_cfg(tmp_path, fp8=True), "cpu")


def test_load_not_set() -> None:
    cfg = dataclasses.replace(small_cfg(Path(".")), runtime=RuntimeConfig(load=None))
    with pytest.raises(ValueError, match="runtime_config.load is not set"):
        load_dit(cfg, "cpu")


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "inference_weight").mkdir()
    with pytest.raises(FileNotFoundError, match="is empty"):
        load_dit(small_cfg(tmp_path), "cpu")


def test_folder_without_checkpoint_files(tmp_path: Path) -> None:
    (tmp_path / "inference_weight").mkdir()
    (tmp_path / "inference_weight" / "README").write_text("x")
    with pytest.raises(FileNotFoundError, match="has neither model.safetensors.index.json nor model.safetensors"):
        load_dit(small_cfg(tmp_path), "cpu")


@pytest.mark.parametrize("text", ["{not json", '{"metadata": {}}', '{"weight_map": [1, 2]}'])
def test_bad_index_json(tmp_path: Path, text: str) -> None:
    folder = tmp_path / "inference_weight"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ValueError, match="is not a valid safetensors index"):
        load_dit(small_cfg(tmp_path), "cpu")


def test_shard_listed_but_absent(tmp_path: Path) -> None:
    folder = tmp_path / "inference_weight"
    write_sharded(folder, random_state())
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError, match="model-00002-of-00002.safetensors listed in the checkpoint index does not exist"
    ):
        load_dit(small_cfg(tmp_path), "cpu")


def test_zstd_tool_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "inference_weight"
    write_sharded(folder, random_state())
    shard = folder / "model-00001-of-00002.safetensors"
    shard.rename(f"{shard}.zst")
    monkeypatch.setattr(ckpt.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="zstd-compressed but the `zstd` tool is not installed"):
        load_dit(small_cfg(tmp_path), "cpu")


def test_missing_and_unexpected_keys_listed_together(tmp_path: Path) -> None:
    state = random_state()
    del state["rope.bands"]
    state["extra.tensor"] = torch.zeros(2)
    write_sharded(tmp_path / "inference_weight", state)
    with pytest.raises(ValueError) as err:
        load_dit(small_cfg(tmp_path), "cpu")
    message = str(err.value)
    assert "1 missing key(s): rope.bands" in message and "1 unexpected key(s): extra.tensor" in message
    assert "likely cause: the checkpoint is incomplete" in message and "\n" not in message


def test_mis_shaped_keys(tmp_path: Path) -> None:
    state = random_state()
    state["final_linear.linear.weight"] = torch.zeros(5, 32)
    write_sharded(tmp_path / "inference_weight", state)
    with pytest.raises(
        ValueError,
        match=r"1 mis-shaped key\(s\): final_linear.linear.weight \[5, 32\] \(model \[64, 32\]\).*another model_config",
    ):
        load_dit(small_cfg(tmp_path), "cpu")


def test_layer_count_mismatch_names_the_cause(tmp_path: Path) -> None:
    write_sharded(tmp_path / "inference_weight", random_state())
    with pytest.raises(ValueError, match=r"unexpected.*checkpoint has 3 layers but the config says num_layers=2"):
        load_dit(small_cfg(tmp_path, dataclasses.replace(SMALL, num_layers=2)), "cpu")


def test_24b_checkpoint_with_45b_config(reference_dir: Path, tmp_path: Path) -> None:
    """Key names alone decide: an index of the official 24B keys against the 4.5B config."""
    manifest = json.loads((reference_dir / "manifests" / "official_dit_24B_base.json").read_text())
    folder = tmp_path / "inference_weight"
    folder.mkdir()
    weight_map = {k: "model-00001-of-00001.safetensors" for k in manifest["state_dict"]}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError) as err:
        load_dit(small_cfg(tmp_path, OFFICIAL_4P5B), "cpu")
    message = str(err.value)
    assert "checkpoint has 48 layers but the config says num_layers=34: 24B weights with a 4.5B config?" in message
    assert "more)" in message  # long key lists are truncated


def test_fp8_checkpoint_without_fp8_quant(tmp_path: Path) -> None:
    write_sharded(tmp_path / "inference_weight", random_state(fp8=True))
    with pytest.raises(ValueError, match="fp8 keys .* but engine_config.fp8_quant is false"):
        load_dit(small_cfg(tmp_path), "cpu")


def test_fp8_quant_with_bf16_checkpoint(tmp_path: Path) -> None:
    write_sharded(tmp_path / "inference_weight.fp8", random_state())
    with pytest.raises(ValueError, match="fp8_quant is true but the checkpoint has no fp8 keys"):
        load_dit(small_cfg(tmp_path, fp8=True), "cpu")


def test_bad_layer_selection(tmp_path: Path) -> None:
    write_sharded(tmp_path / "inference_weight", random_state())
    with pytest.raises(ValueError, match=r"layers must be distinct indices in \[0, 3\)"):
        load_dit(small_cfg(tmp_path), "cpu", layers=[2, 3])
