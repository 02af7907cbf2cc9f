"""Where a generation's chunks go: the mp4, per-chunk segments, saved tensors, the state.

- ``Outputs``: the sinks of one ``generate`` / ``resume`` / ``extend`` call, fed chunk by chunk:
  the output mp4 (one continuous encode, or joined from segments), the ``SegmentSink``, the
  ``TensorSink`` of ``save_tensors``, the timings of the ``GenerationResult``.
- ``SegmentSink``: every chunk as its own complete fragmented mp4 in a folder, written when the
  chunk is clean. With a saved state it makes a run survive ``kill -9``: the segments of the
  chunks the state covers stay valid, and resume joins them with the rest into one mp4. The
  HTTP service streams them to browsers (MediaSource) as they appear.
- ``TensorSink``: the ``save_tensors`` file, its chunks spilled to disk as they come (bounded
  memory) and assembled into one safetensors file at the end.
- ``StateSaver``: writes the generation state (``magi.state``) at resume points.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import resource
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from magi.media.mp4 import (
    Mp4Writer,
    VideoWriteError,
    append_mp4,
    cmaf_timescale,
    fragment_frames,
    join_mp4,
    retime_fmp4,
    split_fmp4,
)
from magi.output import check_output_type, convert_frames
from magi.request import shown_path, whole_number
from magi.results import GenerationResult, VideoChunk
from magi.state import GenerationState, StateError

logger = logging.getLogger(__name__)
SEGMENT = re.compile(r"^(\d{5,})\.mp4$")  # 00000.mp4, 00001.mp4, ...


class Outputs:
    """Where the chunks of one ``generate`` call go: the mp4, the segments, the saved tensors,
    the timings.

    Args:
        writer: the continuous mp4 encode (None: no mp4, or one joined from ``segments``).
        result: the call's result, filled in as chunks come.
        segments: the per-chunk segment folder, or None.
        joined: with ``segments``, the mp4 to join them into at the end (also when stopped).
        on_chunk: called with each chunk once every sink has it.
        save_tensors: the .safetensors file the latents and frames go to (``TensorSink``; None: none).
        append_to: the earlier run's mp4 the new chunks are appended to (resume / extend).
        output_type: also return the frames in this form (``magi.output``; None: keep none).
    """

    def __init__(
        self,
        writer: Mp4Writer | None,
        result: GenerationResult,
        *,
        segments: SegmentSink | None = None,
        joined: Path | None = None,
        on_chunk: Callable[[VideoChunk], None] | None = None,
        save_tensors: str | Path | None = None,
        append_to: Path | None = None,
        output_type: str | None = None,
    ) -> None:
        self.writer, self.result = writer, result
        self.segments, self.joined, self.on_chunk = segments, joined, on_chunk
        self.save_tensors, self.append_to = save_tensors, append_to
        self.output_type = check_output_type(output_type)
        # frames / latents are kept only when returned; save_tensors spills them to disk
        self.tensors = TensorSink(Path(save_tensors)) if save_tensors is not None else None
        self.keep_latents = output_type == "latent"
        self.keep_frames = output_type not in (None, "latent")
        self.latents: list[torch.Tensor] = []
        self.frames: list[torch.Tensor] = []
        self.started = time.perf_counter()
        # first and last chunk times and the count: nothing kept per chunk (bounded memory)
        self.first_at, self.last_at, self.timed = 0.0, 0.0, 0

    def add(self, chunk: VideoChunk) -> None:
        self.last_at = time.perf_counter()
        self.first_at = self.first_at if self.timed else self.last_at
        self.timed += 1
        if self.writer is not None and len(chunk.frames):
            try:
                self.writer.append(chunk.frames)
            except RuntimeError as err:  # ffmpeg stopped; the writer removed its temporary file
                raise VideoWriteError(str(err)) from None
        if self.segments is not None:
            self.segments.add(chunk)
        self.result.frames_written += len(chunk.frames)
        self.result.chunks_done += 1
        if self.tensors is not None:
            self.tensors.add(chunk.latent, chunk.frames)
        if self.keep_latents:
            self.latents.append(chunk.latent.float().cpu())
        if self.keep_frames:
            self.frames.append(chunk.frames.cpu())
        if self.on_chunk is not None:
            self.on_chunk(chunk)

    def prepend_tensors(
        self, path: Path, tail: list[tuple[int, torch.Tensor]], offset: int, chunks: int, frames: int
    ) -> None:
        """A resumed run's save_tensors start with the interrupted run's file at ``path`` when it
        holds exactly the state's ``chunks`` chunks and ``frames`` frames and ends in the state's
        clean chunks ``tail`` (absolute index, latent; ``offset`` prefix chunks); else a warning."""
        if not is_earlier_tensors(path, tail, offset, chunks, frames):
            logger.warning(
                "save_tensors %s is not the stopped run's file of its first %d chunks: it will hold "
                "only the chunks generated after the resume",
                path,
                chunks,
            )
        elif self.tensors is not None:
            self.tensors.add_file(path)

    def returned_frames(self) -> None:
        """Put the kept frames (or latents) on the result in the form ``output_type`` names."""
        if self.output_type == "latent":
            self.result.frames = torch.cat(self.latents, dim=2) if self.latents else None
        elif self.output_type is not None:
            w, h = self.result.size
            frames = torch.cat(self.frames) if self.frames else torch.zeros(0, 3, h, w, dtype=torch.uint8)
            self.result.frames = convert_frames(frames, self.output_type)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
        if self.tensors is not None:
            self.tensors.abort()

    def finish(self, device: torch.device) -> GenerationResult:
        """Save tensors, close the mp4 (drop it when no frame exists), fill the timings.

        The tensors go first: if they cannot be written the video is dropped too, so a failed
        run leaves nothing at the output path.
        """
        append_to = self.append_to
        self.returned_frames()
        if self.tensors is not None:
            try:
                self.tensors.close()
            except OSError:
                self.abort()
                raise
        if self.writer is not None and self.writer.frames_written:
            try:
                self.writer.close()
            except RuntimeError as err:
                raise VideoWriteError(str(err)) from None
            if append_to is not None:
                append_mp4(append_to, self.writer.path)
        elif self.writer is not None:
            self.writer.abort()
            if append_to is None:
                self.result.output_path = None
        if self.segments is not None and self.joined is not None:
            parts = ([append_to] if append_to is not None else []) + self.segments.paths()
            if parts:
                join_mp4(parts, self.joined)
            else:
                self.result.output_path = None
        if self.timed:
            self.result.time_to_first_chunk = self.first_at - self.started
            steady = (self.last_at - self.first_at) / (self.timed - 1) if self.timed > 1 else None
            self.result.seconds_per_chunk = self.result.time_to_first_chunk if steady is None else steady
        self.result.peak_memory_bytes = peak_memory(device)
        return self.result


class SegmentSink:
    """Each generated chunk (with frames) as its own mp4 in ``folder``: 00000.mp4, 00001.mp4, ...

    A segment is a complete fragmented mp4 (libx264, yuv420p, no B-frames) of one chunk's
    frames, written to a hidden temporary file and renamed, so a kill leaves only whole
    segments. The segments are one CMAF stream: every segment's init (ftyp + moov) is the same,
    and its fragments are retimed (``retime_fmp4``) to start where the segment before ended,
    numbered on from its fragments. So segment 0 whole followed by the fragments (moof + mdat)
    of 1, 2, ... is one valid mp4 of every frame with increasing timestamps, what a MediaSource
    plays without "sequence" mode and HLS serves as fMP4 segments; ``join_mp4`` remuxes it into
    the video. A resumed run (``keep``) goes on from the kept segments' end.

    Args:
        folder: the segment folder (created when missing; its parent must exist).
        fps: the video's frame rate.
        keep: segments already in the folder that belong to this run (a resumed run: the chunks
            its state covers); those numbered ``keep`` and above are stale and removed.
    """

    def __init__(self, folder: str | Path, fps: float, keep: int = 0) -> None:
        self.folder, self.fps = Path(folder), fps
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"segments folder {self.folder} is a file; name a folder")
        if not self.folder.parent.is_dir():
            raise FileNotFoundError(f"segments folder's parent does not exist: {self.folder.parent} (create it first)")
        self.folder.mkdir(exist_ok=True)
        for f in self.folder.iterdir():
            m = SEGMENT.match(f.name)
            if m and int(m.group(1)) >= keep:
                f.unlink()
        self.next = len(self.paths())
        self._ticks = cmaf_timescale(fps)[1]
        self.frames_done, self.fragments_done = 0, 0  # over the segments kept: where the timeline goes on
        for path in self.paths():
            for fragment in split_fmp4(path.read_bytes())[1]:
                self.frames_done += fragment_frames(fragment)
                self.fragments_done += 1
        if self.next < keep:
            logger.warning(
                "%s holds %d of the earlier %d segments; the joined video will lack the missing ones",
                self.folder,
                self.next,
                keep,
            )

    def path(self, k: int) -> Path:
        return self.folder / f"{k:05d}.mp4"

    def paths(self) -> list[Path]:
        """The segments in order, up to the first gap."""
        found: list[Path] = []
        while self.path(len(found)).is_file():
            found.append(self.path(len(found)))
        return found

    def add(self, chunk: VideoChunk) -> None:
        if not len(chunk.frames):
            return
        encoded = self.folder / f".{self.next:05d}.encoded.mp4"
        try:
            with Mp4Writer(encoded, self.fps, fragmented=True) as writer:
                writer.append(chunk.frames)
            init, fragments = split_fmp4(encoded.read_bytes())
        except RuntimeError as err:
            raise VideoWriteError(str(err)) from None
        finally:
            encoded.unlink(missing_ok=True)
        retimed, frames = [], self.frames_done
        for i, fragment in enumerate(fragments):
            retimed.append(retime_fmp4(fragment, frames * self._ticks, self.fragments_done + i + 1))
            frames += fragment_frames(fragment)
        temp = self.folder / f".{self.next:05d}.retimed.mp4"
        try:
            temp.write_bytes(init + b"".join(retimed))
            os.replace(temp, self.path(self.next))
        except OSError as err:
            temp.unlink(missing_ok=True)
            raise VideoWriteError(f"cannot write segment {self.path(self.next)}: {err}") from None
        self.frames_done, self.fragments_done = frames, self.fragments_done + len(fragments)
        self.next += 1


class StateSaver:
    """Writes the generation state at resume points: after every ``every``-th finished chunk,
    and (``save()``) the last resume point when the run stops.

    Args:
        path: the state file (replaced atomically at each save).
        every: chunks between saves (>= 1).
        allowed: False when the request cannot be saved (given noise tensors are not kept).
    """

    def __init__(self, path: str | Path, every: int = 1, allowed: bool = True) -> None:
        if not allowed:
            raise ValueError("save_state needs noise drawn from the seed (drop noise=...)")
        every = whole_number("save_every", every)
        if every < 1:
            raise ValueError(f"save_every must be >= 1 (chunks between saves), got {every}")
        self.path, self.every = Path(path), every
        if self.path.is_dir() or not self.path.parent.is_dir():
            raise ValueError(f"save_state {path}: name a file in an existing folder")
        self.last: GenerationState | None = None
        self._saved: GenerationState | None = None

    def chunk_done(self, state: GenerationState) -> None:
        self.last = state
        if state.meta["finished"] or state.meta["chunks_done"] % self.every == 0:
            self.save()

    def save(self) -> None:
        """Write the newest resume point, unless it is on disk already."""
        if self.last is not None and self.last is not self._saved:
            self.last.save(self.path)
            self._saved = self.last


def check_earlier_video(output_path: str | Path | None, frames: int, where: object) -> Path | None:
    """The earlier run's mp4 at output_path to append to (None: nothing to append).

    Raises:
        StateError: the file holds other than ``frames`` frames (resumed into already).
    """
    if output_path is None or frames == 0 or not Path(output_path).is_file():
        if output_path is not None and frames:
            logger.warning(
                "%s does not hold the earlier %d frames (not written, or the run was killed "
                "before closing it); writing the remaining chunks only",
                output_path,
                frames,
            )
        return None
    import imageio_ffmpeg

    have = imageio_ffmpeg.count_frames_and_secs(str(output_path))[0]
    if have != frames:
        raise StateError(  # one line of <= 200 characters: the paths elided (magi.request.shown_path)
            f"{shown_path(output_path, 36)} holds {have} frames, not the {frames} of {shown_path(where, 28)}: "
            "resumed into this output already, or another video; choose another output_path"
        )
    return Path(output_path)


def check_save_path(path: str | Path | None) -> None:
    if path is None:
        return
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_tensors path must end in .safetensors, got {path}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"save_tensors folder does not exist: {path.parent} (create it first)")
    if path.is_dir():
        raise ValueError(f"save_tensors path is a folder: {path}; name a .safetensors file")


def check_not_the_input(output_path: str | Path | None, prefix_video_path: str | Path | None) -> None:
    """v2v writing onto its own prefix video would destroy the input: refuse before any work."""
    if output_path is None or prefix_video_path is None:
        return
    out, src = Path(output_path), Path(prefix_video_path)
    same = out.exists() and src.exists() and os.path.samefile(out, src)
    if same or out.resolve() == src.resolve():
        raise ValueError(
            f"output_path {output_path} is the prefix video: writing it would overwrite "
            "the input video; choose another output_path"
        )


class TensorSink:
    """The save_tensors file, written without holding the video: each chunk's latent and frames
    are appended to two spill files beside ``path`` as they come; ``close`` streams them into the
    bytes ``safetensors.torch.save_file`` writes for ``final_latent`` (the latents concatenated
    on the time axis, float32) and ``video_tchw_uint8`` (the frames), under a temporary name
    renamed to ``path``: the file appears only when complete. Disk: about twice the file at the end.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        stem = path.parent / f".{path.name[:150]}.magi-partial-{os.getpid()}"
        self.spills = (Path(f"{stem}.latent"), Path(f"{stem}.frames"))
        self.partial = Path(f"{stem}.safetensors")
        self.files: tuple | None = None  # the open spills, from the first chunk on
        self.latents: list[list[int]] = []  # shape of each latent piece [B, C, t, h, w], in order
        self.frames: list[int] = []  # [frames so far, 3, H, W]

    def _write(self, what: int, data: object) -> None:
        try:
            if self.files is None:
                self.files = tuple(open(spill, "wb") for spill in self.spills)  # noqa: SIM115 (closed in close/abort)
            self.files[what].write(data)
        except OSError as err:
            raise self._failed(err) from None

    def _failed(self, err: OSError) -> OSError:
        """Remove every trace; the one-line error to raise."""
        self.abort()
        return OSError(f"cannot write save_tensors {self.path}: {err.strerror or err}; nothing was written")

    def add(self, latent: torch.Tensor, frames: torch.Tensor) -> None:
        """Append one chunk: latent [B, C, t, h, w] (any dtype and device), frames [T, 3, H, W] uint8."""
        latent = latent.detach().float().cpu().contiguous()
        frames = frames.detach().cpu().contiguous()
        self._write(0, latent.numpy().data)
        self._write(1, frames.numpy().data)
        self.latents.append(list(latent.shape))
        self.frames = [(self.frames[0] if self.frames else 0) + len(frames), *frames.shape[1:]]

    def add_file(self, path: Path) -> None:
        """Append the tensors of a save_tensors file (a resumed run's earlier chunks), copied as bytes."""
        with open(path, "rb") as src:
            size = struct.unpack("<Q", src.read(8))[0]
            header = json.loads(src.read(size))
            for what, name in enumerate(("final_latent", "video_tchw_uint8")):
                begin, end = header[name]["data_offsets"]
                src.seek(8 + size + begin)
                self._copy(src, end - begin, lambda block, what=what: self._write(what, block))
        latent, video = header["final_latent"]["shape"], header["video_tchw_uint8"]["shape"]
        self.latents.append(latent)
        self.frames = [(self.frames[0] if self.frames else 0) + video[0], *video[1:]]

    @staticmethod
    def _copy(src: object, nbytes: int, write: Callable[[bytes], object]) -> None:
        while nbytes > 0:
            block = src.read(min(nbytes, 1 << 20))
            if not block:
                raise OSError(f"{src.name} ended early")
            write(block)
            nbytes -= len(block)

    def close(self) -> None:
        """Assemble the file from the spills and rename it to ``path`` (nothing when no chunk came)."""
        if self.files is None:
            return
        for f in self.files:
            f.close()
        b, c, _, h, w = self.latents[0]
        latent = [b, c, sum(shape[2] for shape in self.latents), h, w]
        size = 4 * math.prod(latent)
        header = {  # safetensors' order: the larger dtype first, then by name
            "final_latent": {"dtype": "F32", "shape": latent, "data_offsets": [0, size]},
            "video_tchw_uint8": {
                "dtype": "U8",
                "shape": self.frames,
                "data_offsets": [size, size + math.prod(self.frames)],
            },
        }
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads its header to 8 bytes with spaces
        try:
            with open(self.partial, "wb") as out, open(self.spills[0], "rb") as latents:
                out.write(struct.pack("<Q", len(raw)) + raw)
                for channel in range(b * c):  # final_latent [B, C, T, h, w]: each channel's T frames in a row
                    start = 0
                    for shape in self.latents:
                        block = 4 * math.prod(shape[2:])
                        latents.seek(start + channel * block)
                        self._copy(latents, block, out.write)
                        start += 4 * math.prod(shape)
                with open(self.spills[1], "rb") as frames:
                    self._copy(frames, math.prod(self.frames), out.write)
            os.replace(self.partial, self.path)
        except OSError as err:
            raise self._failed(err) from None
        self.abort()  # the spills go

    def abort(self) -> None:
        """Remove the spills and the partial file (the finished file at ``path`` stays)."""
        for f in self.files or ():
            f.close()
        self.files = None
        for leftover in (*self.spills, self.partial):
            leftover.unlink(missing_ok=True)


