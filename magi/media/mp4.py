"""Writing mp4 files for MAGI-1: the streaming writer and stream-copy joins, both atomic.

- ``Mp4Writer``: frames [F, 3, H, W] uint8 piped to ffmpeg (libx264, yuv420p), written to a
  hidden temporary file and renamed onto the output path once read back whole.
- ``join_mp4`` / ``append_mp4``: concatenation by stream copy (no re-encode), replaced atomically.
- ``VideoWriteError``: what the generation sinks raise when writing the output fails.

Everything goes through the ffmpeg binary shipped with imageio-ffmpeg, as the official code does.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import tempfile
import uuid
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import IO

import imageio_ffmpeg
import numpy as np
import torch
from einops import rearrange


class VideoWriteError(RuntimeError):
    """Writing the output mp4 failed (ffmpeg stopped, disk full); nothing is left at the output path."""


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
            which MediaSource plays as it arrives; same frames. No B-frames and the track
            timescale of ``cmaf_timescale``, so segments retimed by ``retime_fmp4`` join into one
            CMAF stream (one init, continuous fragments).
    """

    def __init__(self, path: str | Path, fps: float, *, keep_partial: bool = False, fragmented: bool = False) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() != ".mp4":
            raise ValueError(f"output path must end in .mp4, got {self.path}")
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise ValueError(f"output folder {self.path.parent} is a file, not a folder; choose another output path")
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"output folder does not exist: {self.path.parent} (create it first)")
        if self.path.is_dir():
            raise ValueError(f"output path is a folder: {self.path}")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps = fps
        self.keep_partial = keep_partial
        self.fragmented = fragmented
        self.frames_written = 0
        self.size: tuple[int, int] | None = None  # (width, height)
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
        cmd = [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-y",
            "-f",
            "rawvideo",
            "-vcodec",
            "rawvideo",
            "-s",
            f"{width}x{height}",
            "-pix_fmt",
            "rgb24",
            "-r",
            str(fps),
            "-i",
            "-",
            "-an",
            "-vcodec",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-v",
            "error",
            "-f",
            "mp4",
            str(self.tmp_path),
        ]
        if self.fragmented:  # CMAF-ready: no B-frames, a timescale where every frame lasts whole ticks
            timescale, _ = cmaf_timescale(self.fps)
            cmd[-3:-3] = [
                "-bf",
                "0",
                "-video_track_timescale",
                str(timescale),
                "-movflags",
                "+frag_keyframe+empty_moov+default_base_moof",
            ]
        self._log = tempfile.TemporaryFile()
        # own session: Ctrl-C reaches only Python, so keep_partial can still finalise the mp4
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log, start_new_session=True
        )

    def append(self, frames: torch.Tensor | np.ndarray) -> None:
        """Append uint8 frames [F, 3, H, W] (all appends must share H and W)."""
        if self._done:
            raise ValueError(f"Mp4Writer for {self.path} is already closed")
        frames = torch.as_tensor(frames)
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(
                f"Mp4Writer.append expects uint8 frames [F, 3, H, W], got {frames.dtype} {tuple(frames.shape)}"
            )
        h, w = frames.shape[2:]
        if self._proc is None:
            self._start(w, h)
        elif (w, h) != self.size:
            raise ValueError(f"frame size {w}x{h} differs from the first frames' {self.size[0]}x{self.size[1]}")
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
            raise RuntimeError(
                self._fail("finishing", f"the written file {found}, {self.frames_written} were appended")
            )
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
        return f"cannot write {self.path}: ffmpeg failed {stage} the mp4 ({cause}); the output path was left untouched"

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

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
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
        raise ValueError(
            f"cannot write the output video in {path.parent} "
            f"({err.strerror or type(err).__name__}); choose a writable folder"
        ) from None


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
        match = _TEMP_TAIL.fullmatch(candidate.name[len(prefix) :])
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
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-nostdin",
        "-v",
        "error",
        "-i",
        str(path),
        "-map",
        "0:v:0",
        "-c",
        "copy",
        "-f",
        "null",
        "-progress",
        "pipe:1",
        "-nostats",
        "-",
    ]
    try:
        # own session, as the writer's: a signal to this process's group (Ctrl-C, torchrun stopping its
        # ranks) must not kill the check and turn a good file into a failed write
        done = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=600, start_new_session=True
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    counts = re.findall(rb"^frame=(\d+)", done.stdout, flags=re.M)
    return int(counts[-1]) if done.returncode == 0 and counts else None


