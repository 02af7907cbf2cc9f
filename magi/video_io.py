"""Media in and out of MAGI-1: image / video reading with resizing, the VAE prefix and decode
helpers the pipeline uses, and a streaming mp4 writer.

Everything goes through the ffmpeg binary shipped with imageio-ffmpeg, as the official code
does (shared/spec/sampling.md §8-§9, vae.md §5-§6). Frame layouts: THWC uint8 for what is read
(frames as ffmpeg gives them), [F, 3, H, W] uint8 for decoded frames and what the writer takes.

``compat="official"`` restores official behaviour where magi deliberately differs:
* resize: official stretches to (w, h); magi keeps the aspect ratio (scale to cover, centre crop);
* v2v prefix: official uses the first 32 frames; magi continues from the end of the prefix;
* decoded frames: official converts to uint8 in bf16 and truncates; magi rounds in float32;
* VAE temporal tile: official fps // 2 frames; magi rounds it down to a multiple of 4.
Both use ffmpeg's default (bicubic) scaler.
"""

from __future__ import annotations

import collections
import glob
import logging
import os
import re
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import IO

import imageio_ffmpeg
import numpy as np
import torch
from einops import rearrange

from magi.models.vae import ViTVAE, tile_spec_for_fps, tiled_decode, tiled_encode

SCALE_FACTOR = 0.18215  # runtime_config.scale_factor of every released config
OFFICIAL_PREFIX_FRAMES = 32  # the official v2v reads exactly this many frames from the start
TEMPORAL_FACTOR = 4  # VAE temporal compression
MIN_SOURCE_SIDE = 8  # smaller sources are rejected: less than one VAE patch of real content
# start images above this are refused before decoding (a small png can decode to gigabytes);
# 8192x8192 (67 megapixels, 192 MB as RGB) is far above any generation size
MAX_IMAGE_PIXELS = 8192 * 8192
COMPAT_MODES = ("magi", "official")
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
def _check_compat(compat: str) -> None:
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")


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
    return p


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
    return _media_info(meta)


_OPEN_ERRORS = (OSError, RuntimeError, IndexError, StopIteration, AttributeError, ValueError)
_TOO_MANY_PIXELS = re.compile(r"Picture size (\d+)x(\d+) exceeds specified max pixel count")


def _open_error(err: BaseException, p: Path, kind: str) -> ValueError:
    """The one-line error for a file ffmpeg could not open (imageio appends ffmpeg's whole log)."""
    text = str(err)
    if any(sign in text for sign in _NO_VIDEO_STREAM):
        return ValueError(f"cannot use {kind} {p}: it has no decodable frames (no video "
                          "stream, e.g. audio only, or an empty one); give an image or a video")
    if big := _TOO_MANY_PIXELS.search(text):
        w, h = int(big.group(1)), int(big.group(2))
        return ValueError(f"cannot use {kind} {p}: image is {w}x{h} ({w * h / 1e6:.0f} "
                          f"megapixels), above magi's limit of {MAX_IMAGE_PIXELS / 1e6:.0f} "
                          "megapixels (MAX_IMAGE_PIXELS); downscale it")
    reason = text.strip().splitlines()[-1] if text.strip() else type(err).__name__
    return ValueError(f"cannot decode {kind} {p}: not a readable image/video, or no "
                      f"decodable frames (ffmpeg: {reason[:200]})")


def _media_info(meta: dict) -> MediaInfo:
    width, height = meta["source_size"]
    pix_fmt = meta.get("pix_fmt", "").split("(")[0].strip()
    return MediaInfo(width, height, float(meta.get("fps") or 0.0),
                     float(meta.get("duration") or 0.0), pix_fmt, meta.get("codec", ""))


def _check_size(size: Size | None) -> None:
    if size is None:
        return
    if len(size) != 2 or any(int(s) != s or s <= 0 or s % 8 for s in size):
        raise ValueError(f"size must be (width, height), positive multiples of 8 (the VAE "
                         f"patch), got {size}")


def resize_filter(size: Size | None, compat: str = "magi") -> list[str]:
    """ffmpeg filters resizing to (w, h): official stretches, magi covers and centre-crops."""
    _check_compat(compat)
    if size is None:
        return []
    w, h = size
    if compat == "official":
        return [f"scale={w}:{h}"]
    return [f"scale={w}:{h}:force_original_aspect_ratio=increase", f"crop={w}:{h}"]


