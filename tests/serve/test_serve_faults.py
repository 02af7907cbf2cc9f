"""magi serve under faults, with the real server (uvicorn + its worker, the tiny checkpoint):
a graceful stop (SIGTERM / Ctrl-C) mid-job loses nothing and is not a failed attempt; a corrupt
database or a port in use is one ``error:`` line and exit 2; an unwritable jobs folder fails the
job with a one-line error naming no server path and /health says so with 503."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (pip install -e '.[test]')")
pytest.importorskip("fastapi", reason="magi serve needs its extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="magi serve needs its extra: pip install -e '.[serve]'")

from magi.serve.store import JobStore  # noqa: E402
from tests.helpers import CHUNK, free_port, write_tiny_config  # noqa: E402
from tests.serve.live import LiveServer  # noqa: E402


@pytest.fixture(scope="module")
def setup(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("faults")
    write_tiny_config(root / "config.json", tiny_checkpoint, num_steps=4, window_size=4)
    env = {**os.environ, "SPECIAL_TOKEN_PATH": str(tiny_checkpoint / "special_tokens.npz"), "PYTHONUNBUFFERED": "1"}
    return {"root": root, "config": root / "config.json", "env": env}


def _serve_cmd(setup: dict, data: Path, port: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "magi.serve",
        "--config",
        str(setup["config"]),
        "--data_dir",
        str(data),
        "--port",
        str(port),
        "--device",
        "cpu",
        *extra,
    ]


def _server(setup: dict, data: Path, *extra: str, ready: bool = True) -> LiveServer:
    """The real server on the tiny config, once its worker is ready (``ready=False``: once it answers)."""
    return LiveServer(setup["config"], data, "--device", "cpu", *extra, env=setup["env"],
                      wait_for="worker" if ready else "http")  # fmt: skip


def _attempts(data: Path, job_id: str) -> int:
    store = JobStore(data / "magi.db")
    try:
        return store.get(job_id).attempts
    finally:
        store.close()


STOP_CHUNKS = 48  # 1152 frames, under the server's 1440


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_graceful_stop_mid_job_resumes_to_every_frame(setup: dict, tmp_path: Path, signum: int) -> None:
    data = tmp_path / "data"
    srv = _server(setup, data)
    try:
        # long enough that the stop lands mid-job also on an idle machine (a tiny chunk takes ~0.1 s)
        r = srv.client.post("/v1/videos", json={"prompt": "a long walk", "num_frames": STOP_CHUNKS * CHUNK, "seed": 2})
        job_id = r.json()["id"]
        srv.wait(job_id, until=lambda j: j["chunks_done"] >= 1)
        assert srv.job(job_id)["status"] == "in_progress"
        start = time.monotonic()
        if signum == signal.SIGINT:
            os.killpg(srv.proc.pid, signum)  # Ctrl-C in a terminal: the whole process group
        else:
            srv.proc.send_signal(signum)  # docker stop / systemd: the server process
        assert srv.proc.wait(30) == 0, srv.text_log()
        assert time.monotonic() - start < 15, srv.text_log()
        assert "killing it" not in srv.text_log()
    finally:
        srv.kill()
    assert _attempts(data, job_id) == 0  # a stop is not a failed attempt
    srv = _server(setup, data)
    try:
        job = srv.wait(job_id)
        assert job["status"] == "completed", job
        assert job["frames_done"] == STOP_CHUNKS * CHUNK
        assert srv.client.get(f"/v1/videos/{job_id}/content").status_code == 200
        assert _attempts(data, job_id) == 1
    finally:
        srv.kill()


def _run_server(setup: dict, data: Path, port: int, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _serve_cmd(setup, data, port, "--no_worker", *extra),
        env=setup["env"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_corrupt_database_is_one_error_line_and_exit_2(setup: dict, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "magi.db").write_bytes(b"this is not sqlite" * 100)
    out = _run_server(setup, data, free_port())
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "magi.db" in lines[0], out.stderr
    assert "move it away" in lines[0]


def test_a_port_in_use_is_one_error_line_and_exit_2(setup: dict, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        out = _run_server(setup, tmp_path / "data", taken.getsockname()[1])
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot listen on 127.0.0.1:"), out.stderr


def test_an_unwritable_jobs_folder_fails_the_job_and_the_queue_goes_on_once_fixed(setup: dict, tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = _server(setup, data)
    try:
        (data / "jobs").write_text("a file where the jobs folder should be")  # unwritable even for root
        bad = srv.client.post("/v1/videos", json={"prompt": "x", "num_frames": CHUNK}).json()["id"]
        job = srv.wait(bad)
        assert job["status"] == "failed", job
        message = job["error"]["message"]
        assert "cannot create the job's folder" in message and "\n" not in message
        assert str(tmp_path) not in message and "/jobs/" not in message, message
        health = srv.client.get("/health")
        assert health.status_code == 503 and "cannot create the job's folder" in health.json()["error"], health.text
        (data / "jobs").unlink()
        good = srv.client.post("/v1/videos", json={"prompt": "x", "num_frames": CHUNK}).json()["id"]
        assert srv.wait(good)["status"] == "completed"
        assert srv.client.get("/health").status_code == 200
    finally:
        srv.kill()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_worker_that_cannot_load_the_model_fails_the_queued_jobs(setup: dict, tmp_path: Path) -> None:
    srv = _server(setup, tmp_path / "data", "--device", "cuda", ready=False)
    try:
        job_id = srv.client.post("/v1/videos", json={"prompt": "x", "num_frames": CHUNK}).json()["id"]
        job = srv.wait(job_id)
        assert job["status"] == "failed" and "cannot load the model" in job["error"]["message"], job
        health = srv.client.get("/health")
        assert health.status_code == 503 and health.json()["worker"]["status"] == "failed"
    finally:
        srv.kill()


def test_health_shows_a_dead_worker(setup: dict, tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = _server(setup, data)
    try:
        import json

        pid = json.loads((data / "worker.json").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)  # the supervisor restarts it after 1 s; until then /health names the dead process
        health = srv.client.get("/health")
        assert health.status_code == 503 and health.json()["worker"]["status"] == "dead", health.text
    finally:
        srv.kill()


def test_an_upload_killed_midway_leaves_no_staging_files(setup: dict, tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = _server(setup, data, "--no_worker", ready=False)
    try:
        boundary = "b0undary"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na cat\r\n--{boundary}\r\n'
            f'Content-Disposition: form-data; name="image"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", srv.port)) as conn:
            conn.sendall(
                b"POST /v1/videos HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                + f"boundary={boundary}\r\nContent-Length: 5000000\r\n\r\n".encode()
                + head
                + b"\x89PNG"
                + b"\0" * 200_000
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not any((data / "uploads").glob("*")):
                time.sleep(0.05)
            assert any((data / "uploads").glob("*")), "the upload never got a staging folder"
        deadline = time.monotonic() + 10  # the client is gone mid-file
        while time.monotonic() < deadline and any((data / "uploads").iterdir()):
            time.sleep(0.1)
        assert list((data / "uploads").iterdir()) == []
        assert srv.client.get("/v1/videos").json()["data"] == []
    finally:
        srv.kill()


class _LastStepPipe:
    """A stand-in pipeline whose run ends just as a cancel arrives (after its last step)."""

    def __init__(self, store: JobStore, job_id: str) -> None:
        self.store, self.job_id, self.runs = store, job_id, 0
        self.config = types.SimpleNamespace(runtime=types.SimpleNamespace(video_size_w=64, video_size_h=64))

    def generate(self, *args: object, **kwargs: object) -> object:
        self.runs += 1
        self.store.request_cancel(self.job_id)  # the HTTP side, racing the end of the run
        return types.SimpleNamespace(chunks_total=1, interrupted=False)


def test_a_cancel_racing_the_jobs_start_or_end_is_never_lost(tmp_path: Path) -> None:
    from magi.serve.worker import Worker

    store = JobStore(tmp_path / "magi.db")
    try:
        params = {"mode": "t2v", "prompts": ["a"], "seed": 1, "num_frames": CHUNK, "size": [64, 64]}
        first = store.create(params).id
        picked = store.next_job()  # the worker read it queued ...
        store.request_cancel(first)  # ... and the cancel lands before it starts
        pipe = _LastStepPipe(store, first)
        Worker(pipe, store, tmp_path).run_job(picked)
        assert store.get(first).status == "cancelled" and pipe.runs == 0
        second = store.create(params).id
        pipe = _LastStepPipe(store, second)
        Worker(pipe, store, tmp_path).run_job(store.next_job())
        assert pipe.runs == 1 and store.get(second).status == "cancelled"
    finally:
        store.close()