def is_earlier_tensors(path: Path, tail: list[tuple[int, torch.Tensor]], offset: int, chunks: int, frames: int) -> bool:
    """Whether the save_tensors file at ``path`` holds exactly ``chunks`` generated chunks and
    ``frames`` frames, and its chunks in ``tail`` equal those latents bit for bit (so it is this
    run's file). Only those chunks' slices are read."""
    from safetensors import SafetensorError, safe_open

    if not tail or not path.is_file():
        return False
    cw = tail[0][1].shape[2]  # latent frames per chunk
    try:
        with safe_open(str(path), framework="pt") as f:
            if set(f.keys()) != {"final_latent", "video_tchw_uint8"}:
                return False
            latent, video = f.get_slice("final_latent"), f.get_slice("video_tchw_uint8")
            shape = latent.get_shape()
            if latent.get_dtype() != "F32" or video.get_dtype() != "U8" or video.get_shape()[0] != frames:
                return False
            if len(shape) != 5 or shape[2] != chunks * cw or list(shape[3:]) != list(tail[0][1].shape[3:]):
                return False
            for index, clean in tail:
                j = index - offset  # generated chunk j = latent frames [j*cw, (j+1)*cw)
                if not 0 <= j < chunks or not torch.equal(latent[:, :, j * cw : (j + 1) * cw], clean.float()):
                    return False
    except (OSError, SafetensorError):
        return False
    return True


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython's ZMQ shell)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def show_progress(progress: bool | None) -> bool:
    """``progress`` itself when given; None ("auto"): on in a notebook or when stderr is a terminal."""
    if progress is not None:
        return bool(progress)
    if in_notebook():
        return True
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False


