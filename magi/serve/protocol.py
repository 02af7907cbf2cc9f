"""The shapes of the ``magi serve`` API: request bodies, the video object, errors, the limits.

Request bodies are pydantic models whose validators call ``magi.request`` (the rules the CLI and
the library use), resolved against the served config: ``parse(VideoCreate, fields, served)``
returns the typed request or raises ``ApiError`` (400, the field in ``param``). Unknown fields
are refused (``extra="forbid"``), never ignored. Form fields arrive as text, so whole numbers and
numbers may be given as strings here. ``/openapi.json`` documents the same models
(``request_schema``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any, TypeVar

from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from magi import budget
from magi.config import ConfigError, MagiConfig
from magi.request import (
    MODES,
    RequestError,
    check_frames,
    check_from_chunk,
    check_mode,
    check_prompts_fit,
    check_seed,
    check_text,
    parse_size,
    prompt_list,
)
from magi.serve.store import Job

MAX_FRAMES = 1440  # 60 s at 24 fps
MAX_PIXELS = 1280 * 720
MAX_QUEUED = 32
MAX_UPLOAD_BYTES = 100 * 2**20
MAX_JSON_BYTES = 1 * 2**20  # a JSON body (prompts) above this is refused with 413
MAX_CHUNK_INDEX = 2**31 - 1  # from_chunk above this is out of range whatever the video
UPLOAD_PARAMS = {"image": "i2v", "prefix_video": "v2v"}  # the upload's field -> the mode it implies


# ---- errors ---------------------------------------------------------------------------------
class ApiError(Exception):
    """A request error: HTTP status, a code, one line and the field it is about."""

    def __init__(
        self, status: int, code: str, message: str, param: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = headers


def bad(param: str | None, message: str) -> ApiError:
    """A 400 ``invalid_request`` about ``param``."""
    return ApiError(400, "invalid_request", message, param)


class ErrorInfo(BaseModel):
    message: str
    type: str  # OpenAI's error class: invalid_request_error, authentication_error, ...
    param: str | None = None
    code: str


class ErrorBody(BaseModel):
    """Every error's JSON, OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorInfo


def error_type(status: int) -> str:
    """OpenAI's ``error.type`` for an HTTP status."""
    if status >= 500:
        return "server_error"
    return {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error"
    )


def error_response(
    status: int, code: str, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    line = " ".join(str(message).split())  # one line, always
    body = ErrorBody(error=ErrorInfo(message=line, type=error_type(status), param=param, code=code))
    return JSONResponse(body.model_dump(), status, headers=headers)


# ---- what validation is checked against -----------------------------------------------------
class Limits(BaseModel):
    """The largest request this server takes (``python -m magi.serve`` flags)."""

    model_config = ConfigDict(frozen=True)

    max_frames: int = MAX_FRAMES
    max_pixels: int = MAX_PIXELS
    max_queued: int = MAX_QUEUED
    max_upload_bytes: int = MAX_UPLOAD_BYTES


@dataclasses.dataclass(frozen=True)
class Served:
    """The served config and the limits: the context every request body is validated in."""

    config: MagiConfig
    limits: Limits


M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], fields: dict, served: Served, **context: Any) -> M:
    """``model`` validated from ``fields``; the first problem as an ``ApiError`` (400)."""
    try:
        return model.model_validate(fields, context={"served": served, **context})
    except ValidationError as err:
        first = err.errors()[0]
        cause = (first.get("ctx") or {}).get("error")
        loc = first.get("loc") or ()
        param = str(loc[-1]) if loc else None
        if isinstance(cause, RequestError):
            raise bad(cause.param or param, str(cause)) from None
        if first.get("type") == "extra_forbidden":
            known = ", ".join(n for n in model.model_fields)
            raise bad(param, f"unknown field {param!r}; the fields are: {known}") from None
        raise bad(param, f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "")) from None


def _served(info: ValidationInfo) -> Served:
    return info.context["served"]


# ---- text fields to values ------------------------------------------------------------------
def http_int(name: str, value: object) -> int:
    """A whole number from JSON or from a form's text ("48"; a whole float such as 48.0 too)."""
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise RequestError(f"{name} must be a whole number, got {value[:60]!r}", name) from None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(f"{name} must be a whole number, got {str(value)[:60]} ({type(value).__name__})", name)
    return value


def _http_number(name: str, value: object) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise RequestError(f"{name} must be a number, got {value[:60]!r}", name) from None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise RequestError(f"{name} must be a number, got {str(value)[:60]} ({type(value).__name__})", name)
    return float(value)


