"""A user's bad inputs get one clear line: corrupt weight files and unwritable outputs.

Regression tests from the QA pass: each case used to end in a raw traceback (SafetensorError,
FileExistsError, a multi-line ffmpeg dump) or fail only after the models had run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from magi import video_io as vio
from magi.checkpoint import load_dit
from magi.config import load_config
from magi.models.text_encoder import T5Encoder
from magi.models.vae import load_vae
from tests.helpers import REPO_ROOT as REPO, TINY_CONFIG, tiny_script


@pytest.fixture()
def tiny(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A fresh copy of the tiny checkpoint per test: the tests damage its files."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "checkpoints"))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _config(root: Path, tmp_path: Path) -> Path:
    raw = json.loads(TINY_CONFIG.read_text())
    raw["runtime_config"].update(
        load=str(root / "magi" / "tiny"), t5_pretrained=str(root / "t5"), vae_pretrained=str(root / "vae")
    )
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return path


# --------------------------------------------------------------------------- corrupt weight files
def test_truncated_dit_shard_names_the_file(tiny: Path, tmp_path: Path) -> None:
    shard = tiny / "magi/tiny/inference_weight/model-00001-of-00002.safetensors"
    _truncate(shard)
    cfg = load_config(_config(tiny, tmp_path))
    with pytest.raises(ValueError, match="truncated or corrupt") as info:
        load_dit(cfg, "cpu")
    assert str(shard) in str(info.value) and len(str(info.value).splitlines()) == 1


def test_garbage_dit_shard_names_the_file(tiny: Path, tmp_path: Path) -> None:
    shard = tiny / "magi/tiny/inference_weight/model-00002-of-00002.safetensors"
    shard.write_bytes(b"<html>not found</html>")  # what a failed download often leaves behind
    with pytest.raises(ValueError, match=f"{shard}.*not a readable safetensors file"):
        load_dit(load_config(_config(tiny, tmp_path)), "cpu")


def test_truncated_vae_names_the_file(tiny: Path) -> None:
    weights = tiny / "vae" / "diffusion_pytorch_model.safetensors"
    _truncate(weights)
    with pytest.raises(ValueError, match=f"{weights}.*truncated or corrupt"):
        load_vae(tiny / "vae")


def test_truncated_t5_names_the_file(tiny: Path) -> None:
    weights = tiny / "t5" / "t5-v1_1-xxl" / "model.safetensors"
    _truncate(weights)
    with pytest.raises(ValueError, match=f"{weights}.*truncated or corrupt"):
        T5Encoder.from_pretrained(tiny / "t5")


def test_bad_t5_index_names_the_file(tiny: Path) -> None:
    folder = tiny / "t5" / "t5-v1_1-xxl"
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')  # no weight_map
    with pytest.raises(ValueError, match="model.safetensors.index.json is not a valid weight index"):
        T5Encoder.from_pretrained(tiny / "t5")


def test_cli_corrupt_shard_is_one_error_line(tiny: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from magi.infer import main

    _truncate(tiny / "magi/tiny/inference_weight/model-00001-of-00002.safetensors")
    monkeypatch.setenv("SPECIAL_TOKEN_PATH", str(tiny / "special_tokens.npz"))
    out = tmp_path / "out.mp4"
    status = main(
        [
            "--config",
            str(_config(tiny, tmp_path)),
            "--mode",
            "t2v",
            "--prompt",
            "a cat",
            "--num_frames",
            "24",
            "--output_path",
            str(out),
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    # found by the start-up check of the shard headers, before any model loads (was exit 1 after loading)
    assert status == 2 and not out.exists()
    assert err[-1].startswith("error: ") and "model-00001-of-00002.safetensors" in err[-1]
    assert not any("Traceback" in line for line in err)


# ---------------------------------------------------------------------------- output locations
def test_writer_parent_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        vio.Mp4Writer(tmp_path / "notes.txt" / "out.mp4", fps=24)


def test_writer_unwritable_folder_fails_at_once(tmp_path: Path, monkeypatch) -> None:
    # Root ignores folder permissions, so the refusal is simulated where the writer probes it.
    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "touch", refuse)
    with pytest.raises(
        ValueError,
        match=f"cannot write the output video in {tmp_path} "
        r"\(Permission denied\); choose a writable folder",
    ):
        vio.Mp4Writer(tmp_path / "out.mp4", fps=24)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_writer_probe_leaves_no_file(tmp_path: Path) -> None:
    writer = vio.Mp4Writer(tmp_path / "out.mp4", fps=24)
    assert list(tmp_path.iterdir()) == []  # the writability probe cleans up after itself
    writer.abort()


# ffmpeg dying while writing: tests/media/test_video_io_faults.py (a real failing ffmpeg process).


# ------------------------------------------------------------------------------------ inputs
def test_audio_only_input_says_so(tmp_path: Path) -> None:
    import subprocess

    import imageio_ffmpeg

    audio = tmp_path / "song.mp4"
    subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440:duration=1",
            str(audio),
        ],
        check=True,
    )
    with pytest.raises(ValueError, match=f"cannot use video {audio}: it has no decodable frames \\(no video stream"):
        vio.load_video(audio, 24)
    with pytest.raises(ValueError, match="it has no decodable frames"):
        vio.load_image(audio)


# ---------------------------------------------------------------------- make_tiny_checkpoint.py
def test_tiny_script_refuses_a_real_model_config(tmp_path: Path, capsys) -> None:
    # the 4.5B config used to write a 9.6 GB "tiny" checkpoint
    config = REPO / "example" / "4.5B" / "4.5B_base_config.json"
    status = tiny_script().main(["--out", str(tmp_path / "ck"), "--config", str(config)])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "4,460M-parameter DiT" in err and "at most 50M" in err
    assert list(tmp_path.iterdir()) == []


def test_tiny_script_out_below_a_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("x")
    status = tiny_script().main(["--out", str(tmp_path / "notes.txt" / "ck")])
    assert status == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: {tmp_path / 'notes.txt'} is a file, not a folder; choose another --out"
    )


# ------------------------------------------------------------------------- damaged side files
def test_bad_vae_config_json_names_the_file(tiny: Path) -> None:
    (tiny / "vae" / "config.json").write_text("{")
    with pytest.raises(ValueError, match=f"{tiny / 'vae' / 'config.json'} is not valid JSON"):
        load_vae(tiny / "vae")


def test_bad_t5_config_json_names_the_file(tiny: Path) -> None:
    config = tiny / "t5" / "t5-v1_1-xxl" / "config.json"
    config.write_text("{")
    with pytest.raises(ValueError, match=f"{config} is not a readable T5 config"):
        T5Encoder.from_pretrained(tiny / "t5")


def test_damaged_tokenizer_is_not_a_missing_package(tiny: Path) -> None:
    folder = tiny / "t5" / "t5-v1_1-xxl"
    (folder / "spiece.model").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=f"cannot load the T5 tokenizer from {folder}: spiece.model"):
        T5Encoder.from_pretrained(tiny / "t5")


def test_download_dir_blocked_by_a_file(tmp_path: Path, capsys, monkeypatch) -> None:
    from magi.download import main as download_main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never reaches the hub either way
    (tmp_path / "downloads").write_text("x")
    assert download_main(["4.5B_base", "--dir", str(tmp_path / "downloads")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: cannot create the target folder {tmp_path / 'downloads'} (a file is in the way); choose another --dir"
    )
