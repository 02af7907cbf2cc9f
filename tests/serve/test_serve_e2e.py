"""magi serve end to end: the real server (uvicorn on a loopback port) with its real worker and
the tiny checkpoint; httpx as the client. Covers submit / poll / download for t2v, i2v and v2v,
the queue order, the live stream, cancel, steering (equals a run started with that timeline) and
kill -9 + restart (resumes to the same frames as an uninterrupted run)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (pip install -e '.[test]')")
pytest.importorskip("fastapi", reason="magi serve needs its extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="magi serve needs its extra: pip install -e '.[serve]'")

from magi.state import GenerationState  # noqa: E402
from magi.video_io import Mp4Writer  # noqa: E402
from tests.helpers import CHUNK, write_tiny_config  # noqa: E402
from tests.serve.live import LiveServer  # noqa: E402

TIMEOUT = 240.0  # s for one job on a loaded 2-core machine


@pytest.fixture(scope="module")
def setup(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny config with 4 steps per chunk (window 4): one step per stage, quick jobs."""
    root = tmp_path_factory.mktemp("serve")
    ck = tiny_checkpoint
    write_tiny_config(root / "config.json", ck, num_steps=4, window_size=4)
    env = {**os.environ, "SPECIAL_TOKEN_PATH": str(ck / "special_tokens.npz"), "PYTHONUNBUFFERED": "1"}
    g = torch.Generator().manual_seed(5)
    image = root / "start.ppm"
    image.write_bytes(
        b"P6 64 64 255\n" + torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=g).numpy().tobytes()
    )
    video = root / "prefix.mp4"
    with Mp4Writer(video, 24) as w:
        w.append(torch.randint(0, 256, (40, 3, 64, 64), dtype=torch.uint8, generator=g))
    return {"root": root, "config": root / "config.json", "env": env, "image": image, "video": video}


def _server(setup: dict, data_dir: Path) -> LiveServer:
    """The real server with its worker, on the tiny config, once the worker is ready."""
    return LiveServer(setup["config"], data_dir, "--device", "cpu", env=setup["env"])


@pytest.fixture(scope="module")
def server(setup: dict):
    srv = _server(setup, setup["root"] / "data")
    yield srv
    srv.stop()


def test_t2v_i2v_v2v_submit_poll_download(server: LiveServer, setup: dict, tmp_path: Path) -> None:
    t2v = server.submit(prompt="a red fox", num_frames=2 * CHUNK, seed=7)
    with open(setup["image"], "rb") as f:
        r = server.client.post(
            "/v1/videos",
            data={"prompt": "a lake", "num_frames": "30"},
            files={"image": ("start.ppm", f, "image/x-portable-pixmap")},
        )
    assert r.status_code == 200, r.text
    i2v = r.json()["id"]
    with open(setup["video"], "rb") as f:
        r = server.client.post(
            "/v1/videos",
            data={"prompt": "the sea", "num_frames": "24"},
            files={"prefix_video": ("prefix.mp4", f, "video/mp4")},
        )
    assert r.status_code == 200, r.text
    v2v = r.json()["id"]
    for job_id, mode, frames in ((t2v, "t2v", 2 * CHUNK), (i2v, "i2v", 30), (v2v, "v2v", 24)):
        job = server.wait(job_id)
        assert job["status"] == "completed", job
        assert job["mode"] == mode and job["frames_done"] == frames and job["progress"] == 100
        assert job["timings"]["time_to_first_chunk_s"] > 0 and job["timings"]["queue_wait_s"] >= 0
        assert len(server.frames(job_id, tmp_path)) == frames
    # queued in order: each started after the one before it finished
    jobs = [server.job(j) for j in (t2v, i2v, v2v)]
    for before, after in zip(jobs, jobs[1:]):
        assert before["completed_at"] <= after["created_at"] or after["timings"]["queue_wait_s"] > 0


