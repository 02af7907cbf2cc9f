"""Files in and out of the HTTP side: uploads (staged, size-limited, decoded once), byte ranges of a
finished video, the segments of a job followed as the worker writes them (one CMAF stream: an
init and continuous fragments; a live HLS playlist over them), and thumbnails.

Live routes follow the store and the files by polling (``POLL_S``), so they survive a worker
restart and see a resumed job's segments as any others.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import FileResponse, MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

from magi.config import MagiConfig
from magi.media.mp4 import fragment_frames, split_fmp4
from magi.serve.protocol import ApiError, error_response
from magi.serve.store import JobFiles, JobStore

POLL_S = 0.25  # live routes look at the store and the files this often
_BACKWARDS = re.compile(r"\s*bytes\s*=\s*(\d+)\s*-\s*(\d+)\s*")  # bytes=9-3: last before first


# ---- ranges ---------------------------------------------------------------------------------
class RangedFile(FileResponse):
    """Starlette's FileResponse (206 for one or several byte ranges, 400 for a Range header it
    cannot read) with the API's 416: a range outside the file, or one ending before it starts, is
    an error JSON with ``Content-Range: bytes */SIZE``."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        header = Headers(scope=scope).get("range")
        if header is not None and scope.get("method", "GET").upper() in ("GET", "HEAD"):
            size = os.stat(self.path).st_size
            try:
                self._parse_range_header(header, size)
            except RangeNotSatisfiable:
                return await self._unsatisfiable(header, size)(scope, receive, send)
            except MalformedRangeHeader:  # Starlette answers 400, except for a range that ends before it starts
                backwards = _BACKWARDS.fullmatch(header)
                if backwards is not None and int(backwards[2]) < int(backwards[1]):
                    return await self._unsatisfiable(header, size)(scope, receive, send)
        await super().__call__(scope, receive, send)

    @staticmethod
    def _unsatisfiable(header: str, size: int) -> Any:
        return error_response(
            416,
            "range_not_satisfiable",
            f"the range {header!r} is outside the {size}-byte video",
            "Range",
            {"Content-Range": f"bytes */{size}"},
        )


# ---- segments -------------------------------------------------------------------------------
async def follow_segments(
    store: JobStore, files: JobFiles, job_id: str, start: int = 0
) -> AsyncIterator[tuple[int, Path]]:
    """Yield (k, path) for each segment as it is written, until the job has ended and all are out."""
    k = start
    while True:
        job = store.get(job_id)
        ended = job is None or job.ended  # read before listing
        while files.segment(k).is_file():
            yield k, files.segment(k)
            k += 1
        if ended:
            return
        await asyncio.sleep(POLL_S)


def segment_pieces(path: Path) -> tuple[bytes, list[bytes]]:
    """A segment's init (ftyp + moov) and fragments (moof + mdat), as ``SegmentSink`` retimed them."""
    return split_fmp4(path.read_bytes())


def hls_playlist(files: JobFiles, fps: float, ended: bool) -> str:
    """A live HLS (fMP4) playlist over the segments written so far; ``#EXT-X-ENDLIST`` once ended."""
    lengths = [sum(fragment_frames(f) for f in segment_pieces(p)[1]) / fps for p in files.segments()]
    lines = [
        "#EXTM3U",
        "#EXT-X-VERSION:7",
        f"#EXT-X-TARGETDURATION:{math.ceil(max(lengths, default=1.0))}",
        "#EXT-X-MEDIA-SEQUENCE:0",
        "#EXT-X-PLAYLIST-TYPE:EVENT",
        "#EXT-X-INDEPENDENT-SEGMENTS",
    ]
    if lengths:
        lines.append('#EXT-X-MAP:URI="stream/init.mp4"')
    for k, seconds in enumerate(lengths):
        lines += [f"#EXTINF:{seconds:.6f},", f"stream/{k}.m4s"]
    if ended:
        lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"


# ---- uploads --------------------------------------------------------------------------------
def upload_suffix(filename: str | None, mode: str) -> str:
    """The upload's file extension (lower case) if it looks like one, else .png (i2v) / .mp4 (v2v)."""
    suffix = Path(filename or "").suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else (".png" if mode == "i2v" else ".mp4")


async def copy_limited(upload: Any, dest: Path, limit: int, too_large: ApiError, param: str) -> None:
    """Copy an uploaded file to ``dest``; ``too_large`` (about ``param``) past ``limit`` bytes."""
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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pnm")
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".gif", ".y4m", ".mpg", ".mpeg", ".ts")


def check_upload(cfg: MagiConfig, mode: str, size: tuple[int, int], path: Path, max_frames: int | None = None) -> None:
    """Check an upload as the CLI does before a run, cheapest first: its file type by name, then
    (v2v) its header's width x height and frame count against the limits (``max_frames``, the
    server's; MAX_IMAGE_PIXELS), before any frame is decoded; then decode the image, or the prefix
    video's first frames."""
    from magi.media import read

    rt = cfg.runtime
    allowed = IMAGE_SUFFIXES if mode == "i2v" else VIDEO_SUFFIXES
    if path.suffix.lower() not in allowed:
        raise ValueError(
            f"a {path.suffix or 'nameless'} file is not {'an image' if mode == 'i2v' else 'a video'}; "
            f"give one of {', '.join(allowed)}"
        )
    if mode != "i2v":
        info = read.probe(path, "video")
        if info.width * info.height > read.MAX_IMAGE_PIXELS:
            raise ValueError(
                f"the video is {info.width}x{info.height}, above magi's limit of "
                f"{read.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels per frame; downscale it"
            )
        frames = info.duration * info.fps
        if max_frames is not None and frames > max_frames:
            raise ValueError(
                f"the video has about {frames:.0f} frames ({info.duration:.1f} s), more than this "
                f"server's limit of {max_frames}; trim it"
            )
    from magi import video_io

    if mode == "i2v":
        video_io.load_image(path, size)
    else:
        head = video_io.load_video(path, rt.fps, size, max_frames=rt.temporal_downsample_factor)
        video_io.select_prefix_frames(
            head, rt.temporal_downsample_factor, temporal_factor=rt.temporal_downsample_factor
        )


def move_upload(staging: Path, files: JobFiles) -> None:
    """The validated upload into the job's folder (before the job exists: the worker never sees a
    job without its input)."""
    files.dir.mkdir(parents=True, exist_ok=True)
    for path in staging.iterdir():
        os.replace(path, files.dir / path.name)


# ---- thumbnails -----------------------------------------------------------------------------
def thumbnail(video: Path, out: Path) -> None:
    """The first frame of ``video`` as a PNG at ``out`` (written atomically)."""
    import imageio_ffmpeg

    temp = out.with_name(f".{out.name}.{os.getpid()}.tmp.png")
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-nostdin",
        "-v",
        "error",
        "-y",
        "-i",
        str(video),
        "-frames:v",
        "1",
        "-f",
        "image2",
        "-c:v",
        "png",
        str(temp),
    ]
    done = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    if done.returncode != 0 or not temp.is_file():
        temp.unlink(missing_ok=True)
        cause = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no frame"]
        raise ApiError(500, "thumbnail_failed", f"cannot read the video's first frame: {cause[0][:120]}")
    os.replace(temp, out)
