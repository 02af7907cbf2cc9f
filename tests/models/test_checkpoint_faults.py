"""Damaged or hostile weight files: each fault is one ValueError line naming the file and the fix.

Covers the DiT checkpoint (index vs shards, shard names outside the folder, integer tensors),
special_tokens.npz (truncated, missing arrays, wrong shapes) and the T5 ``.bin`` shards (pickles
with code, truncated zips), plus the cheap start-up checks the pipeline can run before loading.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from magi.checkpoint import INDEX_FILE, check_dit_checkpoint, load_dit
from tests.models.helpers import assert_loaded_equals, random_state, small_cfg, write_sharded

SHARD_1 = "model-00001-of-00002.safetensors"
SHARD_2 = "model-00002-of-00002.safetensors"
WEIGHT = "videodit_blocks.layers.0.mlp.linear_fc1.weight"


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    """The message, asserted to be a single line (no traceback text, no multi-line dumps)."""
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def _index(folder: Path) -> dict:
    return json.loads((folder / INDEX_FILE).read_text())


def _write_index(folder: Path, index: dict) -> None:
    (folder / INDEX_FILE).write_text(json.dumps(index))


@pytest.fixture()
def sharded(tmp_path: Path) -> Path:
    """A good two-shard bf16 checkpoint under tmp_path/inference_weight; returns the root."""
    write_sharded(tmp_path / "inference_weight", random_state())
    return tmp_path


# ---------------------------------------------------------------- DiT: index vs shards


def test_index_key_absent_from_its_shard(sharded: Path) -> None:
    folder = sharded / "inference_weight"
    shard = _index(folder)["weight_map"][WEIGHT]
    tensors = load_file(str(folder / shard))
    del tensors[WEIGHT]  # the index still lists it there (a shard from another download)
    save_file(tensors, str(folder / shard))
    for check in (lambda: load_dit(small_cfg(sharded), "cpu"), lambda: check_dit_checkpoint(small_cfg(sharded))):
        with pytest.raises(ValueError) as excinfo:
            check()
        message = one_line_error(excinfo)
        assert WEIGHT in message and shard in message and INDEX_FILE in message
        assert "download the checkpoint again" in message


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "windows"])
def test_index_shard_outside_the_folder_is_refused(sharded: Path, kind: str) -> None:
    folder = sharded / "inference_weight"
    outside = sharded / "elsewhere" / SHARD_2
    outside.parent.mkdir()
    shutil.copy(folder / SHARD_2, outside)  # a real, readable file: the load would succeed
    names = {"dotdot": f"../elsewhere/{SHARD_2}", "absolute": str(outside), "windows": f"..\\elsewhere\\{SHARD_2}"}
    name = names[kind]
    index = _index(folder)
    index["weight_map"] = {k: (name if v == SHARD_2 else v) for k, v in index["weight_map"].items()}
    _write_index(folder, index)
    for check in (lambda: load_dit(small_cfg(sharded), "cpu"), lambda: check_dit_checkpoint(small_cfg(sharded))):
        with pytest.raises(ValueError, match="outside the checkpoint folder") as excinfo:
            check()
        message = one_line_error(excinfo)
        assert INDEX_FILE in message and repr(name) in message


def test_index_shard_name_not_a_string(sharded: Path) -> None:
    folder = sharded / "inference_weight"
    index = _index(folder)
    index["weight_map"][WEIGHT] = ["a", "b"]
    _write_index(folder, index)
    with pytest.raises(ValueError, match="not a shard file name") as excinfo:
        load_dit(small_cfg(sharded), "cpu")
    assert WEIGHT in one_line_error(excinfo)


def test_shard_in_a_subfolder_still_loads(tmp_path: Path) -> None:
    state = random_state()
    folder = tmp_path / "inference_weight"
    write_sharded(folder, state)
    (folder / "part").mkdir()
    shutil.move(folder / SHARD_2, folder / "part" / SHARD_2)
    index = _index(folder)
    index["weight_map"] = {k: (f"part/{v}" if v == SHARD_2 else v) for k, v in index["weight_map"].items()}
    _write_index(folder, index)
    assert_loaded_equals(load_dit(small_cfg(tmp_path), "cpu"), state)


# ---------------------------------------------------------------- DiT: tensor dtypes


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.uint8])
def test_integer_tensor_refused(tmp_path: Path, dtype: torch.dtype) -> None:
    state = random_state()
    state[WEIGHT] = torch.ones(state[WEIGHT].shape, dtype=dtype)  # silently cast before the fix
    write_sharded(tmp_path / "inference_weight", state)
    for check in (lambda: load_dit(small_cfg(tmp_path), "cpu"), lambda: check_dit_checkpoint(small_cfg(tmp_path))):
        with pytest.raises(ValueError, match="non-floating") as excinfo:
            check()
        message = one_line_error(excinfo)
        safetensors_name = {torch.int64: "I64", torch.int8: "I8", torch.bool: "BOOL", torch.uint8: "U8"}[dtype]
        assert f"{WEIGHT} ({safetensors_name})" in message and "download the checkpoint again" in message


def test_integer_tensor_in_single_file_refused(tmp_path: Path) -> None:
    state = random_state()
    state[WEIGHT] = state[WEIGHT].to(torch.int32)
    folder = tmp_path / "inference_weight"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"model\.safetensors holds non-floating.*{WEIGHT} \(I32\)") as excinfo:
        load_dit(small_cfg(tmp_path), "cpu")
    one_line_error(excinfo)


def test_fp8_checkpoint_passes_the_checks(tmp_path: Path) -> None:
    state = random_state(fp8=True)  # float8_e4m3fn weights, float32 scales
    assert torch.float8_e4m3fn in {v.dtype for v in state.values()}
    write_sharded(tmp_path / "inference_weight.fp8", state)
    cfg = small_cfg(tmp_path, fp8=True)
    assert check_dit_checkpoint(cfg) == tmp_path / "inference_weight.fp8"
    assert_loaded_equals(load_dit(cfg, "cpu"), state)


def test_start_up_check_passes_and_reports_key_mismatch(sharded: Path) -> None:
    assert check_dit_checkpoint(small_cfg(sharded)) == sharded / "inference_weight"
    assert check_dit_checkpoint(small_cfg(sharded), layers=[1, 2]) == sharded / "inference_weight"
    (sharded / "inference_weight").rename(sharded / "inference_weight.fp8")  # bf16 files, fp8 config
    with pytest.raises(ValueError, match="engine_config.fp8_quant is true") as excinfo:
        check_dit_checkpoint(small_cfg(sharded, fp8=True))
    one_line_error(excinfo)


# ---------------------------------------------------------------- special_tokens.npz

WIDTH = 8


def _good_tokens(path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(
        path,
        caption_token=rng.standard_normal((1, WIDTH)),
        logo_token=rng.standard_normal((1, WIDTH)),
        other_tokens=rng.standard_normal((20, WIDTH)),
    )
    return path


def _truncated(path: Path) -> None:
    data = _good_tokens(path).read_bytes()
    path.write_bytes(data[: len(data) // 2])  # an interrupted download: zipfile.BadZipFile


def _member_cut(path: Path) -> None:
    # the zip directory survives but a member's bytes are damaged (a bad copy)
    data = bytearray(_good_tokens(path).read_bytes())
    start = data.index(b"\x93NUMPY")
    data[start : start + 10] = b"\x00" * 10
    path.write_bytes(bytes(data))


BAD_TOKEN_FILES = {
    "truncated": (_truncated, "not a readable .npz"),
    "empty": (lambda p: p.write_bytes(b""), "not a readable .npz"),
    "not_a_zip": (lambda p: p.write_bytes(b"<html>404 Not Found</html>"), "not a readable .npz"),
    "damaged_member": (_member_cut, "not a readable .npz"),
    "missing_array": (
        lambda p: np.savez(p, caption_token=np.ones((1, WIDTH)), other_tokens=np.ones((20, WIDTH))),
        "has no array 'logo_token'",
    ),
    "too_few_rows": (
        lambda p: np.savez(
            p, caption_token=np.ones((1, WIDTH)), logo_token=np.ones((1, WIDTH)), other_tokens=np.ones((5, WIDTH))
        ),
        r"other_tokens has shape \[5, 8\]",
    ),
    "one_dimensional": (
        lambda p: np.savez(
            p, caption_token=np.ones(WIDTH), logo_token=np.ones((1, WIDTH)), other_tokens=np.ones((20, WIDTH))
        ),
        r"caption_token has shape \[8\]",
    ),
    "width_mismatch": (
        lambda p: np.savez(
            p, caption_token=np.ones((1, 4)), logo_token=np.ones((1, WIDTH)), other_tokens=np.ones((20, WIDTH))
        ),
        "disagree on the token width",
    ),
    "object_array": (
        lambda p: np.savez(
            p,
            caption_token=np.array([[None] * WIDTH], dtype=object),
            logo_token=np.ones((1, WIDTH)),
            other_tokens=np.ones((20, WIDTH)),
        ),
        "not a readable .npz",
    ),
    "strings": (
        lambda p: np.savez(
            p,
            caption_token=np.array([["x"] * WIDTH]),
            logo_token=np.ones((1, WIDTH)),
            other_tokens=np.ones((20, WIDTH)),
        ),
        "not finite floating data",
    ),
    "nan": (
        lambda p: np.savez(
            p,
            caption_token=np.full((1, WIDTH), np.nan),
            logo_token=np.ones((1, WIDTH)),
            other_tokens=np.ones((20, WIDTH)),
        ),
        "not finite floating data",
    ),
}


@pytest.mark.parametrize("fault", sorted(BAD_TOKEN_FILES))
def test_bad_special_tokens_file(tmp_path: Path, fault: str) -> None:
    from magi.conditioning import check_special_tokens_file, load_special_tokens

    path = tmp_path / "special_tokens.npz"
    write, reason = BAD_TOKEN_FILES[fault]
    write(path)
    for check in (load_special_tokens, check_special_tokens_file):
        with pytest.raises(ValueError, match=reason) as excinfo:
            check(path)
        message = one_line_error(excinfo)
        assert str(path) in message and "python -m magi.download <model>" in message
        assert "example/assets/special_tokens.npz" in message


def test_good_special_tokens_file_passes_the_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from magi.conditioning import check_special_tokens_file, load_special_tokens

    path = _good_tokens(tmp_path / "special_tokens.npz")
    assert check_special_tokens_file(path) == path
    monkeypatch.setenv("SPECIAL_TOKEN_PATH", str(path))
    assert check_special_tokens_file() == path
    tokens = load_special_tokens(path)
    assert tokens.width == WIDTH and tokens.other_tokens.shape == (20, WIDTH)
    with np.load(path) as data:  # the official float64 -> float16 -> float32 rounding is kept
        assert torch.equal(tokens.logo_token, torch.from_numpy(data["logo_token"].astype(np.float16)).float())


# ---------------------------------------------------------------- T5 .bin shards


class _Custom:  # a class weights_only=True refuses (any pickled code or object)
    pass


def _bin_faults(path: Path, fault: str) -> str:
    """Write one faulty .bin; returns the regex its error must match."""
    if fault == "pickled_class":
        torch.save({"shared.weight": torch.zeros(2), "extra": _Custom()}, path)
        return "not a plain weights file.*magi never unpickles code: convert it to safetensors"
    if fault == "legacy_pickled_class":
        torch.save({"w": torch.zeros(2), "extra": _Custom()}, path, _use_new_zipfile_serialization=False)
        return "not a plain weights file.*magi never unpickles code: convert it to safetensors"
    torch.save({"shared.weight": torch.zeros(64, 8)}, path)
    data = path.read_bytes()
    if fault == "truncated_zip":
        path.write_bytes(data[: len(data) // 2])
    elif fault == "empty":
        path.write_bytes(b"")
    elif fault == "random_bytes":
        path.write_bytes(b"<html>rate limited</html>" * 10)
    elif fault == "not_a_state_dict":
        torch.save([torch.zeros(2)], path)
        return "holds no plain state dict"
    return "not a readable PyTorch weights file.*truncated or corrupt: download it again"


BIN_FAULTS = ["pickled_class", "legacy_pickled_class", "truncated_zip", "empty", "random_bytes", "not_a_state_dict"]


@pytest.mark.parametrize("fault", BIN_FAULTS)
def test_bad_bin_file_is_one_line(tmp_path: Path, fault: str) -> None:
    from magi.models.text_encoder import _read_shard

    path = tmp_path / "pytorch_model.bin"
    reason = _bin_faults(path, fault)
    with pytest.raises(ValueError, match=reason) as excinfo:
        _read_shard(path)
    assert str(path) in one_line_error(excinfo)


def test_good_bin_files_still_read(tmp_path: Path) -> None:
    from magi.models.text_encoder import _read_shard

    state = {"shared.weight": torch.randn(4, 3)}
    for legacy in (False, True):
        path = tmp_path / f"legacy{legacy}.bin"
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
        assert torch.equal(_read_shard(path)["shared.weight"], state["shared.weight"])


@pytest.fixture()
def t5_copy(reference_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of the tiny reference T5 (two .bin shards + index); returns its root."""
    shutil.copytree(reference_dir / "checkpoints" / "t5" / "t5-v1_1-xxl", tmp_path / "t5-v1_1-xxl")
    return tmp_path


