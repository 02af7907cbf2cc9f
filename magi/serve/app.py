"""The HTTP side of ``magi serve``: a FastAPI app over the job store; it never loads the model.

Requests are validated here (the CLI's checks: magi.config, magi.budget, magi.video_io) and
queued in the SQLite store; the worker process generates and writes the segment files. Live
routes (``/stream``, ``/events``) follow the store and the files by polling about 4 times a
second, so they survive a worker restart and see a resumed job's segments as any others.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import math
import os
import re
import shutil
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from magi.config import ConfigError, MagiConfig, load_config
from magi.serve.store import ENDED, JobFiles, JobStore, QueueFull, new_id

MAX_FRAMES = 1440  # 60 s at 24 fps
MAX_PIXELS = 1280 * 720
MAX_QUEUED = 32
MAX_UPLOAD_BYTES = 100 * 2**20
MAX_JSON_BYTES = 1 * 2**20  # a JSON body (prompts) above this is refused with 413
POLL_S = 0.25  # live routes look at the store and the files this often
STATIC_DIR = Path(__file__).resolve().parent / "static"
_UPLOAD_FIELDS = {"image": "i2v", "input_reference": "i2v", "prefix_video": "v2v"}
_FORM_SLACK = 64 * 2**10  # multipart boundaries and the small text fields around the file


class ApiError(Exception):
    """A request error: HTTP status, a code, one line and the field it is about."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


def _bad(param: str | None, message: str) -> ApiError:
    return ApiError(400, "invalid_request", message, param)


