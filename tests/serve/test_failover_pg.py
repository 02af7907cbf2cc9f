"""magi serve over the PostgreSQL store, and failover through it: two real workers (``python -m magi.serve.worker --db
postgresql://...``, tiny checkpoint) share one data folder and one database the test starts; the
worker running a job is killed with SIGKILL mid-job, the other claims it once its lease runs out,
resumes it from the saved state, and the finished video equals an uninterrupted run's frames, as
does the live stream a client read from an HTTP server on the same store across the switch.
Also: ``magi serve --db`` runs a job through HTTP, an unreachable database is one error line, a
worker whose lease was taken leaves that job, and SIGTERM releases the running job at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

psycopg = pytest.importorskip("psycopg", reason="the PostgreSQL store needs psycopg 3: pip install -e '.[postgres]'")
imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="decoding the videos needs imageio-ffmpeg")
httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (pip install -e '.[test]')")

from magi.serve.store_pg import PgJobStore  # noqa: E402
from tests.helpers import CHUNK, decode_mp4, write_tiny_config  # noqa: E402
from tests.serve.live import LiveServer, running_server  # noqa: E402
from tests.serve.pg import pg_bin, postgres_server  # noqa: E402

TIMEOUT = 300.0  # s for one job on a loaded 2-core machine
LEASE_S = 2.0


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    if pg_bin() is None:
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql)")
    with postgres_server() as url:
        yield url


def _worker(config: Path, data: Path, url: str, env: dict, log: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "magi.serve.worker",
        "--config",
        str(config),
        "--data_dir",
        str(data),
        "--db",
        url,
        "--lease_s",
        str(LEASE_S),
        "--device",
        "cpu",
    ]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def _until(check: Callable[[], object], what: str, logs: list[Path]) -> object:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    tails = "\n".join(p.read_text(errors="replace")[-1500:] for p in logs)
    raise AssertionError(f"timed out waiting for {what}; worker logs:\n{tails}")


def _ready(data: Path, proc: subprocess.Popen) -> bool:
    try:
        status = json.loads((data / "worker.json").read_text())
    except (OSError, ValueError):
        return False
    assert proc.poll() is None, "a worker exited"
    return status.get("pid") == proc.pid and status.get("status") == "ready"


def test_a_killed_worker_s_job_resumes_on_the_other_to_the_same_frames(
    pg_url: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    # an HTTP server (--no_worker) on the shared store and folder: a player's view of the switch
    with running_server(tmp_path, tiny_checkpoint, "--db", pg_url, num_steps=4, window_size=4) as (base, data, _):
        job, again = _kill_mid_job(tmp_path / "config.json", data, pg_url, tiny_checkpoint, base, tmp_path)
    resumed = decode_mp4(data / "jobs" / job / "video.mp4")
    assert len(resumed) == 30 * CHUNK
    assert torch.equal(resumed, decode_mp4(data / "jobs" / again / "video.mp4"))


def _kill_mid_job(config: Path, data: Path, pg_url: str, ck: Path, base: str, tmp_path: Path) -> tuple[str, str]:
    """Worker a runs a job and is killed mid-way; worker b resumes it, then runs the same request
    again start to end; a client streams the first job all along. The two job ids."""
    env = {**os.environ, "SPECIAL_TOKEN_PATH": str(ck / "special_tokens.npz"), "PYTHONUNBUFFERED": "1"}
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    store = PgJobStore(pg_url)
    params = {
        "mode": "t2v",
        "prompts": ["a long walk"],
        "seed": 21,
        "num_frames": 30 * CHUNK,
        "size": None,
        "image": None,
        "prefix_video": None,
    }
    a = _worker(config, data, pg_url, env, logs[0])
    b, streamed = None, tmp_path / "streamed.mp4"
    try:
        _until(lambda: _ready(data, a), "worker a to load", logs)
        job = store.create(params)
        reader = threading.Thread(target=_save_stream, args=(base, job.id, streamed), daemon=True)
        reader.start()  # a player's view: GET /stream from before the kill to the end
        _until(lambda: store.get(job.id).chunks_done >= 1, "the first chunk", logs)
        assert store.lease(job.id)[0].split(":")[1] == str(a.pid)
        b = _worker(config, data, pg_url, env, logs[1])
        _until(lambda: _ready(data, b), "worker b to load", logs)
        assert store.get(job.id).status == "in_progress", "the job ended before worker a could be killed"
        a.kill()  # mid-job: its lease is left to run out
        a.wait()
        _until(lambda: store.lease(job.id)[0].split(":")[1] == str(b.pid), "worker b to claim the job", logs)
        done = _until(lambda: (j := store.get(job.id)).ended and j, "the job to finish", logs)
        assert done.status == "completed" and done.attempts == 2, done
        again = store.create(params)  # the same request, run start to end by worker b
        assert _until(lambda: (j := store.get(again.id)).ended and j, "the second job", logs).status == "completed"
        reader.join(TIMEOUT)
        assert not reader.is_alive(), "the stream did not end with its job"
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        store.close()
    # the stream went on across the switch: every frame
    assert torch.equal(decode_mp4(streamed), decode_mp4(data / "jobs" / job.id / "video.mp4"))
    return job.id, again.id


def _save_stream(base: str, job_id: str, dest: Path) -> None:
    with httpx.stream("GET", f"{base}/v1/videos/{job_id}/stream", timeout=TIMEOUT) as r, open(dest, "wb") as out:
        r.raise_for_status()
        for piece in r.iter_bytes():
            out.write(piece)


def test_serve_with_an_unreachable_db_is_one_error_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    config = write_tiny_config(tmp_path / "config.json", tiny_checkpoint)
    cmd = [
        sys.executable,
        "-m",
        "magi.serve",
        "--config",
        str(config),
        "--data_dir",
        str(tmp_path / "d"),
        "--db",
        "postgresql://nobody@127.0.0.1:1/none?connect_timeout=2",
        "--no_worker",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    line = run.stderr.strip()
    assert line.startswith("error: cannot connect to the job database") and "--db" in line and "\n" not in line


def test_serve_with_db_runs_a_job_through_http(pg_url: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    config = write_tiny_config(tmp_path / "config.json", tiny_checkpoint, num_steps=4, window_size=4)
    env = {**os.environ, "SPECIAL_TOKEN_PATH": str(tiny_checkpoint / "special_tokens.npz"), "PYTHONUNBUFFERED": "1"}
    srv = LiveServer(config, tmp_path / "d", "--db", pg_url, "--device", "cpu", env=env, log=tmp_path / "serve.log")
    store = PgJobStore(pg_url)
    try:
        r = srv.client.post("/v1/videos", json={"prompt": "a lake", "num_frames": 2 * CHUNK, "seed": 4})
        assert r.status_code == 200, r.text
        job_id = r.json()["id"]
        assert store.get(job_id).params["prompts"] == ["a lake"]  # the row is in PostgreSQL
        assert srv.wait(job_id, timeout=TIMEOUT)["status"] == "completed"
        assert len(srv.frames(job_id, tmp_path)) == 2 * CHUNK
        assert store.lease(job_id)[0].split(":")[1] != str(srv.proc.pid)  # claimed by its worker process
    finally:
        srv.stop()
        store.close()


def test_a_worker_leaves_a_job_whose_lease_it_lost_and_releases_its_job_on_sigterm(
    pg_url: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    config = write_tiny_config(tmp_path / "config.json", tiny_checkpoint, num_steps=4, window_size=4)
    env = {**os.environ, "SPECIAL_TOKEN_PATH": str(tiny_checkpoint / "special_tokens.npz"), "PYTHONUNBUFFERED": "1"}
    data, logs = tmp_path / "shared", [tmp_path / "a.log"]
    store = PgJobStore(pg_url)
    while store.claim("drain", 3600) is not None:  # the module's earlier jobs out of the way
        pass
    long = {
        "mode": "t2v",
        "prompts": ["long"],
        "seed": 1,
        "num_frames": 30 * CHUNK,
        "size": None,
        "image": None,
        "prefix_video": None,
    }
    a = _worker(config, data, pg_url, env, logs[0])
    try:
        _until(lambda: _ready(data, a), "the worker to load", logs)
        stolen = store.create(long)
        _until(lambda: store.get(stolen.id).chunks_done >= 1, "the first chunk", logs)
        with psycopg.connect(pg_url, autocommit=True) as db:  # another worker took it (a's lease "ran out")
            db.execute(
                "UPDATE jobs SET claimed_by = 'thief', lease_until = extract(epoch from clock_timestamp()) "
                "+ 3600 WHERE id = %s",
                (stolen.id,),
            )
        short = store.create({**long, "num_frames": CHUNK})
        _until(lambda: store.get(short.id).status == "completed", "the next job", logs)
        left = store.get(stolen.id)
        assert left.status == "in_progress" and left.chunks_done < 30 and store.lease(stolen.id)[0] == "thief", left
        third = store.create(long)
        _until(lambda: store.get(third.id).chunks_done >= 1, "the third job's first chunk", logs)
        a.terminate()  # SIGTERM: save, release, exit 0
        assert a.wait(120) == 0
        assert store.get(third.id).status == "in_progress" and store.lease(third.id) == (None, None)
        assert store.claim("next", 60).id == third.id  # claimable at once, no lease to wait for
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
        store.close()
