"""The chunk plan: which chunks each sampler step denoises, their schedule indices and kv ranges.

Pure data, no model and no tensors except the small helpers that turn a step into DiT inputs.
Notation (shared/spec/sampling.md §1, §4): cw = chunk_width latent frames per chunk, ws =
window_size chunks in flight, N = num_steps, dsps = N / ws steps per stage, P = prefix latent
frames, o = P // cw whole chunks covered by the prefix.

Each chunk is denoised in ws stages of dsps steps; chunk c enters one stage after chunk c − 1.
Outer iteration i runs over o .. chunk_num + ws − 2, with inner steps d = 0 .. dsps − 1. At
iteration i the window is chunks a .. b − 1, a = max(o, i − ws + 1), b = min(chunk_num, i + 1);
chunk c is at schedule index σ_c = (i − c)·dsps + d. At d == 0 with a > o the finished chunk a − 1
rides along once more at time clean_t ("extra clean chunk") so that its clean K/V reach the cache.

Key ranges are block-causal over chunks: chunk e sees chunks [e + 1 − K, e + 1), K taken from
noise2clean_kvrange by the quarter of its schedule, or clean_chunk_kvrange for a clean chunk.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from magi.sampling.schedule import step_intervals

PREFIX_FALLBACK_KVRANGE = 8  # official fallback when neither kv-range setting is given


@dataclass(frozen=True)
class Step:
    """One sampler step (one official DiT call); all chunk indices are absolute.

    Attributes:
        index: global step counter g = (i − o)·dsps + d.
        iteration: outer iteration i (the window position).
        inner: step d inside the current stage.
        chunks: denoising chunks a .. b − 1, oldest (most denoised) first.
        sigmas: schedule index σ of each denoising chunk (time ts[σ], after the step ts[σ + 1]).
        extra: the clean chunk a − 1 forwarded first to refresh its K/V, or None.
        kv_ranges: per call chunk (extra first), the visible chunks [lo, hi) in chunk units.
        entering: chunk whose denoising starts at this step (σ == 0), or None.
        finished: chunk that is clean after this step (σ + 1 == N), or None.
        released: chunks whose latents are no longer needed after this step.
    """

    index: int
    iteration: int
    inner: int
    chunks: tuple[int, ...]
    sigmas: tuple[int, ...]
    extra: int | None
    kv_ranges: tuple[tuple[int, int], ...]
    entering: int | None
    finished: int | None
    released: tuple[int, ...]

    @property
    def slice_point(self) -> int:
        """Absolute index of the call's first chunk (the extra clean chunk when present)."""
        return self.chunks[0] if self.extra is None else self.extra

    @property
    def call_chunks(self) -> tuple[int, ...]:
        """Chunks in the call, extra clean chunk first."""
        return self.chunks if self.extra is None else (self.extra, *self.chunks)


@dataclass(frozen=True)
class PrefixCall:
    """The one DiT call that writes the K/V of the whole prefix chunks 0 .. o − 1 (v2v)."""

    chunks: tuple[int, ...]
    kv_ranges: tuple[tuple[int, int], ...]

    @property
    def slice_point(self) -> int:
        return 0


