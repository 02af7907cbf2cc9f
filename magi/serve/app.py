"""The HTTP side of ``magi serve``: a FastAPI app over the job store; it never loads the model.

Requests are validated here (``magi.serve.protocol``: the CLI's rules from ``magi.request`` and
``magi.budget``) and queued in the SQLite store (``magi.serve.store``); the worker process
generates and writes the segment files. The routes are in ``magi.serve.routes``.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from magi.config import load_config
from magi.serve.guard import Guard
from magi.serve.protocol import (
    MAX_FRAMES,
    MAX_PIXELS,
    MAX_QUEUED,
    MAX_UPLOAD_BYTES,
    ApiError,
    Limits,
    Served,
    error_response,
)
from magi.serve.realtime import router as realtime_router
from magi.serve.routes import Service, router
from magi.serve.store_pg import open_store

STATIC_DIR = Path(__file__).resolve().parent / "static"
_NO_PAGE = (
    "<!doctype html><title>magi serve</title><p>magi serve is running; the page files "
    "(magi/serve/static/) are not installed. The API is at /v1/videos.</p>"
)


def create_app(
    config_path: str | Path,
    data_dir: str | Path,
    *,
    api_key: str | None = None,
    max_frames: int = MAX_FRAMES,
    max_pixels: int = MAX_PIXELS,
    max_queued: int = MAX_QUEUED,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    db: str | None = None,
    bound_host: str = "127.0.0.1",
    allowed_hosts: Sequence[str] = (),
) -> FastAPI:
    """The ``magi serve`` HTTP app over the store in ``{data_dir}/magi.db``.

    Args:
        config_path: the served config (official JSON format); read, never the model.
        data_dir: the store and the jobs' files (created if missing).
        api_key: when set, every route but ``/`` and ``/static/*`` needs ``Authorization: Bearer KEY``.
        max_frames, max_pixels: the largest video one request may ask for.
        max_queued: jobs waiting at most; more are refused with 429.
        max_upload_bytes: the largest i2v image / v2v prefix video upload (413 beyond).
        db: the job store, a ``postgresql://`` URL or a SQLite file (default ``{data_dir}/magi.db``).
        bound_host, allowed_hosts: the address served and further Host names to answer
            (``magi.serve.guard``: DNS rebinding and cross-site requests are refused).
    """
    cfg = load_config(config_path)
    data = Path(data_dir)
    data.mkdir(parents=True, exist_ok=True)
    store = open_store(db, data)
    limits = Limits(
        max_frames=max_frames, max_pixels=max_pixels, max_queued=max_queued, max_upload_bytes=max_upload_bytes
    )

    app = FastAPI(title="magi serve", version="0.1.0")
    app.state.store, app.state.data_dir, app.state.config = store, data, cfg
    app.state.service = Service(store, data, Served(cfg, limits), Path(config_path).stem, api_key)
    _install_error_handlers(app)
    app.add_middleware(Guard, bound=bound_host, allowed_hosts=allowed_hosts, api_key=api_key)
    app.include_router(router)
    app.include_router(realtime_router)  # WS /v1/realtime/video (checks the API key itself)
    app.add_middleware(HeadAsGet)

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        index = STATIC_DIR / "index.html"
        if index.is_file():
            return FileResponse(index, media_type="text/html")
        return HTMLResponse(_NO_PAGE)

    if STATIC_DIR.is_dir():  # the page's files; without them /static/* is a plain 404
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else err.headers
        return error_response(err.status, err.code, err.message, err.param, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        param = str(first.get("loc", ["", None])[-1]) if first.get("loc") else None
        return error_response(400, "invalid_request", f"{param}: {first.get('msg', 'invalid value')}", param)

    @app.exception_handler(Exception)  # anything unforeseen: still the JSON error shape, never text
    async def unexpected(_: Request, err: Exception) -> JSONResponse:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return error_response(
                507, "insufficient_storage", "the server's disk is full; free space in its --data_dir and retry"
            )
        return error_response(
            500,
            "internal_error",
            f"the server hit an unexpected error ({type(err).__name__}); the server's console has the details",
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return error_response(err.status_code, code, str(err.detail))


class HeadAsGet:
    """HEAD on any GET route answers as GET does (status, headers, Content-Length), without the body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async with anyio.create_task_group() as group:  # a stream (/events) is stopped once headers are out

            async def headers_only(message: Message) -> None:
                if message["type"] == "http.response.body":
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    group.cancel_scope.cancel()
                    return
                await send(message)

            await self.app({**scope, "method": "GET"}, receive, headers_only)
