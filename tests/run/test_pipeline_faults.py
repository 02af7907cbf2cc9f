"""Faults that used to lose or corrupt a video, or crash after the models had loaded (issue 10).

Each test reproduces the real fault: a real signal to a real process, NaN values in the weight
file, a real full disk (a small tmpfs; skipped where mounting is not allowed), more prompts than
the encoding cache holds.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import imageio_ffmpeg
import pytest
import torch
from safetensors.torch import load_file, save_file

from magi.config import load_config, save_config
from magi.pipeline import PROMPT_CACHE_SIZE, MagiPipeline, NonFiniteLatentError
from magi.sampling.noise import InitialNoise
from tests.helpers import REPO_ROOT as REPO, TINY_CONFIG


def _config(root: Path, ck: Path, load: Path | None = None) -> Path:
    cfg = load_config(TINY_CONFIG)
    runtime = dataclasses.replace(
        cfg.runtime,
        load=str(load or ck / "magi" / "tiny"),
        t5_pretrained=str(ck / "t5"),
        vae_pretrained=str(ck / "vae"),
        num_steps=4,
        window_size=4,
    )
    path = root / ("config.json" if load is None else "config_nan.json")
    save_config(cfg.replace(runtime=runtime), path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config file with 4 steps per chunk, window 4; the shared tiny checkpoint folder)."""
    root = tmp_path_factory.mktemp("reliability")
    return _config(root, tiny_checkpoint), tiny_checkpoint


@pytest.fixture(scope="module")
def pipe(tiny: tuple[Path, Path]) -> MagiPipeline:
    os.environ["SPECIAL_TOKEN_PATH"] = str(tiny[1] / "special_tokens.npz")
    return MagiPipeline.from_config(tiny[0], device="cpu")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs (ENOSPC once full); skips where this process may not mount."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root / CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _frames(path: Path) -> int:
    gen = imageio_ffmpeg.read_frames(str(path))
    next(gen)
    return sum(1 for _ in gen)