def _iter_frames(path: Path, info: MediaInfo, filters: list[str],
                 kind: str) -> Iterator[np.ndarray]:
    """Yield RGB uint8 frames [H, W, 3]; alpha sources are composited on white."""
    alpha = info.pix_fmt.startswith(_ALPHA_PREFIXES)
    params = ["-vf", ",".join(filters)] if filters else []
    gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgba" if alpha else "rgb24",
                                     bits_per_pixel=32 if alpha else 24, output_params=params)
    try:
        w, h = next(gen)["size"]
        for buf in gen:
            frame = np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 4 if alpha else 3)
            yield _over_white(frame) if alpha else frame
    except (OSError, RuntimeError) as err:
        raise ValueError(f"cannot decode {kind} {path}: ffmpeg stopped with "
                         f"'{str(err).strip().splitlines()[-1][:200]}'") from None
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
        raise ValueError(f"{kind} {path} is {info.width}x{info.height} px; at least "
                         f"{MIN_SOURCE_SIDE}x{MIN_SOURCE_SIDE} is needed")


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
        str(path), pix_fmt="rgba" if alpha else "rgb24", bits_per_pixel=32 if alpha else 24,
        input_params=["-max_pixels", str(MAX_IMAGE_PIXELS)],
        output_params=["-vf", ",".join(filters)] if filters else [])
    try:
        try:
            meta = next(gen)
        except _OPEN_ERRORS as err:
            raise _open_error(err, path, "image") from None
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


def load_video(path: str | Path, fps: float, size: Size | None = None, *, compat: str = "magi",
               max_frames: int | None = None, keep: str = "first") -> torch.Tensor:
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
    frames: collections.deque[np.ndarray] = collections.deque(
        maxlen=max_frames if keep == "last" else None)
    for frame in _iter_frames(p, info, [f"fps={fps}", *resize_filter(size, compat)], "video"):
        frames.append(frame)
        if keep == "first" and max_frames is not None and len(frames) == max_frames:
            break
    if not frames:
        raise ValueError(f"video {p} contains no decodable frames")
    return torch.from_numpy(np.stack(frames))


# ------------------------------------------------------------------------------ v2v prefix
def visible_prefix_frames(noise2clean_kvrange: Sequence[int], chunk_width: int,
                          temporal_factor: int = TEMPORAL_FACTOR) -> int:
    """Pixel frames of history a new chunk can still attend to: (max(kv range) - 1) chunks."""
    return (max(noise2clean_kvrange) - 1) * chunk_width * temporal_factor


def select_prefix_frames(frames: torch.Tensor, visible_frames: int, *, compat: str = "magi",
                         temporal_factor: int = TEMPORAL_FACTOR) -> torch.Tensor:
    """Pick the v2v prefix from frames [F, H, W, 3].

    magi: the LAST frames, at most ``visible_frames`` (older ones cannot be seen by the model),
    a multiple of the VAE temporal factor. official: the FIRST 32 frames (its bug).

    Args:
        frames: the whole prefix video at the runtime fps.
        visible_frames: see ``visible_prefix_frames``.
        compat: "magi" or "official".
    """
    _check_compat(compat)
    if compat == "official":
        return frames[:OFFICIAL_PREFIX_FRAMES]
    count = min(len(frames), visible_frames) // temporal_factor * temporal_factor
    if count == 0:
        raise ValueError(f"v2v prefix has {len(frames)} frame(s) at the runtime fps; at least "
                         f"{temporal_factor} are needed")
    return frames[len(frames) - count:]


def load_prefix_video(path: str | Path, fps: float, size: Size, visible_frames: int, *,
                      compat: str = "magi") -> torch.Tensor:
    """Read the v2v prefix [F, H, W, 3] uint8: official first 32 frames, or magi's tail."""
    _check_compat(compat)
    if compat == "official":
        frames = load_video(path, fps, size, compat=compat, max_frames=OFFICIAL_PREFIX_FRAMES)
    else:
        frames = load_video(path, fps, size, compat=compat, max_frames=visible_frames, keep="last")
    return select_prefix_frames(frames, visible_frames, compat=compat)


