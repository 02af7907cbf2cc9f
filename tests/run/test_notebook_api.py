"""The notebook API: from_pretrained, pipe(...) returning frames, output types, export_to_video, progress."""

from __future__ import annotations

import io
import json
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from magi.demo import CONFIG_NAME, tiny_folder
from magi.hub import resolve_pretrained
from magi.output import export_to_video
from magi.pipeline import MagiPipeline
from magi.sinks import progress_bar, show_progress


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny checkpoint folder (magi.demo's layout) with 4 steps per chunk, to keep the tests short."""
    folder = tiny_folder(tmp_path_factory.mktemp("nb") / "tiny")
    config = folder / CONFIG_NAME
    data = json.loads(config.read_text())
    data["runtime_config"]["num_steps"] = 4
    config.write_text(json.dumps(data))
    return folder


@pytest.fixture(scope="module")
def pipe(tiny: Path) -> MagiPipeline:
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("SPECIAL_TOKEN_PATH", raising=False)  # found beside the config, as from a download
        mp.delenv("PAD_HQ", raising=False)
        mp.delenv("PAD_DURATION", raising=False)
        yield MagiPipeline.from_pretrained(tiny, variant="tiny", device="cpu")


def _frames_of(path: Path) -> tuple[int, tuple[int, int]]:
    gen = imageio_ffmpeg.read_frames(str(path))
    meta = next(gen)
    return sum(1 for _ in gen), tuple(meta["size"])


# ------------------------------------------------------------------------------ from_pretrained
def test_from_pretrained_reads_the_folder_config(pipe: MagiPipeline, tiny: Path) -> None:
    assert Path(pipe.config.source).resolve() == (tiny / CONFIG_NAME).resolve()
    assert pipe.config.runtime.num_steps == 4 and pipe.config.runtime.video_size_w == 64


def test_resolve_pretrained_cases(tiny: Path, tmp_path: Path) -> None:
    config = tiny / CONFIG_NAME
    assert resolve_pretrained(config) == config  # a config file works as is
    # a Hub repo id already in the cache folder: no network
    assert resolve_pretrained("sand-ai/MAGI-1", "tiny", cache_dir=tiny) == config
    with pytest.raises(FileNotFoundError, match="magi.download 4.5B_distill") as err:
        resolve_pretrained(tmp_path)  # an empty folder: how to get it
    assert len(str(err.value)) <= 200
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ValueError, match="not an official checkpoint"):
        resolve_pretrained(tmp_path, "9B_magic")
    with pytest.raises(FileNotFoundError, match="neither a folder nor a Hub repo id"):
        resolve_pretrained(tmp_path / "missing" / "folder")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a config .json"):
        resolve_pretrained(tmp_path / "notes.txt")


# ------------------------------------------------------------------------------ the output object
def test_call_returns_np_frames_and_writes_nothing(
    pipe: MagiPipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = pipe("a red car", num_frames=20, seed=3)
    assert isinstance(out.frames, np.ndarray) and out.frames.dtype == np.uint8
    assert out.frames.shape == (20, 64, 64, 3) and out.output_path is None and out.frames_written == 20
    assert list(tmp_path.iterdir()) == []  # no file unless asked for
    # the same request as a tensor: the same pixels, channels first
    pt = pipe("a red car", num_frames=20, seed=3, output_type="pt", output_path=tmp_path / "o.mp4")
    assert pt.frames.dtype == torch.uint8 and tuple(pt.frames.shape) == (20, 3, 64, 64)
    assert np.array_equal(pt.frames.permute(0, 2, 3, 1).numpy(), out.frames)
    assert pt.output_path == tmp_path / "o.mp4" and _frames_of(pt.output_path) == (20, (64, 64))
    assert float(out.frames.astype(np.float64).std()) > 1.0  # real frames, not a blank buffer


def test_output_types_pil_and_latent(pipe: MagiPipeline) -> None:
    ref = pipe("a red car", num_frames=20, seed=3).frames
    pil = pipe("a red car", num_frames=20, seed=3, output_type="pil").frames
    assert len(pil) == 20 and pil[0].size == (64, 64) and pil[0].mode == "RGB"
    assert np.array_equal(np.stack([np.asarray(im) for im in pil]), ref)
    latent = pipe("a red car", num_frames=20, seed=3, output_type="latent").frames
    assert latent.dtype == torch.float32 and tuple(latent.shape) == (1, 16, 6, 8, 8)
    assert bool(torch.isfinite(latent).all()) and float(latent.std()) > 0


def test_bad_output_type_is_one_line_before_any_work(pipe: MagiPipeline) -> None:
    with pytest.raises(ValueError, match="output_type must be one of np, pil, pt, latent") as err:
        pipe("a red car", output_type="numpy")
    assert "\n" not in str(err.value) and len(str(err.value)) <= 200
    with pytest.raises(ValueError, match="not both"):
        pipe("a red car", image="a.png", video="b.mp4")


# ------------------------------------------------------------------------------ export_to_video
def test_export_to_video_takes_every_form(tmp_path: Path) -> None:
    g = np.random.default_rng(0)
    frames = g.integers(0, 256, (7, 32, 48, 3), dtype=np.uint8)
    assert export_to_video(frames, tmp_path / "np.mp4", fps=12) == tmp_path / "np.mp4"
    assert _frames_of(tmp_path / "np.mp4") == (7, (48, 32))
    from PIL import Image

    export_to_video([Image.fromarray(f) for f in frames], tmp_path / "pil.mp4")
    export_to_video(torch.from_numpy(frames).permute(0, 3, 1, 2), tmp_path / "pt.mp4")
    export_to_video(frames.astype(np.float32) / 255, tmp_path / "float.mp4")
    for name in ("pil", "pt", "float"):
        assert _frames_of(tmp_path / f"{name}.mp4") == (7, (48, 32))
    fps = next(imageio_ffmpeg.read_frames(str(tmp_path / "np.mp4")))["fps"]
    assert float(fps) == 12.0
    with pytest.raises(ValueError, match=r"expects frames \(T, H, W, 3\)"):
        export_to_video(frames[..., :2], tmp_path / "bad.mp4")
    with pytest.raises(ValueError, match="no frames"):
        export_to_video([], tmp_path / "bad.mp4")
    assert not (tmp_path / "bad.mp4").exists()


# ------------------------------------------------------------------------------ progress
class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_auto_follows_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    assert show_progress(True) is True and show_progress(False) is False
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert show_progress(None) is False  # a pipe or a log file: no bar
    assert type(progress_bar(3, None)).__name__ == "_NoBar"
    tty = _Tty()
    monkeypatch.setattr("sys.stderr", tty)
    assert show_progress(None) is True
    bar = progress_bar(3, None)
    bar.update(1)
    bar.close()
    assert "1/3" in tty.getvalue()


def test_generate_shows_no_bar_off_a_terminal(pipe: MagiPipeline, capfd: pytest.CaptureFixture) -> None:
    result = pipe.generate("t2v", "a red car", num_frames=20, seed=3)  # progress=None: auto; stderr is captured
    assert "chunk" not in capfd.readouterr().err
    assert result.frames is None and result.frames_written == 20  # generate keeps no frames by default
    pipe.generate("t2v", "a red car", num_frames=20, seed=3, progress=True)
    assert "1/1" in capfd.readouterr().err