# ---- request bodies -------------------------------------------------------------------------
class _Video(BaseModel):
    """The fields POST /v1/videos and POST /v1/videos/{id}/extend share: prompts, length, seed."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | list[str] | None = None  # a form repeats the field for several prompts
    prompts: list[str] | None = None
    num_frames: int | None = None
    seconds: float | None = None
    seed: int | None = None
    _frames_param: str = PrivateAttr("num_frames")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: object) -> object:
        if isinstance(value, list):  # a form with the prompt field repeated: per-chunk prompts
            return prompt_list(value, "prompts")
        return None if value is None else check_text(value, "prompt")

    @field_validator("prompts", mode="before")
    @classmethod
    def _prompts(cls, value: object) -> object:
        if value is None:
            return None
        if not isinstance(value, list) or not value:
            raise RequestError("prompts must be a non-empty list of strings", "prompts")
        return prompt_list(value, "prompts")

    @field_validator("num_frames", mode="before")
    @classmethod
    def _num_frames(cls, value: object) -> object:
        return None if value is None else http_int("num_frames", value)

    @field_validator("seconds", mode="before")
    @classmethod
    def _seconds(cls, value: object) -> object:
        return None if value is None else _http_number("seconds", value)

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, value: object) -> object:
        return None if value is None else check_seed(http_int("seed", value))

    @property
    def chunk_prompts(self) -> list[str]:
        """Chunk i's prompt is entry i, the last repeating."""
        assert self.prompts is not None  # resolved by the model validator
        return self.prompts

    def _resolve_prompts(self) -> None:
        if self.prompt is not None and self.prompts is not None:
            raise RequestError("give either prompt or prompts, not both", "prompts")
        if self.prompts is None:
            if self.prompt is None:
                raise RequestError("prompt is required (or prompts, a list of per-chunk prompts)", "prompt")
            self.prompts = self.prompt if isinstance(self.prompt, list) else [self.prompt]

    def _resolve_frames(self, served: Served, default: int | None) -> None:
        """num_frames, else seconds at the config's fps, else ``default``; within the server's limit."""
        if self.num_frames is None and self.seconds is not None:
            self.num_frames, self._frames_param = round(self.seconds * served.config.runtime.fps), "seconds"
        elif self.num_frames is None:
            if default is None:
                raise RequestError("num_frames (or seconds) is required", "num_frames")
            self.num_frames = default
        self.num_frames = check_frames(self.num_frames, self._frames_param, most=served.limits.max_frames)

    def _check_run(self, served: Served, mode: str, size: tuple[int, int]) -> None:
        """The config's own checks on the run, the budget check of the CLI, prompts vs chunks."""
        cfg, frames = served.config, self.num_frames
        runtime = dataclasses.replace(
            cfg.runtime, num_frames=frames, video_size_w=size[0], video_size_h=size[1], seed=self.seed
        )
        try:
            run_cfg = cfg.replace(runtime=runtime)
        except ConfigError as err:
            text = str(err)
            param = "seed" if "seed" in text else self._frames_param if "num_frames" in text else "size"
            raise RequestError(text.split(": ", 1)[-1], param) from None
        budget_mode = "v2v" if mode == "extend" else mode
        bound = budget.prefix_frames_upper_bound(run_cfg, budget_mode, "magi")
        try:
            est = budget.check_request(run_cfg, budget_mode, frames, bound, compat="magi")
        except ValueError as err:
            raise RequestError(str(err), "size" if "one chunk" in str(err) else self._frames_param) from None
        check_prompts_fit(len(self.chunk_prompts), est.generated_chunks, frames)

    def params(self, mode: str, size: tuple[int, int], upload: str | None = None) -> dict[str, Any]:
        """The job's params as the store keeps them (and the worker reads them)."""
        return {
            "mode": mode,
            "prompts": self.chunk_prompts,
            "seed": self.seed,
            "num_frames": self.num_frames,
            "size": list(size),
            "image": upload if mode == "i2v" else None,
            "prefix_video": upload if mode == "v2v" else None,
        }


