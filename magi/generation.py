"""The run loop: a prepared ``Run`` -> denoised, checked, decoded chunks -> the sinks.

- ``chunks``: denoise the run step by step (from its start step), check each clean latent, decode
  it, trim it to the frame budget, and yield ``VideoChunk``s; the state saver sees every resume
  point.
- ``execute``: one ``generate`` / ``resume`` / ``extend`` call: the run's chunks into the
  ``Outputs`` (mp4, segments, tensors, state), stopped between steps by a ``Control`` or by
  Ctrl-C (``KeyboardInterrupt``), returning the ``GenerationResult``.
- ``Control``: steer (``set_prompt``) or stop a run from any thread; the run applies both at its
  next step boundary. ``Generation``: the iterable handle ``MagiPipeline.stream`` returns.

The library installs no signal handler: an entry point (the CLI, the serve worker) turns its
signals into ``Control.stop(signum)`` (``magi.cli.stop_on_signals``).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import torch

from magi.engine import Engine
from magi.models.kv_cache import KVCache
from magi.prepare import TAIL_CHUNKS, Run, added_noise_seed, snapshot
from magi.prompts import PromptEncoder
from magi.request import check_from_chunk, check_text
from magi.results import GenerationResult, StepInfo, VideoChunk
from magi.sampling.chunks import ChunkPlan, Step
from magi.sampling.denoise import denoise
from magi.sampling.noise import InitialNoise, JoinedNoise
from magi.sinks import Outputs, StateSaver, progress_bar, show_progress
from magi.state import state_identity

logger = logging.getLogger(__name__)

STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")  # an entry point stops after the current step on these


class NonFiniteLatentError(ValueError):
    """A chunk's latent came out of the sampler with NaN / Inf values; nothing is written."""


class StopRequested(Exception):
    """Raised from the step hook once a stop is asked for: the run ends after the current step."""


def check_finite(latent: torch.Tensor, index: int, load: object) -> None:
    """Fail on a non-finite clean latent (one reduction per chunk) instead of writing black frames."""
    if bool(torch.isfinite(latent).all()):
        return
    bad = int((~torch.isfinite(latent)).sum())
    raise NonFiniteLatentError(
        f"chunk {index} came out of the sampler with {bad} NaN/Inf latent values: the DiT weights "
        f"in {load} likely hold non-finite values (a corrupt or wrongly converted "
        "checkpoint), or the model dtype overflowed; nothing was written"
    )


