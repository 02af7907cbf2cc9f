"""python -m magi.infer --steer FILE: timeline edits read from a file the CLI watches."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from magi import infer
from magi.generation import Control
from magi.steer_file import SteerFile, check_file
from tests.helpers import infer_argv, infer_env

FOX, BIRD = "a red fox in the snow", "a blue bird over the sea"


def _line(from_chunk: object, prompt: object) -> str:
    return json.dumps({"from_chunk": from_chunk, "prompt": prompt}) + "\n"


def _pending(control: Control) -> list[tuple[int, str, bool]]:
    return list(control._pending)


def test_watcher_reads_complete_lines_and_skips_bad_ones(tmp_path: Path) -> None:
    path, warnings, control = tmp_path / "steer.jsonl", [], Control()
    watcher = SteerFile(path, control, warn=warnings.append)
    watcher.poll()  # no file yet: nothing, no warning
    assert _pending(control) == [] and warnings == []
    path.write_text('{"from_chunk": 2, "prom')  # being written: waits for its newline
    watcher.poll()
    assert _pending(control) == []
    with open(path, "a") as f:
        f.write(
            'pt": "' + BIRD + '"}\n\nnot json\n' + _line(-1, "x") + _line(1, "  ") + '{"chunk": 1}\n' + _line(4, FOX)
        )
    watcher.poll()
    assert _pending(control) == [(2, BIRD, True), (4, FOX, True)]
    assert watcher.applied == [(2, BIRD), (4, FOX)]
    assert len(warnings) == 4 and all(
        w.startswith(f"--steer {path} line ") and w.endswith("; skipped") for w in warnings
    )
    assert [w.split(":")[0].rsplit(" ", 1)[1] for w in warnings] == ["3", "4", "5", "6"]  # line numbers
    watcher.poll()  # nothing new: nothing applied twice
    assert len(_pending(control)) == 2
    path.write_text(_line(0, "again"))  # replaced by a shorter file: read from the top
    watcher.poll()
    assert _pending(control)[-1] == (0, "again", True) and "got shorter" in warnings[-1]


def test_watcher_thread_applies_lines_appended_later(tmp_path: Path) -> None:
    path, control = tmp_path / "steer.jsonl", Control()
    path.write_text(_line(1, FOX))
    with SteerFile(path, control, warn=pytest.fail) as watcher:
        assert watcher.applied == [(1, FOX)]  # read at start, before the run
        with open(path, "a") as f:
            f.write(_line(3, BIRD))
        deadline = time.monotonic() + 10
        while len(watcher.applied) < 2:
            assert time.monotonic() < deadline, "the appended line was never read"
            time.sleep(0.02)
    assert _pending(control) == [(1, FOX, True), (3, BIRD, True)]


def test_check_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "steer.jsonl"
    check_file(path)  # missing: fine, it may be created during the run
    path.write_text(_line(0, FOX) + "oops\n")
    with pytest.raises(ValueError, match=rf"^--steer {path} line 2: not a JSON line"):
        check_file(path)
    path.write_text(_line(0, FOX) + _line(8, BIRD))
    with pytest.raises(ValueError, match=r"line 2: from_chunk 8 is beyond the video \(generated chunks 0 \.\. 7\)"):
        check_file(path, chunks=8)
    check_file(path, chunks=9)
    path.write_text(_line(0, FOX) + "half a li")  # the last line is read without its newline too (issue 21)
    with pytest.raises(ValueError, match=rf"^--steer {path} line 2: not a JSON line"):
        check_file(path)


def test_cli_refuses_a_bad_steer_file_before_loading(tiny: Path, tmp_path: Path, capsys) -> None:
    base = [
        "--config",
        str(tiny),
        "--device",
        "cpu",
        "--mode",
        "t2v",
        "--prompt",
        FOX,
        "--num_frames",
        "48",
        "--output_path",
        str(tmp_path / "o.mp4"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_line(2, BIRD))  # 48 frames: generated chunks 0 .. 1
    cases = {
        str(bad): f"error: --steer {bad} line 1: from_chunk 2 is beyond the video (generated chunks 0 .. 1)",
        str(tmp_path): f"error: --steer {tmp_path} is a folder; give a file",
        str(tmp_path / "no" / "s.jsonl"): f"error: --steer {tmp_path / 'no' / 's.jsonl'}: the folder",
    }
    for steer, start in cases.items():
        assert infer.main(base + ["--steer", steer]) == 2
        err = capsys.readouterr().err
        assert err.startswith(start) and err.count("\n") == 1, err
    assert not (tmp_path / "o.mp4").exists()


def _latent(path: Path) -> torch.Tensor:
    return load_file(str(path))["final_latent"]


def test_cli_steered_from_a_file_equals_the_timeline_run(tiny: Path, tmp_path: Path) -> None:
    """Lines already in the file apply from the start; a line appended once the first chunk is
    written (16 chunks, the edit from chunk 15: far from the window) applies too. Both equal a
    --prompt_file timeline run."""
    chunks = 16
    common = ["--mode", "t2v", "--num_frames", str(24 * chunks), "--seed", "5"]
    timeline = tmp_path / "timeline.json"
    timeline.write_text(
        json.dumps(
            [{"chunk": 0, "prompt": FOX}, {"chunk": 2, "prompt": BIRD}, {"chunk": 15, "prompt": "the fox sleeps"}]
        )
    )
    subprocess.run(
        infer_argv(
            tiny,
            *common,
            "--prompt_file",
            str(timeline),
            "--output_path",
            str(tmp_path / "t.mp4"),
            "--save_tensors",
            str(tmp_path / "t.safetensors"),
        ),
        env=infer_env(tiny),
        check=True,
        capture_output=True,
        timeout=300,
    )

    steer, state = tmp_path / "steer.jsonl", tmp_path / "run.state"
    steer.write_text(_line(2, BIRD))
    proc = subprocess.Popen(
        infer_argv(
            tiny,
            *common,
            "--prompt",
            FOX,
            "--steer",
            str(steer),
            "--save_state",
            str(state),
            "--output_path",
            str(tmp_path / "s.mp4"),
            "--save_tensors",
            str(tmp_path / "s.safetensors"),
        ),
        env=infer_env(tiny),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = Path(f"{state}.chunks") / "00000.mp4"
        deadline = time.monotonic() + 240
        while not first.is_file():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.02)
        with open(steer, "a") as f:
            f.write(_line(15, "the fox sleeps"))
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-2000:]
    assert "--steer" not in stderr  # no line was skipped
    assert torch.equal(_latent(tmp_path / "s.safetensors"), _latent(tmp_path / "t.safetensors"))
