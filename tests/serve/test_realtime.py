"""``WS /v1/realtime/video`` against the real server (uvicorn, its real worker, the tiny
checkpoint) with a websockets client: auth, a bad opening message, a session with a mid-session
prompt change (vLLM-Omni's interaction shape) that drops and is resumed by id, and session.stop.
The binary frames of a connection are one CMAF stream (the init segment, then each chunk's
fragments): concatenated they decode to every frame sent, with rising timestamps, and the
chunks of both connections behind one init equal the same timeline run through HTTP."""

from __future__ import annotations

import json
import os
import subprocess
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
from tests.helpers import CHUNK, write_tiny_config  # noqa: E402
from tests.serve.live import LiveServer  # noqa: E402

KEY = "rt-key-42"
TIMEOUT = 300.0  # s for one job on a loaded 2-core machine


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("realtime")
    config = write_tiny_config(root / "config.json", tiny_checkpoint, num_steps=4, window_size=4)
    env = {**os.environ, "SPECIAL_TOKEN_PATH": str(tiny_checkpoint / "special_tokens.npz"), "PYTHONUNBUFFERED": "1"}
    srv = LiveServer(config, root / "data", "--device", "cpu", "--api_key", KEY, env=env, key=KEY,
                     log=root / "server.log")  # fmt: skip
    yield {"ws": srv.url.replace("http", "ws", 1) + "/v1/realtime/video", "http": srv.client, "data": srv.data,
           "log": srv.log_path}  # fmt: skip
    srv.stop()


def _open(server: dict) -> ClientConnection:
    return connect(server["ws"], additional_headers={"Authorization": f"Bearer {KEY}"}, open_timeout=30)


def _next(ws: ClientConnection) -> dict:
    message = ws.recv(timeout=TIMEOUT)
    assert isinstance(message, str), "a binary frame without its video.chunk_metadata"
    return json.loads(message)


def _chunks(ws: ClientConnection, got: dict[int, bytes], until: int | None = None, binary: list | None = None) -> list:
    """Read chunks into ``got`` until ``until`` of them are in (None: until session.done); every
    binary frame also into ``binary`` in receive order; the other messages."""
    others, binary = [], [] if binary is None else binary
    while until is None or len(got) < until:
        event = _next(ws)
        if event["type"] == "video.chunk_metadata":
            data = ws.recv(timeout=TIMEOUT)
            assert isinstance(data, bytes) and len(data) == event["byte_length"] and event["format"] == "m4s"
            assert event["transport_chunk_index"] == len(binary), event  # numbered per connection
            binary.append(data)
            if event["kind"] == "init":  # once, before any media, on every connection
                assert len(binary) == 1 and event["generation_chunk_index"] is None and data[4:8] == b"ftyp"
                continue
            assert event["kind"] == "media" and event["num_frames"] == CHUNK and data[4:8] == b"moof", event
            assert event["generation_chunk_index"] not in got
            got[event["generation_chunk_index"]] = data
            continue
        others.append(event)
        if event["type"] == "session.done":
            break
    return others


def _pts(path: Path) -> list[int]:
    """The presentation timestamps of the video's frames in frames (1/fps), in decode order, as
    the file has them (ffmpeg's framemd5, without shifting the first to 0)."""
    out = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-copyts", "-i", str(path), "-f", "framemd5", "-"],
        capture_output=True,
        check=True,
        timeout=120,
    )
    rows = [line.split(",") for line in out.stdout.decode().splitlines() if line and not line.startswith("#")]
    return [int(row[2]) for row in rows]


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
    first: list[bytes] = []
    with _open(server) as ws:
        ws.send(json.dumps({"type": "session.start", "prompt": "calm", "num_frames": chunks * CHUNK, "seed": 11}))
        start = _next(ws)
        assert start["type"] == "video.start" and start["format"] == "m4s", start
        job_id = start["request_id"]
        assert start["config"]["id"] == job_id and start["config"]["status"] in ("queued", "in_progress")
        _chunks(ws, got, until=1, binary=first)  # mid-session: chunk 0 is out
        change = {"event_id": "storm-1", "event": {"prompt": "a storm"}, "from_chunk": 12}
        ws.send(json.dumps({"type": "session.interaction", "interaction": change}))
        others = _chunks(ws, got, until=3, binary=first)
        ws.send(json.dumps({"type": "session.ping"}))
        while not any(e["type"] == "session.pong" for e in others):  # chunks may come before the pong
            others += _chunks(ws, got, until=len(got) + 1, binary=first)
    dropped = len(got)  # the client dropped after these chunks; the job goes on
    assert dropped < chunks
    queued = [e for e in others if e["type"] == "session.interaction.queued"]
    assert len(queued) == 1 and queued[0]["from_chunk"] == 12 and queued[0]["prompt"] == "a storm", others
    assert queued[0]["event_id"] == "storm-1" and any(e["type"] == "session.pong" for e in others), others
    second: list[bytes] = []
    with _open(server) as ws:
        ws.send(json.dumps({"type": "session.resume", "id": job_id, "from_chunk": len(got)}))
        assert _next(ws)["request_id"] == job_id
        done = _chunks(ws, got, binary=second)[-1]
    assert done["type"] == "session.done" and done["status"] == "completed" and done["chunks"] == chunks, done
    assert done["stopped"] is False and sorted(got) == list(range(chunks))
    # each connection's binary frames, concatenated, are one playable file with rising timestamps
    for name, frames, count in (("first", first, dropped), ("second", second, chunks - dropped)):
        path = tmp_path / f"{name}.mp4"
        path.write_bytes(b"".join(frames))
        pts = _pts(path)
        assert len(pts) == count * CHUNK and all(a < b for a, b in zip(pts, pts[1:])), (name, pts[:5])
        assert pts[0] == (0 if name == "first" else dropped * CHUNK), pts[:3]  # resumed: on from where it left
    streamed = _decode(first[0] + b"".join(got[k] for k in range(chunks)), tmp_path / "ws.mp4")
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
    frames: list[bytes] = []
    with _open(server) as ws:
        ws.send(json.dumps({"type": "session.start", "prompt": "long", "num_frames": 30 * CHUNK, "seed": 3}))
        job_id = _next(ws)["request_id"]
        _chunks(ws, got, until=1, binary=frames)
        gradual = {"event": {"prompt": "x"}, "transition_chunks": 2}  # magi changes a prompt at once only
        ws.send(json.dumps({"type": "session.interaction", "interaction": gradual}))
        ws.send(json.dumps({"type": "session.interaction", "from_chunk": 29, "prompt": "late"}))  # magi's shape
        ws.send(json.dumps({"type": "session.stop"}))
        others = _chunks(ws, got, binary=frames)
        done = others[-1]
    errors = [e for e in others if e["type"] == "error"]
    assert len(errors) == 1 and errors[0]["param"] == "interaction.transition_chunks", others
    (queued,) = [e for e in others if e["type"] == "session.interaction.queued"]
    assert queued["from_chunk"] == 29 and queued["event_id"] == str(queued["edit_id"]), queued
    assert done["type"] == "session.done" and done["status"] == "cancelled" and 1 <= done["chunks"] < 30, done
    assert done["stopped"] is True
    assert sorted(got) == list(range(done["chunks"]))
    assert server["http"].get(f"/v1/videos/{job_id}").json()["status"] == "cancelled"
