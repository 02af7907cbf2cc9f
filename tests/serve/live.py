"""A running ``magi serve`` (``LiveServer``: the real server on a loopback port, with its worker or
``--no_worker``; ``running_server``: on the tiny config) and a fake worker for it.

The fake worker opens its own JobStore on the server's database, as the real worker does, and
finishes each queued job at once with a small real mp4 (frame k of every job has the value
``value_of(job)``), a saved-state file (so extend / remix are allowed) and the job's counters.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch

from magi.media.mp4 import Mp4Writer
from magi.serve.store import JobFiles, JobStore
from tests.helpers import decode_mp4, free_port, write_tiny_config

FRAMES = 8  # frames of each fake video


class LiveServer:
    """``python -m magi.serve --config C --data_dir D --port P *extra`` on a free loopback port, in
    its own process group, its console in ``log`` (default ``{data}-{port}.log`` beside ``data``).

    ``wait_for``: "worker" (until /health says its worker is ready), "http" (until it answers), or
    None. ``key``: the client sends it as the bearer token. ``env`` defaults to this process's.
    """

    def __init__(self, config: Path, data: Path, *extra: str, env: dict | None = None, cwd: Path | None = None,
                 key: str | None = None, wait_for: str | None = "worker", log: Path | None = None,
                 timeout: float = 120.0) -> None:  # fmt: skip
        self.port, self.data = free_port(), data
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log or data.parent / f"{data.name}-{self.port}.log"
        cmd = [sys.executable, "-m", "magi.serve", "--config", str(config), "--data_dir", str(data),
               "--port", str(self.port), *extra]  # fmt: skip
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                         start_new_session=True)  # fmt: skip
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=30)
        if wait_for is not None:
            self._wait_up(wait_for == "worker", timeout)

    def _wait_up(self, worker: bool, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited: {self.text_log()}")
            try:
                if worker:
                    if self.client.get("/health").json()["worker"].get("status") == "ready":
                        return
                elif self.client.get("/openapi.json").status_code in (200, 401):
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        self.kill()
        raise AssertionError(f"the server was not ready in {timeout:g} s: {self.text_log()}")

    def text_log(self, tail: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def submit(self, **body: object) -> str:
        r = self.client.post("/v1/videos", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "queued"
        return r.json()["id"]

    def job(self, job_id: str) -> dict:
        return self.client.get(f"/v1/videos/{job_id}").json()

    def wait(self, job_id: str, until=lambda j: j["status"] in ("completed", "failed", "cancelled"),
             timeout: float = 240.0) -> dict:  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if until(job):
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} stuck at {self.job(job_id)}; log: {self.text_log()}")

    def frames(self, job_id: str, tmp: Path) -> torch.Tensor:
        r = self.client.get(f"/v1/videos/{job_id}/content")
        assert r.status_code == 200, r.text
        path = tmp / f"{job_id}.mp4"
        path.write_bytes(r.content)
        return decode_mp4(path)

    def kill(self) -> None:
        """SIGKILL the whole process group (the worker too)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.client.close()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, as a service manager stops it; killed after ``timeout`` s. Its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.client.close()
        return self.proc.returncode


@contextlib.contextmanager
def running_server(
    root: Path, ck: Path, *args: str, worker: bool = False, **runtime: object
) -> Iterator[tuple[str, Path, subprocess.Popen]]:
    """(url, data_dir, process) of a server on the tiny config (``runtime`` overrides; ``worker``:
    with the real worker, else ``--no_worker``); its console goes to ``root/server.log``."""
    write_tiny_config(root / "config.json", ck, **runtime)
    env = {**os.environ, "SPECIAL_TOKEN_PATH": str(ck / "special_tokens.npz")}
    server = LiveServer(root / "config.json", root / "data", *([] if worker else ["--no_worker"]), *args, env=env,
                        cwd=root, wait_for="http", log=root / "server.log", timeout=60)  # fmt: skip
    try:
        yield server.url, server.data, server.proc
    finally:
        server.stop(30)


def value_of(job_id: str) -> int:
    """The grey level of a fake job's frames (differs between jobs)."""
    return 40 + sum(job_id.encode()) % 180


class FakeWorker:
    """Completes queued jobs in a thread (``paused``: leaves them queued)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir, self.paused = data_dir, False
        self.store = JobStore(data_dir / "magi.db")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            job = None if self.paused else self.store.next_job()
            if job is None:
                time.sleep(0.05)
                continue
            files = JobFiles(self.data_dir, job.id)
            files.dir.mkdir(parents=True, exist_ok=True)
            with Mp4Writer(files.video, 24) as w:
                w.append(torch.full((FRAMES, 3, 64, 64), value_of(job.id), dtype=torch.uint8))
            files.state.write_bytes(b"state")
            now = time.time()
            self.store.update(
                job.id,
                status="completed",
                started_at=now,
                finished_at=now,
                chunks_done=1,
                chunks_total=1,
                frames_done=FRAMES,
            )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.store.close()
