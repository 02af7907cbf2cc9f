"""The routes of ``magi serve``: ``/health`` and ``/v1/videos`` (create, list, get, delete,
content, stream, segment, events, prompt, cancel, extend, remix), over the ``Service`` that
``create_app`` keeps in ``app.state.service``. Every route needs the API key when one is set.
Bodies are read by hand (size limits, forms) and validated by the models of
``magi.serve.protocol``, which ``openapi_extra`` documents in /openapi.json.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from magi.serve.media import (
    POLL_S,
    RangedFile,
    check_upload,
    copy_limited,
    follow_segments,
    hls_playlist,
    move_upload,
    segment_pieces,
    thumbnail,
    upload_suffix,
)
from magi.serve.protocol import (
    MAX_JSON_BYTES,
    ApiError,
    PromptEdit,
    Served,
    Video,
    VideoCreate,
    VideoExtend,
    bad,
    parse,
    planned_chunks,
    request_schema,
)
from magi.serve.store import Job, JobFiles, JobStore, QueueFull, new_id

_UPLOAD_FIELDS = {"image": "image", "input_reference": "image", "prefix_video": "prefix_video"}  # -> its param
MAX_EDITS = 100  # steering edits one job takes (each is a row the worker re-reads and applies)
_FORM_SLACK = 64 * 2**10  # multipart boundaries and the small text fields around the file
logger = logging.getLogger("magi.serve")
RETRY_AFTER_S = 10  # a full queue's 429 asks the client to come back after this


@dataclasses.dataclass(frozen=True)
class Service:
    """What the routes work on: the store, the data folder, the served config and limits."""

    store: JobStore
    data_dir: Path
    served: Served
    model: str  # the config's name, as the worker names it in worker.json
    api_key: str | None = None

    def job(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise ApiError(404, "not_found", f"no video with id {job_id!r}", "id")
        return job

    def video(self, job: Job) -> dict[str, Any]:
        """The job as the API shows it."""
        planned = None if job.chunks_total is not None else planned_chunks(self.served, job.params)
        return Video.of(
            job,
            model=self.model,
            fps=self.served.config.runtime.fps,
            segments=len(self.files(job.id).segments()),
            queue_position=self.store.queue_position(job.id) if job.status == "queued" else None,
            edits=self.store.edits(job.id),
            chunks_total=planned,
        ).model_dump()

    def files(self, job_id: str) -> JobFiles:
        return JobFiles(self.data_dir, job_id)


def get_service(request: Request) -> Service:
    return request.app.state.service


async def require_key(request: Request) -> None:
    """401 unless ``Authorization: Bearer KEY`` (compared in constant time) when a key is set."""
    expected = get_service(request).api_key
    if not expected:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer KEY'")


Svc = Annotated[Service, Depends(get_service)]
router = APIRouter(dependencies=[Depends(require_key)])


# ---- request bodies -------------------------------------------------------------------------
class _TooLarge(Exception):
    pass


def _counting(request: Request, limit: int) -> Request:
    """The request with a body that raises _TooLarge once more than ``limit`` bytes arrive."""
    receive, seen = request.receive, [0]
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _TooLarge()

    async def counted() -> dict:
        message = await receive()
        seen[0] += len(message.get("body", b""))
        if seen[0] > limit:
            raise _TooLarge()
        return message

    return Request(request.scope, counted)


async def json_body(request: Request) -> dict:
    """The JSON object of the body (an empty body: {}); 413 above MAX_JSON_BYTES."""
    try:
        raw = await _counting(request, MAX_JSON_BYTES).body()
    except _TooLarge:
        raise ApiError(413, "request_too_large", f"the JSON body is over {MAX_JSON_BYTES} bytes") from None
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, RecursionError):
        raise bad(None, "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise bad(None, "the body must be a JSON object")
    return data


async def form_body(request: Request, limit: int, staging: Path) -> tuple[dict, tuple[str, Path] | None]:
    """Fields of a multipart form and its one upload (param, path), copied to ``staging`` within ``limit``."""
    too_large = ApiError(
        413, "upload_too_large", f"the upload is over the limit of {limit} bytes ({limit / 2**20:g} MB)", "image"
    )
    try:
        form = await _counting(request, limit + _FORM_SLACK).form(max_files=2, max_fields=100)
    except _TooLarge:
        raise too_large from None
    except StarletteHTTPException as err:  # a malformed multipart body
        raise bad(None, f"cannot read the form: {err.detail}") from None
    fields: dict = {}
    upload = None
    try:
        for key, value in form.multi_items():
            if isinstance(value, str):  # a repeated field becomes a list
                fields[key] = (
                    [*fields[key], value]
                    if isinstance(fields.get(key), list)
                    else ([fields[key], value] if key in fields else value)
                )
                continue
            if key not in _UPLOAD_FIELDS:
                raise bad(key, f"unexpected file field {key!r}; use image (i2v) or prefix_video (v2v)")
            if upload is not None:
                raise bad(key, "give one file: image (i2v) or prefix_video (v2v)")
            param = _UPLOAD_FIELDS[key]
            dest = staging / f"input{upload_suffix(value.filename, 'i2v' if param == 'image' else 'v2v')}"
            await copy_limited(value, dest, limit, too_large, param)
            upload = (param, dest)
    finally:
        await form.close()
    if isinstance(fields.get("prompts"), str):  # a JSON list in one form field
        try:
            fields["prompts"] = json.loads(fields["prompts"])
        except ValueError:
            raise bad("prompts", "prompts must be a JSON list of strings in a form") from None
    return fields, upload


# ---- routes ---------------------------------------------------------------------------------
@router.get("/health")
async def health(svc: Svc) -> Response:
    """200 while the worker is starting or ready; 503 naming the problem when it failed to load
    the model, hit an unwritable or full data folder (``error``), or its process is gone."""
    try:
        worker = json.loads((svc.data_dir / "worker.json").read_text())
    except (OSError, ValueError):
        worker = None
    worker = worker if isinstance(worker, dict) else {"status": "starting"}
    if worker.get("status") != "starting" and not _alive(worker.get("pid")):
        worker = {**worker, "status": "dead", "error": f"the worker process {worker.get('pid')} has exited"}
    if worker.get("status") in ("failed", "error", "dead"):
        return JSONResponse({"status": "unavailable", "error": worker.get("error"), "worker": worker}, status_code=503)
    return JSONResponse({"status": "ok", "worker": worker})


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


@router.post("/v1/videos", openapi_extra=request_schema(VideoCreate, form=True))
async def create(request: Request, svc: Svc) -> dict:
    staging = svc.data_dir / "uploads" / secrets.token_hex(8)
    try:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            staging.mkdir(parents=True)
            fields, upload = await form_body(request, svc.served.limits.max_upload_bytes, staging)
        else:
            fields, upload = await json_body(request), None
        req = parse(VideoCreate, fields, svc.served, upload=upload[0] if upload else None)
        if upload is not None:
            await _check_upload(svc, req, *upload)
        job_id = new_id()
        if upload is not None:
            move_upload(staging, svc.files(job_id))
        params = req.params(req.mode, req.size, upload[1].name if upload else None)
        job = _queue(svc, params, job_id=job_id)
        logger.info("job %s queued: %s, %d frames, %s", job.id, req.mode, req.num_frames, params["size"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return svc.video(job)


async def _check_upload(svc: Svc, req: VideoCreate, param: str, path: Path) -> None:
    """Decode the upload in a thread; a file the CLI would refuse is a 422."""
    try:
        await run_in_threadpool(check_upload, svc.served.config, req.mode, req.size, path, svc.served.limits.max_frames)
    except (ValueError, OSError) as err:
        text = str(err).replace(str(path.parent) + os.sep, "")  # the staging folder is no one's business
        raise ApiError(422, "invalid_file", f"{param}: {text}", param) from None


def _queue(svc: Service, params: dict, *, job_id: str | None = None, parent_id: str | None = None) -> Job:
    try:
        return svc.store.create(params, max_queued=svc.served.limits.max_queued, job_id=job_id, parent_id=parent_id)
    except QueueFull as err:
        if job_id is not None:
            shutil.rmtree(svc.files(job_id).dir, ignore_errors=True)
        raise ApiError(429, "queue_full", str(err), headers={"Retry-After": str(RETRY_AFTER_S)}) from None


@router.get("/v1/videos")
async def list_videos(
    svc: Svc, limit: int = 20, after: str | None = None, order: Literal["asc", "desc"] = "desc"
) -> dict:
    """A page of jobs (newest first by default); ``last_id`` is the next page's ``after``."""
    if not 1 <= limit <= 100:
        raise bad("limit", f"limit must be 1..100, got {limit}")
    if after is not None:
        svc.job(after)
    jobs = svc.store.list(limit + 1, after, order)
    page = [svc.video(j) for j in jobs[:limit]]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(jobs) > limit,
    }


