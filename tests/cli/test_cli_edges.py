"""CLI rough edges: --steer's last line, --extend of an extended video, --resume's fixed flags,
a text file as the i2v image, state mismatches naming the fields."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import pytest

from magi.config import load_config
from magi.demo import CONFIG_NAME, tiny_folder
from magi.generation import Control
from magi.infer import UsageError, prepare
from magi.media.read import check_not_text, is_text, load_image, probe
from magi.state import GenerationState, StateError, state_identity
from magi.steer_file import SteerFile, check_file


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny config (4 steps per chunk) beside its checkpoint and special tokens."""
    folder = tiny_folder(tmp_path_factory.mktemp("edges") / "tiny")
    config = folder / CONFIG_NAME
    data = json.loads(config.read_text())
    data["runtime_config"]["num_steps"] = 4
    config.write_text(json.dumps(data))
    return config


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("SPECIAL_TOKEN_PATH", "PAD_HQ", "PAD_DURATION")}


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "magi.infer", "--config", str(config), "--device", "cpu", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)


def _frames(path: Path) -> int:
    return imageio_ffmpeg.count_frames_and_secs(str(path))[0]


# ------------------------------------------------------------------------------ --steer FILE
def test_steer_file_last_line_without_newline_is_read(tmp_path: Path) -> None:
    path = tmp_path / "steer.jsonl"
    path.write_text('{"from_chunk": 1, "prompt": "rain"}')  # no trailing newline
    check_file(path, chunks=4)
    warnings: list[str] = []
    steer = SteerFile(path, Control(), warn=warnings.append)
    steer.poll()
    assert steer.applied == [(1, "rain")]
    with path.open("a") as f:  # the newline comes later, then more lines
        f.write('\n{"from_chunk": 2, "prompt": "snow"}\n{"from_chunk": 3, "prompt": }\n')
    steer.poll()
    assert steer.applied == [(1, "rain"), (2, "snow")]
    assert len(warnings) == 1 and "line 3" in warnings[0] and "skipped" in warnings[0]


def test_steer_file_half_written_last_line_waits(tmp_path: Path) -> None:
    path = tmp_path / "steer.jsonl"
    path.write_text('{"from_chunk": 1, "prompt": "ra')
    steer = SteerFile(path, Control(), warn=lambda line: pytest.fail(line))
    steer.poll()
    assert steer.applied == []
    with path.open("a") as f:
        f.write('in"}')
    steer.poll()
    assert steer.applied == [(1, "rain")]


def test_steer_file_malformed_line_names_its_number(tmp_path: Path) -> None:
    path = tmp_path / "steer.jsonl"
    path.write_text('{"from_chunk": 1, "prompt": "rain"}\n\n{"from_chunk": "x", "prompt": "snow"}')
    with pytest.raises(ValueError, match=r"steer\.jsonl line 3: ") as err:
        check_file(path, chunks=4)
    assert len(str(err.value)) <= 200