class VideoCreate(_Video):
    """POST /v1/videos (JSON or form fields); context: ``upload``, the uploaded file's field or None.

    Unset values come from the served config (size, num_frames, seed); mode from the upload.
    """

    model: str | None = None  # accepted and ignored: the server runs one model
    mode: str | None = None
    size: (
        Annotated[
            tuple[int, int],
            WithJsonSchema(
                {"type": "string", "pattern": "^[0-9]+x[0-9]+$", "description": "WIDTHxHEIGHT, e.g. 256x256"}
            ),
        ]
        | None
    ) = None

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, value: object) -> object:
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise RequestError("model must be a non-empty string (it is ignored: the server runs one model)", "model")
        return value

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, value: object) -> object:
        if value is not None and value not in MODES:
            check_mode(value)  # the one message for an unknown mode
        return value

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, value: object, info: ValidationInfo) -> object:
        return None if value is None else parse_size(value, _served(info).limits.max_pixels)

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> VideoCreate:
        served, upload = _served(info), info.context.get("upload")
        rt = served.config.runtime
        mode = self.mode if self.mode is not None else UPLOAD_PARAMS.get(upload, "t2v")
        self.mode = check_mode(
            mode,
            upload if upload == "image" else None,
            upload if upload == "prefix_video" else None,
            image_name="image",
            prefix_name="prefix_video",
        )
        self._resolve_prompts()
        if self.size is None:
            self.size = (rt.video_size_w, rt.video_size_h)
            if self.size[0] * self.size[1] > served.limits.max_pixels:
                raise RequestError(
                    f"the config's size {self.size[0]}x{self.size[1]} is over this server's "
                    f"{served.limits.max_pixels} pixels; give a smaller size",
                    "size",
                )
        self._resolve_frames(served, rt.num_frames)
        self.seed = rt.seed if self.seed is None else self.seed
        self._check_run(served, self.mode, self.size)
        return self


class VideoExtend(_Video):
    """POST /v1/videos/{id}/extend (and /remix); context: ``parent``, the completed job (its size;
    its seed by default), ``default_frames`` (remix: the parent's length; extend: none, required)."""

    _size: tuple[int, int] = PrivateAttr((0, 0))

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> VideoExtend:
        served, parent = _served(info), info.context["parent"]
        self._size = (parent.params["size"][0], parent.params["size"][1])
        self._resolve_prompts()
        self._resolve_frames(served, info.context.get("default_frames"))
        self.seed = parent.params["seed"] if self.seed is None else self.seed
        self._check_run(served, "extend", self.size)
        return self

    @property
    def size(self) -> tuple[int, int]:
        """The parent's size (an extension continues the same frames)."""
        return self._size


class PromptEdit(BaseModel):
    """POST /v1/videos/{id}/prompt; context: ``chunks``, the job's chunk count (None: not known yet)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"required": ["from_chunk", "prompt"]})

    from_chunk: int = Field(None, validate_default=True)  # missing: the validator's error, as for a bad one
    prompt: str = Field(None, validate_default=True)

    @field_validator("from_chunk", mode="before")
    @classmethod
    def _from_chunk(cls, value: object, info: ValidationInfo) -> object:
        if value is None:
            raise RequestError("from_chunk is required (the first chunk the new prompt applies to)", "from_chunk")
        chunk = http_int("from_chunk", value)
        if not 0 <= chunk <= MAX_CHUNK_INDEX:
            raise RequestError(
                f"from_chunk {chunk} is out of range; give a chunk index 0 .. the video's last", "from_chunk"
            )
        return check_from_chunk(chunk, info.context.get("chunks"))

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: object) -> object:
        return check_text(value, "prompt")


def planned_chunks(served: Served, params: dict) -> int | None:
    """The chunks a queued t2v / i2v job will generate (None for v2v and extend: the prefix decides)."""
    if params["mode"] not in ("t2v", "i2v"):
        return None
    cfg, (width, height) = served.config, params["size"]
    runtime = dataclasses.replace(
        cfg.runtime, num_frames=params["num_frames"], video_size_w=width, video_size_h=height, seed=params["seed"]
    )
    run_cfg = cfg.replace(runtime=runtime)
    bound = budget.prefix_frames_upper_bound(run_cfg, params["mode"], "magi")
    return budget.check_request(run_cfg, params["mode"], params["num_frames"], bound, compat="magi").generated_chunks


def request_schema(model: type[BaseModel], *, form: bool = False) -> dict:
    """The OpenAPI ``requestBody`` of a route that reads ``model`` (JSON; with ``form``, multipart too)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    content = {"application/json": {"schema": schema}}
    if form:
        upload = {"type": "string", "format": "binary"}
        props = {**schema["properties"], "input_reference": upload, "image": upload, "prefix_video": upload}
        content["multipart/form-data"] = {"schema": {**schema, "properties": props}}
    return {"requestBody": {"required": True, "content": content}}


