"""A running ``magi serve`` (uvicorn on a loopback port, ``--no_worker``) and a fake worker for it.

The fake worker opens its own JobStore on the server's database, as the real worker does, and
finishes each queued job at once with a small real mp4 (frame k of every job has the value
``value_of(job)``), a saved-state file (so extend / remix are allowed) and the job's counters.
"""

from __future__ import annotations

import contextlib
import os
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
from tests.helpers import free_port, write_tiny_config

FRAMES = 8  # frames of each fake video


@contextlib.contextmanager
def running_server(
    root: Path, ck: Path, *args: str, worker: bool = False, **runtime: object
) -> Iterator[tuple[str, Path, subprocess.Popen]]:
    """(url, data_dir, process) of a server on the tiny config (``runtime`` overrides; ``worker``:
    with the real worker, else ``--no_worker``); its console goes to ``root/server.log``."""
    write_tiny_config(root / "config.json", ck, **runtime)
    data, port, log = root / "data", free_port(), root / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "magi.serve",
        "--config",
        str(root / "config.json"),
        "--data_dir",
        str(data),
        "--port",
        str(port),
        *([] if worker else ["--no_worker"]),
        *args,
    ]
    env = {**os.environ, "SPECIAL_TOKEN_PATH": str(ck / "special_tokens.npz")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/openapi.json", timeout=5).status_code in (200, 401):
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    try:
        yield url, data, proc
    finally:
        proc.terminate()
        proc.wait(30)


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
