"""A real ``magi serve`` on a cp_size=2 config (the tiny checkpoint, gloo on CPU, loopback): its
worker is a group of 2 ranks under torchrun (``magi.serve.ranks``), compared with a 1-process
server given the same requests.

- a t2v job on the two ranks gives the frames of the 1-process run;
- a steering edit posted while a job runs applies on both ranks at the same step: the video
  equals the 1-process run of the prompt timeline the edit made;
- SIGTERM to the server mid-job: the group stops within seconds (every rank exits 0, none is
  killed), the job stays in_progress and the next start resumes it to every frame, equal to
  the uninterrupted 1-process run.
- ``--device cuda:N`` with a world of 2 is one error line; a dead server is seen by the ranks'
  pid check also while it is an unreaped zombie.

The frames are compared bit-exact: the 1-process server runs with one intra-op thread, as each
rank does (torchrun's OMP_NUM_THREADS=1), and then computes the same latents as the two ranks
(measured: identical; with 2 threads they differ by ~5e-7 relative L2, which moves decoded pixels
by 1 grey level and then, through libx264's decisions on the tiny model's noisy frames, the
encoded video by up to ~30 levels: hence the same thread count, not a tolerance).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (pip install -e '.[test]')")
pytest.importorskip("fastapi", reason="magi serve needs its extra: pip install -e '.[serve]'")
imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="decoding the videos needs imageio-ffmpeg")

from magi.serve.store import JobStore  # noqa: E402
from tests.helpers import CHUNK, decode_mp4, free_port, write_tiny_config  # noqa: E402
from tests.serve.live import LiveServer  # noqa: E402

TIMEOUT = 240.0  # s for one job on a loaded 2-core machine
PLAIN = {"prompt": "a fox in the snow", "num_frames": 3 * CHUNK, "seed": 7}
STEERED = {"prompt": "a fox in the snow", "num_frames": 16 * CHUNK, "seed": 9}
EDIT_FROM, EDIT_TEXT = 10, "a cat on a roof"  # far enough ahead to be taken as asked
TIMELINE = {"prompts": ["a fox in the snow"] * EDIT_FROM + [EDIT_TEXT], "num_frames": 16 * CHUNK, "seed": 9}
LONG = {"prompt": "a long walk", "num_frames": 24 * CHUNK, "seed": 2}  # long enough to stop mid-way


@pytest.fixture(scope="module")
def setup(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("dist")
    one = write_tiny_config(root / "cp1.json", tiny_checkpoint, num_steps=4, window_size=4)
    raw = json.loads(one.read_text())
    raw["engine_config"].update(cp_size=2, cp_strategy="cp_ulysses", distributed_backend="gloo")
    (root / "cp2.json").write_text(json.dumps(raw))
    # one intra-op thread in every worker process (torchrun's default for the ranks)
    env = {**os.environ, "SPECIAL_TOKEN_PATH": str(tiny_checkpoint / "special_tokens.npz"), "OMP_NUM_THREADS": "1"}
    return {"root": root, "cp1": one, "cp2": root / "cp2.json", "env": env}


def _server(setup: dict, config: Path, data: Path) -> LiveServer:
    """The real server on ``config``, once its worker (group) is ready."""
    return LiveServer(config, data, "--device", "cpu", env=setup["env"], timeout=180)


def _frames(srv: LiveServer, job_id: str) -> torch.Tensor:
    """The finished job's video, from the server's data folder."""
    assert srv.wait(job_id)["status"] == "completed", srv.job(job_id)
    return decode_mp4(srv.data / "jobs" / job_id / "video.mp4")


def _assert_equal(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape, (got.shape, expected.shape)
    diff = (got.int() - expected.int()).abs()
    assert torch.equal(got, expected), f"max pixel diff {int(diff.max())}, {int((diff > 0).sum())} values differ"


@pytest.fixture(scope="module")
def reference(setup: dict) -> dict[str, torch.Tensor]:
    """The frames of each request run by a 1-process server."""
    srv = _server(setup, setup["cp1"], setup["root"] / "one")
    try:
        jobs = {name: srv.submit(**body) for name, body in [("plain", PLAIN), ("timeline", TIMELINE), ("long", LONG)]}
        return {name: _frames(srv, job_id) for name, job_id in jobs.items()}
    finally:
        srv.kill()


@pytest.fixture(scope="module")
def cp2(setup: dict) -> Iterator[LiveServer]:
    srv = _server(setup, setup["cp2"], setup["root"] / "two")
    try:
        yield srv
    finally:
        srv.kill()


def test_a_job_on_two_ranks_equals_the_one_process_run(cp2: LiveServer, reference: dict) -> None:
    job_id = cp2.submit(**PLAIN)
    _assert_equal(_frames(cp2, job_id), reference["plain"])
    assert cp2.job(job_id)["frames_done"] == 3 * CHUNK
    assert sorted(p.name for p in (cp2.data / "jobs" / job_id).iterdir() if not p.name.startswith(".")) == [
        "chunks",
        "state.safetensors",
        "video.mp4",
    ]
    rank0 = json.loads((cp2.data / "worker.json").read_text())["pid"]  # the status file is rank 0's
    launcher = Path(f"/proc/{rank0}/stat").read_text().rsplit(")", 1)[1].split()[1]
    assert b"magi.serve.ranks" in Path(f"/proc/{launcher}/cmdline").read_bytes()


def test_a_steering_edit_applies_on_every_rank(cp2: LiveServer, reference: dict) -> None:
    job_id = cp2.submit(**STEERED)
    cp2.wait(job_id, until=lambda j: j["status"] != "queued" and (j["step"] or 0) >= 1)
    r = cp2.client.post(f"/v1/videos/{job_id}/prompt", json={"from_chunk": EDIT_FROM, "prompt": EDIT_TEXT})
    assert r.status_code == 200, r.text
    assert r.json()["applies_from"] == EDIT_FROM, f"the job ran past chunk {EDIT_FROM} first: {r.text}"
    # without the edit on rank 1, half of every chunk's tokens would keep the old prompt
    _assert_equal(_frames(cp2, job_id), reference["timeline"])


def test_sigterm_mid_job_stops_every_rank_and_the_restart_resumes_it(
    setup: dict, cp2: LiveServer, reference: dict
) -> None:
    job_id = cp2.submit(**LONG)
    cp2.wait(job_id, until=lambda j: j["chunks_done"] >= 1)
    start = time.monotonic()
    cp2.proc.send_signal(signal.SIGTERM)  # the server stops its supervisor: SIGTERM to torchrun
    assert cp2.proc.wait(30) == 0, cp2.text_log()
    took = time.monotonic() - start
    log = cp2.text_log(10**6)  # the whole console
    assert took < 15, f"{took:.1f} s: {log}"
    assert "the worker group stopped on SIGTERM" in log, log
    assert "exitcode" not in log and "killing it" not in log and "Traceback" not in log, log  # every rank exited 0
    store = JobStore(cp2.data / "magi.db")
    try:
        row = store.get(job_id)
    finally:
        store.close()
    assert row.status == "in_progress" and 1 <= row.chunks_done < 24 and row.attempts == 0, row  # not a failed attempt
    assert (cp2.data / "jobs" / job_id / "state.safetensors").is_file()
    again = _server(setup, setup["cp2"], cp2.data)
    try:
        _assert_equal(_frames(again, job_id), reference["long"])
        assert again.job(job_id)["frames_done"] == 24 * CHUNK
    finally:
        again.kill()


def test_cuda_n_with_a_world_of_2_is_one_error_line(setup: dict) -> None:
    cmd = [sys.executable, "-m", "magi.serve", "--config", str(setup["cp2"]), "--data_dir",
           str(setup["root"] / "refused"), "--port", str(free_port()), "--device", "cuda:1"]  # fmt: skip
    out = subprocess.run(cmd, env=setup["env"], capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("error: --device cuda:1") and "one GPU per rank" in lines[0], lines


def test_a_dead_server_is_seen_also_as_a_zombie() -> None:
    from magi.serve.ranks import pid_gone

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.05)
    assert pid_gone(child.pid)  # exited, not yet reaped: os.kill(pid, 0) alone would say alive
    child.wait()
    assert pid_gone(child.pid) and not pid_gone(os.getpid()) and not pid_gone(None)