@pytest.mark.parametrize("fault", ["pickled_class", "truncated_zip"])
def test_t5_from_pretrained_bad_bin(t5_copy: Path, fault: str) -> None:
    from magi.models.text_encoder import T5Encoder, check_t5_folder

    shard = t5_copy / "t5-v1_1-xxl" / "pytorch_model-00002-of-00002.bin"
    if fault == "pickled_class":
        state = torch.load(shard, weights_only=True)
        torch.save({**state, "extra": _Custom()}, shard)
    else:
        shard.write_bytes(shard.read_bytes()[:1000])
    reason = _bin_faults(t5_copy / "scratch.bin", fault)
    for check in (T5Encoder.from_pretrained, check_t5_folder):
        with pytest.raises(ValueError, match=reason) as excinfo:
            check(t5_copy)
        assert str(shard) in one_line_error(excinfo)


def test_t5_integer_weights_refused(t5_copy: Path) -> None:
    from magi.models.text_encoder import T5Encoder

    shard = t5_copy / "t5-v1_1-xxl" / "pytorch_model-00001-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    key = sorted(state)[0]
    state[key] = state[key].to(torch.int64)
    torch.save(state, shard)
    with pytest.raises(ValueError, match=rf"{key} is torch.int64, expected floating") as excinfo:
        T5Encoder.from_pretrained(t5_copy)
    one_line_error(excinfo)


@pytest.mark.parametrize("name", ["../pytorch_model-00002-of-00002.bin", "/etc/passwd"])
def test_t5_index_shard_outside_the_folder(t5_copy: Path, name: str) -> None:
    from magi.models.text_encoder import T5Encoder, check_t5_folder

    index_path = t5_copy / "t5-v1_1-xxl" / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: (name if v.endswith("00002.bin") else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    shutil.copy(t5_copy / "t5-v1_1-xxl" / "pytorch_model-00002-of-00002.bin", t5_copy)  # a readable file outside
    for check in (T5Encoder.from_pretrained, check_t5_folder):
        with pytest.raises(ValueError, match="points outside the T5 folder") as excinfo:
            check(t5_copy)
        assert repr(name) in one_line_error(excinfo)


def test_t5_start_up_check_passes(t5_copy: Path) -> None:
    from magi.models.text_encoder import check_t5_folder

    assert check_t5_folder(t5_copy) == t5_copy / "t5-v1_1-xxl"
