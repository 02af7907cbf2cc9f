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
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (pip install -e '.[test]')")
pytest.importorskip("fastapi", reason="magi serve needs its extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="magi serve needs its extra: pip install -e '.[serve]'")

from magi.serve.store import JobStore  # noqa: E402
from tests.helpers import CHUNK, free_port, write_tiny_config  # noqa: E402

TIMEOUT = 240.0  # s for one job on a loaded 2-core machine


@pytest.fixture(scope="module")
def setup(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("faults")
    write_tiny_config(root / "config.json", tiny_checkpoint, num_steps=4, window_size=4)
    env = {**os.environ, "SPECIAL_TOKEN_PATH": str(tiny_checkpoint / "special_tokens.npz"), "PYTHONUNBUFFERED": "1"}
    return {"root": root, "config": root / "config.json", "env": env}


def _serve_cmd(setup: dict, data: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "magi.serve", "--config", str(setup["config"]), "--data_dir", str(data),
            "--port", str(port), "--device", "cpu", *extra]  # fmt: skip


class Server:
    """``python -m magi.serve`` in its own process group, on a free port, until its worker is ready."""

    def __init__(self, setup: dict, data: Path, *extra: str, ready: bool = True) -> None:
        self.port, self.data = free_port(), data
        self.log_path = data.parent / f"{data.name}-{self.port}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(_serve_cmd(setup, data, self.port, *extra), env=setup["env"], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited: {self.text_log()}"
            try:
                status = self.client.get("/health").json()["worker"].get("status")
                if status == "ready" or not ready:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.3)
        raise AssertionError(f"server not ready: {self.text_log()}")

    def text_log(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-3000:]

    def job(self, job_id: str) -> dict:
        return self.client.get(f"/v1/videos/{job_id}").json()

    def wait(self, job_id: str, until=lambda j: j["status"] in ("completed", "failed", "cancelled")) -> dict:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if until(job):
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} stuck at {self.job(job_id)}; log: {self.text_log()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.client.close()
        self.log.close()


def _attempts(data: Path, job_id: str) -> int:
    store = JobStore(data / "magi.db")
    try:
        return store.get(job_id).attempts
    finally:
        store.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_graceful_stop_mid_job_resumes_to_every_frame(setup: dict, tmp_path: Path, signum: int) -> None:
    data = tmp_path / "data"
    srv = Server(setup, data)
    try:
        r = srv.client.post("/v1/videos", json={"prompt": "a long walk", "num_frames": 12 * CHUNK, "seed": 2})
        job_id = r.json()["id"]
        srv.wait(job_id, until=lambda j: j["chunks_done"] >= 1)
        start = time.monotonic()
        if signum == signal.SIGINT:
            os.killpg(srv.proc.pid, signum)  # Ctrl-C in a terminal: the whole process group
        else:
            srv.proc.send_signal(signum)  # docker stop / systemd: the server process
        assert srv.proc.wait(30) == 0, srv.text_log()
        assert time.monotonic() - start < 15, srv.text_log()
        assert "killing it" not in srv.text_log()
    finally:
        srv.close()
    assert _attempts(data, job_id) == 0  # a stop is not a failed attempt
    srv = Server(setup, data)
    try:
        job = srv.wait(job_id)
        assert job["status"] == "completed", job
        assert job["frames_done"] == 12 * CHUNK
        assert srv.client.get(f"/v1/videos/{job_id}/content").status_code == 200
        assert _attempts(data, job_id) == 1
    finally:
        srv.close()