def _error_response(status: int, code: str, message: str, param: str | None = None,
                    headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    line = " ".join(str(message).split())  # one line, always
    return JSONResponse({"error": {"code": code, "message": line, "param": param}}, status, headers=headers)


@dataclasses.dataclass(frozen=True)
class Limits:
    max_frames: int = MAX_FRAMES
    max_pixels: int = MAX_PIXELS
    max_queued: int = MAX_QUEUED
    max_upload_bytes: int = MAX_UPLOAD_BYTES


# ---- the job object -------------------------------------------------------------------------
def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _timings(job: dict) -> dict:
    """Queue wait, start -> first chunk, and seconds per chunk (between chunk ends once two exist)."""
    created, started, first, last = job["created_at"], job["started_at"], job["first_chunk_at"], job["last_chunk_at"]
    per_chunk = None
    if first is not None and last is not None and job["chunks_done"] >= 2:
        per_chunk = (last - first) / (job["chunks_done"] - 1)
    elif first is not None and started is not None and job["chunks_done"] == 1:
        per_chunk = first - started
    return {"queue_wait_s": _round(None if started is None else started - created),
            "time_to_first_chunk_s": _round(None if first is None or started is None else first - started),
            "seconds_per_chunk": _round(per_chunk)}  # fmt: skip


def _progress(job: dict) -> int:
    if job["status"] == "completed":
        return 100
    parts = [0.0]
    if job["chunks_total"]:
        parts.append(job["chunks_done"] / job["chunks_total"])
    if job["steps_total"]:
        parts.append(job["step"] / job["steps_total"])
    return max(0, min(100, int(max(parts) * 100)))


def job_object(job: dict, store: JobStore, data_dir: Path, model: str, fps: float) -> dict:
    """The job as the API shows it (OpenAI's video object plus magi's progress fields)."""
    p = job["params"]
    ended = job["status"] in ENDED
    return {
        "id": job["id"], "object": "video", "model": model, "status": job["status"], "mode": p["mode"],
        "prompt": p["prompts"][0], "prompts": p["prompts"], "seed": p["seed"], "num_frames": p["num_frames"],
        "size": f"{p['size'][0]}x{p['size'][1]}", "seconds": f"{p['num_frames'] / fps:g}",
        "created_at": int(job["created_at"]),
        "completed_at": int(job["finished_at"]) if ended and job["finished_at"] is not None else None,
        "progress": _progress(job), "chunks_done": job["chunks_done"], "chunks_total": job["chunks_total"],
        "step": job["step"], "steps_total": job["steps_total"], "frames_done": job["frames_done"],
        "segments": len(JobFiles(data_dir, job["id"]).segments()),
        "queue_position": store.queue_position(job["id"]) if job["status"] == "queued" else None,
        "parent_id": job["parent_id"], "timings": _timings(job),
        "error": {"code": "generation_failed", "message": job["error"]} if job["error"] else None,
    }  # fmt: skip


# ---- validation -----------------------------------------------------------------------------
def _int(param: str, value: Any) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise _bad(param, f"{param} must be an integer, got {value!r}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(param, f"{param} must be an integer, got {json.dumps(value)[:60]}")
    return value


def _number(param: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _bad(param, f"{param} must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise _bad(param, f"{param} must be a number, got {json.dumps(value)[:60]}")
    return float(value)


def _check_text(param: str, text: Any) -> str:
    from magi.request import RequestError, check_text

    try:
        return check_text(text, param)
    except RequestError as err:
        raise _bad(param, str(err)) from None


def _prompts(fields: dict) -> list[str]:
    """'prompt' (one string) or 'prompts' (a list of strings: chunk i's prompt, the last repeating)."""
    prompt, prompts = fields.get("prompt"), fields.get("prompts")
    if prompt is not None and prompts is not None:
        raise _bad("prompts", "give either prompt or prompts, not both")
    if prompts is None:
        if prompt is None:
            raise _bad("prompt", "prompt is required (or prompts, a list of per-chunk prompts)")
        if isinstance(prompt, list):  # a form with the prompt field repeated
            prompts = prompt
        else:
            return [_check_text("prompt", prompt)]
    if not isinstance(prompts, list) or not prompts:
        raise _bad("prompts", "prompts must be a non-empty list of strings")
    return [_check_text("prompts", p) for p in prompts]


def _size(value: Any, limits: Limits) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*", value) if isinstance(value, str) else None
    if match is None:
        raise _bad("size", f"size must be 'WIDTHxHEIGHT' (e.g. '720x720'), got {json.dumps(value)[:60]}")
    w, h = int(match[1]), int(match[2])
    if w < 16 or h < 16 or w % 16 or h % 16:
        raise _bad("size", f"size {w}x{h}: width and height must be positive multiples of 16")
    if w * h > limits.max_pixels:
        raise _bad("size", f"size {w}x{h} is {w * h} pixels; this server allows at most {limits.max_pixels}")
    return w, h


def _frames(fields: dict, cfg: MagiConfig, limits: Limits, default: int | None) -> int:
    if fields.get("num_frames") is not None:
        frames, param = _int("num_frames", fields["num_frames"]), "num_frames"
    elif fields.get("seconds") is not None:
        seconds = _number("seconds", fields["seconds"])
        frames, param = round(seconds * cfg.runtime.fps), "seconds"
    elif default is not None:
        frames, param = default, "num_frames"
    else:
        raise _bad("num_frames", "num_frames (or seconds) is required")
    if not 1 <= frames <= limits.max_frames:
        raise _bad(param, f"{param}: the video must have 1..{limits.max_frames} frames on this server, "
                          f"got {frames} ({cfg.runtime.fps} fps)")  # fmt: skip
    return frames


def _seed(fields: dict, default: int) -> int:
    if fields.get("seed") is None:
        return default
    seed = _int("seed", fields["seed"])
    if not -(2**63) <= seed < 2**64:
        raise _bad("seed", f"seed {seed} does not fit in 64 bits")
    return seed


def _check_model(fields: dict) -> None:
    model = fields.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise _bad("model", "model must be a non-empty string (it is ignored: the server runs one model)")


def _request_config(cfg: MagiConfig, mode: str, frames: int, size: tuple[int, int], seed: int,
                    prompts: list[str], param_frames: str = "num_frames") -> MagiConfig:  # fmt: skip
    """The run's config (the config's own checks) and the budget check of the CLI."""
    from magi import budget

    runtime = dataclasses.replace(cfg.runtime, num_frames=frames, video_size_w=size[0], video_size_h=size[1], seed=seed)
    try:
        run_cfg = cfg.replace(runtime=runtime)
    except ConfigError as err:
        text = str(err)
        param = "seed" if "seed" in text else param_frames if "num_frames" in text else "size"
        raise _bad(param, text.split(": ", 1)[-1]) from None
    budget_mode = "v2v" if mode == "extend" else mode
    try:
        est = budget.check_request(run_cfg, budget_mode, frames, budget.prefix_frames_upper_bound(run_cfg, budget_mode))
    except ValueError as err:
        raise _bad("size" if "one chunk" in str(err) else param_frames, str(err)) from None
    if len(prompts) > est.generated_chunks:
        raise _bad("prompts", f"{len(prompts)} prompts but the video has only {est.generated_chunks} chunks "
                              f"(num_frames {frames}); drop some or raise num_frames")  # fmt: skip
    return run_cfg


def _check_upload(run_cfg: MagiConfig, kind: str, path: Path) -> None:
    """Decode the image, or the prefix video's first frames, as the CLI does before a run."""
    from magi import video_io

    rt = run_cfg.runtime
    size = (rt.video_size_w, rt.video_size_h)
    if kind == "i2v":
        video_io.load_image(path, size)
    else:
        head = video_io.load_video(path, rt.fps, size, max_frames=rt.temporal_downsample_factor)
        video_io.select_prefix_frames(head, rt.temporal_downsample_factor, temporal_factor=rt.temporal_downsample_factor)


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


async def _json_body(request: Request) -> dict:
    try:
        raw = await _counting(request, MAX_JSON_BYTES).body()
    except _TooLarge:
        raise ApiError(413, "request_too_large", f"the JSON body is over {MAX_JSON_BYTES} bytes") from None
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, RecursionError):
        raise _bad(None, "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise _bad(None, "the body must be a JSON object")
    return data


def _upload_suffix(filename: str | None, kind: str) -> str:
    suffix = Path(filename or "").suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else (".png" if kind == "i2v" else ".mp4")


async def _form_body(request: Request, limits: Limits, staging: Path) -> tuple[dict, tuple[str, Path] | None]:
    """Fields of a multipart form and its one upload, copied to ``staging`` with the size limit."""
    too_large = ApiError(413, "upload_too_large", f"the upload is over the limit of {limits.max_upload_bytes} bytes "
                                                  f"({limits.max_upload_bytes / 2**20:g} MB)", "image")  # fmt: skip
    try:
        form = await _counting(request, limits.max_upload_bytes + _FORM_SLACK).form(max_files=2, max_fields=100)
    except _TooLarge:
        raise too_large from None
    except StarletteHTTPException as err:  # a malformed multipart body
        raise _bad(None, f"cannot read the form: {err.detail}") from None
    fields: dict = {}
    upload = None
    try:
        for key, value in form.multi_items():
            if isinstance(value, str):
                fields[key] = [*fields[key], value] if isinstance(fields.get(key), list) else (
                    [fields[key], value] if key in fields else value)  # fmt: skip
                continue
            if key not in _UPLOAD_FIELDS:
                raise _bad(key, f"unexpected file field {key!r}; use image (i2v) or prefix_video (v2v)")
            if upload is not None:
                raise _bad(key, "give one file: image (i2v) or prefix_video (v2v)")
            kind = _UPLOAD_FIELDS[key]
            param = "image" if kind == "i2v" else "prefix_video"
            dest = staging / f"input{_upload_suffix(value.filename, kind)}"
            await _copy_limited(value, dest, limits.max_upload_bytes, too_large, param)
            upload = (param, dest)
    finally:
        await form.close()
    if isinstance(fields.get("prompts"), str):  # a JSON list in one form field
        try:
            fields["prompts"] = json.loads(fields["prompts"])
        except ValueError:
            raise _bad("prompts", "prompts must be a JSON list of strings in a form") from None
    return fields, upload


async def _copy_limited(upload: Any, dest: Path, limit: int, too_large: ApiError, param: str) -> None:
    total = 0
    with open(dest, "wb") as out:
        while chunk := await upload.read(1 << 20):
            total += len(chunk)
            if total > limit:
                too_large.param = param
                raise too_large
            out.write(chunk)
    if total == 0:
        raise ApiError(422, "invalid_file", f"{param}: the uploaded file is empty", param)


# ---- live routes ----------------------------------------------------------------------------
async def _follow_segments(store: JobStore, files: JobFiles, job_id: str,
                           start: int = 0) -> AsyncIterator[tuple[int, Path]]:  # fmt: skip
    """Yield (k, path) for each segment as it is written, until the job has ended and all are out."""
    k = start
    while True:
        ended = (store.get(job_id) or {"status": "failed"})["status"] in ENDED  # read before listing
        while files.segment(k).is_file():
            yield k, files.segment(k)
            k += 1
        if ended:
            return
        await asyncio.sleep(POLL_S)


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _parse_range(header: str, size: int) -> tuple[int, int] | None | str:
    """(first, last) of a single 'bytes=' range; None to send everything; "416" when unsatisfiable."""
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if match is None:  # several ranges or another unit: the whole file is a valid answer
        return None
    first, last = match[1], match[2]
    if not first and not last:
        return None
    if not first:  # the last N bytes
        n = int(last)
        return (max(0, size - n), size - 1) if n > 0 and size > 0 else "416"
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        return "416"
    return start, end


async def _file_range(path: Path, start: int, end: int) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start + 1
        while left > 0:
            data = f.read(min(left, 1 << 20))
            if not data:
                return
            left -= len(data)
            yield data


# ---- the app --------------------------------------------------------------------------------
def create_app(config_path: str | Path, data_dir: str | Path, *, api_key: str | None = None,
               max_frames: int = MAX_FRAMES, max_pixels: int = MAX_PIXELS, max_queued: int = MAX_QUEUED,
               max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:  # fmt: skip
    """The ``magi serve`` HTTP app over the store in ``{data_dir}/magi.db``.

    Args:
        config_path: the served config (official JSON format); read, never the model.
        data_dir: the store and the jobs' files (created if missing).
        api_key: when set, every route but ``/`` and ``/static/*`` needs ``Authorization: Bearer KEY``.
        max_frames, max_pixels: the largest video one request may ask for.
        max_queued: jobs waiting at most; more are refused with 429.
        max_upload_bytes: the largest i2v image / v2v prefix video upload (413 beyond).
    """
    import magi.pipeline  # noqa: F401  (budget checks use its frame arithmetic; import once, now)

    cfg = load_config(config_path)
    data = Path(data_dir)
    data.mkdir(parents=True, exist_ok=True)
    store = JobStore(data / "magi.db")
    limits = Limits(max_frames, max_pixels, max_queued, max_upload_bytes)
    model = Path(config_path).stem  # as the worker names it in worker.json
    fps = cfg.runtime.fps

    app = FastAPI(title="magi serve", version="0.1.0")
    app.state.store, app.state.data_dir, app.state.config = store, data, cfg
    _install_error_handlers(app)

    def obj(job: dict) -> dict:
        return job_object(job, store, data, model, fps)

    def get_job(job_id: str) -> dict:
        job = store.get(job_id)
        if job is None:
            raise ApiError(404, "not_found", f"no video with id {job_id!r}", "id")
        return job

    api = APIRouter(dependencies=[Depends(_auth(api_key))])

    @api.get("/health")
    async def health() -> dict:
        return {"status": "ok", "worker": _worker_status(data)}

    @api.post("/v1/videos")
    async def create(request: Request) -> dict:
        staging = data / "uploads" / secrets.token_hex(8)
        try:
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                staging.mkdir(parents=True)
                fields, upload = await _form_body(request, limits, staging)
            else:
                fields, upload = await _json_body(request), None
            params = await _video_params(fields, upload, cfg, limits)
            job = _queue(store, params, staging if upload else None, data, limits.max_queued)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return obj(job)

    @api.get("/v1/videos")
    async def list_videos(limit: int = 20, after: str | None = None) -> dict:
        if not 1 <= limit <= 100:
            raise _bad("limit", f"limit must be 1..100, got {limit}")
        if after is not None:
            get_job(after)
        jobs = store.list(limit + 1, after)
        return {"object": "list", "data": [obj(j) for j in jobs[:limit]], "has_more": len(jobs) > limit}

    @api.get("/v1/videos/{job_id}")
    async def retrieve(job_id: str) -> dict:
        return obj(get_job(job_id))

    @api.get("/v1/videos/{job_id}/content")
    async def content(job_id: str, request: Request) -> Response:
        job = get_job(job_id)
        path = JobFiles(data, job_id).video
        if not path.is_file():
            raise ApiError(409, "not_ready", f"video {job_id} has no mp4 yet (status {job['status']}); "
                                             "it is written when the job completes or is cancelled")  # fmt: skip
        return _ranged_file(path, request.headers.get("range"))

    @api.get("/v1/videos/{job_id}/stream")
    async def stream(job_id: str) -> StreamingResponse:
        get_job(job_id)
        files = JobFiles(data, job_id)

        async def body() -> AsyncIterator[bytes]:
            async for _, path in _follow_segments(store, files, job_id):
                yield await run_in_threadpool(path.read_bytes)

        return StreamingResponse(body(), media_type="video/mp4", headers={"Cache-Control": "no-store"})

    @api.get("/v1/videos/{job_id}/stream/{k}")
    async def segment(job_id: str, k: int) -> FileResponse:
        get_job(job_id)
        path = JobFiles(data, job_id).segment(k) if k >= 0 else None
        if path is None or not path.is_file():
            raise ApiError(404, "not_found", f"video {job_id} has no segment {k} (yet)", "k")
        return FileResponse(path, media_type="video/mp4")

    @api.get("/v1/videos/{job_id}/events")
    async def events(job_id: str) -> StreamingResponse:
        get_job(job_id)
        return StreamingResponse(_events(job_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})  # fmt: skip

    async def _events(job_id: str) -> AsyncIterator[bytes]:
        files, sent, shown = JobFiles(data, job_id), 0, None
        while True:
            job = store.get(job_id)
            if job is None:  # removed under us
                return
            while files.segment(sent).is_file():
                yield _sse("chunk", {"index": sent, "url": f"/v1/videos/{job_id}/stream/{sent}"})
                sent += 1
            current = obj(job)
            if current != shown:
                yield _sse("progress", current)
                shown = current
            if job["status"] in ENDED:
                yield _sse("done", current)
                return
            await asyncio.sleep(POLL_S)

    @api.post("/v1/videos/{job_id}/prompt")
    async def steer(job_id: str, request: Request) -> dict:
        job = get_job(job_id)
        body = await _json_body(request)
        if body.get("from_chunk") is None:
            raise _bad("from_chunk", "from_chunk is required (the first chunk the new prompt applies to)")
        from_chunk = _int("from_chunk", body["from_chunk"])
        total = job["chunks_total"]
        if from_chunk < 0 or (total is not None and from_chunk >= total):
            raise _bad("from_chunk", f"from_chunk must be 0..{'' if total is None else total - 1}, got {from_chunk}")
        prompt = _check_text("prompt", body.get("prompt"))
        if job["status"] not in ("queued", "in_progress"):
            raise ApiError(409, "job_ended", f"video {job_id} is {job['status']}; only a queued or running "
                                             "job can be steered")  # fmt: skip
        edit_id = store.add_edit(job_id, from_chunk, prompt)
        return {"id": job_id, "from_chunk": from_chunk, "prompt": prompt, "edit_id": edit_id}

    @api.post("/v1/videos/{job_id}/cancel")
    async def cancel(job_id: str) -> dict:
        job = get_job(job_id)
        if job["status"] in ENDED:
            raise ApiError(409, "job_ended", f"video {job_id} is already {job['status']}")
        return obj(store.request_cancel(job_id))

    @api.post("/v1/videos/{job_id}/extend")
    async def extend(job_id: str, request: Request) -> dict:
        parent = get_job(job_id)
        body = await _json_body(request)
        if parent["status"] != "completed":
            raise ApiError(409, "not_completed", f"video {job_id} is {parent['status']}; only a completed "
                                                 "video can be extended")  # fmt: skip
        if not JobFiles(data, job_id).state.is_file():
            raise ApiError(409, "no_state", f"video {job_id} has no saved generation state to continue from")
        params = _extend_params(body, parent, cfg, limits)
        try:
            job = store.create(params, max_queued=limits.max_queued, parent_id=job_id)
        except QueueFull as err:
            raise ApiError(429, "queue_full", str(err)) from None
        return obj(job)

    app.include_router(api)

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        index = STATIC_DIR / "index.html"
        if index.is_file():
            return FileResponse(index, media_type="text/html")
        return HTMLResponse("<!doctype html><title>magi serve</title><p>magi serve is running; the page "
                            "files (magi/serve/static/) are not installed. The API is at /v1/videos.</p>")  # fmt: skip

    if STATIC_DIR.is_dir():  # the page's files; without them /static/* is a plain 404
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _auth(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    expected = api_key.encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise ApiError(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer KEY'")

    return check


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return _error_response(err.status, err.code, err.message, err.param, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        param = str(first.get("loc", ["", None])[-1]) if first.get("loc") else None
        return _error_response(400, "invalid_request", f"{param}: {first.get('msg', 'invalid value')}", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return _error_response(err.status_code, code, str(err.detail))


def _worker_status(data: Path) -> dict:
    try:
        status = json.loads((data / "worker.json").read_text())
    except (OSError, ValueError):
        return {"status": "starting"}
    return status if isinstance(status, dict) else {"status": "starting"}


async def _video_params(fields: dict, upload: tuple[str, Path] | None, cfg: MagiConfig, limits: Limits) -> dict:
    """Validate a POST /v1/videos request into the job's params (uploads decoded in a thread)."""
    _check_model(fields)
    mode = fields.get("mode")
    implied = {"image": "i2v", "prefix_video": "v2v"}.get(upload[0]) if upload else "t2v"
    if mode is None:
        mode = implied
    if mode not in ("t2v", "i2v", "v2v"):
        raise _bad("mode", f"mode must be t2v, i2v or v2v, got {json.dumps(mode)[:60]}")
    need = {"i2v": "image", "v2v": "prefix_video"}.get(mode)
    if need is not None and (upload is None or upload[0] != need):
        raise _bad(need, f"mode {mode} needs {'an' if need[0] in 'aeiou' else 'a'} {need} file (multipart/form-data upload)")
    if need is None and upload is not None:
        raise _bad(upload[0], f"{upload[0]} is only used with mode {implied} (got mode {mode})")
    prompts = _prompts(fields)
    rt = cfg.runtime
    size = _size(fields["size"], limits) if fields.get("size") is not None else (rt.video_size_w, rt.video_size_h)
    if fields.get("size") is None and size[0] * size[1] > limits.max_pixels:
        raise _bad("size", f"the config's size {size[0]}x{size[1]} is over this server's {limits.max_pixels} "
                           "pixels; give a smaller size")  # fmt: skip
    frames = _frames(fields, cfg, limits, rt.num_frames)
    seed = _seed(fields, rt.seed)
    param_frames = "seconds" if fields.get("num_frames") is None and fields.get("seconds") is not None else "num_frames"
    run_cfg = _request_config(cfg, mode, frames, size, seed, prompts, param_frames)
    if upload is not None:
        try:
            await run_in_threadpool(_check_upload, run_cfg, mode, upload[1])
        except (ValueError, OSError) as err:
            text = str(err).replace(str(upload[1].parent) + os.sep, "")  # the staging folder is no one's business
            raise ApiError(422, "invalid_file", f"{upload[0]}: {text}", upload[0]) from None
    return {"mode": mode, "prompts": prompts, "seed": seed, "num_frames": frames, "size": list(size),
            "image": upload[1].name if upload and mode == "i2v" else None,
            "prefix_video": upload[1].name if upload and mode == "v2v" else None}  # fmt: skip


def _extend_params(body: dict, parent: dict, cfg: MagiConfig, limits: Limits) -> dict:
    prompts = _prompts(body)
    frames = _frames(body, cfg, limits, None)
    seed = _seed(body, parent["params"]["seed"])
    size = tuple(parent["params"]["size"])
    param_frames = "seconds" if body.get("num_frames") is None else "num_frames"
    _request_config(cfg, "extend", frames, size, seed, prompts, param_frames)
    return {"mode": "extend", "prompts": prompts, "seed": seed, "num_frames": frames, "size": list(size),
            "image": None, "prefix_video": None}  # fmt: skip


def _queue(store: JobStore, params: dict, staging: Path | None, data: Path, max_queued: int) -> dict:
    """Create the job; its upload (validated in ``staging``) is in the job's folder first, so the
    worker never takes the job without its input."""
    job_id = new_id()
    files = JobFiles(data, job_id)
    if staging is not None:
        files.dir.mkdir(parents=True, exist_ok=True)
        for path in staging.iterdir():
            os.replace(path, files.dir / path.name)
    try:
        return store.create(params, max_queued=max_queued, job_id=job_id)
    except QueueFull as err:
        shutil.rmtree(files.dir, ignore_errors=True)
        raise ApiError(429, "queue_full", str(err)) from None


def _ranged_file(path: Path, range_header: str | None) -> Response:
    size = path.stat().st_size
    headers = {"Accept-Ranges": "bytes"}
    span = _parse_range(range_header, size) if range_header else None
    if span == "416":
        return _error_response(416, "range_not_satisfiable", f"the range {range_header!r} is outside the "
                               f"{size}-byte video", "Range", {"Content-Range": f"bytes */{size}"})  # fmt: skip
    if span is None:
        return FileResponse(path, media_type="video/mp4", headers=headers)
    start, end = span
    headers |= {"Content-Range": f"bytes {start}-{end}/{size}", "Content-Length": str(end - start + 1)}
    return StreamingResponse(_file_range(path, start, end), status_code=206, media_type="video/mp4", headers=headers)
