"""Every bad-input error of python -m magi.infer is one line of at most 200 characters, also when
the paths it names are long (~250 characters): a long path is elided in the middle, its file name
kept (magi.request.shown_path / shorten_paths, and one_line as the last guard)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from magi import budget, infer
from magi.demo import CONFIG_NAME, tiny_folder
from magi.generation import Control
from magi.request import one_line, shorten_paths, shown_path
from magi.video_io import Mp4Writer

GIB = 2**30
BASE = ["--config", "cfg.json", "--device", "cpu", "--prompt", "p"]  # the workdir's config (tests/cli/conftest.py)


def _long(root: Path) -> Path:
    """A folder whose path is about 250 characters long (two long names under ``root``)."""
    folder = root / ("d" * 110) / ("e" * (240 - len(str(root)) - 110))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _one_line(argv: list[str], capsys, name: str = "") -> str:
    """Run the CLI: exit 2 and one ``error:`` line of <= 200 characters that keeps the file name."""
    assert infer.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    line = err.rstrip("\n")
    assert len(line) <= 200, f"{len(line)} characters: {line}"
    assert name in line, line
    assert " ... " not in line, line  # short at the source: one_line, the last guard, cut nothing
    return line


def test_message_helpers() -> None:
    path = "/data/" + "x" * 200 + "/out.mp4"
    assert shown_path(path) == "/data/" + "x" * 43 + ".../out.mp4" and len(shown_path(path)) == 60
    assert shown_path("short/out.mp4") == "short/out.mp4"
    assert shorten_paths(f"{path} is bad; so is its folder {Path(path).parent}", path) == (
        f"{shown_path(path)} is bad; so is its folder {shown_path(Path(path).parent)}"
    )
    line = one_line("a" * 150 + "b" * 150 + "\nsecond line")
    assert len(line) == 200 and line.startswith("a" * 97 + " ... ") and line.endswith("b" * 98)


def test_bad_inputs_with_long_paths(workdir: Path, fake_pipeline, capsys, monkeypatch) -> None:
    far = _long(workdir)
    out = ["--output_path", str(far / "out.mp4")]
    (far / "dir.mp4").mkdir()
    (far / "notes.png").write_text("not a picture\n" * 20)
    (far / "bad.json").write_text("[1, 2")
    (far / "afile").write_text("x")
    shutil.copy(workdir / "pre.mp4", far / "pre.mp4")
    t2v = [*BASE, "--mode", "t2v"]
    cases = [
        ([*BASE, "--mode", "i2v", "--image_path", str(far / "missing.png"), *out], "missing.png"),
        ([*BASE, "--mode", "v2v", "--prefix_video_path", str(far / "missing.mp4"), *out], "missing.mp4"),
        ([*BASE, "--mode", "i2v", "--image_path", str(far / "notes.png"), *out], "notes.png"),
        ([*t2v, "--output_path", str(far / "out.txt")], "out.txt"),
        ([*t2v, "--output_path", str(far / "dir.mp4")], "dir.mp4"),
        ([*t2v, "--output_path", str(far / "afile" / "out.mp4")], "afile"),
        ([*t2v, *out, "--save_tensors", str(far / "t.bin")], "t.bin"),
        ([*t2v, *out, "--save_tensors", str(far / "afile" / "t.safetensors")], "afile"),
        ([*t2v, *out, "--save_state", str(far / "afile" / "run.state")], "afile"),
        ([*t2v, *out, "--steer", str(far)], "--steer"),
        ([*t2v, *out, "--steer", str(far / "nowhere" / "s.jsonl")], "s.jsonl"),
        ([*BASE[:4], "--mode", "t2v", "--prompt_file", str(far / "missing.json"), *out], "missing.json"),
        ([*BASE[:4], "--mode", "t2v", "--prompt_file", str(far / "bad.json"), *out], "bad.json"),
        (["--config", str(far / "missing.json"), "--mode", "t2v", "--prompt", "p", *out], "missing.json"),
    ]
    pre = str(far / "pre.mp4")
    cases.append(([*BASE, "--mode", "v2v", "--prefix_video_path", pre, "--output_path", pre], "pre.mp4"))
    data = json.loads((workdir / "cfg.json").read_text())
    data["runtime_config"]["load"] = str(far / "nothing")  # a checkpoint that is not there
    (far / "nock.json").write_text(json.dumps(data))
    cases.append((["--config", str(far / "nock.json"), "--mode", "t2v", "--prompt", "p", *out], "nock.json"))
    for argv, name in cases:
        _one_line(argv, capsys, name)
    # the initial noise too big for a TMPDIR with a long path
    monkeypatch.setattr(budget, "ram_bytes", lambda: 64 * GIB)
    monkeypatch.setattr(budget, "free_tmp_bytes", lambda folder=None: GIB)
    monkeypatch.setattr(tempfile, "tempdir", str(far))
    line = _one_line([*t2v, *out, "--num_frames", "10000000"], capsys, "the initial noise")
    assert line.endswith("GiB free); lower --num_frames or the size")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny config (4 steps per chunk) beside its checkpoint and special tokens."""
    folder = tiny_folder(tmp_path_factory.mktemp("lines") / "tiny")
    config = folder / CONFIG_NAME
    data = json.loads(config.read_text())
    data["runtime_config"]["num_steps"] = 4
    config.write_text(json.dumps(data))
    return config


def test_resume_and_extend_errors_with_long_paths(tiny: Path, tmp_path: Path, capsys) -> None:
    from magi.pipeline import MagiPipeline

    far = _long(tmp_path)
    state = far / "run.state"
    with pytest.MonkeyPatch.context() as mp:
        for name in ("SPECIAL_TOKEN_PATH", "PAD_HQ", "PAD_DURATION"):
            mp.delenv(name, raising=False)
        control = Control()
        MagiPipeline.from_config(tiny, device="cpu").generate(
            "t2v", "a fox", num_frames=48, seed=5, save_state=state, control=control, on_chunk=lambda c: control.stop()
        )
        with Mp4Writer(far / "other.mp4", 24) as writer:  # a video that is not the stopped run's
            writer.append(torch.zeros(3, 3, 64, 64, dtype=torch.uint8))
        (far / "cut.state").write_bytes(state.read_bytes()[:100])
        capsys.readouterr()  # the stopped run's own report (a log handler an earlier CLI run left)
        base = ["--config", str(tiny), "--device", "cpu"]
        cases = [
            ([*base, "--resume", str(state), "--output_path", str(far / "other.mp4")], "other.mp4"),
            ([*base, "--resume", str(far / "cut.state"), "--output_path", str(far / "o.mp4")], "cut.state"),
            ([*base, "--resume", str(far / "none.state"), "--output_path", str(far / "o.mp4")], "none.state"),
            ([*base, "--resume", str(state), "--output_path", str(far / "o.mp4"), "--num_frames", "10"], "10"),
            ([*base, "--extend", str(state), "--prompt", "x", "--output_path", str(far / "o.mp4")], "run.state"),
            ([*base, "--resume", str(state), "--output_path", str(far / "o.mp4"), "--video_size_w", "128"], "128"),
        ]
        for argv, name in cases:
            _one_line(argv, capsys, name)