def test_two_queued_jobs_finish_in_order_and_stream_before_the_end(server: LiveServer, tmp_path: Path) -> None:
    # 24 chunks: long enough that its end (at ~0.1 s a chunk here) comes well after the first
    # segment reaches the stream (polled every 0.25 s); 3 chunks sometimes ended first
    first = server.submit(prompt="one", num_frames=24 * CHUNK, seed=1)
    second = server.submit(prompt="two", num_frames=CHUNK, seed=2)
    assert server.job(second)["queue_position"] == 1 or server.job(second)["status"] == "queued"
    # the first chunk is readable from the live stream while the job still runs
    with server.client.stream("GET", f"/v1/videos/{first}/stream", timeout=TIMEOUT) as r:
        assert r.status_code == 200
        head = b""
        for part in r.iter_bytes():
            head += part
            if b"moof" in head and len(head) > 2000:
                break
        assert server.job(first)["status"] in ("queued", "in_progress"), "the stream came only at the end"
    one, two = server.wait(first), server.wait(second)
    assert one["status"] == two["status"] == "completed"
    db_one, db_two = _times(server, first), _times(server, second)
    assert db_one["finished_at"] <= db_two["started_at"], "jobs must run one at a time, in order"
    assert len(server.frames(second, tmp_path)) == CHUNK


def _times(server: LiveServer, job_id: str) -> dict:
    from magi.serve.store import JobStore

    store = JobStore(Path(server.client.get("/health").json().get("data_dir") or _data_dir(server)) / "magi.db")
    try:
        return store.get(job_id)
    finally:
        store.close()


def _data_dir(server: LiveServer) -> Path:
    return Path(server.proc.args[server.proc.args.index("--data_dir") + 1])


def test_cancel_keeps_the_chunks_done(server: LiveServer, tmp_path: Path) -> None:
    job_id = server.submit(prompt="long", num_frames=30 * CHUNK, seed=3)  # long: the cancel lands mid-job
    server.wait(job_id, until=lambda j: j["chunks_done"] >= 1)
    r = server.client.post(f"/v1/videos/{job_id}/cancel")
    assert r.status_code == 200, r.text
    job = server.wait(job_id)
    assert job["status"] == "cancelled" and 1 <= job["chunks_done"] < 30
    assert len(server.frames(job_id, tmp_path)) == job["frames_done"] == job["chunks_done"] * CHUNK


def test_steer_equals_a_run_started_with_that_timeline(server: LiveServer, tmp_path: Path) -> None:
    chunks = 24  # long enough that chunk 12 has not entered the window when the edit lands
    job_id = server.submit(prompt="calm", num_frames=chunks * CHUNK, seed=11)
    server.wait(job_id, until=lambda j: j["status"] == "in_progress" and j["step"] >= 1)
    r = server.client.post(f"/v1/videos/{job_id}/prompt", json={"from_chunk": 12, "prompt": "a storm"})
    assert r.status_code == 200, r.text
    assert server.wait(job_id)["status"] == "completed"
    state = GenerationState.load(_data_dir(server) / "jobs" / job_id / "state.safetensors")
    timeline = [state.meta["prompts"][k] for k in state.meta["chunk_prompts"]]
    assert timeline[0] == "calm" and timeline[-1] == "a storm", timeline  # the edit took effect
    plain = server.submit(prompts=timeline, num_frames=chunks * CHUNK, seed=11)
    assert server.wait(plain)["status"] == "completed"
    assert torch.equal(server.frames(job_id, tmp_path), server.frames(plain, tmp_path))


def test_kill_9_and_restart_resumes_to_the_same_frames(setup: dict, tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = _server(setup, data)
    try:
        job_id = srv.submit(prompt="a long walk", num_frames=16 * CHUNK, seed=21)
        srv.wait(job_id, until=lambda j: j["chunks_done"] >= 1)
        assert srv.job(job_id)["status"] == "in_progress"
    finally:
        srv.kill()  # the server and (die-with-parent) its worker, mid-job
    srv = _server(setup, data)
    try:
        job = srv.wait(job_id)
        assert job["status"] == "completed", job
        assert _times(srv, job_id)["attempts"] == 2
        resumed = srv.frames(job_id, tmp_path)
        again = srv.submit(prompt="a long walk", num_frames=16 * CHUNK, seed=21)
        assert srv.wait(again)["status"] == "completed"
        assert len(resumed) == 16 * CHUNK
        assert torch.equal(resumed, srv.frames(again, tmp_path))
    finally:
        srv.stop()
