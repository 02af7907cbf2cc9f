"""One generation in flight: what it reports, and how it is steered and stopped.

- ``StepInfo`` (per sampler step), ``VideoChunk`` (per clean chunk), ``GenerationResult`` (per
  ``generate`` / ``resume`` / ``extend`` call): what callers receive.
- ``Run``: one prepared request (plan, captions, noise identity, prefix; for a resumed state also
  its window and step), built by ``MagiPipeline`` and consumed by its run loop.
- ``Control``: steer (``set_prompt``) or stop a run from any thread; the run applies both at its
  next step boundary. ``generate(control=...)`` and the ``Generation`` handle use it.
- ``Generation``: the handle ``MagiPipeline.stream`` returns (iterate it for the chunks).
- Stop signals: the first SIGINT / SIGTERM / SIGHUP stops after the current step.
"""

from __future__ import annotations

import dataclasses
import numbers
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from magi.sampling.chunks import ChunkPlan, Step
from magi.sampling.denoise import SamplerSettings

if TYPE_CHECKING:
    from magi.captions import ChunkCaptions
    from magi.pipeline import MagiPipeline


def whole_number(name: str, value: object) -> int:
    """``value`` as an int; a one-line ValueError for bools, floats and other non-integers."""
    # bool is an int to Python but never a frame count or a seed; numpy integers are fine.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be a whole number, got {value!r} ({type(value).__name__})")
    return int(value)


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
    """Summary of one ``generate`` call."""

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


class _StopRequested(Exception):
    """Raised from the step callback after the first Ctrl-C: stop after the current step."""


# ---------------------------------------------------------------------------------- signals
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")  # stop after the current step, keep the chunks done


class _Stop:
    """Set by the first stop signal; remembers which one (the CLI exits with 128 + its number)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None

    def is_set(self) -> bool:
        return self.event.is_set()

    def set(self, signum: int = signal.SIGINT) -> None:
        if self.signum is None:
            self.signum = signum
        self.event.set()


@contextmanager
def _graceful_stop(stop: _Stop) -> Iterator[None]:
    """First Ctrl-C / SIGTERM / SIGHUP sets ``stop`` (finish the current step, keep the chunks
    done, as docker stop, timeout and Slurm expect); a second one aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set(signum)
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: stopping after the current step and keeping the chunks done so far "
              f"(send it again to abort)", file=sys.stderr, flush=True)

    signums = [getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)]
    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@dataclass
class Run:
    """One prepared request."""

    mode: str
    plan: ChunkPlan
    settings: SamplerSettings
    captions: "ChunkCaptions"
    noise_shape: tuple[int, ...]  # [1, C, T, H, W] of the whole video
    seed: int
    noise: torch.Tensor | None  # given noise, or None to draw it from seed
    per_chunk_noise: bool  # chunk k drawn alone from seed + k (not the official noise)
    prefix: torch.Tensor | None
    limit: int | None  # frames to keep (magi), None = every frame (official)
    start_step: int = 0  # > 0: resumed from a GenerationState with this window
    window: dict[int, torch.Tensor] | None = None
    frames_done: int = 0  # frames / chunks already emitted (counting those of a resumed state)
    chunks_done: int = 0
    tail: list[tuple[int, torch.Tensor]] = dataclasses.field(default_factory=list)  # last clean chunks