@router.get("/v1/videos/{job_id}")
async def retrieve(job_id: str, svc: Svc) -> dict:
    return svc.video(svc.job(job_id))


@router.delete("/v1/videos/{job_id}")
async def delete(job_id: str, svc: Svc) -> dict:
    """Remove an ended job, its edits and its files (a queued or running one: cancel it first)."""
    job = svc.job(job_id)
    if not job.ended:
        raise ApiError(409, "job_running", f"video {job_id} is {job.status}; cancel it first, then delete it")
    if any(not j.ended and j.parent_id == job_id for j in svc.store.list(1000)):
        raise ApiError(409, "job_in_use", f"a queued or running job extends video {job_id}; delete it afterwards")
    svc.store.delete(job_id)
    await run_in_threadpool(shutil.rmtree, svc.files(job_id).dir, True)
    return {"id": job_id, "object": "video.deleted", "deleted": True}


@router.get("/v1/videos/{job_id}/content")
async def content(job_id: str, svc: Svc, variant: Literal["video", "thumbnail"] = Query("video")) -> Response:
    """The finished mp4 (Range requests answered), or ``variant=thumbnail``: its first frame, a PNG."""
    job = svc.job(job_id)
    path = svc.files(job_id).video
    if not path.is_file():
        raise ApiError(
            409,
            "not_ready",
            f"video {job_id} has no mp4 yet (status {job.status}); "
            "it is written when the job completes or is cancelled",
        )
    if variant == "thumbnail":
        image = svc.files(job_id).dir / "thumbnail.png"
        if not image.is_file():
            await run_in_threadpool(thumbnail, path, image)
        return FileResponse(image, media_type="image/png")
    return RangedFile(path, media_type="video/mp4")


