"""Media I/O under faults: a full disk or a failing ffmpeg while writing the mp4, temp-file names
(NAME_MAX, stale files of killed runs) and decompression-bomb images. Each test reproduces the
real fault (a tiny tmpfs, a fake ffmpeg, a dead pid, a 16000x16000 png) and checks that the
output path is never replaced by a broken file and that the error is one clear line."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import imageio_ffmpeg
import pytest
import torch

from magi.media.mp4 import Mp4Writer
from magi.media.read import load_image, load_video

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def _frames(n: int, w: int = 64, h: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )  # noise: x264 cannot compress it, the disk fills


def _good_mp4(path: Path) -> bytes:
    with Mp4Writer(path, fps=24) as writer:
        writer.append(_frames(2, seed=1))
    return path.read_bytes()


# ------------------------------------------------------------------------------- disk full
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 200 KiB tmpfs: the real ENOSPC, as when the output disk fills up mid-video."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)  # lazy: even if still open


def test_disk_full_keeps_the_previous_output(small_disk: Path) -> None:
    out = small_disk / "out.mp4"
    good = _good_mp4(out)
    writer = Mp4Writer(out, fps=24)
    with pytest.raises(RuntimeError) as info:
        for seed in range(12):  # 12 x 4 noise frames of 128x128: ~600 KiB of h264
            writer.append(_frames(4, 128, 128, seed))
        writer.close()
    message = str(info.value)
    assert "\n" not in message and str(out) in message and "no space left on device" in message
    assert out.read_bytes() == good  # the earlier result survives
    assert sorted(p.name for p in small_disk.iterdir()) == ["out.mp4"]  # no temp file left
    assert load_video(out, 24).shape == (2, 48, 64, 3)


# ---------------------------------------------------------------------------- failing ffmpeg
def _fake_ffmpeg(tmp_path: Path, encode: str) -> Path:
    """An ffmpeg that runs ``encode`` (shell) for the writer's command, the real one otherwise."""
    script = tmp_path / "fake-ffmpeg"
    script.write_text(
        f'#!/bin/sh\nif [ "$1" != "-y" ]; then exec "{FFMPEG}" "$@"; fi\nfor last; do :; done\n{encode}\n'
    )
    script.chmod(0o755)
    return script


def test_ffmpeg_failing_at_the_end_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    encode = 'cat > /dev/null\necho "[libx264 @ 0x1] encoder exploded" >&2\nexit 3'
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(_fake_ffmpeg(tmp_path, encode)))
    out = tmp_path / "out" / "video.mp4"
    out.parent.mkdir()
    writer = Mp4Writer(out, fps=24)
    writer.append(_frames(3))
    with pytest.raises(
        RuntimeError,
        match=r"^cannot write .*video\.mp4: .*exit status 3: "
        r"encoder exploded\)",
    ) as info:
        writer.close()
    assert "\n" not in str(info.value)
    assert list(out.parent.iterdir()) == []  # nothing at the output path, no temp file


def test_ffmpeg_exit_zero_with_a_broken_file_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # exit status 0 but no index: what a full disk can leave when ffmpeg misses the error
    encode = 'cat > /dev/null\nprintf "\\000\\000\\000\\030ftypisom" > "$last"\nexit 0'
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(_fake_ffmpeg(tmp_path, encode)))
    out = tmp_path / "video.mp4"
    out.write_bytes(b"previous result")
    writer = Mp4Writer(out, fps=24)
    writer.append(_frames(3))
    with pytest.raises(RuntimeError, match="written file is unreadable, 3 were appended"):
        writer.close()
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake-ffmpeg", "video.mp4"]


def test_ffmpeg_dying_mid_video_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    encode = 'head -c 1000 > /dev/null\necho "Conversion failed!" >&2\nexit 1'
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(_fake_ffmpeg(tmp_path, encode)))
    writer = Mp4Writer(tmp_path / "video.mp4", fps=24)
    with pytest.raises(
        RuntimeError,
        match=r"failed while writing the mp4 \(exit status 1: "
        r"Conversion failed!\)",
    ):
        for _ in range(200):  # the pipe fills, then breaks
            writer.append(_frames(4, 256, 256))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake-ffmpeg"]


# ------------------------------------------------------------------------------- temp names
def test_output_name_near_name_max(tmp_path: Path) -> None:
    out = tmp_path / ("x" * 125 + "é" * 60 + "y.mp4")  # 250 bytes; the cut falls inside an é
    assert len(out.name.encode()) == 250
    with Mp4Writer(out, fps=24) as writer:
        writer.append(_frames(2))
        temp = writer.tmp_path.name
        assert len(temp.encode()) <= 255 and temp.startswith("." + "x" * 125 + "é")
        assert f"é.magi-partial-{os.getpid()}-" in temp and temp.endswith(".mp4")
    assert load_video(out, 24).shape == (2, 48, 64, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_stale_temp_files_of_dead_runs_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid no longer runs
    names = {
        "stale": f".out.magi-partial-{dead.pid}-0123abcd.mp4",
        "live": f".out.magi-partial-{os.getpid()}-89abcdef.mp4",
        "other output": f".other.magi-partial-{dead.pid}-0123abcd.mp4",
        "not ours": ".out.magi-partial-notes.txt",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"half a video")
    writer = Mp4Writer(tmp_path / "out.mp4", fps=24)
    assert not (tmp_path / names["stale"]).exists()
    assert all((tmp_path / names[k]).exists() for k in ("live", "other output", "not ours"))
    writer.abort()


# ---------------------------------------------------------------------------- big images
def _solid_png(path: Path, width: int, height: int) -> Path:
    """A 1-bit grayscale png, compressed row by row: a few KiB on disk, 768 MB as RGB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    squeeze, row, idat = zlib.compressobj(9), b"\0" * (1 + (width + 7) // 8), []
    idat += [squeeze.compress(row) for _ in range(height)]
    idat.append(squeeze.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b"")
    )
    return path


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    bomb = _solid_png(tmp_path / "bomb.png", 16000, 16000)
    assert bomb.stat().st_size < 100_000
    before = _children_peak_rss_mb()
    with pytest.raises(ValueError) as info:
        load_image(bomb, (64, 64))
    assert str(info.value) == (
        f"cannot use image {bomb}: image is 16000x16000 (256 megapixels), above magi's limit of "
        "67 megapixels (MAX_IMAGE_PIXELS); downscale it"
    )
    assert _children_peak_rss_mb() - before < 300  # a decode would take 768 MB


def _children_peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def test_accepted_image_is_decoded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = _solid_png(tmp_path / "white.png", 96, 64)
    runs: list[list[str]] = []
    popen = subprocess.Popen

    def counting_popen(cmd: list[str], *args: object, **kwargs: object) -> subprocess.Popen:
        runs.append(list(cmd))
        return popen(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", counting_popen)
    frame = load_image(image, (64, 64))
    assert frame.shape == (64, 64, 3) and int(frame.min()) == 0 == int(frame.max())  # black
    assert len([cmd for cmd in runs if str(image) in cmd]) == 1