class Control:
    """Steer or stop one run from any thread (``generate`` / ``resume`` / ``extend`` with
    ``control=``, or the ``Generation`` handle of ``stream``).

    ``set_prompt(from_chunk, text)``: chunks >= from_chunk that have not entered the denoising
    window yet take ``text``. A chunk takes the prompt in force when it enters the window
    (``Step.entering``) and keeps it. Edits are queued and applied in the generating thread at
    the next step boundary (after the step's callback, before the next step; a new text is
    T5-encoded there), in call order; a ``from_chunk`` whose chunk has entered by then applies
    from the first chunk that has not; once every chunk has entered an edit has no effect. The
    captions then equal those of a run started with the final timeline (a prompt list), so the
    latents do too. Under torchrun every rank must make the same calls, at the same step.

    ``stop()``: stop after the current step, as a first Ctrl-C does: the chunks done are kept
    (written, joined), the state is saved, ``GenerationResult.interrupted`` is set.

    A Control steers one run; edits made before the run starts apply from its first step.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[tuple[int, str, bool]] = []  # (from_chunk, text, generated)
        self._stop = threading.Event()
        self._pipe: MagiPipeline | None = None
        self._run: Run | None = None
        self._frontier = 0  # first absolute chunk that has not entered the window yet

    @property
    def chunk_num(self) -> int | None:
        """Chunks of the bound run's video (None before it starts)."""
        return None if self._run is None else self._run.plan.chunk_num

    @property
    def plan(self) -> ChunkPlan | None:
        """The bound run's chunk plan (None before it starts)."""
        return None if self._run is None else self._run.plan

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def set_prompt(self, from_chunk: int, text: str, *, generated: bool = False) -> None:
        """Use ``text`` for chunks >= from_chunk that have not entered the window yet.

        ``from_chunk`` is an absolute chunk index (v2v: the prefix chunks come first, as in
        ``VideoChunk.index``), or with ``generated=True`` a generated chunk's (0 = the first
        chunk after a v2v prefix), as prompt lists, segment files, the CLI's ``--steer`` file
        and the HTTP API count them. For t2v and i2v the two are the same.

        Raises ValueError for an empty or non-string text, or a from_chunk outside the video's
        chunks (0 .. chunk_num - 1, or 0 .. generated chunks - 1; checked once the run is known).
        """
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"set_prompt needs a non-empty string, got {text!r}")
        if isinstance(from_chunk, bool) or not isinstance(from_chunk, numbers.Integral):
            raise ValueError(f"from_chunk must be a whole number, got {from_chunk!r}")
        n = self.chunk_num
        if generated and self._run is not None:
            n = len(self._run.plan.generated_chunks)
        if from_chunk < 0 or (n is not None and from_chunk >= n):
            top = "" if n is None else f" 0 .. {n - 1}"
            what = "generated chunks" if generated else "chunks"
            raise ValueError(f"from_chunk {from_chunk} is outside this video's {what}{top}")
        with self._lock:
            self._pending.append((int(from_chunk), text, generated))

    def stop(self) -> None:
        """Stop after the current step (safe from any thread and from the step callback)."""
        self._stop.set()

    # ---- generating thread ------------------------------------------------------------------
    def _bind(self, pipe: "MagiPipeline", run: Run) -> None:
        if self._run is not None:
            raise ValueError("this Control already steers a run; make one per run")
        self._pipe, self._run = pipe, run
        self._frontier = next((s.entering for s in run.plan.steps() if s.index >= run.start_step
                               and s.entering is not None), run.plan.chunk_num)  # fmt: skip
        self._apply()

    def _apply(self) -> None:
        """Apply the queued edits (between steps)."""
        with self._lock:
            edits, self._pending = self._pending, []
        if not edits or self._run is None:
            return
        captions, n = self._run.captions, self._run.plan.chunk_num
        for first, text, generated in edits:
            if generated:  # (an edit queued before the run started is counted here)
                first += self._run.plan.offset
            first = max(first, self._frontier)
            if first >= n:
                continue
            emb, mask = (None, None) if text in captions.texts else self._pipe._encode([text])
            captions.assign_prompt(text, emb, mask, first)

    def _at_step(self, info: StepInfo) -> None:
        self._frontier = max(self._frontier, max(info.chunks) + 1)
        if self._pending:
            self._apply()


class Generation:
    """A running ``MagiPipeline.stream`` request: iterate it for the chunks; ``set_prompt``
    steers it and ``stop`` ends it after the current step (see ``Control``)."""

    def __init__(self, pipe: "MagiPipeline", run: Run, callback: Callable[[StepInfo], None] | None,
                 control: Control | None = None) -> None:  # fmt: skip
        self._callback = callback
        self.control = control if control is not None else Control()
        self.control._bind(pipe, run)
        self._run, self._plan = run, run.plan
        self._chunks = pipe._run(run, self._at_step)

    @property
    def plan(self) -> ChunkPlan:
        """The run's chunk plan (which chunks each step denoises, when each enters)."""
        return self._plan

    @property
    def chunk_num(self) -> int:
        """Chunks of the video (absolute indices 0 .. chunk_num - 1, v2v prefix chunks first)."""
        return self._plan.chunk_num

    def set_prompt(self, from_chunk: int, text: str, *, generated: bool = False) -> None:
        """``Control.set_prompt``: steer the chunks that have not entered the window yet."""
        self.control.set_prompt(from_chunk, text, generated=generated)

    def stop(self) -> None:
        """End the iteration after the current step (the chunks yielded so far stand)."""
        self.control.stop()

    def _at_step(self, info: StepInfo) -> None:
        if self._callback is not None:
            self._callback(info)
        self.control._at_step(info)
        if self.control.stopping:
            raise _StopRequested

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> VideoChunk:
        self.control._apply()
        try:
            return next(self._chunks)
        except _StopRequested:
            self._chunks.close()
            raise StopIteration from None

    def close(self) -> None:
        """Stop the generation (frees its noise); further iteration ends at once."""
        self._chunks.close()

def _step_hook(callback: Callable[[StepInfo], None], plan: ChunkPlan) -> Callable[[Step], None]:
    total = plan.total_steps

    def hook(step: Step) -> None:
        callback(StepInfo(step.index, total, step.chunks, step.finished))

    return hook


def _stop_aware(
    callback: Callable[[StepInfo], None] | None, stop: _Stop, mesh: object | None = None,
    control: Control | None = None,
) -> Callable[[StepInfo], None]:
    """The step hook of a generate call: the user's callback, then steering, then the stop."""

    def hook(info: StepInfo) -> None:
        if callback is not None:
            callback(info)
        if control is not None:
            control._at_step(info)
        stopping = stop.is_set() or (control is not None and control.stopping)
        if mesh is not None:  # a Ctrl-C may reach the ranks at different steps: stop together
            from magi.distributed import any_rank

            stopping = any_rank(stopping, mesh)
        if stopping:
            raise _StopRequested

    return hook