# ---------------------------------------------------------------------------------- steering
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

    ``stop(signum=None)``: stop after the current step, as a first Ctrl-C does: the chunks done
    are kept (written, joined), the state is saved, ``GenerationResult.interrupted`` is set (and
    ``stop_signal`` to ``signum`` when an entry point stops on a signal).

    A Control steers one run; edits made before the run starts apply from its first step.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[tuple[int, str, bool]] = []  # (from_chunk, text, generated)
        self._stop = threading.Event()
        self.stop_signal: int | None = None
        self._encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]] | None = None
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

    @property
    def pending(self) -> int:
        """Edits queued and not yet applied."""
        with self._lock:
            return len(self._pending)

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
            raise ValueError(f"set_prompt needs a non-empty string, got {text!r}"[:200])
        check_text(text, "set_prompt's text")
        n = self.chunk_num
        if generated and self._run is not None:
            n = len(self._run.plan.generated_chunks)
        from_chunk = check_from_chunk(from_chunk, n, generated=generated)
        with self._lock:
            self._pending.append((from_chunk, text, generated))

    def open_from(self, info: StepInfo | None = None, *, generated: bool = False) -> int | None:
        """The first chunk an edit made now still changes (None before the run starts): the
        chunks before it have entered the window, those of ``info``'s step included when given
        (from the step callback: its edits are applied once it returns). ``generated=True``
        counts generated chunks (0 = the first after a v2v prefix); chunk_num once all entered."""
        run = self._run
        if run is None:
            return None
        first = self._frontier if info is None else max(self._frontier, max(info.chunks, default=-1) + 1)
        return max(first - run.plan.offset, 0) if generated else first

    def stop(self, signum: int | None = None) -> None:
        """Stop after the current step (safe from any thread, a signal handler and the step callback)."""
        if signum is not None and self.stop_signal is None:
            self.stop_signal = signum
        self._stop.set()

    # ---- generating thread ------------------------------------------------------------------
    def bind(self, run: Run, encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Attach to the run about to start (``encode``: T5 features of new prompt texts)."""
        if self._run is not None:
            raise ValueError("this Control already steers a run; make one per run")
        self._encode, self._run = encode, run
        self._frontier = next(
            (s.entering for s in run.plan.steps() if s.index >= run.start_step and s.entering is not None),
            run.plan.chunk_num,
        )
        self.apply()

    def apply(self) -> None:
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
            emb, mask = (None, None) if text in captions.texts else self._encode([text])
            captions.assign_prompt(text, emb, mask, first)

    def at_step(self, info: StepInfo) -> None:
        """The step boundary: chunks denoised so far have entered; apply what is queued."""
        self._frontier = max(self._frontier, max(info.chunks) + 1)
        if self._pending:
            self.apply()


# ---------------------------------------------------------------------------------- the loop
def initial_noise(engine: Engine, run: Run) -> InitialNoise | JoinedNoise:
    """The only random draw: randn(shape) from a generator seeded with ``seed`` on the device.

    Held in host memory, or above ``noise_spill_bytes`` in a temporary file, and read chunk by
    chunk as chunks enter the window (``magi.sampling.noise``); same values either way.
    """
    cw = engine.config.runtime.chunk_width
    if run.noise is not None:
        return InitialNoise.from_tensor(run.noise, cw)
    if run.per_chunk_noise:
        return InitialNoise.per_chunk(run.noise_shape, run.seed, cw)
    whole = InitialNoise.draw(run.noise_shape, run.seed, cw, device=engine.device, spill_bytes=engine.noise_spill_bytes)
    if not run.noise_parts:
        return whole
    _, c, _, h, w = run.noise_shape  # a resumed run made longer: its added chunks' own draws
    parts = [(0, whole)]
    for first, n in run.noise_parts:
        seed, shape = added_noise_seed(run.seed, first), (1, c, n * cw, h, w)
        parts.append(
            (first, InitialNoise.draw(shape, seed, cw, device=engine.device, spill_bytes=engine.noise_spill_bytes))
        )
    return JoinedNoise(parts)


def chunks(
    engine: Engine, run: Run, callback: Callable[[StepInfo], None] | None, saver: StateSaver | None = None
) -> Iterator[VideoChunk]:
    """Draw the noise, denoise (from run.start_step), decode each clean chunk, trim it to the
    frame budget; ``saver`` sees every resume point."""
    plan = run.plan
    cache = KVCache(plan.max_cached_chunks(), offload=engine.config.engine.kv_offload)
    # What a saved state must match (hashes the checkpoint's index): once per run, not per chunk.
    identity = None if saver is None else state_identity(engine.config, engine.compat)
    # Closed however the run ends (done, error, Ctrl-C, generator dropped): frees the noise's
    # memory or temporary file.
    with initial_noise(engine, run) as noise:
        hook = None if callback is None else _step_hook(callback, plan)

        def take_noise(chunk: int) -> torch.Tensor:
            return noise.chunk(chunk).to(engine.device)

        def at_step(step: Step, window: dict[int, torch.Tensor]) -> None:
            if saver is not None and step.finished is not None:
                saver.chunk_done(snapshot(run, step.index + 1, window, identity))

        for index, latent in denoise(
            engine.dit,
            plan,
            run.settings,
            run.captions,
            take_noise,
            cache,
            prefix=run.prefix,
            callback=hook,
            start_step=run.start_step,
            window=run.window,
            on_window=at_step,
        ):
            check_finite(latent, index, engine.config.runtime.load)
            lo, hi = plan.emit_range(index, skip_prefix=run.mode == "v2v")
            frames = engine.decode(latent[:, :, lo:hi])
            if run.limit is not None:
                frames = frames[: max(0, run.limit - run.frames_done)]
            run.frames_done += len(frames)
            run.chunks_done += 1
            run.tail = [*run.tail, (index, latent.detach().float().cpu())][-TAIL_CHUNKS:]
            yield VideoChunk(index, frames, latent)


def _step_hook(callback: Callable[[StepInfo], None], plan: ChunkPlan) -> Callable[[Step], None]:
    total = plan.total_steps

    def hook(step: Step) -> None:
        callback(StepInfo(step.index, total, step.chunks, step.finished))

    return hook


def stop_aware(
    callback: Callable[[StepInfo], None] | None, control: Control, mesh: object | None = None
) -> Callable[[StepInfo], None]:
    """The step hook of a run: the user's callback, then steering, then the stop."""

    def hook(info: StepInfo) -> None:
        if callback is not None:
            callback(info)
        control.at_step(info)
        _stop_if_stopped(control, mesh)  # a stop may reach the ranks at different steps: they stop together

    return hook


def _stop_if_stopped(control: Control, mesh: object | None) -> None:
    """StopRequested when ``control`` is stopping (on any rank: the ranks stop together)."""
    stopping = control.stopping
    if mesh is not None:
        from magi.distributed import any_rank

        stopping = any_rank(stopping, mesh)
    if stopping:
        raise StopRequested


def execute(
    engine: Engine,
    encoder: PromptEncoder,
    prepare: Callable[[], Run],
    out: Outputs,
    *,
    callback: Callable[[StepInfo], None] | None = None,
    progress: bool | None = False,
    saver: StateSaver | None = None,
    control: Control | None = None,
) -> GenerationResult:
    """Run a request into its outputs; a stop (``control.stop()``, Ctrl-C) keeps the chunks done.

    ``prepare`` is called here, after the outputs are opened, so a bad output path fails before
    any model work.
    """
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    control = control if control is not None else Control()
    bar = progress_bar(0, False)
    saver = saver if engine.is_writer else None
    try:
        run = prepare()
        control.bind(run, encoder.encode)
        _stop_if_stopped(control, engine.mesh)  # a stop while preparing takes effect before the first step
        out.result.chunks_total = len(run.plan.generated_chunks)
        out.result.chunks_done, out.result.frames_written = run.chunks_done, run.frames_done
        if out.save_tensors is not None and run.chunks_done:  # resumed: the earlier chunks' tensors first
            out.prepend_tensors(Path(out.save_tensors), run.tail, run.plan.offset, run.chunks_done, run.frames_done)
        bar = progress_bar(out.result.chunks_total, show_progress(progress) and engine.is_writer)
        bar.update(run.chunks_done)
        # The stop is taken in the step hook, before the next step: the last state saved then
        # matches the chunks in the mp4.
        with closing(chunks(engine, run, stop_aware(callback, control, engine.mesh), saver)) as stream:
            for chunk in stream:
                out.add(chunk)
                bar.update(1)
    except (StopRequested, KeyboardInterrupt) as stop:
        out.result.interrupted = True
        plain_interrupt = isinstance(stop, KeyboardInterrupt) and control.stop_signal is None
        out.result.stop_signal = signal.SIGINT if plain_interrupt else control.stop_signal
        if saver is not None:
            saver.save()
    except BaseException:
        out.abort()
        raise
    finally:
        bar.close()
    result = out.finish(engine.device)
    if engine.is_writer and (progress or result.interrupted):  # (the CLI prints it itself)
        (logger.warning if result.interrupted else logger.info)(result.summary())
    return result


class Generation:
    """A running ``MagiPipeline.stream`` request: iterate it for the chunks; ``set_prompt``
    steers it and ``stop`` ends it after the current step (see ``Control``)."""

    def __init__(
        self,
        engine: Engine,
        encoder: PromptEncoder,
        run: Run,
        callback: Callable[[StepInfo], None] | None,
        control: Control | None = None,
    ) -> None:
        self.control = control if control is not None else Control()
        self.control.bind(run, encoder.encode)
        self._run, self._plan = run, run.plan
        self._chunks = chunks(engine, run, stop_aware(callback, self.control))

    @property
    def plan(self) -> ChunkPlan:
        """The run's chunk plan (which chunks each step denoises, when each enters)."""
        return self._plan

    @property
    def chunk_num(self) -> int:
        """Chunks of the video (absolute indices 0 .. chunk_num - 1, v2v prefix chunks first)."""
        return self._plan.chunk_num

    @property
    def prompts(self) -> list[str]:
        """The distinct prompt texts of the run so far (steered ones appended)."""
        return list(self._run.captions.texts)

    def set_prompt(self, from_chunk: int, text: str, *, generated: bool = False) -> None:
        """``Control.set_prompt``: steer the chunks that have not entered the window yet."""
        self.control.set_prompt(from_chunk, text, generated=generated)

    def stop(self) -> None:
        """End the iteration after the current step (the chunks yielded so far stand)."""
        self.control.stop()

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> VideoChunk:
        self.control.apply()
        try:
            return next(self._chunks)
        except StopRequested:
            self._chunks.close()
            raise StopIteration from None

    def close(self) -> None:
        """Stop the generation (frees its noise); further iteration ends at once."""
        self._chunks.close()
