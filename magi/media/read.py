"""Reading media for MAGI-1: probing, images, videos (resized, resampled to the runtime fps) and
the v2v prefix.

Everything goes through the ffmpeg binary shipped with imageio-ffmpeg, as the official code
does (shared/spec/sampling.md §8-§9). Frames are THWC uint8, as ffmpeg gives them.

``compat="official"`` restores official behaviour where magi deliberately differs:
* resize: official stretches to (w, h); magi keeps the aspect ratio (scale to cover, centre crop);
* v2v prefix: official uses the first 32 frames; magi continues from the end of the prefix.
Both use ffmpeg's default (bicubic) scaler.
"""

from __future__ import annotations

import collections
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch

from magi.budget import OFFICIAL_PREFIX_FRAMES, TEMPORAL_FACTOR
from magi.request import check_compat

MIN_SOURCE_SIDE = 8  # smaller sources are rejected: less than one VAE patch of real content
# start images above this are refused before decoding (a small png can decode to gigabytes);
# 8192x8192 (67 megapixels, 192 MB as RGB) is far above any generation size
MAX_IMAGE_PIXELS = 8192 * 8192
# pixel formats whose alpha channel must be composited (ffmpeg's rgb24 would just drop it)
_ALPHA_PREFIXES = ("rgba", "bgra", "argb", "abgr", "yuva", "gbrap", "ya", "pal8")

Size = tuple[int, int]  # (width, height), the order of runtime_config video_size_w / _h


@dataclass(frozen=True)
class MediaInfo:
    """What ffmpeg reports about a file's first video stream."""

    width: int
    height: int
    fps: float
    duration: float
    pix_fmt: str
    codec: str


