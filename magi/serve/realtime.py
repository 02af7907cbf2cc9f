"""``WS /v1/realtime/video``: a realtime session over one job, in the shape of vLLM-Omni's
"Streaming Video Output WebSocket API".

The binary frames of a session are one CMAF stream, the same bytes as ``GET
/v1/videos/{id}/stream/init.mp4`` then ``/stream/{k}.m4s`` for each chunk: first the init segment
(ftyp + moov), then each chunk's fragments (moof + mdat) with timestamps going on from the chunk
before. A client that concatenates the binary frames in receive order has one playable
fragmented MP4 of every frame (vLLM-Omni's documented client behaviour); a MediaSource appends
them as they come. Every binary frame follows a ``video.chunk_metadata`` text frame describing it.

Client to server:
  ``session.start``       the request, as the JSON body of ``POST /v1/videos`` (t2v: prompt or prompts,
                          num_frames, seed, size); ``format`` may be given, only ``m4s`` exists
  ``session.resume``      ``id`` of an earlier session's video, ``from_chunk`` the first chunk still wanted
                          (the init segment is sent again first, then the fragments from that chunk)
  ``session.interaction`` the prompt from a chunk on (steering), in vLLM-Omni's shape
                          ``{"interaction": {"event_id", "event": {"prompt"}, "transition_chunks"}}``
                          (``from_chunk`` in ``interaction`` optional: default the next chunk not yet
                          done; ``transition_chunks`` only 0, a change applies at once) or magi's
                          ``{"from_chunk", "prompt"}``
  ``session.stop``        cancel the job; the chunks done so far still arrive, then ``session.done``
  ``session.ping``        answered with ``session.pong``
Server to client:
  ``video.start`` (``request_id``: the video id, ``format``, ``config``: the video object);
  ``video.chunk_metadata`` + one binary frame: ``kind`` (``init``: the init segment, once per
  connection, before any media; ``media``: a chunk's fragments), ``request_id``,
  ``transport_chunk_index`` (the binary frame's number on this connection, from 0),
  ``generation_chunk_index`` (the chunk; null for the init), ``num_frames``, ``byte_length``,
  ``format``;
  ``session.interaction.queued`` (``event_id``, and as ``POST /v1/videos/{id}/prompt`` answers:
  ``edit_id``, ``prompt``, ``from_chunk``, ``applies_from``, ``moved``; the same 409s);
  ``session.done`` (``chunks``: the job's chunks done, ``stopped``: cancelled, ``status``,
  ``error``); ``error`` (``code``, ``message``, ``param``; the socket closes after an error in the
  opening message).

vLLM-Omni's names, as its docs state them (docs/serving/streaming_video_output_api.md and its
realtime prompt-interaction protocol in vllm-project/vllm-omni, read 2026-12): ``session.start``
with ``format: "m4s"``, ``video.start`` (``request_id``, ``format``, ``config``),
``video.chunk_metadata`` (``kind`` media / trailer, ``transport_chunk_index``,
``generation_chunk_index``, ``num_frames``, ``byte_length``, ``started/active/completed_event_ids``)
before each binary frame, ``session.interaction`` with ``interaction.event_id / event.prompt /
transition_chunks``, ``session.interaction.queued`` (``event_id``), ``session.ping`` /
``session.pong``, ``session.stop``, ``session.done`` (``chunks``, ``stopped``), ``error``. magi
uses those names; it adds ``kind: "init"`` (vLLM-Omni puts its init inside the first media
payload), ``session.resume`` and ``format`` in the metadata, and sends no event-id lists and no
trailer (a fragmented stream needs none).

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

from magi.media.mp4 import fragment_frames
from magi.serve.media import POLL_S, segment_pieces
from magi.serve.protocol import ApiError, PromptEdit, VideoCreate, bad, parse
from magi.serve.routes import Service, job_chunks, queue_edit
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
        await ws.close(1000)  # every chunk and session.done are out
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


def _metadata(job_id: str, kind: str, index: int, chunk: int | None, data: bytes, frames: int) -> dict:
    return {
        "type": "video.chunk_metadata",
        "request_id": job_id,
        "kind": kind,
        "transport_chunk_index": index,
        "generation_chunk_index": chunk,
        "num_frames": frames,
        "byte_length": len(data),
        "format": FORMAT,
    }


async def _send_chunks(ws: WebSocket, svc: Service, job_id: str, k: int) -> None:
    """The init segment, then each chunk's fragments from ``k`` on (metadata + one binary frame
    each), then ``session.done`` once the job ended."""
    files, sent = svc.files(job_id), 0
    while True:
        job = svc.job(job_id)  # read before listing, so no segment written before the end is missed
        while files.segment(k).is_file():
            init, fragments = await run_in_threadpool(segment_pieces, files.segment(k))
            if sent == 0:  # the same init opens every segment: sent once, before any media
                await ws.send_json(_metadata(job_id, "init", sent, None, init, 0))
                await ws.send_bytes(init)
                sent += 1
            media = b"".join(fragments)
            await ws.send_json(_metadata(job_id, "media", sent, k, media, sum(map(fragment_frames, fragments))))
            await ws.send_bytes(media)
            sent, k = sent + 1, k + 1
        if job.ended:
            await ws.send_json(
                {
                    "type": "session.done",
                    "request_id": job_id,
                    "chunks": k,
                    "stopped": job.status == "cancelled",
                    "status": job.status,
                    "error": job.error,
                }
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
        return None  # the chunks done so far, then session.done (cancelled)
    if kind == "session.interaction":
        return _interaction(svc, svc.job(job_id), message)
    raise bad("type", f"unknown message type {kind!r}; use session.interaction, session.stop or session.ping")


def _interaction(svc: Service, job: Any, message: dict) -> dict:
    """Queue a prompt edit from ``session.interaction`` (vLLM-Omni's ``interaction`` object, or
    magi's ``from_chunk`` + ``prompt``); the ``session.interaction.queued`` reply."""
    event_id = None
    fields = {k: v for k, v in message.items() if k != "type"}
    if "interaction" in fields:
        interaction = fields.pop("interaction")
        if fields or not isinstance(interaction, dict) or not isinstance(interaction.get("event"), dict):
            raise bad("interaction", "session.interaction needs {'interaction': {'event': {'prompt': ...}}} alone")
        event_id = interaction.get("event_id")
        if event_id is not None and (not isinstance(event_id, str) or not event_id):
            raise bad("interaction.event_id", "event_id must be a non-empty string")
        if interaction.get("transition_chunks", 0) != 0:
            raise bad(
                "interaction.transition_chunks",
                "magi applies a prompt change at once: give transition_chunks 0 or leave it out",
            )
        fields = {
            "from_chunk": interaction.get("from_chunk", job.chunks_done),
            "prompt": interaction["event"].get("prompt"),
        }
    answer = queue_edit(svc, job, parse(PromptEdit, fields, svc.served, chunks=job_chunks(svc, job)))
    return {
        "type": "session.interaction.queued",
        "request_id": job.id,
        "event_id": event_id or str(answer["edit_id"]),
        **{k: answer[k] for k in ("edit_id", "prompt", "from_chunk", "applies_from", "moved")},
    }