def progress_bar(total: int, enabled: bool | None) -> object:
    """A per-chunk tqdm bar (tqdm.auto: a widget in notebooks); ``enabled`` None = auto."""
    if not show_progress(enabled):
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="chunk", desc="magi", dynamic_ncols=True)


@dataclass(frozen=True)
class Destinations:
    """Where a generate / resume / extend call sends its chunks."""

    output_path: str | Path | None
    segments: str | Path | None = None
    keep_segments: int = 0  # segments already in the folder that belong to this run (resume)
    on_chunk: Callable[[VideoChunk], None] | None = None
    save_tensors: str | Path | None = None
    append_to: Path | None = None  # the earlier run's mp4 the new chunks are appended to
    output_type: str | None = None  # return the frames in this form (magi.output; None: none)


def open_outputs(
    dest: Destinations, fps: int, size: tuple[int, int], writer_rank: bool, prefix_video_path: str | Path | None = None
) -> Outputs:
    """The sinks of one call, opened before any model work so a bad path fails first.

    Only the writer rank writes; the others get an ``Outputs`` that counts chunks.
    """
    output_path = dest.output_path
    check_save_path(dest.save_tensors)
    check_not_the_input(output_path, prefix_video_path)
    segments = None
    if dest.segments is not None and writer_rank:
        segments = SegmentSink(dest.segments, fps, keep=dest.keep_segments)
    writer = None
    if output_path and writer_rank:
        target, append_to = output_path, dest.append_to
        if append_to is not None:  # the new chunks go to a part file, appended at the end
            target = append_to.parent / f".{append_to.name[:150]}.magi-resume-{os.getpid()}.mp4"
        writer = Mp4Writer(target, fps)
        if segments is not None:  # checked only: the mp4 is joined from the segments
            writer.abort()
            writer = None
    result = GenerationResult(Path(output_path) if output_path and writer_rank else None, fps=fps, size=size)
    joined = Path(output_path) if output_path and segments is not None else None
    return Outputs(
        writer,
        result,
        segments=segments,
        on_chunk=dest.on_chunk,
        joined=joined,
        save_tensors=dest.save_tensors if writer_rank else None,
        append_to=dest.append_to,
        output_type=dest.output_type,
    )