@router.get("/v1/videos/{job_id}/stream")
async def stream(job_id: str, svc: Svc) -> StreamingResponse:
    """The live video as one fragmented mp4: segment 0 whole, then each later segment's fragments."""
    svc.job(job_id)

    async def body() -> AsyncIterator[bytes]:
        async for k, path in follow_segments(svc.store, svc.files(job_id), job_id):
            if k == 0:
                yield await run_in_threadpool(path.read_bytes)
            else:
                yield b"".join((await run_in_threadpool(segment_pieces, path))[1])

    return StreamingResponse(body(), media_type="video/mp4", headers={"Cache-Control": "no-store"})


@router.get("/v1/videos/{job_id}/stream.m3u8")
async def hls(job_id: str, svc: Svc) -> Response:
    """A live HLS playlist (fMP4 segments) over the stream's fragments; ends with the job."""
    job = svc.job(job_id)
    text = await run_in_threadpool(hls_playlist, svc.files(job_id), svc.served.config.runtime.fps, job.ended)
    return Response(text, media_type="application/vnd.apple.mpegurl", headers={"Cache-Control": "no-store"})


@router.get("/v1/videos/{job_id}/stream/init.mp4")
async def stream_init(job_id: str, svc: Svc) -> Response:
    """The stream's init segment (ftyp + moov, the same in every segment)."""
    svc.job(job_id)
    path = svc.files(job_id).segment(0)
    if not path.is_file():
        raise ApiError(404, "not_found", f"video {job_id} has no segment yet; its init comes with the first", "k")
    return Response((await run_in_threadpool(segment_pieces, path))[0], media_type="video/mp4")


