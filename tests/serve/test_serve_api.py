"""magi serve's HTTP API against the real server (uvicorn on a loopback port, no worker, no model).

The worker is faked from the test: it opens its own JobStore on the server's database and writes
segment files, as the real worker does. Checked: auth, every validation error (4xx JSON naming
the field), uploads and their limit, the queue limit, listing, cancel, steering, extend, the
live stream and events, and Range requests on the finished mp4.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="magi serve needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="magi serve needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("multipart", reason="magi serve needs the serve extra: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the API tests use httpx: pip install -e '.[test]'")

from magi.media.mp4 import split_fmp4  # noqa: E402
from magi.serve.store import JobFiles, JobStore  # noqa: E402
from magi.video_io import Mp4Writer  # noqa: E402
from tests.helpers import write_tiny_config  # noqa: E402
from tests.serve.live import LiveServer  # noqa: E402

KEY = "test-key-0123"
MAX_FRAMES = 200
MAX_PIXELS = 128 * 128
MAX_QUEUED = 3
MAX_UPLOAD_MB = 0.2


@dataclasses.dataclass
class Server:
    url: str
    data_dir: Path
    store: JobStore  # the fake worker's own connection to the server's database
    client: httpx.Client  # with the API key
    log: Path


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Server:
    root = tmp_path_factory.mktemp("serve")
    ck = tiny_checkpoint
    write_tiny_config(root / "config.json", ck)
    env = {**os.environ, "SPECIAL_TOKEN_PATH": str(ck / "special_tokens.npz")}
    limits = ["--max_frames", str(MAX_FRAMES), "--max_pixels", str(MAX_PIXELS), "--max_queued", str(MAX_QUEUED),
              "--max_upload_mb", str(MAX_UPLOAD_MB)]  # fmt: skip
    srv = LiveServer(root / "config.json", root / "data", "--api_key", KEY, "--no_worker", *limits, env=env, cwd=root,
                     key=KEY, wait_for="http", log=root / "server.log", timeout=60)  # fmt: skip
    store = JobStore(srv.data / "magi.db")
    yield Server(srv.url, srv.data, store, srv.client, srv.log_path)
    assert srv.stop(30) == 0, srv.text_log(2000)
    assert "magi serve: http://127.0.0.1:" in srv.text_log(10**6)
    store.close()


@pytest.fixture(autouse=True)
def _clear_queue(request: pytest.FixtureRequest) -> None:
    """End every job a test left waiting or running, so the queue limit starts empty each time."""
    yield
    if "server" in request.fixturenames:
        srv = request.getfixturevalue("server")
        for job in srv.store.list(1000):
            if job["status"] in ("queued", "in_progress"):
                srv.store.update(job["id"], status="cancelled", finished_at=time.time())


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("media")
    g = torch.Generator().manual_seed(3)
    rgb = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=g)
    video = root / "prefix.mp4"
    with Mp4Writer(video, 24) as w:  # smooth frames: a small file
        ramp = torch.linspace(0, 255, 64).to(torch.uint8)
        w.append(ramp.view(1, 1, 1, 64).expand(8, 3, 64, 64).contiguous())
    return {"image": b"P6 64 64 255\n" + rgb.numpy().tobytes(), "video": video.read_bytes()}


def _segment(path: Path, frames: int, value: int) -> bytes:
    """A real little mp4 at ``path`` (written atomically, as the worker writes segments)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with Mp4Writer(path, 24) as w:
        w.append(torch.full((frames, 3, 64, 64), value, dtype=torch.uint8))
    return path.read_bytes()


