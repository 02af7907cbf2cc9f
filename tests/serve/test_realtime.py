"""``WS /v1/realtime/video`` against the real server (uvicorn, its real worker, the tiny
checkpoint) with a websockets client: auth, a bad opening message, a session with a mid-session
prompt change that drops and is resumed by id (its joined fMP4 chunks equal the same timeline run
through HTTP), and session.stop."""

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
pytest.importorskip("websockets", reason="the realtime session needs websockets: pip install -e '.[serve]'")
imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg", reason="decoding the videos needs imageio-ffmpeg")

from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.sync.client import ClientConnection, connect  # noqa: E402

from magi.state import GenerationState  # noqa: E402
from tests.helpers import CHUNK, free_port, write_tiny_config  # noqa: E402

KEY = "rt-key-42"
TIMEOUT = 300.0  # s for one job on a loaded 2-core machine


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("realtime")
    config = write_tiny_config(root / "config.json", tiny_checkpoint, num_steps=4, window_size=4)
    env = {**os.environ, "SPECIAL_TOKEN_PATH": str(tiny_checkpoint / "special_tokens.npz"), "PYTHONUNBUFFERED": "1"}
    port, data, log = free_port(), root / "data", root / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "magi.serve",
                "--config",
                str(config),
                "--data_dir",
                str(data),
                "--port",
                str(port),
                "--device",
                "cpu",
                "--api_key",
                KEY,
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        try:
            if client.get("/health").json()["worker"].get("status") == "ready":
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    yield {"ws": f"ws://127.0.0.1:{port}/v1/realtime/video", "http": client, "data": data, "log": log}
    client.close()
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def _open(server: dict) -> ClientConnection:
    return connect(server["ws"], additional_headers={"Authorization": f"Bearer {KEY}"}, open_timeout=30)


def _next(ws: ClientConnection) -> dict:
    message = ws.recv(timeout=TIMEOUT)
    assert isinstance(message, str), "a binary frame without its video.chunk_metadata"
    return json.loads(message)


def _chunks(ws: ClientConnection, got: dict[int, bytes], until: int | None = None) -> list[dict]:
    """Read chunks into ``got`` until ``until`` of them are in (None: until video.done); other messages."""
    others = []
    while until is None or len(got) < until:
        event = _next(ws)
        if event["type"] == "video.chunk_metadata":
            data = ws.recv(timeout=TIMEOUT)
            assert isinstance(data, bytes) and len(data) == event["bytes"] and event["format"] == "m4s"
            assert event["chunk_index"] not in got
            got[event["chunk_index"]] = data
            continue
        others.append(event)
        if event["type"] == "video.done":
            break
    return others


def _decode(data: bytes, path: Path) -> torch.Tensor:
    path.write_bytes(data)
    reader = imageio_ffmpeg.read_frames(str(path))
    w, h = next(reader)["size"]
    return torch.stack([torch.frombuffer(bytearray(f), dtype=torch.uint8).reshape(h, w, 3) for f in reader])


def test_auth_and_a_bad_opening_message_are_refused(server: dict) -> None:
    for url, headers in ((server["ws"], {}), (server["ws"] + "?api_key=wrong", {})):
        with connect(url, additional_headers=headers) as ws:
            event = _next(ws)
            assert event["type"] == "error" and event["code"] == "unauthorized"
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)
    with connect(server["ws"] + f"?api_key={KEY}") as ws:  # the query parameter is enough
        ws.send(json.dumps({"type": "session.start", "num_frames": CHUNK}))
        event = _next(ws)
        assert event["type"] == "error" and event["param"] == "prompt", event
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd.code == 1008


def test_session_with_a_prompt_change_dropped_and_resumed_equals_http(server: dict, tmp_path: Path) -> None:
    chunks = 24  # long enough that chunk 12 has not entered the window when the change lands
    got: dict[int, bytes] = {}
    with _open(server) as ws:
        ws.send(json.dumps({"type": "session.start", "prompt": "calm", "num_frames": chunks * CHUNK, "seed": 11}))
        start = _next(ws)
        assert start["type"] == "video.start" and start["format"] == "m4s", start
        job_id = start["request_id"]
        assert start["config"]["id"] == job_id and start["config"]["status"] in ("queued", "in_progress")
        _chunks(ws, got, until=1)  # mid-session: chunk 0 is out
        ws.send(json.dumps({"type": "session.interaction", "from_chunk": 12, "prompt": "a storm"}))
        others = _chunks(ws, got, until=3)
        ws.send(json.dumps({"type": "session.ping"}))
        others += _chunks(ws, got, until=4)
    # the client dropped after 4 chunks; the job goes on
    queued = [e for e in others if e["type"] == "session.interaction.queued"]
    assert len(queued) == 1 and queued[0]["from_chunk"] == 12 and queued[0]["prompt"] == "a storm", others
    assert any(e["type"] == "session.pong" for e in others), others
    with _open(server) as ws:
        ws.send(json.dumps({"type": "session.resume", "id": job_id, "from_chunk": len(got)}))
        assert _next(ws)["request_id"] == job_id
        done = _chunks(ws, got)[-1]
    assert done["type"] == "video.done" and done["status"] == "completed" and done["chunks"] == chunks, done
    assert sorted(got) == list(range(chunks))
    # each binary frame is one chunk's complete fMP4: decoded one by one, in order
    streamed = torch.cat([_decode(got[k], tmp_path / f"ws{k}.mp4") for k in range(chunks)])
    state = GenerationState.load(server["data"] / "jobs" / job_id / "state.safetensors")
    timeline = [state.meta["prompts"][k] for k in state.meta["chunk_prompts"]]
    assert timeline[0] == "calm" and timeline[-1] == "a storm", timeline  # the change took effect
    http = server["http"]
    r = http.post("/v1/videos", json={"prompts": timeline, "num_frames": chunks * CHUNK, "seed": 11})
    assert r.status_code == 200, r.text
    plain = r.json()["id"]
    deadline = time.monotonic() + TIMEOUT
    while http.get(f"/v1/videos/{plain}").json()["status"] != "completed":
        assert time.monotonic() < deadline, server["log"].read_text()[-3000:]
        time.sleep(0.2)
    content = http.get(f"/v1/videos/{plain}/content")
    assert content.status_code == 200
    assert len(streamed) == chunks * CHUNK
    assert torch.equal(streamed, _decode(content.content, tmp_path / "http.mp4"))


def test_session_stop_cancels_and_keeps_the_chunks_done(server: dict) -> None:
    got: dict[int, bytes] = {}
    with _open(server) as ws:
        ws.send(json.dumps({"type": "session.start", "prompt": "long", "num_frames": 30 * CHUNK, "seed": 3}))
        job_id = _next(ws)["request_id"]
        _chunks(ws, got, until=1)
        ws.send(json.dumps({"type": "session.stop"}))
        done = _chunks(ws, got)[-1]
    assert done["type"] == "video.done" and done["status"] == "cancelled" and 1 <= done["chunks"] < 30, done
    assert sorted(got) == list(range(done["chunks"]))
    assert server["http"].get(f"/v1/videos/{job_id}").json()["status"] == "cancelled"
