"""magi serve's resource bounds: a prompt is at most MAX_PROMPT_CHARS characters (create and
steer), the same rule as the CLI's (``magi.request.check_text``); a job takes at most MAX_EDITS
steering edits; /events sends a long prompt once, not in every message."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="magi serve needs its extra: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="the serve tests need httpx (pip install -e '.[test]')")

from fastapi.testclient import TestClient  # noqa: E402

from magi.request import MAX_PROMPT_CHARS, RequestError, check_text  # noqa: E402
from magi.serve.app import create_app  # noqa: E402
from magi.serve.routes import MAX_EDITS  # noqa: E402
from magi.serve.store import JobStore  # noqa: E402
from tests.helpers import CHUNK, write_tiny_config  # noqa: E402


@pytest.fixture
def client(tiny_checkpoint: Path, tmp_path: Path) -> TestClient:
    config = write_tiny_config(tmp_path / "config.json", tiny_checkpoint)
    app = create_app(config, tmp_path / "data", max_frames=48)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client
    app.state.store.close()


def test_a_prompt_over_the_cap_is_refused_naming_the_limit(client: TestClient) -> None:
    assert check_text("x" * MAX_PROMPT_CHARS, "prompt")
    with pytest.raises(RequestError, match=f"the most is {MAX_PROMPT_CHARS}"):
        check_text("x" * (MAX_PROMPT_CHARS + 1), "prompt")
    r = client.post("/v1/videos", json={"prompt": "x" * (MAX_PROMPT_CHARS + 1), "num_frames": 24})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert str(MAX_PROMPT_CHARS) in r.json()["error"]["message"]
    job = client.post("/v1/videos", json={"prompt": "a cat", "num_frames": 24}).json()["id"]
    r = client.post(f"/v1/videos/{job}/prompt", json={"prompt": "y" * (MAX_PROMPT_CHARS + 1), "from_chunk": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


def test_steering_edits_per_job_are_capped(client: TestClient) -> None:
    job = client.post("/v1/videos", json={"prompt": "a cat", "num_frames": 24}).json()["id"]
    for _ in range(MAX_EDITS):
        assert client.post(f"/v1/videos/{job}/prompt", json={"prompt": "a dog", "from_chunk": 0}).status_code == 200
    r = client.post(f"/v1/videos/{job}/prompt", json={"prompt": "a dog", "from_chunk": 0})
    assert r.status_code == 409 and r.json()["error"]["code"] == "too_many_edits", r.text


def test_events_send_a_long_prompt_once(client: TestClient, tmp_path: Path) -> None:
    prompt = "a very long prompt " * 500
    job = client.post("/v1/videos", json={"prompt": prompt, "num_frames": 24}).json()["id"]
    worker = JobStore(tmp_path / "data" / "magi.db")  # the worker's side: progress, then the end
    try:

        def work() -> None:
            for step in range(1, 4):
                time.sleep(0.3)
                worker.update(job, status="in_progress", step=step, steps_total=4)
            time.sleep(0.3)
            worker.update(job, status="cancelled", finished_at=time.time())

        threading.Thread(target=work).start()
        with client.stream("GET", f"/v1/videos/{job}/events") as r:
            data = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    finally:
        worker.close()
    progress, done = data[:-1], data[-1]
    assert len(progress) >= 3 and len(progress[0]["prompt"]) > 9000 and len(progress[0]["prompts"][0]) > 9000
    assert all("prompt" not in p and "prompts" not in p for p in progress[1:])
    assert [p["step"] for p in progress[1:]][-1] == 3 and done["status"] == "cancelled" and done["prompt"]


def test_a_queued_jobs_from_chunk_past_its_video_is_refused_at_once(client: TestClient) -> None:
    job = client.post("/v1/videos", json={"prompt": "a cat", "num_frames": 2 * CHUNK}).json()  # 2 chunks
    assert job["status"] == "queued"
    assert client.post(f"/v1/videos/{job['id']}/prompt", json={"prompt": "a dog", "from_chunk": 1}).status_code == 200
    r = client.post(f"/v1/videos/{job['id']}/prompt", json={"prompt": "a dog", "from_chunk": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "from_chunk", r.text
    assert "0 .. 1" in r.json()["error"]["message"]


def test_finished_jobs_are_kept_by_the_retention_rule(tmp_path: Path) -> None:
    from magi.serve.store import JobFiles
    from magi.serve.worker import Worker

    store = JobStore(tmp_path / "magi.db")
    try:
        ids = [store.create({"mode": "t2v", "prompts": ["a"]}).id for _ in range(5)]
        for job_id in ids:
            JobFiles(tmp_path, job_id).dir.mkdir(parents=True)
            store.update(job_id, status="completed", finished_at=time.time())
        store.update(ids[0], finished_at=time.time() - 3 * 86400)
        child = store.create({"mode": "extend"}, parent_id=ids[1]).id  # still queued: its parent stays
        Worker(None, store, tmp_path, keep_jobs=3).prune()
        kept = [j for j in ids if store.get(j) is not None]
        assert kept == ids[1:] and not JobFiles(tmp_path, ids[0]).dir.exists()  # newest 3 + the parent
        assert store.get(child) is not None
        Worker(None, store, tmp_path, keep_jobs=100, keep_days=2).prune()
        assert [j for j in ids if store.get(j) is not None] == ids[1:]
        store.update(ids[2], finished_at=time.time() - 3 * 86400)
        Worker(None, store, tmp_path, keep_jobs=100, keep_days=2).prune()
        assert [j for j in ids if store.get(j) is not None] == [ids[1], ids[3], ids[4]]
        assert JobFiles(tmp_path, ids[1]).dir.exists() and not JobFiles(tmp_path, ids[2]).dir.exists()
    finally:
        store.close()


def test_a_job_stuck_before_its_first_step_with_no_worker_is_cancelled_at_once(
    client: TestClient, tmp_path: Path
) -> None:
    job = client.post("/v1/videos", json={"prompt": "a cat", "num_frames": 24}).json()["id"]
    worker = JobStore(tmp_path / "data" / "magi.db")
    try:
        worker.update(job, status="in_progress", started_at=time.time())  # taken, then the worker died
    finally:
        worker.close()
    (tmp_path / "data" / "worker.json").write_text(json.dumps({"pid": 2**22 + 7, "status": "ready"}))
    r = client.post(f"/v1/videos/{job}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text


def _upload(client: TestClient, field: str, name: str, data: bytes) -> dict:
    r = client.post("/v1/videos", data={"prompt": "a cat", "num_frames": "24"}, files={field: (name, data)})
    assert r.status_code == 422, r.text
    return r.json()["error"]


def test_uploads_are_checked_from_their_name_and_header_before_any_decode(client: TestClient, tmp_path: Path) -> None:
    from magi.media.mp4 import Mp4Writer

    error = _upload(client, "image", "notes.txt", b"hello, this is text\n" * 10)
    assert error["param"] == "image" and ".txt file is not an image" in error["message"]
    huge = b"YUV4MPEG2 W16000 H16000 F24:1 Ip A1:1 C420jpeg\nFRAME\n" + bytes(100_000)  # claims 16000x16000
    start = time.monotonic()
    error = _upload(client, "prefix_video", "huge.y4m", huge)
    assert "16000x16000" in error["message"] and time.monotonic() - start < 20, error
    long_video = tmp_path / "long.mp4"  # 100 frames; the server below takes 48 at most
    with Mp4Writer(long_video, 24) as w:
        w.append(torch.zeros(100, 3, 64, 64, dtype=torch.uint8))
    error = _upload(client, "prefix_video", "long.mp4", long_video.read_bytes())
    assert "more than this server's limit of 48" in error["message"], error


def test_a_small_video_claiming_20_hours_is_refused_from_its_header(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    import imageio_ffmpeg

    from magi import video_io

    video = tmp_path / "20h.mp4"  # 72000 tiny frames at 1 fps: under 1 MB
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-v",
        "error",
        "-y",
        "-f",
        "lavfi",
        "-i",
        "color=c=gray:s=16x16:r=1:d=72000",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv420p",
        str(video),
    ]
    subprocess.run(cmd, check=True, timeout=300)
    decoded = []
    monkeypatch.setattr(video_io, "load_video", lambda *a, **k: decoded.append(a) or torch.zeros(0))
    start = time.monotonic()
    error = _upload(client, "prefix_video", "20h.mp4", video.read_bytes())
    assert "about 72000 frames (72000.0 s), more than this server's limit of 48" in error["message"], error
    assert error["param"] == "prefix_video" and not decoded and time.monotonic() - start < 30