def _create(srv: Server, **body: object) -> dict:
    r = srv.client.post("/v1/videos", json={"prompt": "a red fox in the snow", "num_frames": 48, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _error(r: httpx.Response, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["message"] and "\n" not in err["message"]
    return err


# ---- auth -----------------------------------------------------------------------------------
def test_auth(server: Server) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("GET", "/health"), ("GET", "/v1/videos"), ("POST", "/v1/videos")):
            r = httpx.request(method, server.url + path, headers=headers, json={"prompt": "x"})
            assert r.status_code == 401, (headers, path, r.text)
            assert r.json()["error"]["code"] == "unauthorized"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert httpx.get(server.url + "/static/no-such-file.js").status_code == 404  # open, just missing
    health = server.client.get("/health").json()
    assert health == {"status": "ok", "worker": {"status": "starting"}}
    (server.data_dir / "worker.json").write_text(
        json.dumps({"pid": 1, "status": "ready", "error": None, "model": "tiny"})
    )
    assert server.client.get("/health").json()["worker"]["status"] == "ready"
    (server.data_dir / "worker.json").unlink()


# ---- validation -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "mode": "t3v"}, "mode"),
        ({"prompt": "x", "mode": "extend"}, "mode"),
        ({"prompt": "   "}, "prompt"),
        ({}, "prompt"),
        ({"prompts": "a fox"}, "prompts"),
        ({"prompts": ["a fox", 3]}, "prompts"),
        ({"prompts": []}, "prompts"),
        ({"prompt": "x", "prompts": ["y"]}, "prompts"),
        ({"prompts": ["a"] * 9, "num_frames": 48}, "prompts"),  # 48 frames are 2 chunks
        ({"prompt": "x", "num_frames": 0}, "num_frames"),
        ({"prompt": "x", "num_frames": MAX_FRAMES + 1}, "num_frames"),
        ({"prompt": "x", "num_frames": "many"}, "num_frames"),
        ({"prompt": "x", "seconds": 1000}, "seconds"),
        ({"prompt": "x", "size": "64"}, "size"),
        ({"prompt": "x", "size": "64x60"}, "size"),
        ({"prompt": "x", "size": [64, 64]}, "size"),
        ({"prompt": "x", "size": "256x256"}, "size"),  # over max_pixels
        ({"prompt": "x", "seed": "lucky"}, "seed"),
        ({"prompt": "x", "seed": 2**64}, "seed"),
        ({"prompt": "x", "seed": True}, "seed"),
        ({"prompt": "x", "model": 5}, "model"),
        ({"prompt": "x", "mode": "i2v"}, "image"),
        ({"prompt": "x", "mode": "v2v"}, "prefix_video"),
    ],
)
def test_validation_errors(server: Server, body: dict, param: str) -> None:
    before = len(server.store.list(1000))
    _error(server.client.post("/v1/videos", json=body), 400, param)
    assert len(server.store.list(1000)) == before  # nothing was queued


def test_bad_bodies_and_unknown_ids(server: Server) -> None:
    _error(
        server.client.post("/v1/videos", content=b"{not json", headers={"content-type": "application/json"}), 400, None
    )
    _error(server.client.post("/v1/videos", json=["a list"]), 400, None)
    for method, path in (
        ("GET", ""),
        ("GET", "/content"),
        ("GET", "/stream"),
        ("GET", "/stream/0"),
        ("GET", "/events"),
        ("POST", "/cancel"),
        ("POST", "/extend"),
        ("POST", "/prompt"),
    ):
        r = server.client.request(method, f"/v1/videos/video_nope{path}", json={})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (path, r.text)
    _error(server.client.get("/v1/videos", params={"limit": 0}), 400, "limit")
    _error(server.client.get("/v1/videos", params={"limit": "x"}), 400, "limit")


def test_defaults_and_seconds(server: Server) -> None:
    job = server.client.post("/v1/videos", json={"prompt": "a fox", "model": "sora-2"}).json()
    assert (job["mode"], job["num_frames"], job["size"], job["seed"]) == ("t2v", 96, "64x64", 1234)
    assert job["status"] == "queued" and job["object"] == "video" and job["model"] == "config"
    assert job["seconds"] == "4" and job["progress"] == 0 and job["queue_position"] == 0
    assert job["timings"] == {"queue_wait_s": None, "time_to_first_chunk_s": None, "seconds_per_chunk": None}
    job = _create(server, num_frames=None, seconds=2, prompt=None, prompts=["a", "b"], seed=7, size="64x128")
    assert (job["num_frames"], job["prompt"], job["prompts"], job["seed"], job["size"]) == (
        48,
        "a",
        ["a", "b"],
        7,
        "64x128",
    )
    assert server.store.get(job["id"])["params"] == {
        "mode": "t2v",
        "prompts": ["a", "b"],
        "seed": 7,
        "num_frames": 48,
        "size": [64, 128],
        "image": None,
        "prefix_video": None,
    }


