"""A signal sent to the writing process's whole group (a terminal's Ctrl-C, torchrun stopping its
ranks with killpg) reaches only Python: the ffmpeg processes magi starts, the encoder and the
short checks and joins after it, run in their own session, so a handled signal does not turn a
good mp4 into a failed write (seen with serve's distributed worker before they did). The test
sends SIGTERM to the group 10 ms into each check and join."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("imageio_ffmpeg", reason="writing mp4 needs imageio-ffmpeg")

SCRIPT = textwrap.dedent(
    """
    import os, signal, subprocess, sys, threading
    from pathlib import Path
    import imageio_ffmpeg
    import torch
    from magi.media.mp4 import Mp4Writer, join_mp4

    imageio_ffmpeg.get_ffmpeg_exe()  # found once, before any signal (as a worker has long before a stop)
    signals = []
    signal.signal(signal.SIGTERM, lambda *_: signals.append(1))  # handled in Python, as the worker does
    real_run = subprocess.run

    def run_and_stop(*args, **kwargs):  # SIGTERM to the whole group while ffmpeg checks or joins
        threading.Timer(0.01, os.killpg, (os.getpgid(0), signal.SIGTERM)).start()
        return real_run(*args, **kwargs)

    subprocess.run = run_and_stop
    out = Path(sys.argv[1])
    parts = []
    for i in range(4):
        with Mp4Writer(out / f"{i}.mp4", 24) as writer:
            writer.append(torch.full((48, 3, 64, 64), 40 * i, dtype=torch.uint8))
        parts.append(out / f"{i}.mp4")
    join_mp4(parts, out / "joined.mp4")
    print(len(signals) >= 5, (out / "joined.mp4").is_file())
    """
)


def test_a_signal_to_the_group_does_not_break_a_write(tmp_path) -> None:
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        start_new_session=True,  # its killpg must not reach pytest
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["True", "True"], run.stdout + run.stderr[-2000:]