# -------------------------------------------------------------------------------- VAE helpers
def encode_prefix(vae: ViTVAE, frames: torch.Tensor, *, fps: int = 24,
                  scale_factor: float = SCALE_FACTOR, compat: str = "magi") -> torch.Tensor:
    """uint8 frames [T, H, W, 3] (or one image [H, W, 3]) -> prefix latent [1, z, T', H/8, W/8].

    Posterior mean x scale_factor, tiled as the official ``encode_prefix_video`` (256 px tiles,
    fps // 2-frame temporal tiles); a single image is encoded as one repeated frame (T' = 1).
    The result is in the VAE's dtype (bf16 in the pipeline) on its device.

    Args:
        vae: loaded VAE.
        frames: RGB uint8, H and W multiples of 8; T = 1 or T >= 4.
        fps: runtime fps (sets the temporal tile length).
        scale_factor: runtime_config.scale_factor.
        compat: "magi" or "official" (temporal tile length at fps where fps // 2 % 4 != 0).
    """
    if frames.dtype != torch.uint8 or frames.ndim not in (3, 4) or frames.shape[-1] != 3:
        raise ValueError(f"encode_prefix expects uint8 frames [T, H, W, 3] or [H, W, 3], got "
                         f"{frames.dtype} {tuple(frames.shape)}")
    if frames.ndim == 3:
        frames = frames[None]
    x = rearrange(frames.to(vae.device), "t h w c -> 1 c t h w")
    x = (x.float() / 127.5 - 1).to(vae.dtype)
    return tiled_encode(vae, x, tile_spec_for_fps(fps, compat)) * scale_factor