# ---- uploads --------------------------------------------------------------------------------
def test_uploads(server: Server, media: dict[str, bytes]) -> None:
    form = {"prompt": "a fox", "num_frames": "48", "seed": "5"}
    r = server.client.post("/v1/videos", data=form, files={"image": ("start.ppm", media["image"])})
    assert r.status_code == 200, r.text
    job = server.store.get(r.json()["id"])
    assert job["params"]["mode"] == "i2v" and job["params"]["image"] == "input.ppm" and job["params"]["seed"] == 5
    assert (JobFiles(server.data_dir, job["id"]).dir / "input.ppm").read_bytes() == media["image"]

    r = server.client.post("/v1/videos", data=form, files={"input_reference": ("x.ppm", media["image"])})
    assert r.status_code == 200 and r.json()["mode"] == "i2v"
    server.store.request_cancel(r.json()["id"])

    r = server.client.post(
        "/v1/videos",
        data={"num_frames": "48", "prompts": '["a", "b"]'},
        files={"prefix_video": ("clip.mp4", media["video"])},
    )
    assert r.status_code == 200, r.text
    job = server.store.get(r.json()["id"])
    assert job["params"]["mode"] == "v2v" and job["params"]["prefix_video"] == "input.mp4"
    assert job["params"]["prompts"] == ["a", "b"]
    assert (JobFiles(server.data_dir, job["id"]).dir / "input.mp4").read_bytes() == media["video"]


def test_upload_errors(server: Server, media: dict[str, bytes]) -> None:
    before = len(server.store.list(1000))
    post = server.client.post
    _error(post("/v1/videos", data={"prompt": "x"}, files={"image": ("a.png", b"not an image at all")}), 422, "image")
    _error(
        post("/v1/videos", data={"prompt": "x"}, files={"prefix_video": ("a.mp4", media["image"])}), 422, "prefix_video"
    )
    _error(post("/v1/videos", data={"prompt": "x"}, files={"image": ("a.png", b"")}), 422, "image")
    big = b"\0" * int(MAX_UPLOAD_MB * 2**20 + 100)
    err = _error(post("/v1/videos", data={"prompt": "x"}, files={"image": ("a.png", big)}), 413, "image")
    assert err["code"] == "upload_too_large"
    _error(
        post("/v1/videos", data={"prompt": "x", "mode": "t2v"}, files={"image": ("a.ppm", media["image"])}),
        400,
        "image",
    )
    _error(
        post("/v1/videos", data={"prompt": "x", "mode": "i2v"}, files={"prefix_video": ("a.mp4", media["video"])}),
        400,
        "image",
    )
    _error(post("/v1/videos", data={"prompt": ""}, files={"image": ("a.ppm", media["image"])}), 400, "prompt")
    _error(
        post("/v1/videos", data={"prompt": "x", "size": "256x256"}, files={"image": ("a.ppm", media["image"])}),
        400,
        "size",
    )
    assert len(server.store.list(1000)) == before  # no job, half-made or not
    assert not any((server.data_dir / "uploads").iterdir())  # and no staged files left behind
    jobs_dir = server.data_dir / "jobs"
    known = {j["id"] for j in server.store.list(1000)}
    assert not jobs_dir.exists() or {p.name for p in jobs_dir.iterdir()} <= known


# ---- queue, listing, cancel, steering, extend -----------------------------------------------
def test_queue_limit(server: Server) -> None:
    ids = [_create(server)["id"] for _ in range(MAX_QUEUED)]
    assert [server.client.get(f"/v1/videos/{i}").json()["queue_position"] for i in ids] == [0, 1, 2]
    err = _error(server.client.post("/v1/videos", json={"prompt": "one too many"}), 429, None)
    assert err["code"] == "queue_full"
    server.client.post(f"/v1/videos/{ids[0]}/cancel")
    assert server.client.get(f"/v1/videos/{ids[1]}").json()["queue_position"] == 0
    assert _create(server)["status"] == "queued"  # room again