# ---- the video object -----------------------------------------------------------------------
class Timings(BaseModel):
    queue_wait_s: float | None
    time_to_first_chunk_s: float | None
    seconds_per_chunk: float | None


class PromptSpan(BaseModel):
    """One prompt of the timeline: the chunks it covers (``to_chunk`` None: to the end, not known
    yet) and the steering edit that set it (None: the request's own prompts)."""

    prompt: str
    from_chunk: int
    to_chunk: int | None
    edit_id: int | None


def prompt_timeline(prompts: list[str], edits: list[Any], chunks: int | None) -> list[PromptSpan]:
    """The prompts over the chunks: entry i of ``prompts`` from chunk i (the last to the end), then
    each edit (``from_chunk``, ``prompt``, ``id``; oldest first) from its chunk on."""
    spans: list[tuple[int, str, int | None]] = [(i, text, None) for i, text in enumerate(prompts)]
    for edit in edits:
        spans = [span for span in spans if span[0] < edit.from_chunk] + [(edit.from_chunk, edit.prompt, edit.id)]
    if chunks is not None:
        spans = [span for span in spans if span[0] < chunks] or spans[:1]
    ends = [start - 1 for start, _, _ in spans[1:]] + [None if chunks is None else chunks - 1]
    return [
        PromptSpan(prompt=text, from_chunk=start, to_chunk=end, edit_id=eid)
        for (start, text, eid), end in zip(spans, ends, strict=True)
    ]


class JobError(BaseModel):
    code: str
    message: str


class Video(BaseModel):
    """A job as the API shows it: OpenAI's video object plus magi's progress fields."""

    id: str
    object: str = "video"
    model: str
    status: str
    mode: str
    prompt: str
    prompts: list[str]
    prompt_timeline: list[PromptSpan]
    seed: int
    num_frames: int
    size: str
    seconds: str
    created_at: int
    completed_at: int | None
    progress: int
    chunks_done: int
    chunks_total: int | None
    step: int
    steps_total: int | None
    frames_done: int
    segments: int
    queue_position: int | None
    parent_id: str | None
    remixed_from_video_id: str | None
    expires_at: int | None = None
    timings: Timings
    error: JobError | None

    @classmethod
    def of(
        cls,
        job: Job,
        *,
        model: str,
        fps: float,
        segments: int,
        queue_position: int | None,
        edits: list[Any] = (),
        chunks_total: int | None = None,
    ) -> Video:
        """``chunks_total``: the planned chunks while the job has not reported its own."""
        p = job.params
        done = job.finished_at is not None and job.ended
        total = job.chunks_total if job.chunks_total is not None else chunks_total
        return cls(
            id=job.id,
            model=model,
            status=job.status,
            mode=p["mode"],
            prompt=p["prompts"][0],
            prompts=p["prompts"],
            prompt_timeline=prompt_timeline(p["prompts"], list(edits), total),
            seed=p["seed"],
            num_frames=p["num_frames"],
            size=f"{p['size'][0]}x{p['size'][1]}",
            seconds=f"{p['num_frames'] / fps:g}",
            created_at=int(job.created_at),
            completed_at=int(job.finished_at) if done else None,
            progress=_progress(job),
            chunks_done=job.chunks_done,
            chunks_total=total,
            step=job.step,
            steps_total=job.steps_total,
            frames_done=job.frames_done,
            segments=segments,
            queue_position=queue_position,
            parent_id=job.parent_id,
            remixed_from_video_id=job.parent_id,
            timings=_timings(job),
            error=JobError(code="generation_failed", message=job.error) if job.error else None,
        )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _timings(job: Job) -> Timings:
    """Queue wait, start -> first chunk, and seconds per chunk (between chunk ends once two exist)."""
    created, started, first, last = job.created_at, job.started_at, job.first_chunk_at, job.last_chunk_at
    per_chunk = None
    if first is not None and last is not None and job.chunks_done >= 2:
        per_chunk = (last - first) / (job.chunks_done - 1)
    elif first is not None and started is not None and job.chunks_done == 1:
        per_chunk = first - started
    return Timings(
        queue_wait_s=_round(None if started is None else started - created),
        time_to_first_chunk_s=_round(None if first is None or started is None else first - started),
        seconds_per_chunk=_round(per_chunk),
    )


def _progress(job: Job) -> int:
    if job.status == "completed":
        return 100
    parts = [0.0]
    if job.chunks_total:
        parts.append(job.chunks_done / job.chunks_total)
    if job.steps_total:
        parts.append(job.step / job.steps_total)
    return max(0, min(100, int(max(parts) * 100)))