@router.get("/v1/videos/{job_id}/stream/{k}.m4s")
async def fragment(job_id: str, k: int, svc: Svc) -> Response:
    """Segment k's fragments (moof + mdat), timed on from segment k - 1: append after the init."""
    svc.job(job_id)
    path = svc.files(job_id).segment(k) if k >= 0 else None
    if path is None or not path.is_file():
        raise ApiError(404, "not_found", f"video {job_id} has no segment {k} (yet)", "k")
    return Response(b"".join((await run_in_threadpool(segment_pieces, path))[1]), media_type="video/iso.segment")


@router.get("/v1/videos/{job_id}/stream/{k}")
async def segment(job_id: str, k: int, svc: Svc) -> FileResponse:
    svc.job(job_id)
    path = svc.files(job_id).segment(k) if k >= 0 else None
    if path is None or not path.is_file():
        raise ApiError(404, "not_found", f"video {job_id} has no segment {k} (yet)", "k")
    return FileResponse(path, media_type="video/mp4")


@router.get("/v1/videos/{job_id}/events")
async def events(job_id: str, svc: Svc) -> EventSourceResponse:
    svc.job(job_id)
    return EventSourceResponse(_events(svc, job_id), headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def _events(svc: Service, job_id: str) -> AsyncIterator[dict]:
    """``chunk`` per segment, ``steer`` per accepted edit (its prompt cut to 200 characters),
    ``progress`` when the video object changes, ``done`` when it ends.

    The first ``progress`` and ``done`` carry the whole object; the other ``progress`` events leave
    out the prompt fields (``prompt``, ``prompts``, ``prompt_timeline``: up to MAX_PROMPT_CHARS
    each) unless they changed.
    """
    files, sent, shown, edit_seen = svc.files(job_id), 0, None, 0
    while True:
        job = svc.store.get(job_id)
        if job is None:  # removed under us
            return
        for edit in svc.store.edits(job_id, after=edit_seen):
            edit_seen = edit.id
            yield {
                "event": "steer",
                "data": json.dumps({"edit_id": edit.id, "applies_from": edit.from_chunk, "prompt": edit.prompt[:200]}),
            }
        while files.segment(sent).is_file():
            yield {"event": "chunk", "data": json.dumps({"index": sent, "url": f"/v1/videos/{job_id}/stream/{sent}"})}
            sent += 1
        current = svc.video(job)
        if current != shown:
            yield {"event": "progress", "data": json.dumps(_changed_prompts(current, shown))}
            shown = current
        if job.ended:
            yield {"event": "done", "data": json.dumps(current)}
            return
        await asyncio.sleep(POLL_S)


_PROMPT_FIELDS = ("prompt", "prompts", "prompt_timeline")


def _changed_prompts(video: dict, before: dict | None) -> dict:
    """``video`` without its prompt fields where ``before`` (the last one sent) has the same."""
    if before is None:
        return video
    return {k: v for k, v in video.items() if k not in _PROMPT_FIELDS or before.get(k) != v}


@router.post("/v1/videos/{job_id}/prompt", openapi_extra=request_schema(PromptEdit))
async def steer(job_id: str, request: Request, svc: Svc) -> dict:
    job = svc.job(job_id)
    edit = parse(PromptEdit, await json_body(request), svc.served, chunks=job_chunks(svc, job))
    return queue_edit(svc, job, edit)


def job_chunks(svc: Service, job: Job) -> int | None:
    """The job's chunk count: known once it runs, else planned from its request (None: unknown)."""
    return job.chunks_total if job.chunks_total is not None else planned_chunks(svc.served, job.params)


def queue_edit(svc: Service, job: Job, edit: PromptEdit) -> dict:
    """Queue a checked steering edit of ``job`` (HTTP and realtime): the ``video.prompt_edit``
    answer, or ApiError 409 (ended, too late, too many edits)."""
    job_id, chunks = job.id, job_chunks(svc, job)
    if job.status not in ("queued", "in_progress"):
        raise ApiError(409, "job_ended", f"video {job_id} is {job.status}; only a queued or running job can be steered")
    applies, moved = _applies_from(svc, job, edit.from_chunk)
    if chunks is not None and applies >= chunks:
        raise ApiError(
            409,
            "too_late",
            f"every chunk of video {job_id} has entered the denoising window; an edit can no longer change it",
            "from_chunk",
        )
    if len(svc.store.edits(job_id)) >= MAX_EDITS:
        raise ApiError(
            409,
            "too_many_edits",
            f"video {job_id} has {MAX_EDITS} steering edits already, the most "
            "one job takes; start a new job (or extend this one) to steer more",
        )
    edit_id = svc.store.add_edit(job_id, applies, edit.prompt)
    logger.info("job %s steered: edit %d from chunk %d%s", job_id, edit_id, applies, f" ({moved})" if moved else "")
    return {
        "object": "video.prompt_edit",
        "id": job_id,
        "edit_id": edit_id,
        "prompt": edit.prompt,
        "from_chunk": edit.from_chunk,
        "applies_from": applies,
        "moved": moved,
    }


def _applies_from(svc: Service, job: Job, from_chunk: int) -> tuple[int, str | None]:
    """The chunk an edit takes effect from and why, if later than asked: chunks that entered the
    denoising window keep their prompt. The worker records the first chunk still open after each
    step (``steer_from``); before its first step (queued, or resumed) nothing has entered past the
    chunks done. Should the window move on before the worker reads the edit, it moves the edit on
    and the job's ``prompt_timeline`` shows where it applies."""
    first = job.chunks_done
    if job.status == "in_progress" and job.steer_from is not None:
        first = max(first, job.steer_from)
    if from_chunk >= first:
        return from_chunk, None
    return first, (
        f"chunks {from_chunk}..{first - 1} are done or in the denoising window; the edit applies from chunk {first}"
    )


@router.post("/v1/videos/{job_id}/cancel")
async def cancel(job_id: str, svc: Svc) -> dict:
    job = svc.job(job_id)
    if job.ended:
        raise ApiError(409, "job_ended", f"video {job_id} is already {job.status}")
    job = svc.store.request_cancel(job_id)
    if job is not None and job.status == "in_progress" and not _worker_alive(svc):
        # no worker will reach the job's next step (dead, or never started): cancel it now
        svc.store.cancel_now(job_id)
        job = svc.store.get(job_id)
    return svc.video(job)


def _worker_alive(svc: Service) -> bool:
    """False when worker.json names a worker that failed to load or whose process is gone (no
    worker.json yet: one is starting, and it resumes the job)."""
    try:
        worker = json.loads((svc.data_dir / "worker.json").read_text())
    except (OSError, ValueError):
        return True
    return (
        isinstance(worker, dict) and worker.get("status") in ("loading", "ready", "error") and _alive(worker.get("pid"))
    )


@router.post("/v1/videos/{job_id}/extend", openapi_extra=request_schema(VideoExtend))
async def extend(job_id: str, request: Request, svc: Svc) -> dict:
    """A new job continuing the completed video ``job_id`` (its saved state) by num_frames more."""
    return await _continue(job_id, request, svc, remix=False)


@router.post("/v1/videos/{job_id}/remix", openapi_extra=request_schema(VideoExtend))
async def remix(job_id: str, request: Request, svc: Svc) -> dict:
    """OpenAI's remix: the extend path, the new prompt continuing the video (as long again by default)."""
    return await _continue(job_id, request, svc, remix=True)


async def _continue(job_id: str, request: Request, svc: Service, *, remix: bool) -> dict:
    parent = svc.job(job_id)
    body = await json_body(request)
    if parent.status != "completed":
        raise ApiError(
            409, "not_completed", f"video {job_id} is {parent.status}; only a completed video can be extended"
        )
    if not svc.files(job_id).state.is_file():
        raise ApiError(409, "no_state", f"video {job_id} has no saved generation state to continue from")
    req = parse(
        VideoExtend, body, svc.served, parent=parent, default_frames=parent.params["num_frames"] if remix else None
    )
    return svc.video(_queue(svc, req.params("extend", req.size), parent_id=job_id))