def test_list_and_pages(server: Server) -> None:
    ids = []
    for _ in range(3):
        ids.append(_create(server)["id"])
        server.store.request_cancel(ids[-1])
    page = server.client.get("/v1/videos", params={"limit": 2}).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert [j["id"] for j in page["data"]] == ids[::-1][:2]  # newest first
    rest = server.client.get("/v1/videos", params={"limit": 2, "after": page["data"][-1]["id"]}).json()
    assert rest["data"][0]["id"] == ids[0]
    everything = server.client.get("/v1/videos", params={"limit": 100}).json()
    assert everything["has_more"] is False and len(everything["data"]) == len(server.store.list(1000))


def test_cancel(server: Server) -> None:
    job = _create(server)
    r = server.client.post(f"/v1/videos/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["completed_at"] is not None
    _error(server.client.post(f"/v1/videos/{job['id']}/cancel"), 409, None)
    running = _create(server)
    server.store.update(running["id"], status="in_progress", started_at=time.time())
    r = server.client.post(f"/v1/videos/{running['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "in_progress"  # the worker stops it at its next step
    assert server.store.get(running["id"])["cancel_requested"] is True


def test_prompt(server: Server) -> None:
    job = _create(server)
    r = server.client.post(f"/v1/videos/{job['id']}/prompt", json={"from_chunk": 1, "prompt": "now it rains"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["id"], body["from_chunk"], body["prompt"]) == (job["id"], 1, "now it rains")
    assert [(e["id"], e["from_chunk"], e["prompt"]) for e in server.store.edits(job["id"])] == [
        (body["edit_id"], 1, "now it rains")
    ]
    for bad, param in (
        ({"prompt": "x"}, "from_chunk"),
        ({"from_chunk": -1, "prompt": "x"}, "from_chunk"),
        ({"from_chunk": "a", "prompt": "x"}, "from_chunk"),
        ({"from_chunk": 0, "prompt": ""}, "prompt"),
    ):
        _error(server.client.post(f"/v1/videos/{job['id']}/prompt", json=bad), 400, param)
    server.store.update(job["id"], status="in_progress", chunks_total=2)
    _error(
        server.client.post(f"/v1/videos/{job['id']}/prompt", json={"from_chunk": 2, "prompt": "x"}), 400, "from_chunk"
    )
    server.store.update(job["id"], status="completed", finished_at=time.time())
    _error(server.client.post(f"/v1/videos/{job['id']}/prompt", json={"from_chunk": 1, "prompt": "x"}), 409, None)


def test_extend(server: Server) -> None:
    job = _create(server)
    body = {"num_frames": 24, "prompt": "and then it flies"}
    _error(server.client.post(f"/v1/videos/{job['id']}/extend", json=body), 409, None)  # queued
    server.store.update(job["id"], status="completed", finished_at=time.time())
    err = _error(server.client.post(f"/v1/videos/{job['id']}/extend", json=body), 409, None)
    assert err["code"] == "no_state"
    files = JobFiles(server.data_dir, job["id"])
    files.dir.mkdir(parents=True, exist_ok=True)
    files.state.write_bytes(b"a state")
    _error(server.client.post(f"/v1/videos/{job['id']}/extend", json={"prompt": "x"}), 400, "num_frames")
    _error(server.client.post(f"/v1/videos/{job['id']}/extend", json={"num_frames": 24}), 400, "prompt")
    r = server.client.post(f"/v1/videos/{job['id']}/extend", json=body)
    assert r.status_code == 200, r.text
    child = r.json()
    assert (child["mode"], child["parent_id"], child["num_frames"], child["size"], child["seed"]) == (
        "extend",
        job["id"],
        24,
        job["size"],
        job["seed"],
    )
    assert server.store.get(child["id"])["params"]["mode"] == "extend"
    r = server.client.post(f"/v1/videos/{job['id']}/extend", json={**body, "seconds": 2, "num_frames": None, "seed": 9})
    assert (r.json()["num_frames"], r.json()["seed"]) == (48, 9)


# ---- the live routes ------------------------------------------------------------------------
def _start_fake(srv: Server, job_id: str, seg0_value: int = 40) -> bytes:
    now = time.time()
    srv.store.update(job_id, status="in_progress", started_at=now, chunks_total=2, steps_total=16, attempts=1)
    seg0 = _segment(JobFiles(srv.data_dir, job_id).segment(0), 24, seg0_value)
    srv.store.update(job_id, chunks_done=1, step=8, frames_done=24, first_chunk_at=now + 2, last_chunk_at=now + 2)
    return seg0


def _finish_fake(srv: Server, job_id: str) -> bytes:
    seg1 = _segment(JobFiles(srv.data_dir, job_id).segment(1), 24, 200)
    job = srv.store.get(job_id)
    srv.store.update(job_id, chunks_done=2, step=16, frames_done=48, last_chunk_at=job["first_chunk_at"] + 3)
    shutil.copy(JobFiles(srv.data_dir, job_id).segment(0), JobFiles(srv.data_dir, job_id).video)
    srv.store.update(job_id, status="completed", finished_at=time.time())
    return seg1


def test_stream_follows_the_job(server: Server) -> None:
    job = _create(server)
    _error(server.client.get(f"/v1/videos/{job['id']}/stream/0"), 404, "k")
    seg0 = _start_fake(server, job["id"])
    got = bytearray()
    with server.client.stream("GET", f"/v1/videos/{job['id']}/stream") as r:
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
        chunks = r.iter_raw()
        while len(got) < len(seg0):  # segment 0 arrives while the job still runs
            got += next(chunks)
        assert bytes(got) == seg0 and server.store.get(job["id"])["status"] == "in_progress"
        seg1 = _finish_fake(server, job["id"])
        for piece in chunks:  # ends when the job has ended
            got += piece
    stream = seg0 + b"".join(split_fmp4(seg1)[1])  # one fMP4: segment 0 whole, then the fragments of 1
    assert bytes(got) == stream
    assert server.client.get(f"/v1/videos/{job['id']}/stream/1").content == seg1
    # an ended job's stream is all of its segments at once
    assert server.client.get(f"/v1/videos/{job['id']}/stream").content == stream


def _read_events(lines, until: str, out: list) -> None:
    event = None
    for line in lines:
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            out.append((event, json.loads(line[len("data: ") :])))
            if event == until:
                return


def test_events(server: Server) -> None:
    job = _create(server)
    seen: list = []
    with server.client.stream("GET", f"/v1/videos/{job['id']}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        _read_events(lines, "progress", seen)
        assert seen[0][1]["status"] == "queued" and seen[0][1]["queue_position"] == 0
        _start_fake(server, job["id"])
        _read_events(lines, "chunk", seen)
        assert seen[-1] == ("chunk", {"index": 0, "url": f"/v1/videos/{job['id']}/stream/0"})
        _finish_fake(server, job["id"])
        _read_events(lines, "done", seen)
        assert [line for line in lines if line] == []  # the server closes the stream after done
    names = [e for e, _ in seen]
    assert names.count("chunk") == 2 and names[-1] == "done"
    done = seen[-1][1]
    assert (done["status"], done["progress"], done["segments"], done["chunks_done"]) == ("completed", 100, 2, 2)
    timings = done["timings"]
    assert timings["time_to_first_chunk_s"] == pytest.approx(2, abs=1e-3)
    assert timings["seconds_per_chunk"] == pytest.approx(3, abs=1e-3)
    assert timings["queue_wait_s"] >= 0
    running = [d for e, d in seen if e == "progress" and d["status"] == "in_progress"]
    assert running and running[-1]["progress"] == 50
    # events of an ended job: the chunks, its state, done
    replay: list = []
    with server.client.stream("GET", f"/v1/videos/{job['id']}/events") as r:
        _read_events(r.iter_lines(), "done", replay)
    assert [e for e, _ in replay] == ["chunk", "chunk", "progress", "done"]


def test_content_ranges(server: Server) -> None:
    job = _create(server)
    url = f"/v1/videos/{job['id']}/content"
    err = _error(server.client.get(url), 409, None)
    assert err["code"] == "not_ready"
    _start_fake(server, job["id"])
    _finish_fake(server, job["id"])
    whole = JobFiles(server.data_dir, job["id"]).video.read_bytes()
    r = server.client.get(url)
    assert r.status_code == 200 and r.content == whole and r.headers["accept-ranges"] == "bytes"
    n = len(whole)
    for header, (a, b) in (
        ("bytes=0-9", (0, 9)),
        ("bytes=10-", (10, n - 1)),
        ("bytes=-5", (n - 5, n - 1)),
        (f"bytes=5-{n + 100}", (5, n - 1)),
    ):
        r = server.client.get(url, headers={"Range": header})
        assert r.status_code == 206, (header, r.text)
        assert r.headers["content-range"] == f"bytes {a}-{b}/{n}" and r.content == whole[a : b + 1]
    for header in (f"bytes={n}-", "bytes=9-3"):
        r = server.client.get(url, headers={"Range": header})
        assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{n}", header


# ---- the worker supervisor ------------------------------------------------------------------
def test_supervisor_restarts_a_crashed_worker(tmp_path: Path) -> None:
    from magi.serve.supervisor import Supervisor

    runs = tmp_path / "runs"
    crash = f"open({str(runs)!r}, 'a').write('x'); raise SystemExit(3)"
    sup = Supervisor([sys.executable, "-c", crash])
    sup.start()
    deadline = time.monotonic() + 20
    while (len(runs.read_text()) if runs.exists() else 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    sup.stop()
    assert len(runs.read_text()) >= 2  # restarted after the non-zero exit

    done = tmp_path / "done"
    sup = Supervisor([sys.executable, "-c", f"open({str(done)!r}, 'a').write('x')"])
    sup.start()
    sup._thread.join(20)
    assert not sup._thread.is_alive() and done.read_text() == "x"  # exit 0: not restarted

    termed = tmp_path / "termed"
    waits = (
        f"import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (open({str(termed)!r}, 'w').write('saved'), sys.exit(0)))\n"
        f"open({str(runs)!r}, 'w').write('up')\ntime.sleep(60)"
    )
    sup = Supervisor([sys.executable, "-c", waits])
    sup.start()
    while runs.read_text() != "up" and time.monotonic() < deadline + 20:
        time.sleep(0.05)
    start = time.monotonic()
    sup.stop()
    assert termed.read_text() == "saved" and time.monotonic() - start < 10


# ---- the store's rows -----------------------------------------------------------------------
def test_store_rows_are_typed(tmp_path: Path) -> None:
    from magi.serve.store import Edit, Job

    store = JobStore(tmp_path / "magi.db")
    params = {
        "mode": "t2v",
        "prompts": ["a"],
        "seed": 3,
        "num_frames": 24,
        "size": [64, 64],
        "image": None,
        "prefix_video": None,
    }
    job = store.create(params)
    assert isinstance(job, Job) and job.status == "queued" and job["status"] == "queued" and not job.ended
    assert job.params == params and job.cancel_requested is False and job.chunks_done == 0 and job.chunks_total is None
    store.update(job.id, status="in_progress", chunks_total=2)
    store.request_cancel(job.id)
    again = store.get(job.id)
    assert (again.status, again.chunks_total, again.cancel_requested) == ("in_progress", 2, True)
    store.update(job.id, status="cancelled", finished_at=time.time())
    assert store.get(job.id).ended and store.next_job() is None
    with pytest.raises(KeyError):
        job["no_such_column"]
    edit_id = store.add_edit(job.id, 1, "rain")
    (edit,) = store.edits(job.id)
    assert isinstance(edit, Edit) and (edit.id, edit.job_id, edit.from_chunk, edit.prompt) == (
        edit_id,
        job.id,
        1,
        "rain",
    )
    assert store.edits(job.id, after=edit_id) == []
    store.close()
