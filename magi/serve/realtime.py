"""``WS /v1/realtime/video``: a realtime session over one job, in the shape of vLLM-Omni's
"Streaming Video Output WebSocket API".

Control messages are JSON text frames with a ``type``; each chunk is a ``video.chunk_metadata``
message followed by exactly one binary frame, the chunk's segment: a complete fragmented MP4 of
that chunk's frames, playable on its own (the same bytes as ``GET /v1/videos/{id}/stream/{k}``).

Client to server:
  ``session.start``       the request, as the JSON body of ``POST /v1/videos`` (t2v: prompt or prompts,
                          num_frames, seed, size); ``format`` may be given, only ``m4s`` exists
  ``session.resume``      ``id`` of an earlier session's video, ``from_chunk`` the first chunk still wanted
  ``session.interaction`` ``from_chunk`` and ``prompt``: the prompt from that chunk on (steering)
  ``session.stop``        cancel the job; the chunks done so far still arrive, then ``video.done``
  ``session.ping``        answered with ``session.pong``
Server to client:
  ``video.start`` (``request_id``: the video id, ``format``, ``config``: the video object),
  ``video.chunk_metadata`` (``chunk_index``, ``bytes``, ``format``) + one binary frame,
  ``session.interaction.queued`` (``edit_id``, ``from_chunk``, ``prompt``), ``video.done``
  (``status``, ``chunks``, ``error``), ``error`` (``code``, ``message``, ``param``; the socket closes
  after an error in the opening message).

A session is a job: a client that drops leaves it running, and a new connection with
``session.resume`` continues from the chunk it names. Auth as the HTTP routes: the
``Authorization: Bearer KEY`` header, or ``?api_key=KEY`` for clients (browsers) that cannot set it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.concurrency import run_in_threadpool

from magi.serve.media import POLL_S
from magi.serve.protocol import ApiError, PromptEdit, VideoCreate, bad, parse
from magi.serve.routes import Service
from magi.serve.store import QueueFull

FORMAT = "m4s"
CLOSE_POLICY = 1008  # the WebSocket close code for a refused session (auth, a bad opening message)

router = APIRouter()


def _authorized(ws: WebSocket, expected: str | None) -> bool:
    if not expected:
        return True
    scheme, _, token = ws.headers.get("authorization", "").partition(" ")
    given = token.strip() if scheme.lower() == "bearer" else ws.query_params.get("api_key", "")
    return hmac.compare_digest(given.encode(), expected.encode())


def _error(err: ApiError) -> dict[str, Any]:
    return {"type": "error", "code": err.code, "message": err.message, "param": err.param}


async def _receive(ws: WebSocket) -> dict:
    """The next JSON object from the client; ``ApiError`` for anything else."""
    text = await ws.receive_text()
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        raise bad(None, "a message must be a JSON object with a 'type'") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise bad("type", "a message must be a JSON object with a 'type'")
    return message


@router.websocket("/v1/realtime/video")
async def realtime_video(ws: WebSocket) -> None:
    svc: Service = ws.app.state.service
    await ws.accept()
    if not _authorized(ws, svc.api_key):
        err = ApiError(
            401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer KEY' or ?api_key=KEY"
        )
        await ws.send_json(_error(err))
        await ws.close(CLOSE_POLICY)
        return
    try:
        job_id, start = await _open(svc, await _receive(ws))
    except ApiError as err:
        await ws.send_json(_error(err))
        await ws.close(CLOSE_POLICY)
        return
    except WebSocketDisconnect:
        return
    await ws.send_json(
        {"type": "video.start", "request_id": job_id, "format": FORMAT, "config": svc.video(svc.job(job_id))}
    )
    sender = asyncio.create_task(_send_chunks(ws, svc, job_id, start))
    listener = asyncio.create_task(_listen(ws, svc, job_id))
    done, pending = await asyncio.wait({sender, listener}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if sender in done and sender.exception() is None:
        await ws.close(1000)  # every chunk and video.done are out
    # else the client left: the job goes on, session.resume picks it up


async def _open(svc: Service, message: dict) -> tuple[str, int]:
    """The session's job (created for session.start, found for session.resume) and its first chunk."""
    kind = message["type"]
    if message.get("format", FORMAT) != FORMAT:
        raise bad("format", f"format must be {FORMAT!r} (fragmented MP4 chunks), got {message.get('format')!r}")
    if kind == "session.resume":
        job_id = message.get("id")
        if not isinstance(job_id, str):
            raise bad("id", "session.resume needs 'id', the video id that video.start named")
        start = message.get("from_chunk", 0)
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise bad("from_chunk", f"from_chunk must be an integer >= 0, got {start!r}")
        return svc.job(job_id).id, start
    if kind != "session.start":
        raise bad("type", f"the first message must be session.start or session.resume, got {kind!r}")
    fields = {k: v for k, v in message.items() if k not in ("type", "format")}
    req = parse(VideoCreate, fields, svc.served, upload=None)
    params = req.params(req.mode, req.size, None)
    try:
        job = svc.store.create(params, max_queued=svc.served.limits.max_queued)
    except QueueFull as err:
        raise ApiError(429, "queue_full", str(err)) from None
    return job.id, 0


async def _send_chunks(ws: WebSocket, svc: Service, job_id: str, k: int) -> None:
    """Each segment from ``k`` on as metadata + one binary frame, then ``video.done`` once the job ended."""
    files = svc.files(job_id)
    while True:
        job = svc.job(job_id)  # read before listing, so no segment written before the end is missed
        while files.segment(k).is_file():
            data = await run_in_threadpool(files.segment(k).read_bytes)
            await ws.send_json(
                {
                    "type": "video.chunk_metadata",
                    "request_id": job_id,
                    "chunk_index": k,
                    "bytes": len(data),
                    "format": FORMAT,
                }
            )
            await ws.send_bytes(data)
            k += 1
        if job.ended:
            await ws.send_json(
                {"type": "video.done", "request_id": job_id, "status": job.status, "chunks": k, "error": job.error}
            )
            return
        await asyncio.sleep(POLL_S)


async def _listen(ws: WebSocket, svc: Service, job_id: str) -> None:
    """Handle the client's messages until it disconnects; a bad one is answered with ``error``."""
    while True:
        try:
            message = await _receive(ws)
            reply = _handle(svc, job_id, message)
        except WebSocketDisconnect:
            return
        except ApiError as err:
            reply = _error(err)
        if reply is not None:
            await ws.send_json(reply)


def _handle(svc: Service, job_id: str, message: dict) -> dict | None:
    kind = message["type"]
    if kind == "session.ping":
        return {"type": "session.pong"}
    if kind == "session.stop":
        job = svc.job(job_id)
        if not job.ended:
            svc.store.request_cancel(job_id)
        return None  # the chunks done so far, then video.done (cancelled)
    if kind == "session.interaction":
        job = svc.job(job_id)
        fields = {k: v for k, v in message.items() if k != "type"}
        edit = parse(PromptEdit, fields, svc.served, chunks=job.chunks_total)
        if job.status not in ("queued", "in_progress"):
            raise ApiError(
                409, "job_ended", f"video {job_id} is {job.status}; only a queued or running job can be steered"
            )
        edit_id = svc.store.add_edit(job_id, edit.from_chunk, edit.prompt)
        return {
            "type": "session.interaction.queued",
            "request_id": job_id,
            "edit_id": edit_id,
            "from_chunk": edit.from_chunk,
            "prompt": edit.prompt,
        }
    raise bad("type", f"unknown message type {kind!r}; use session.interaction, session.stop or session.ping")
