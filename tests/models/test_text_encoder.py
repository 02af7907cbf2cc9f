"""T5 wrapper against the official embeddings of the fixture prompts (tiny T5, float32)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from magi.models.text_encoder import CAPTION_MAX_LENGTH, T5Encoder, check_t5_folder
from tests.helpers import load_fixture, rel_l2

TOL = 1e-5  # float32 exact-math fixture: only accumulation order may differ


@pytest.fixture(scope="module")
def t5_root(reference_dir) -> Path:
    return reference_dir / "checkpoints" / "t5"


def test_embeddings_match_official(reference_dir, t5_root: Path) -> None:
    tensors, meta = load_fixture(reference_dir, "t5_embeddings")
    with T5Encoder.from_pretrained(t5_root) as t5:
        emb, mask = t5.encode(meta["prompts"])
    assert emb.dtype == torch.float32 and emb.shape == (2, CAPTION_MAX_LENGTH, 64)
    for i in range(len(meta["prompts"])):
        ref = tensors[f"p{i}.caption_embs"][0, 0]  # [Lcap, Ccap], padding rows included
        assert torch.equal(mask[i], tensors[f"p{i}.emb_masks"][0])
        assert rel_l2(emb[i], ref) <= TOL
        valid = mask[i].bool()
        assert rel_l2(emb[i][valid], ref[valid]) <= TOL


def test_subfolder_path_and_free(t5_root: Path) -> None:
    t5 = T5Encoder.from_pretrained(t5_root / "t5-v1_1-xxl")  # the folder itself is accepted
    emb_a, _ = t5.encode(["Good Boy"])
    emb_b, _ = t5.encode(["good boy"])  # cleaning lowercases: same tokens, same features
    assert torch.equal(emb_a, emb_b)
    t5.free()
    with pytest.raises(RuntimeError, match="freed"):
        t5.encode(["Good Boy"])


def test_bfloat16_weights_return_float32(t5_root: Path) -> None:
    with T5Encoder.from_pretrained(t5_root, dtype=torch.bfloat16) as t5:
        assert t5.model.shared.weight.dtype == torch.bfloat16
        emb, _ = t5.encode(["Good Boy"])
    assert emb.dtype == torch.float32


def test_missing_folder_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="t5-v1_1-xxl"):
        T5Encoder.from_pretrained(tmp_path)


def test_missing_spiece_error(tmp_path: Path, t5_root: Path) -> None:
    folder = tmp_path / "t5-v1_1-xxl"
    shutil.copytree(t5_root / "t5-v1_1-xxl", folder)
    (folder / "spiece.model").unlink()
    with pytest.raises(FileNotFoundError, match="spiece.model missing"):
        T5Encoder.from_pretrained(tmp_path)


def test_missing_shard_error(tmp_path: Path, t5_root: Path) -> None:
    folder = tmp_path / "t5-v1_1-xxl"
    shutil.copytree(t5_root / "t5-v1_1-xxl", folder)
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(FileNotFoundError, match="shards missing"):
        T5Encoder.from_pretrained(tmp_path)


def test_safetensors_preferred_and_equal(tmp_path: Path, t5_root: Path) -> None:
    # A converted copy (safetensors, single file) loads to the same encoder.
    from safetensors.torch import save_file

    folder = tmp_path / "t5-v1_1-xxl"
    folder.mkdir()
    src = t5_root / "t5-v1_1-xxl"
    for name in ("config.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(src.glob("pytorch_model-*.bin")):
        state.update(torch.load(shard, weights_only=True))
    state.pop("encoder.embed_tokens.weight")  # the shared copy alone must do
    save_file(state, str(folder / "model.safetensors"))
    with T5Encoder.from_pretrained(tmp_path) as a, T5Encoder.from_pretrained(t5_root) as b:
        assert torch.equal(a.encode(["Good Boy"])[0], b.encode(["Good Boy"])[0])


def test_single_string_rejected(t5_root: Path) -> None:
    with T5Encoder.from_pretrained(t5_root) as t5, pytest.raises(ValueError, match="list"):
        t5.encode("Good Boy")  # type: ignore[arg-type]


# ---------------------------------------------------------------- start-up check (no transformers)


def test_start_up_check_does_not_import_transformers(t5_root: Path) -> None:
    code = (
        "import sys; from magi.models.text_encoder import check_t5_folder; "
        f"print(check_t5_folder({str(t5_root)!r})); print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(t5_root / "t5-v1_1-xxl"), "False"]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("config.json", b"{", "config.json is not a readable T5 config"),
        ("config.json", b"[1, 2]", "config.json is not a readable T5 config"),
        ("tokenizer_config.json", b"\xff\xfe{", "tokenizer_config.json is damaged"),
        ("spiece.model", b"garbage", "spiece.model or tokenizer_config.json is damaged"),
    ],
)
def test_start_up_check_names_a_damaged_side_file(
    tmp_path: Path, t5_root: Path, name: str, content: bytes, expected: str
) -> None:
    folder = tmp_path / "t5-v1_1-xxl"
    shutil.copytree(t5_root / "t5-v1_1-xxl", folder)
    (folder / name).write_bytes(content)
    with pytest.raises(ValueError) as excinfo:
        check_t5_folder(tmp_path)
    message = str(excinfo.value)
    assert expected in message and str(folder) in message and "\n" not in message
    with pytest.raises(ValueError):  # the load itself refuses the same file
        T5Encoder.from_pretrained(tmp_path)


def test_free_releases_the_weights_without_a_garbage_collection(t5_root: Path, monkeypatch) -> None:
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef

    t5 = T5Encoder.from_pretrained(t5_root)
    t5.encode(["Good Boy"])
    storages = [StorageWeakRef(p.untyped_storage()) for p in t5.model.parameters()]
    assert storages and not any(s.expired() for s in storages)
    monkeypatch.setattr(gc, "collect", lambda *a: pytest.fail("free() ran a full garbage collection"))
    gc.disable()  # the weights must go by reference counting alone
    try:
        t5.free()
        assert all(s.expired() for s in storages)
    finally:
        gc.enable()
    assert t5.model is None