@dataclass(frozen=True)
class ChunkPlan:
    """Window / stage schedule of the autoregressive sampler.

    Args:
        chunk_num: total chunks (prefix chunks included); latent length T = chunk_num · cw.
        num_steps: denoising steps per chunk (N), divisible by window_size.
        window_size: chunks denoised together (ws).
        chunk_width: latent frames per chunk (cw).
        prefix_frames: P, latent frames given by the prefix (0 t2v, 1 i2v, encoded length v2v).
        noise2clean_kvrange: visible chunks (self included) per part of a chunk's schedule;
            empty = every previous chunk is visible.
        clean_chunk_kvrange: visible chunks of a clean chunk (−1 = last of noise2clean_kvrange).
    """

    chunk_num: int
    num_steps: int
    window_size: int = 4
    chunk_width: int = 6
    prefix_frames: int = 0
    noise2clean_kvrange: tuple[int, ...] = (5, 4, 3, 2)
    clean_chunk_kvrange: int = 1

    def __post_init__(self) -> None:
        if self.chunk_num < 1 or self.chunk_width < 1 or self.window_size < 1:
            raise ValueError(
                f"chunk_num ({self.chunk_num}), chunk_width ({self.chunk_width}) and window_size "
                f"({self.window_size}) must all be >= 1"
            )
        if self.num_steps % self.window_size != 0:
            raise ValueError(
                f"num_steps ({self.num_steps}) must be divisible by window_size "
                f"({self.window_size}); otherwise no chunk ever finishes denoising"
            )
        ranges = self.noise2clean_kvrange
        if ranges and self.num_steps % len(ranges) != 0:
            raise ValueError(
                f"num_steps ({self.num_steps}) must be divisible by len(noise2clean_kvrange) ({len(ranges)})"
            )
        if not 0 <= self.prefix_frames < self.chunk_num * self.chunk_width:
            raise ValueError(
                f"prefix_frames ({self.prefix_frames}) must lie in [0, chunk_num * chunk_width = "
                f"{self.chunk_num * self.chunk_width}): nothing would be left to generate"
            )

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def offset(self) -> int:
        """o: chunks wholly covered by the prefix (never denoised, never emitted)."""
        return self.prefix_frames // self.chunk_width

    @property
    def steps_per_stage(self) -> int:
        return self.num_steps // self.window_size

    @property
    def num_iterations(self) -> int:
        return self.chunk_num + self.window_size - 1 - self.offset

    @property
    def total_steps(self) -> int:
        """Number of sampler steps (= official DiT calls, prefix call excluded)."""
        return self.steps_per_stage * self.num_iterations

    @property
    def generated_chunks(self) -> range:
        """Chunks the sampler denoises and emits, in emission order."""
        return range(self.offset, self.chunk_num)

    # ---- kv ranges ---------------------------------------------------------------------------
    def visible_chunks(self, sigma: int) -> int | None:
        """K for a chunk at schedule index sigma (sigma == N: clean); None = all previous."""
        ranges = self.noise2clean_kvrange
        if sigma >= self.num_steps:
            if self.clean_chunk_kvrange >= 0:
                return self.clean_chunk_kvrange
            return ranges[-1] if ranges else None
        if not ranges:
            return None
        return ranges[sigma // (self.num_steps // len(ranges))]

    def _kv_range(self, chunk: int, sigma: int) -> tuple[int, int]:
        k = self.visible_chunks(sigma)
        lo = 0 if k is None else max(0, chunk + 1 - k)
        return (lo, chunk + 1)

    def prefix_call(self) -> PrefixCall | None:
        """The prefix K/V extraction call (v2v with o > 0), or None."""
        if self.offset == 0:
            return None
        k = self.clean_chunk_kvrange
        if k < 0:
            k = self.noise2clean_kvrange[-1] if self.noise2clean_kvrange else PREFIX_FALLBACK_KVRANGE
        chunks = tuple(range(self.offset))
        return PrefixCall(chunks, tuple((max(0, c + 1 - k), c + 1) for c in chunks))

    # ---- the walk ----------------------------------------------------------------------------
    def steps(self) -> Iterator[Step]:
        """Every sampler step in order (lazy: the plan of a long video costs nothing)."""
        o, ws, dsps = self.offset, self.window_size, self.steps_per_stage
        for i in range(o, self.chunk_num + ws - 1):
            a, b = max(o, i - ws + 1), min(self.chunk_num, i + 1)
            for d in range(dsps):
                yield self._step(i, d, a, b)

    def _step(self, i: int, d: int, a: int, b: int) -> Step:
        dsps, n = self.steps_per_stage, self.num_steps
        chunks = tuple(range(a, b))
        sigmas = tuple((i - c) * dsps + d for c in chunks)
        extra = a - 1 if d == 0 and a > self.offset else None
        kv = [self._kv_range(c, s) for c, s in zip(chunks, sigmas)]
        if extra is not None:
            kv.insert(0, self._kv_range(extra, n))
        finished = a if sigmas[0] + 1 == n else None
        released = tuple(c for c in (extra, finished) if c is not None and self._last_use(c, extra))
        return Step(
            index=(i - self.offset) * dsps + d,
            iteration=i,
            inner=d,
            chunks=chunks,
            sigmas=sigmas,
            extra=extra,
            kv_ranges=tuple(kv),
            entering=b - 1 if sigmas[-1] == 0 else None,
            finished=finished,
            released=released,
        )

    def _last_use(self, chunk: int, extra: int | None) -> bool:
        # A finished chunk is needed once more for its K/V refresh, except the very last chunk.
        return chunk == extra or chunk == self.chunk_num - 1

    # ---- derived sizes -----------------------------------------------------------------------
    def max_cached_chunks(self) -> int:
        """Most chunks any call reads from the KV cache (the bound of a KVCache for this plan)."""
        if not self.noise2clean_kvrange:  # every previous chunk is visible: no bound
            return max(1, self.chunk_num - 1)
        # The pattern is periodic once the window is full and the longest kv range is covered,
        # so a short plan has every case.
        reach = max(*self.noise2clean_kvrange, self.clean_chunk_kvrange)
        short = min(self.chunk_num, self.offset + 2 * self.window_size + reach + 1)
        plan = ChunkPlan(
            short,
            self.num_steps,
            self.window_size,
            self.chunk_width,
            self.prefix_frames,
            self.noise2clean_kvrange,
            self.clean_chunk_kvrange,
        )
        need = 1
        for step in plan.steps():
            reads = step.slice_point - min(r[0] for r in step.kv_ranges)
            # A call that also writes (the K/V refresh) must not evict what it reads.
            need = max(need, reads + (1 if step.extra is not None and reads > 0 else 0))
        return need

    def carried_cache_rows(self, start: int) -> tuple[int, ...]:
        """Chunks whose K/V rows a run resumed at step ``start`` reads but would not write itself.

        Steps write the K/V of their extra clean chunk; the prefix call (redone on resume) writes
        the prefix chunks. A chunk read at or after ``start`` whose row was written by a step
        before ``start`` must be carried over; empty means ``start`` is a clean resume point
        (with the default kv ranges: every stage boundary).
        """
        written_at: dict[int, int] = {}
        carried: set[int] = set()
        for step in self.steps():
            if step.extra is not None:
                written_at[step.extra] = step.index
            if step.index < start:
                continue
            lo = min(r[0] for r in step.kv_ranges)
            for c in range(max(lo, self.offset), step.slice_point):
                if written_at.get(c, start) < start:
                    carried.add(c)
        return tuple(sorted(carried))

    def emit_range(self, chunk: int, skip_prefix: bool) -> tuple[int, int]:
        """Latent frames [lo, hi) of chunk (chunk-local) that go to the output video.

        skip_prefix=True (v2v): the prefix frames of the partially prefilled chunk are left out.
        skip_prefix=False (i2v, t2v): whole chunks, the image position included.
        """
        lo = max(0, self.prefix_frames - chunk * self.chunk_width) if skip_prefix else 0
        return (lo, self.chunk_width)

    def inject_frames(self, first_chunk: int, call_frames: int) -> int:
        """How many leading frames of a call starting at first_chunk are overwritten by the prefix."""
        f0 = first_chunk * self.chunk_width
        return max(0, min(self.prefix_frames - f0, call_frames))


# ---- helpers turning a step into DiT inputs ------------------------------------------------------
def token_ranges(chunk_ranges: Sequence[tuple[int, int]], tokens_per_chunk: int) -> torch.Tensor:
    """Chunk-unit ranges -> key-token ranges [R, 2] int64 (official kv_range convention)."""
    return torch.tensor(chunk_ranges, dtype=torch.int64).reshape(-1, 2) * tokens_per_chunk


def token_pairs(chunk_ranges: Sequence[tuple[int, int]], tokens_per_chunk: int) -> tuple[tuple[int, int], ...]:
    """``token_ranges`` as host int pairs: the DiT reads them with no device-to-host copy."""
    return tuple((int(lo) * tokens_per_chunk, int(hi) * tokens_per_chunk) for lo, hi in chunk_ranges)


def step_times(step: Step, ts: torch.Tensor, clean_t: float) -> torch.Tensor:
    """Per call chunk times [R] float32: clean_t for the extra chunk, then ts[σ] oldest first."""
    times = ts[list(step.sigmas)]
    if step.extra is None:
        return times
    return torch.cat([torch.tensor([clean_t], dtype=torch.float32), times])


def nearly_clean(step: Step, ts: torch.Tensor, threshold: float) -> bool:
    """distill_nearly_clean_chunk: first denoising chunk's time > threshold.

    The float32 time is widened to a Python float before the comparison, as the official code
    does: float32(0.3) = 0.3000000119 > 0.3, so the flag is already set at the first step of the
    last stage (a float32 comparison would say False there).
    """
    return float(ts[step.sigmas[0]].item()) > threshold


def official_call_kwargs(
    plan: ChunkPlan, step: Step, ts: torch.Tensor, threshold: float, shortcut_mode: str = "8,16,16"
) -> dict[str, Any]:
    """The keyword values the official sampler passes to its DiT dispatcher for this step.

    Used to check the plan against the recorded official calls; magi's DiT takes explicit inputs.
    """
    return {
        "chunk_width": plan.chunk_width,
        "fwd_extra_1st_chunk": step.extra is not None,
        "num_steps": plan.num_steps,
        "slice_point": step.slice_point,
        "range_num": step.slice_point + len(step.call_chunks),
        "denoising_range_num": len(step.call_chunks),
        "distill_nearly_clean_chunk": nearly_clean(step, ts, threshold),
        "distill_interval": official_interval(plan.num_steps, step.inner, shortcut_mode),
    }


def official_prefix_kwargs(plan: ChunkPlan, shortcut_mode: str = "8,16,16") -> dict[str, Any]:
    """Keyword values of the official prefix feature-extraction call."""
    o = plan.offset
    return {
        "chunk_width": plan.chunk_width,
        "fwd_extra_1st_chunk": False,
        "num_steps": plan.num_steps,
        "slice_point": 0,
        "range_num": o,
        "denoising_range_num": o,
        "extract_prefix_video_feature": True,
        "distill_interval": official_interval(plan.num_steps, 0, shortcut_mode),
    }


def official_interval(num_steps: int, inner: int, shortcut_mode: str) -> float | int:
    """distill_interval as recorded: float 1.0 unless num_steps % 3 == 0 (then an int)."""
    if num_steps % 3 != 0:
        return 1.0
    return step_intervals(num_steps, shortcut_mode)[inner]