# ------------------------------------------------------------------------------ the i2v image
def test_text_file_as_image_is_refused_before_any_model(tiny: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.png"  # a text file, whatever its name says
    text.write_text("hello\nthis is not a picture\n" * 20)
    ansi = tmp_path / "art.ans"
    ansi.write_bytes(b"\0\x1b[31mred\x1b[0m\n" * 20)  # binary enough to pass the text sniff: ffmpeg's tty demuxer
    for path in (text, ansi):
        with pytest.raises(ValueError, match="is a text file"):
            load_image(path, (64, 64))
        with pytest.raises(ValueError, match="is a text file"):
            probe(path, "video")
    with pytest.raises(UsageError, match=r"--image_path: image .*notes\.png is a text file") as err:
        prepare(
            [
                "--config",
                str(tiny),
                "--mode",
                "i2v",
                "--prompt",
                "x",
                "--image_path",
                str(text),
                "--output_path",
                str(tmp_path / "o.mp4"),
            ]
        )
    assert len(str(err.value)) <= 200
    assert is_text("naïve café ☕\n".encode()) and not is_text(b"\x89PNG\r\n\x1a\n\0\0")
    assert not is_text(b"P3\n2 2\n255\n0 0 0 255 255 255\n")  # ASCII netpbm is a picture
    with pytest.raises(ValueError, match="config.json is a text file"):
        check_not_text(Path(__file__).parents[2] / "example" / "tiny" / "config.json", "image")


# ------------------------------------------------------------------------------ state mismatches
def _state(identity: dict) -> GenerationState:
    import torch

    return GenerationState({"identity": identity}, {}, None, torch.zeros(0), torch.zeros(0))


def test_state_mismatch_names_the_fields(tiny: Path) -> None:
    cfg = load_config(tiny)
    saved = state_identity(cfg, "magi")
    bigger = cfg.replace(runtime=dataclasses.replace(cfg.runtime, video_size_h=128, num_steps=8))
    with pytest.raises(StateError) as err:
        _state(saved).check_compatible(state_identity(bigger, "magi"), "run.state")
    text = str(err.value)
    assert "runtime.num_steps 4, this run 8" in text and "runtime.video_size_h 64, this run 128" in text
    assert "hash" not in text and len(text) <= 200 and "\n" not in text
    with pytest.raises(StateError, match=r"another compat mode \(magi, this run official\)"):
        _state(saved).check_compatible(state_identity(cfg, "official"), "run.state")
    old = {k: v for k, v in saved.items() if k != "config"}  # a state saved before the fields were kept
    _state(old).check_compatible(state_identity(cfg, "magi"))  # still loads and matches
    with pytest.raises(StateError, match="another config .a state from before"):
        _state(old).check_compatible(state_identity(bigger, "magi"))


# ------------------------------------------------------------------------------ resume / extend
@pytest.fixture(scope="module")
def stopped(tiny: Path, tmp_path_factory) -> Path:
    """A run of 2 chunks stopped after its first: an unfinished state."""
    from magi.pipeline import MagiPipeline

    root = tmp_path_factory.mktemp("stopped")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("SPECIAL_TOKEN_PATH", "PAD_HQ", "PAD_DURATION"):
            mp.delenv(name, raising=False)
        pipe = MagiPipeline.from_config(tiny, device="cpu")
        control = Control()
        pipe.generate(
            "t2v",
            "a fox",
            num_frames=48,
            seed=5,
            save_state=root / "run.state",
            control=control,
            on_chunk=lambda chunk: control.stop(),
        )
    assert not GenerationState.load(root / "run.state").meta["finished"]
    return root / "run.state"


def test_resume_refuses_flags_it_cannot_apply(tiny: Path, stopped: Path, tmp_path: Path) -> None:
    base = ["--config", str(tiny), "--resume", str(stopped), "--output_path", str(tmp_path / "o.mp4")]
    with pytest.raises(UsageError, match=r"^--seed 99: a resumed run keeps its seed \(5\); drop --seed$"):
        prepare([*base, "--seed", "99"])
    # its 2-chunk plan had begun ending the video at the resume point: no longer plan agrees with it
    with pytest.raises(UsageError, match=r"^--num_frames 96: the stopped run had begun the steps that end its video"):
        prepare([*base, "--num_frames", "96"])
    with pytest.raises(UsageError, match=r"^--num_frames 20: the stopped run has written 24 frames already"):
        prepare([*base, "--num_frames", "20"])
    with pytest.raises(UsageError, match=r"runtime\.video_size_w 64, this run 128"):
        prepare([*base, "--video_size_w", "128"])
    _, request, args = prepare([*base, "--seed", "5", "--num_frames", "48"])  # the state's own values pass
    assert args.mode == "t2v" and request.prompt == ["a fox"]


def test_extend_of_an_extended_video(tiny: Path, tmp_path: Path) -> None:
    out, first, second = tmp_path / "v.mp4", tmp_path / "a.state", tmp_path / "b.state"
    run = _cli(
        tiny,
        "--mode",
        "t2v",
        "--prompt",
        "a fox",
        "--num_frames",
        "24",
        "--output_path",
        str(out),
        "--save_state",
        str(first),
    )
    assert run.returncode == 0, run.stderr[-2000:]
    more = _cli(
        tiny,
        "--extend",
        str(first),
        "--prompt",
        "it rains",
        "--num_frames",
        "24",
        "--output_path",
        str(out),
        "--save_state",
        str(second),
    )
    assert more.returncode == 0, more.stderr[-2000:]
    assert f"extended by 24 frames: {out} now holds 48 frames" in more.stdout
    again = _cli(tiny, "--extend", str(second), "--prompt", "it snows", "--num_frames", "24", "--output_path", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"extended by 24 frames: {out} now holds 72 frames" in again.stdout and _frames(out) == 72
    alone = tmp_path / "alone.mp4"  # written to a new file: only the new frames, said so
    apart = _cli(
        tiny, "--extend", str(second), "--prompt", "it snows", "--num_frames", "24", "--output_path", str(alone)
    )
    assert apart.returncode == 0 and _frames(alone) == 24
    assert "written alone to" in apart.stdout and "has 48 frames" in apart.stdout


# ------------------------------------------------------------------------------ one-line errors
def test_missing_files_errors_fit_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from magi.config import config_from_dict
    from magi.prompts import check_special_tokens
    from magi.tiny import tiny_config_dict

    data = tiny_config_dict(tmp_path / ("a-long-folder-name" * 8))  # nothing there: all three missing
    (tmp_path / "nock.json").write_text(json.dumps(data))
    with pytest.raises(UsageError) as err:
        prepare(
            [
                "--config",
                str(tmp_path / "nock.json"),
                "--mode",
                "t2v",
                "--prompt",
                "x",
                "--output_path",
                str(tmp_path / "o.mp4"),
            ]
        )
    text = str(err.value)
    assert text.startswith("nock.json: 'runtime_config.load': no DiT weights in") and "(+2 more missing)" in text
    assert "magi.download" in text and len(text) <= 200
    monkeypatch.delenv("SPECIAL_TOKEN_PATH", raising=False)
    monkeypatch.setenv("PAD_HQ", "1")
    monkeypatch.setenv("PAD_DURATION", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="special_tokens.npz not found") as err:
        check_special_tokens(config_from_dict(data))
    assert len(str(err.value)) <= 200 and str(err.value).endswith("are on unless set to 0)")