# what a user can act on, searched for in ffmpeg's log before falling back to its last line
_OS_ERRORS = (
    "No space left on device",
    "Disk quota exceeded",
    "File too large",
    "Permission denied",
    "Input/output error",
    "Read-only file system",
)


def _ffmpeg_cause(log: str, status: int | None) -> str:
    for sign in _OS_ERRORS:
        if sign.lower() in log.lower():
            return sign.lower()
    lines = [re.sub(r"^\[[^]]*\]\s*", "", line).strip() for line in log.splitlines()]
    last = next((line for line in reversed(lines) if line), "")
    if status is not None and status < 0:
        return f"ffmpeg was killed by signal {-status}" + (f": {last[:200]}" if last else "")
    return f"exit status {status}" + (f": {last[:200]}" if last else "")


def join_mp4(parts: list[Path], out: Path) -> None:
    """out := parts concatenated by stream copy (no re-encode), replaced atomically.

    ``out`` may be one of the parts (append in place). Parts that are one CMAF stream (segments
    of a ``SegmentSink``: one init, continuous fragments) are remuxed as that stream, so the
    file holds the very fragments a live client was sent. Raises VideoWriteError when ffmpeg fails.
    """
    out = Path(out)
    tag = f"{os.getpid()}-{os.urandom(4).hex()}"
    listing = out.parent / f".{out.name[:150]}.magi-join-{tag}.txt"
    joined = out.parent / f".{out.name[:150]}.magi-join-{tag}.mp4"
    stream = _cmaf_stream(parts)
    if stream is not None:
        listing.write_bytes(stream)
        source = ["-f", "mp4", "-i", str(listing)]
    else:
        listing.write_text("".join(f"file '{_concat_quote(p.resolve())}'\n" for p in parts))
        source = ["-f", "concat", "-safe", "0", "-i", str(listing)]
    try:
        done = subprocess.run(
            [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", *source, "-c", "copy", "-f", "mp4", str(joined)],
            capture_output=True,
            text=True,
            start_new_session=True,  # a signal to this process's group must not kill the join
        )
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            raise VideoWriteError(f"ffmpeg could not join {len(parts)} parts into {out}: {why}")
        os.replace(joined, out)
    finally:
        listing.unlink(missing_ok=True)
        joined.unlink(missing_ok=True)


def _concat_quote(path: Path) -> str:
    # the concat demuxer's quoting: a quote is written as '\''
    return str(path).replace("'", "'\\''")


def append_mp4(earlier: Path, part: Path) -> None:
    """earlier := earlier + part, by stream copy (no re-encode); atomic, removes ``part``."""
    try:
        join_mp4([earlier, part], earlier)
    finally:
        part.unlink(missing_ok=True)


# ---- CMAF: one init segment, continuous fragments ---------------------------------------------
def cmaf_timescale(fps: float) -> tuple[int, int]:
    """(track timescale, ticks per frame) for ``fps``: every frame lasts a whole number of ticks."""
    rate = Fraction(fps).limit_denominator(1001)
    return 1000 * rate.numerator, 1000 * rate.denominator


def _boxes(data: bytes, start: int = 0, end: int | None = None) -> list[tuple[str, int, int]]:
    """(type, offset, size) of the boxes in ``data[start:end]``; ValueError for a cut or bad box."""
    end, found, at = len(data) if end is None else end, [], start
    while at < end:
        if at + 8 > end:
            raise ValueError(f"mp4 box header cut at byte {at}")
        size, kind = int.from_bytes(data[at : at + 4], "big"), data[at + 4 : at + 8].decode("latin-1")
        if size == 1:
            size = int.from_bytes(data[at + 8 : at + 16], "big")
        if size < 8 or at + size > end:
            raise ValueError(f"mp4 box {kind!r} at byte {at} has a bad size {size}")
        found.append((kind, at, size))
        at += size
    return found


def split_fmp4(data: bytes) -> tuple[bytes, list[bytes]]:
    """A fragmented mp4 as (init = ftyp + moov, [moof + mdat, ...]); other boxes (mfra) dropped."""
    boxes = _boxes(data)
    init = b"".join(data[o : o + n] for kind, o, n in boxes if kind in ("ftyp", "moov"))
    if not any(kind == "moov" for kind, _, _ in boxes):
        raise ValueError("not a fragmented mp4: no moov box")
    fragments, current = [], b""
    for kind, o, n in boxes:
        if kind == "moof":
            current = data[o : o + n]
        elif kind == "mdat" and current:
            fragments.append(current + data[o : o + n])
            current = b""
    return init, fragments


def _child(data: bytes, box: tuple[str, int, int], kind: str, header: int = 8) -> tuple[str, int, int]:
    for found in _boxes(data, box[1] + header, box[1] + box[2]):
        if found[0] == kind:
            return found
    raise ValueError(f"mp4 box {box[0]!r} has no {kind!r}")


def fragment_frames(fragment: bytes) -> int:
    """The samples (frames) in one moof + mdat: the sum of its trun sample counts."""
    moof = _boxes(fragment)[0]
    traf = _child(fragment, moof, "traf")
    return sum(
        int.from_bytes(fragment[o + 12 : o + 16], "big")
        for kind, o, _ in _boxes(fragment, traf[1] + 8, traf[1] + traf[2])
        if kind == "trun"
    )


def retime_fmp4(fragment: bytes, decode_time: int, sequence: int) -> bytes:
    """``fragment`` (moof + mdat) starting at ``decode_time`` ticks, numbered ``sequence``.

    Rewrites the moof's mfhd sequence number and its traf's tfdt (written as version 1, 64 bits),
    so fragments of separately encoded segments play as one timeline.
    """
    out = bytearray(fragment)
    moof = _boxes(fragment)[0]
    _, mfhd, _ = _child(fragment, moof, "mfhd")
    out[mfhd + 12 : mfhd + 16] = sequence.to_bytes(4, "big")
    traf = _child(fragment, moof, "traf")
    _, tfdt, size = _child(fragment, traf, "tfdt")
    if fragment[tfdt + 8] == 1:
        out[tfdt + 12 : tfdt + 20] = decode_time.to_bytes(8, "big")
        return bytes(out)
    # version 0 (32 bits): grow the box to version 1, and every size and offset around it by 4
    new_tfdt = (20).to_bytes(4, "big") + b"tfdt" + b"\x01\x00\x00\x00" + decode_time.to_bytes(8, "big")
    out[tfdt : tfdt + size] = new_tfdt
    for start in (moof[1], traf[1]):
        out[start : start + 4] = (int.from_bytes(out[start : start + 4], "big") + 4).to_bytes(4, "big")
    return _shift_trun_offsets(bytes(out), 4)


def _shift_trun_offsets(fragment: bytes, by: int) -> bytes:
    """trun data offsets (relative to the moof with default-base-is-moof) moved by ``by`` bytes."""
    out = bytearray(fragment)
    moof = _boxes(fragment)[0]
    traf = _child(fragment, moof, "traf")
    for kind, o, _ in _boxes(fragment, traf[1] + 8, traf[1] + traf[2]):
        if kind == "trun" and int.from_bytes(fragment[o + 9 : o + 12], "big") & 0x1:
            offset = int.from_bytes(fragment[o + 16 : o + 20], "big", signed=True) + by
            out[o + 16 : o + 20] = offset.to_bytes(4, "big", signed=True)
    return bytes(out)


def _cmaf_stream(parts: list[Path]) -> bytes | None:
    """init + every fragment when ``parts`` are segments of one CMAF stream, else None."""
    try:
        pieces = [split_fmp4(Path(p).read_bytes()) for p in parts]
    except (OSError, ValueError):
        return None
    if not pieces or any(init != pieces[0][0] or not frags for init, frags in pieces):
        return None
    return pieces[0][0] + b"".join(f for _, frags in pieces for f in frags)