# ------------------------------------------------------------------------------ stop signals
DRIVER = textwrap.dedent(
    """
    import sys
    from magi.cli import stop_on_signals
    from magi.generation import Control
    from magi.pipeline import MagiPipeline
    pipe = MagiPipeline.from_config(sys.argv[1], device="cpu")
    def report(info):
        if info.finished is not None:
            print("FINISHED", info.finished, flush=True)
    control = Control()  # the script owns its signals; the library installs no handler
    with stop_on_signals(control):
        result = pipe.generate("t2v", "a long walk", output_path=sys.argv[2], num_frames=24 * 30,
                               callback=report, control=control)
    print(result.summary(), flush=True)
    sys.exit(result.exit_status)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_keep_a_playable_partial_mp4(tiny: tuple[Path, Path], tmp_path: Path, signum: int) -> None:
    out = tmp_path / "partial.mp4"
    env = dict(os.environ, PYTHONPATH=str(REPO), SPECIAL_TOKEN_PATH=str(tiny[1] / "special_tokens.npz"))
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(tiny[0]), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:
            if line.startswith("FINISHED 1"):
                proc.send_signal(signum)
                break
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, stderr[-2000:]
    assert "interrupted" in stdout and signal.Signals(signum).name in stderr
    frames = _frames(out)
    assert 24 <= frames < 24 * 30 and frames % 24 == 0
    assert not [p for p in tmp_path.iterdir() if p.name != "partial.mp4"]  # no orphan temp file


def test_cli_exit_status_follows_the_signal() -> None:
    from magi.pipeline import GenerationResult

    assert GenerationResult(None).exit_status == 0
    assert GenerationResult(None, interrupted=True).exit_status == 130
    assert GenerationResult(None, interrupted=True, stop_signal=signal.SIGTERM).exit_status == 143


# ------------------------------------------------------------------------------ NaN weights
@pytest.fixture(scope="module")
def nan_config(tiny: tuple[Path, Path]) -> Path:
    """The tiny checkpoint with NaN in the final linear layer's weights (a corrupt conversion)."""
    cfg_path, ck = tiny
    src, dst = ck / "magi" / "tiny", cfg_path.parent / "nan_ckpt"
    dst.mkdir(exist_ok=True)
    poisoned = False
    for f in src.rglob("*"):
        rel = dst / f.relative_to(src)
        if f.is_dir():
            rel.mkdir(parents=True, exist_ok=True)
            continue
        rel.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix != ".safetensors":
            rel.write_bytes(f.read_bytes())
            continue
        tensors = load_file(str(f))
        for key in tensors:
            if key.startswith("final_linear") and key.endswith("weight") and tensors[key].is_floating_point():
                tensors[key] = torch.full_like(tensors[key], float("nan"))
                poisoned = True
        save_file(tensors, str(rel))
    assert poisoned, "no final_linear weight found in the tiny checkpoint"
    return _config(cfg_path.parent, ck, load=dst)


def test_nan_weights_fail_with_one_line_and_write_nothing(
    nan_config: Path, tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    os.environ["SPECIAL_TOKEN_PATH"] = str(tiny[1] / "special_tokens.npz")
    bad = MagiPipeline.from_config(nan_config, device="cpu")
    out = tmp_path / "black.mp4"
    with pytest.raises(NonFiniteLatentError, match="chunk 0 .*NaN/Inf.*non-finite") as err:
        bad.generate("t2v", "a", output_path=out, num_frames=24)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_nan_weights_cli_exit_1(nan_config: Path, tiny: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "black.mp4"
    env = dict(os.environ, PYTHONPATH=str(REPO), SPECIAL_TOKEN_PATH=str(tiny[1] / "special_tokens.npz"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "magi.infer",
            "--config",
            str(nan_config),
            "--mode",
            "t2v",
            "--prompt",
            "a",
            "--num_frames",
            "24",
            "--output_path",
            str(out),
            "--device",
            "cpu",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "NaN/Inf" in errors[0] and "Traceback" not in done.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ v2v onto itself
def test_v2v_output_onto_its_prefix_video_is_refused(pipe: MagiPipeline, tmp_path: Path) -> None:
    from magi.video_io import Mp4Writer

    video = tmp_path / "in.mp4"
    with Mp4Writer(video, 24) as w:
        w.append(torch.full((8, 3, 64, 64), 100, dtype=torch.uint8))
    before = video.read_bytes()
    with pytest.raises(ValueError, match="overwrite the input video"):
        pipe.generate("v2v", "a", prefix_video_path=video, output_path=video, num_frames=24)
    with pytest.raises(ValueError, match="overwrite the input video"):
        pipe.generate("v2v", "a", prefix_video_path=video, output_path=tmp_path / "." / "in.mp4")
    assert video.read_bytes() == before


# ------------------------------------------------------------------------------ prompts
def test_more_prompts_than_the_cache_holds(pipe: MagiPipeline) -> None:
    n = PROMPT_CACHE_SIZE + 3
    prompts = [f"scene number {k}" for k in range(n)]
    pipe.prompts.forget()
    chunks = list(pipe.stream("t2v", prompts, num_frames=24 * n))
    assert [c.index for c in chunks] == list(range(n))
    assert len(pipe.prompts.cached) == PROMPT_CACHE_SIZE  # the LRU still bounds reuse across requests
    assert pipe.prompts.cached == prompts[-PROMPT_CACHE_SIZE:]


def test_only_prompts_of_generated_chunks_are_encoded(pipe: MagiPipeline, monkeypatch) -> None:
    from magi.models.text_encoder import T5Encoder

    seen: list[list[str]] = []
    real = T5Encoder.encode

    def spy(self, prompts, *args, **kwargs):
        seen.append(list(prompts))
        return real(self, prompts, *args, **kwargs)

    monkeypatch.setattr(T5Encoder, "encode", spy)
    pipe.prompts.forget()
    list(pipe.stream("t2v", ["first", "second", "first", "second"], num_frames=96))
    assert seen == [["first", "second"]]  # each distinct prompt once
    # more prompts than generated chunks is refused (the HTTP API's rule), before T5 runs
    with pytest.raises(ValueError, match="4 prompts but the video has only 2 chunks"):
        pipe.stream("t2v", ["first", "second", "never reached", "nor this"], num_frames=48)
    assert seen == [["first", "second"]]


# ------------------------------------------------------------------------------ full disks
def test_save_tensors_on_a_full_disk_is_one_line_and_leaves_nothing(pipe: MagiPipeline, small_disk: Path) -> None:
    out, saved = small_disk / "v.mp4", small_disk / "t.safetensors"
    (small_disk / "filler").write_bytes(b"\0" * 150_000)  # leaves room for the mp4, not the tensors
    with pytest.raises(OSError, match=r"cannot write save_tensors .*No space left on device; nothing was written"):
        pipe.generate("t2v", "a", output_path=out, num_frames=72, save_tensors=saved)
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_noise_file_on_a_full_disk_names_the_folder_and_tmpdir(small_disk: Path) -> None:
    shape = (1, 16, 6 * 100, 8, 8)  # 2.4 MB of float32, the disk holds 256 KiB
    with pytest.raises(OSError, match=rf"initial noise file .* in {small_disk}: No space left on device; .*TMPDIR"):
        InitialNoise.draw(shape, 0, 6, spill_bytes=0, directory=small_disk)
    assert list(small_disk.iterdir()) == []