# ----------------------------------------------------------------------------------- reading
def _check_input_file(path: str | Path, kind: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{kind} not found: {p}")
    if not p.is_file():
        raise ValueError(f"{kind} path is not a file: {p}")
    if not os.access(p, os.R_OK):
        raise ValueError(f"{kind} is not readable (permissions): {p}")
    if p.stat().st_size == 0:
        raise ValueError(f"{kind} is empty (0 bytes): {p}")
    check_not_text(p, kind)
    return p


# Text formats ffmpeg reads as pictures (XPM, SVG, ASCII netpbm): not refused as text.
_TEXT_PICTURES = (b"/* XPM */", b"<?xml", b"<svg", b"P1", b"P2", b"P3")


def is_text(head: bytes) -> bool:
    """The first bytes of a file look like plain text (UTF-8, no NUL or other control bytes)."""
    if not head or b"\0" in head or head.lstrip().startswith(_TEXT_PICTURES):
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:  # a multi-byte character cut at the end of the head is fine
        if err.start < len(head) - 3:
            return False
        text = head[: err.start].decode("utf-8")
    return all(c.isprintable() or c in "\t\n\r\f\v\x1b" for c in text)  # ESC: ANSI colour codes


def check_not_text(path: str | Path, kind: str = "image") -> None:
    """Refuse a text file given as an image or a video, by its content (ffmpeg's "tty" demuxer
    would render it as ANSI art and magi would generate from that picture).

    Raises:
        ValueError: one line naming the file and what to give instead.
    """
    with open(path, "rb") as f:
        head = f.read(4096)
    if is_text(head):
        raise ValueError(
            f"{kind} {path} is a text file, not an image or a video; give a picture "
            "(jpeg, png, webp, ...) or a video (mp4, webm, ...)"
        )


def _refuse_ansi(meta: dict, path: Path, kind: str) -> None:
    if re.split(r"[\s,(]", meta.get("codec", "") or "")[0] == "ansi":  # the tty demuxer's ANSI-art decoder
        raise ValueError(f"{kind} {path} is a text file (ffmpeg reads it as ANSI art), not an image or a video")


def _quiet_ffmpeg_logger() -> logging.Logger:
    # imageio-ffmpeg warns whenever the output size differs from the source: intended here
    logger = logging.getLogger("imageio_ffmpeg")
    logger.setLevel(logging.ERROR)
    return logger


# what ffmpeg's log says when a file opens but holds no picture to decode
_NO_VIDEO_STREAM = ("Output file does not contain any stream", "matches no streams")


def probe(path: str | Path, kind: str = "media file") -> MediaInfo:
    """Size, frame rate, duration and pixel format of a file's first video stream.

    Args:
        path: image or video file.
        kind: word used in error messages ("image", "video", ...).
    """
    p = _check_input_file(path, kind)
    _quiet_ffmpeg_logger()
    gen = imageio_ffmpeg.read_frames(str(p))
    try:
        meta = next(gen)
    except _OPEN_ERRORS as err:
        raise _open_error(err, p, kind) from None
    finally:
        gen.close()
    _refuse_ansi(meta, p, kind)
    return _media_info(meta)


_OPEN_ERRORS = (OSError, RuntimeError, IndexError, StopIteration, AttributeError, ValueError)
_TOO_MANY_PIXELS = re.compile(r"Picture size (\d+)x(\d+) exceeds specified max pixel count")


def _open_error(err: BaseException, p: Path, kind: str) -> ValueError:
    """The one-line error for a file ffmpeg could not open (imageio appends ffmpeg's whole log)."""
    text = str(err)
    if any(sign in text for sign in _NO_VIDEO_STREAM):
        return ValueError(
            f"cannot use {kind} {p}: it has no decodable frames (no video "
            "stream, e.g. audio only, or an empty one); give an image or a video"
        )
    if big := _TOO_MANY_PIXELS.search(text):
        w, h = int(big.group(1)), int(big.group(2))
        return ValueError(
            f"cannot use {kind} {p}: image is {w}x{h} ({w * h / 1e6:.0f} "
            f"megapixels), above magi's limit of {MAX_IMAGE_PIXELS / 1e6:.0f} "
            "megapixels (MAX_IMAGE_PIXELS); downscale it"
        )
    reason = text.strip().splitlines()[-1] if text.strip() else type(err).__name__
    return ValueError(
        f"cannot decode {kind} {p}: not a readable image/video, or no decodable frames (ffmpeg: {reason[:200]})"
    )


def _media_info(meta: dict) -> MediaInfo:
    width, height = meta["source_size"]
    pix_fmt = meta.get("pix_fmt", "").split("(")[0].strip()
    return MediaInfo(
        width, height, float(meta.get("fps") or 0.0), float(meta.get("duration") or 0.0), pix_fmt, meta.get("codec", "")
    )


def _check_size(size: Size | None) -> None:
    if size is None:
        return
    if len(size) != 2 or any(int(s) != s or s <= 0 or s % 8 for s in size):
        raise ValueError(f"size must be (width, height), positive multiples of 8 (the VAE patch), got {size}")


def resize_filter(size: Size | None, compat: str = "magi") -> list[str]:
    """ffmpeg filters resizing to (w, h): official stretches, magi covers and centre-crops."""
    check_compat(compat)
    if size is None:
        return []
    w, h = size
    if compat == "official":
        return [f"scale={w}:{h}"]
    return [f"scale={w}:{h}:force_original_aspect_ratio=increase", f"crop={w}:{h}"]


def _iter_frames(path: Path, info: MediaInfo, filters: list[str], kind: str) -> Iterator[np.ndarray]:
    """Yield RGB uint8 frames [H, W, 3]; alpha sources are composited on white."""
    alpha = info.pix_fmt.startswith(_ALPHA_PREFIXES)
    params = ["-vf", ",".join(filters)] if filters else []
    gen = imageio_ffmpeg.read_frames(
        str(path), pix_fmt="rgba" if alpha else "rgb24", bits_per_pixel=32 if alpha else 24, output_params=params
    )
    try:
        w, h = next(gen)["size"]
        for buf in gen:
            frame = np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 4 if alpha else 3)
            yield _over_white(frame) if alpha else frame
    except (OSError, RuntimeError) as err:
        raise ValueError(
            f"cannot decode {kind} {path}: ffmpeg stopped with '{str(err).strip().splitlines()[-1][:200]}'"
        ) from None
    finally:
        gen.close()


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite an RGBA frame over a white background (rounded integer arithmetic)."""
    rgb, a = rgba[..., :3].astype(np.uint32), rgba[..., 3:].astype(np.uint32)
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def _checked_info(path: str | Path, kind: str) -> tuple[Path, MediaInfo]:
    info = probe(path, kind)
    _check_min_side(info, path, kind)
    return Path(path), info


def _check_min_side(info: MediaInfo, path: str | Path, kind: str) -> None:
    if min(info.width, info.height) < MIN_SOURCE_SIDE:
        raise ValueError(
            f"{kind} {path} is {info.width}x{info.height} px; at least {MIN_SOURCE_SIDE}x{MIN_SOURCE_SIDE} is needed"
        )


def _read_image(path: Path, filters: list[str]) -> np.ndarray:
    """The first frame as RGB [H, W, 3], in one ffmpeg run for images without alpha.

    ffmpeg's decoder refuses images above MAX_IMAGE_PIXELS before allocating them, and the size
    checks use the header of the same run. A source with alpha (seen in that header, before a
    frame is taken) is read again as RGBA: ffmpeg's rgb24 drops alpha, and its RGBA conversion
    of opaque sources is not bit-identical to rgb24 (official parity).
    """
    frame = _read_first_frame(path, filters, alpha=False)
    return _read_first_frame(path, filters, alpha=True) if frame is None else frame


def _read_first_frame(path: Path, filters: list[str], alpha: bool) -> np.ndarray | None:
    """None when reading rgb24 and the header shows an alpha channel."""
    _quiet_ffmpeg_logger()
    gen = imageio_ffmpeg.read_frames(
        str(path),
        pix_fmt="rgba" if alpha else "rgb24",
        bits_per_pixel=32 if alpha else 24,
        input_params=["-max_pixels", str(MAX_IMAGE_PIXELS)],
        output_params=["-vf", ",".join(filters)] if filters else [],
    )
    try:
        try:
            meta = next(gen)
        except _OPEN_ERRORS as err:
            raise _open_error(err, path, "image") from None
        _refuse_ansi(meta, path, "image")
        info = _media_info(meta)
        _check_min_side(info, path, "image")
        if not alpha and info.pix_fmt.startswith(_ALPHA_PREFIXES):
            return None
        (w, h), buf = meta["size"], next(gen, None)
    except (OSError, RuntimeError) as err:
        raise _open_error(err, path, "image") from None
    finally:
        gen.close()
    if buf is None:
        raise ValueError(f"image {path} decoded to zero frames")
    frame = np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 4 if alpha else 3)
    return _over_white(frame) if alpha else frame


def load_image(path: str | Path, size: Size | None = None, *, compat: str = "magi") -> torch.Tensor:
    """Read an image as RGB uint8 [H, W, 3], optionally resized to ``size``.

    Grayscale, palette and 16-bit images are converted to 8-bit RGB; transparent images are
    composited over white. Images above MAX_IMAGE_PIXELS are refused before being decoded.

    Args:
        path: any still-image format ffmpeg reads (jpeg, png, webp, bmp, ...).
        size: (width, height) to resize to, or None to keep the native size.
        compat: "magi" keeps the aspect ratio (cover + centre crop); "official" stretches.
    """
    _check_size(size)
    p = _check_input_file(path, "image")
    return torch.from_numpy(_read_image(p, resize_filter(size, compat)).copy())


def load_video(
    path: str | Path,
    fps: float,
    size: Size | None = None,
    *,
    compat: str = "magi",
    max_frames: int | None = None,
    keep: str = "first",
) -> torch.Tensor:
    """Read a video as RGB uint8 [F, H, W, 3], resampled to ``fps`` (ffmpeg's fps filter).

    Args:
        path: any video ffmpeg reads.
        fps: target frame rate (the runtime fps); frames are dropped / repeated as ffmpeg does.
        size: (width, height) to resize to, or None to keep the native size.
        compat: "magi" keeps the aspect ratio (cover + centre crop); "official" stretches.
        max_frames: keep at most this many frames (None: all).
        keep: with max_frames, keep the "first" or the "last" frames (memory stays bounded).
    """
    _check_size(size)
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if keep not in ("first", "last"):
        raise ValueError(f"keep must be 'first' or 'last', got {keep!r}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    p, info = _checked_info(path, "video")
    frames: collections.deque[np.ndarray] = collections.deque(maxlen=max_frames if keep == "last" else None)
    for frame in _iter_frames(p, info, [f"fps={fps}", *resize_filter(size, compat)], "video"):
        frames.append(frame)
        if keep == "first" and max_frames is not None and len(frames) == max_frames:
            break
    if not frames:
        raise ValueError(f"video {p} contains no decodable frames")
    return torch.from_numpy(np.stack(frames))


# ------------------------------------------------------------------------------ v2v prefix
def select_prefix_frames(
    frames: torch.Tensor, visible_frames: int, *, compat: str = "magi", temporal_factor: int = TEMPORAL_FACTOR
) -> torch.Tensor:
    """Pick the v2v prefix from frames [F, H, W, 3].

    magi: the LAST frames, at most ``visible_frames`` (older ones cannot be seen by the model),
    a multiple of the VAE temporal factor. official: the FIRST 32 frames (its bug).

    Args:
        frames: the whole prefix video at the runtime fps.
        visible_frames: see ``visible_prefix_frames``.
        compat: "magi" or "official".
    """
    check_compat(compat)
    if compat == "official":
        return frames[:OFFICIAL_PREFIX_FRAMES]
    count = min(len(frames), visible_frames) // temporal_factor * temporal_factor
    if count == 0:
        raise ValueError(
            f"v2v prefix has {len(frames)} frame(s) at the runtime fps; at least {temporal_factor} are needed"
        )
    return frames[len(frames) - count :]


def load_prefix_video(
    path: str | Path, fps: float, size: Size, visible_frames: int, *, compat: str = "magi"
) -> torch.Tensor:
    """Read the v2v prefix [F, H, W, 3] uint8: official first 32 frames, or magi's tail."""
    check_compat(compat)
    if compat == "official":
        frames = load_video(path, fps, size, compat=compat, max_frames=OFFICIAL_PREFIX_FRAMES)
    else:
        frames = load_video(path, fps, size, compat=compat, max_frames=visible_frames, keep="last")
    return select_prefix_frames(frames, visible_frames, compat=compat)
