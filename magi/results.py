"""What a generation reports: per sampler step, per clean chunk, and per call."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class StepInfo:
    """What the per-step callback receives after every sampler step."""

    step: int  # 0-based global step
    total_steps: int
    chunks: tuple[int, ...]  # chunks denoised in this step (absolute indices)
    finished: int | None  # chunk that became clean in this step


@dataclass(frozen=True)
class VideoChunk:
    """One generated chunk, as ``MagiPipeline.stream`` yields it.

    Attributes:
        index: absolute chunk index (v2v: the prefix chunks come first and are never yielded).
        frames: uint8 [F, 3, H, W] video frames of this chunk (after trimming to num_frames).
        latent: float32 [1, C, chunk_width, H/8, W/8] clean latent of the whole chunk.
    """

    index: int
    frames: torch.Tensor
    latent: torch.Tensor


@dataclass
class GenerationResult:
    """What one ``generate`` / ``resume`` / ``extend`` call (or ``pipe(...)``) returns.

    ``frames`` holds the generated frames in the form ``output_type`` asked for (``magi.output``:
    "np" uint8 (T, H, W, 3), "pil" images, "pt" uint8 (T, 3, H, W), "latent" the clean latents);
    None when no output_type was given. ``output_path`` is the mp4 written, or None.
    """

    output_path: Path | None
    frames_written: int = 0
    chunks_done: int = 0
    chunks_total: int = 0
    interrupted: bool = False
    stop_signal: int | None = None  # the stop signal (SIGINT, SIGTERM, SIGHUP) when interrupted
    time_to_first_chunk: float = float("nan")
    seconds_per_chunk: float = float("nan")
    peak_memory_bytes: int = 0
    fps: int = 24
    size: tuple[int, int] = (0, 0)
    frames: object = field(default=None, repr=False)

    @property
    def exit_status(self) -> int:
        """The CLI's exit status: 0 when done, 128 + the signal's number when stopped by one."""
        if not self.interrupted:
            return 0
        return 128 + int(self.stop_signal or signal.SIGINT)

    def summary(self) -> str:
        """One-paragraph report printed at the end of a CLI run."""
        if self.interrupted and not self.chunks_done:
            return "interrupted before the first chunk was done; nothing written"
        where = f" to {self.output_path}" if self.output_path else ""
        head = "interrupted: wrote the chunks done so far" if self.interrupted else "done"
        return (
            f"{head}: {self.frames_written} frames ({self.chunks_done}/{self.chunks_total} "
            f"chunks, {self.size[0]}x{self.size[1]} @ {self.fps} fps){where}; time to first "
            f"chunk {self.time_to_first_chunk:.1f} s, {self.seconds_per_chunk:.2f} s per chunk, "
            f"peak memory {self.peak_memory_bytes / 2**30:.2f} GiB"
        )