def decode_to_uint8(vae: ViTVAE, latent: torch.Tensor, *, fps: int = 24,
                    scale_factor: float = SCALE_FACTOR, compat: str = "magi") -> torch.Tensor:
    """Scaled latent [1, z, T', H', W'] -> uint8 frames [F, 3, 8H', 8W'] on the CPU.

    Divides by scale_factor, tiled decode under the (emulated) bf16 autocast. A trailing lone
    latent frame of a temporal tile gives one frame (official: 3q+1 latents -> 12q+1 frames).

    Args:
        vae: loaded VAE.
        latent: the DiT-space latent (float32 or bf16).
        fps: runtime fps (sets the temporal tile length).
        scale_factor: runtime_config.scale_factor.
        compat: "official" converts in bf16 (v * 127.5 + 127.5, clamp, truncate) as the
            official code; "magi" rounds to the nearest level in float32.
    """
    _check_compat(compat)
    if latent.ndim != 5 or latent.shape[0] != 1:
        raise ValueError(f"decode_to_uint8 expects a latent [1, C, T, H, W], got "
                         f"{tuple(latent.shape)}")
    z = latent.to(vae.device).float() / scale_factor
    video = tiled_decode(vae, z, tile_spec_for_fps(fps, compat), autocast=True)
    if compat == "official":
        frames = (video * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)
    else:
        frames = ((video.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return rearrange(frames, "b c t h w -> (b t) c h w").cpu()


# ------------------------------------------------------------------------------------ writer
class Mp4Writer:
    """Streaming mp4 writer (libx264, yuv420p, ffmpeg's default quality), as the official output.

    Frames go to a hidden temporary file in the output folder, renamed onto the output path by
    ``close()``; ``abort()`` removes it, so the output path never holds a half-written video.
    ``close()`` after an interruption finalises a playable mp4 of what was appended. ``close()``
    renames only after ffmpeg exited 0 and the file reads back with every appended frame; else
    (disk full, ffmpeg killed, ...) it removes the temp file and raises a one-line RuntimeError.

    The temp file is ``.{stem}.magi-partial-{pid}-{8 hex}.mp4`` (the stem cut to keep the name
    within NAME_MAX), {pid} being the writing process. A process killed with ``kill -9`` cannot
    clean up and leaves this file; the next Mp4Writer for the same output deletes such files
    whose pid no longer runs (the check sees only this machine's processes).

    As a context manager: success closes; an exception aborts, or closes when ``keep_partial``
    and frames were appended.

    Args:
        path: output file, must end in .mp4, its folder must exist. Overwritten on success.
        fps: frame rate of the output (the runtime fps).
        keep_partial: on an exception inside ``with``, keep what was appended.
        fragmented: write a fragmented mp4 (an init segment, then a fragment per keyframe),
            which MediaSource plays as it arrives; same frames.
    """

    def __init__(self, path: str | Path, fps: float, *, keep_partial: bool = False,
                 fragmented: bool = False) -> None:  # fmt: skip
        self.path = Path(path)
        if self.path.suffix.lower() != ".mp4":
            raise ValueError(f"output path must end in .mp4, got {self.path}")
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise ValueError(f"output folder {self.path.parent} is a file, not a folder; "
                             "choose another output path")
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"output folder does not exist: {self.path.parent} "
                                    "(create it first)")
        if self.path.is_dir():
            raise ValueError(f"output path is a folder: {self.path}")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps = fps
        self.keep_partial = keep_partial
        self.fragmented = fragmented
        self.frames_written = 0
        self.size: Size | None = None
        self.tmp_path = self.path.parent / _temp_name(self.path)
        self._proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None  # ffmpeg's stderr: a file, never a pipe that fills up
        self._done = True  # nothing to clean up until the folder is known to be writable
        _check_writable(self.tmp_path)
        _remove_stale_temps(self.path)
        self._done = False

    def _start(self, width: int, height: int) -> None:
        if width % 2 or height % 2:
            raise ValueError(f"yuv420p needs even frame sizes, got {width}x{height}")
        self.size = (width, height)
        # the command imageio-ffmpeg's write_frames builds, run here so the exit status is seen
        fps = Fraction(self.fps).limit_denominator()
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo",
               "-s", f"{width}x{height}", "-pix_fmt", "rgb24", "-r", str(fps), "-i", "-", "-an",
               "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-v", "error", "-f", "mp4",
               str(self.tmp_path)]
        if self.fragmented:
            cmd[-3:-3] = ["-movflags", "+frag_keyframe+empty_moov+default_base_moof"]
        self._log = tempfile.TemporaryFile()
        # own session: Ctrl-C reaches only Python, so keep_partial can still finalise the mp4
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      stderr=self._log, start_new_session=True)

    def append(self, frames: torch.Tensor | np.ndarray) -> None:
        """Append uint8 frames [F, 3, H, W] (all appends must share H and W)."""
        if self._done:
            raise ValueError(f"Mp4Writer for {self.path} is already closed")
        frames = torch.as_tensor(frames)
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"Mp4Writer.append expects uint8 frames [F, 3, H, W], got "
                             f"{frames.dtype} {tuple(frames.shape)}")
        h, w = frames.shape[2:]
        if self._proc is None:
            self._start(w, h)
        elif (w, h) != self.size:
            raise ValueError(f"frame size {w}x{h} differs from the first frames' "
                             f"{self.size[0]}x{self.size[1]}")
        data = rearrange(frames.cpu(), "f c h w -> f h w c").contiguous().numpy()
        try:
            for frame in data:
                self._proc.stdin.write(frame.tobytes())
                self.frames_written += 1
        except OSError:  # ffmpeg exited early (disk full, killed, ...): its log says why
            raise RuntimeError(self._fail("while writing")) from None

    def close(self) -> Path:
        """Finish the mp4 and move it onto the output path; returns that path."""
        if self._done:
            return self.path
        if self.frames_written == 0:
            self.abort()
            raise ValueError(f"no frames were appended; nothing written to {self.path}")
        try:
            self._proc.stdin.close()  # end of input: ffmpeg writes the index (moov) and exits
        except OSError:
            pass  # ffmpeg is already gone; its exit status tells why
        if self._proc.wait() != 0:
            raise RuntimeError(self._fail("finishing"))
        # a 0 exit is not proof (a full disk can lose the index silently): read the file back
        count = _count_video_frames(self.tmp_path)
        if count != self.frames_written:
            found = "is unreadable" if count is None else f"holds {count} frame(s)"
            raise RuntimeError(self._fail("finishing", f"the written file {found}, "
                                          f"{self.frames_written} were appended"))
        self._close_log()
        os.replace(self.tmp_path, self.path)
        self._done = True
        return self.path

    def abort(self) -> None:
        """Stop writing and delete the temporary file; the output path is left untouched."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()  # nothing of it is kept: no need to let it finish the file
            self._proc.wait()
        if self._proc is not None and self._proc.stdin is not None:
            try:
                self._proc.stdin.close()
            except OSError:
                pass  # the process is gone; only the temp file matters
        self._close_log()
        self.tmp_path.unlink(missing_ok=True)
        self._done = True

    def _fail(self, stage: str, cause: str | None = None) -> str:
        """Abort (temp file removed, output untouched); the one-line error saying why."""
        if self._proc is not None and self._proc.stdin is not None:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
        status = self._proc.wait() if self._proc is not None else None
        if cause is None:
            cause = _ffmpeg_cause(self._read_log(), status)
        self.abort()
        return (f"cannot write {self.path}: ffmpeg failed {stage} the mp4 ({cause}); "
                "the output path was left untouched")

    def _read_log(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(max(0, self._log.seek(0, os.SEEK_END) - 100_000))  # the end says why
        return self._log.read().decode(errors="replace")

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None or (self.keep_partial and self.frames_written):
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        # a writer dropped without close/abort must not leave its temp file behind
        if not getattr(self, "_done", True):
            try:
                self.abort()
            except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to report to
                pass


def _check_writable(path: Path) -> None:
    """Create and remove ``path``, so an unwritable folder fails before any model work."""
    try:
        path.touch(exist_ok=False)
        path.unlink()
    except OSError as err:
        raise ValueError(f"cannot write the output video in {path.parent} "
                         f"({err.strerror or type(err).__name__}); choose a writable folder") from None


_TEMP_TAG = ".magi-partial-"  # .{stem}.magi-partial-{pid}-{8 hex}.mp4
_TEMP_TAIL = re.compile(r"(\d+)-[0-9a-f]{8}\.mp4")


def _temp_stem(path: Path) -> str:
    """The output's stem, cut (on a utf-8 character boundary) so the temp name fits NAME_MAX."""
    try:
        name_max = os.pathconf(path.parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    # a fixed budget (Linux pids are at most 2**22), so every run cuts a stem the same way
    budget = name_max - len(f".{_TEMP_TAG}{2**22}-12345678.mp4")
    return path.stem.encode(errors="surrogateescape")[:budget].decode(errors="ignore")


def _temp_name(path: Path) -> str:
    return f".{_temp_stem(path)}{_TEMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}.mp4"


def _remove_stale_temps(path: Path) -> None:
    """Delete temp files of earlier writers of ``path`` whose process is gone (kill -9, crash)."""
    prefix = f".{_temp_stem(path)}{_TEMP_TAG}"
    for candidate in path.parent.glob(glob.escape(prefix) + "*.mp4"):
        match = _TEMP_TAIL.fullmatch(candidate.name[len(prefix):])
        if match is None or _pid_alive(int(match.group(1))):
            continue
        try:
            candidate.unlink()
        except OSError:
            pass  # someone else's file, or already gone: not ours to insist on


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists (another user's) or unknowable: keep its file
    return True


def _count_video_frames(path: Path) -> int | None:
    """Frames in the first video stream, demuxed without decoding; None when unreadable."""
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path),
           "-map", "0:v:0", "-c", "copy", "-f", "null", "-progress", "pipe:1", "-nostats", "-"]
    try:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=600)
    except (OSError, subprocess.TimeoutExpired):
        return None
    counts = re.findall(rb"^frame=(\d+)", done.stdout, flags=re.M)
    return int(counts[-1]) if done.returncode == 0 and counts else None


# what a user can act on, searched for in ffmpeg's log before falling back to its last line
_OS_ERRORS = ("No space left on device", "Disk quota exceeded", "File too large",
              "Permission denied", "Input/output error", "Read-only file system")


def _ffmpeg_cause(log: str, status: int | None) -> str:
    for sign in _OS_ERRORS:
        if sign.lower() in log.lower():
            return sign.lower()
    lines = [re.sub(r"^\[[^]]*\]\s*", "", line).strip() for line in log.splitlines()]
    last = next((line for line in reversed(lines) if line), "")
    if status is not None and status < 0:
        return f"ffmpeg was killed by signal {-status}" + (f": {last[:200]}" if last else "")
    return f"exit status {status}" + (f": {last[:200]}" if last else "")
