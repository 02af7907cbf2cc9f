"""The autoregressive denoise loop: walk the chunk plan, call the DiT, integrate, emit clean chunks.

``denoise(model, ...)`` is a free function over a model whose ``forward`` is one official DiT pass
(docs/ARCHITECTURE.md). It does no I/O and knows no ranks. Per step (shared/spec/sampling.md §5):

1. a chunk entering the window takes its slice of the initial noise;
2. the call input is the window's chunks (plus the clean chunk a − 1 on its K/V-refresh step),
   with the prefix latents written over the leading prefix frames (i2v / v2v);
3. base models run the 3 CFG passes, skipping a pass whose weight is exactly zero for every chunk
   it would serve (bit-identical result); distilled models run one pass, with a history-free copy
   of the first chunk appended once it is nearly clean (0.7 / 0.3 blend);
4. Euler in float32: x ← x + v·(ts[σ + 1] − ts[σ]);
5. a chunk whose schedule is complete is yielded at once; latents no longer needed are dropped.

Memory stays bounded: at most window_size + 1 chunk latents are held, and the KV cache keeps only
the chunks later calls read (``ChunkPlan.max_cached_chunks``). Only the clean K/V are written to
the cache (official code also writes rows of noisy chunks that are never read back).

Legend: C latent channels, cw latent frames per chunk, H W latent size, R chunks in a call,
U chunks in the unconditional pass, Lcap caption slots, Ccap caption width.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from magi.attention.masks import Pairs, chunk_query_pairs
from magi.config import MagiConfig
from magi.models.kv_cache import KVCache
from magi.sampling.chunks import ChunkPlan, Step, nearly_clean, step_times, token_pairs
from magi.sampling.guidance import (
    CfgScales,
    cfg_scales,
    combine_cfg,
    distill_blend,
    prev_chunks_scale,
)
from magi.sampling.schedule import distill_step_size, step_intervals, time_schedule

PROMPT, NULL = 0, 1  # rows of the caption table

NoiseSource = torch.Tensor | Callable[[int], torch.Tensor]


@dataclass(frozen=True)
class SamplerSettings:
    """Everything the loop needs from the config (runtime + engine sections).

    Build with ``SamplerSettings.from_config(cfg)``; fields keep the official names.
    """

    num_steps: int = 64
    window_size: int = 4
    chunk_width: int = 6
    noise2clean_kvrange: tuple[int, ...] = (5, 4, 3, 2)
    clean_chunk_kvrange: int = 1
    clean_t: float = 0.9999
    cfg_number: int = 3
    cfg_t_range: tuple[float, ...] = (0.0, 0.0217, 0.1, 0.3, 0.999)
    prev_chunk_scales: tuple[float, ...] = (1.5, 1.5, 1.5, 1.0, 1.0)
    text_scales: tuple[float, ...] = (7.5, 7.5, 7.5, 0.0, 0.0)
    distill: bool = False  # adds the step-size embedding; cfg_number 1 selects the one-pass path
    distill_nearly_clean_chunk_threshold: float = 0.3
    shortcut_mode: str = "8,16,16"
    prev_chunks_scale: float = 0.7

    @classmethod
    def from_config(cls, cfg: MagiConfig, prev_chunks_scale_value: float | None = None) -> SamplerSettings:
        """Settings of ``cfg``; the distill blend weight defaults to env ``prev_chunks_scale``."""
        rt, en = cfg.runtime, cfg.engine
        scale = prev_chunks_scale() if prev_chunks_scale_value is None else prev_chunks_scale_value
        return cls(
            num_steps=rt.num_steps,
            window_size=rt.window_size,
            chunk_width=rt.chunk_width,
            noise2clean_kvrange=tuple(rt.noise2clean_kvrange),
            clean_chunk_kvrange=rt.clean_chunk_kvrange,
            clean_t=rt.clean_t,
            cfg_number=rt.cfg_number,
            cfg_t_range=tuple(rt.cfg_t_range),
            prev_chunk_scales=tuple(rt.prev_chunk_scales),
            text_scales=tuple(rt.text_scales),
            distill=en.distill,
            distill_nearly_clean_chunk_threshold=en.distill_nearly_clean_chunk_threshold,
            shortcut_mode=en.shortcut_mode,
            prev_chunks_scale=scale,
        )

    def plan(self, chunk_num: int, prefix_frames: int = 0) -> ChunkPlan:
        """The chunk plan of a video of chunk_num chunks with prefix_frames prefix latents."""
        return ChunkPlan(
            chunk_num=chunk_num,
            num_steps=self.num_steps,
            window_size=self.window_size,
            chunk_width=self.chunk_width,
            prefix_frames=prefix_frames,
            noise2clean_kvrange=self.noise2clean_kvrange,
            clean_chunk_kvrange=self.clean_chunk_kvrange,
        )


class Captions(Protocol):
    """Anything that hands out per-chunk captions (row 0 prompt, row 1 null)."""

    def rows(self, kinds: Sequence[int], chunks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption of chunks[j] from row kinds[j]: ([R, Lcap, Ccap], [R, Lcap])."""
        ...


@dataclass(frozen=True)
class CaptionTable:
    """Per-chunk captions: y [2, chunk_num, Lcap, Ccap], mask [2, chunk_num, Lcap].

    Row 0 = prompt captions (special tokens included), row 1 = null captions
    (magi.conditioning.build_caption_table builds both).
    """

    y: torch.Tensor
    mask: torch.Tensor

    def rows(self, kinds: Sequence[int], chunks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption of chunk chunks[j] from row kinds[j]: ([R, Lcap, Ccap], [R, Lcap])."""
        k, c = list(kinds), list(chunks)
        return self.y[k, c], self.mask[k, c]


@dataclass
class _Loop:
    """Per-video state of one denoise run (kept small: the window and the schedule)."""

    model: nn.Module
    plan: ChunkPlan
    settings: SamplerSettings
    captions: Captions
    kv_cache: KVCache
    prefix: torch.Tensor | None
    ts: torch.Tensor
    intervals: list[int]
    tokens: int  # c, DiT tokens per chunk

    def distill_step(self, inner: int) -> float | None:
        if not self.settings.distill:
            return None
        return distill_step_size(self.settings.num_steps, self.intervals[inner])

    def call_input(self, window: dict[int, torch.Tensor], step: Step) -> torch.Tensor:
        """[1, C, R·cw, H, W] float32 call latents with the prefix frames written over them."""
        x = torch.cat([window[c] for c in step.call_chunks], dim=2)
        n = self.plan.inject_frames(step.slice_point, x.shape[2])
        if n > 0:
            f0 = step.slice_point * self.plan.chunk_width
            x[:, :, :n] = self.prefix[:, :, f0 : f0 + n].to(x)
        return x

    def run_pass(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        captions: tuple[torch.Tensor, torch.Tensor],
        text_dropped: bool,
        kv_range: Pairs,
        slice_point: int,
        write: int,
        inner: int,
        use_cache: bool = True,
    ) -> torch.Tensor:
        y, mask = captions
        flag = torch.tensor([text_dropped], device=x.device)
        return self.model(
            x,
            t.to(x.device),
            y.to(x.device),
            mask.to(x.device),
            flag,
            kv_range,  # host int pairs: the forward reads nothing back for them
            slice_point=slice_point,
            kv_cache=self.kv_cache if use_cache else None,
            cache_write_chunks=write,
            distill_step=self.distill_step(inner),
        )


def denoise(
    model: nn.Module,
    plan: ChunkPlan,
    settings: SamplerSettings,
    captions: Captions,
    noise: NoiseSource,
    kv_cache: KVCache | None = None,
    *,
    prefix: torch.Tensor | None = None,
    callback: Callable[[Step], None] | None = None,
    start_step: int = 0,
    window: dict[int, torch.Tensor] | None = None,
    on_window: Callable[[Step, dict[int, torch.Tensor]], None] | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Denoise a video chunk by chunk, yielding each chunk as soon as it is clean.

    Args:
        model: the DiT (``forward`` = one pass, docs/ARCHITECTURE.md).
        plan: the chunk plan (``settings.plan(chunk_num, prefix_frames)``).
        settings: sampler settings (``SamplerSettings.from_config(cfg)``).
        captions: per-chunk captions, e.g. ``CaptionTable(y, mask)`` from
            ``magi.conditioning.build_caption_table`` (row 0 prompt, row 1 null).
        noise: the initial noise [1, C, T, H, W] (chunk k = frames [k·cw, (k+1)·cw)), or a
            function chunk index -> [1, C, cw, H, W]; a chunk's noise is taken when it enters.
        kv_cache: cache for clean-chunk K/V; default a fresh ``KVCache(plan.max_cached_chunks())``.
        prefix: [1, C, P, H, W] prefix latents (VAE output × scale factor, dtype as encoded) for
            i2v / v2v; P must equal ``plan.prefix_frames``.
        callback: called with each ``Step`` after its Euler update.
        start_step: resume at this step (``Step.index``) with ``window``, the in-flight chunk
            latents after step start_step − 1 (``magi.state``). Bit-identical to the
            uninterrupted run: the prefix call is redone, and ``start_step`` must be a point
            where no K/V row written earlier is read later (``ChunkPlan.carried_cache_rows``).
        window: chunk -> [1, C, cw, H, W] float32 latents to resume from (with start_step).
        on_window: called after each step (its released chunks dropped) with the step and the
            live window, e.g. to save a resumable state; must not modify the tensors.

    Yields:
        (chunk index, clean latent [1, C, cw, H, W] float32) for chunks o .. chunk_num − 1, in order.
    """
    _check_inputs(plan, settings, prefix)
    cache = KVCache(plan.max_cached_chunks()) if kv_cache is None else kv_cache
    if cache.max_chunks < plan.max_cached_chunks():
        raise ValueError(
            f"kv_cache keeps {cache.max_chunks} chunks but this plan reads up to "
            f"{plan.max_cached_chunks()}: build it with KVCache(plan.max_cached_chunks())"
        )
    loop = _Loop(
        model,
        plan,
        settings,
        captions,
        cache,
        prefix,
        ts=time_schedule(settings.num_steps, settings.shortcut_mode),
        intervals=step_intervals(settings.num_steps, settings.shortcut_mode),
        tokens=0,
    )
    if plan.prefix_call() is not None:
        loop.tokens = _tokens_per_chunk(model, plan.chunk_width, prefix.shape)
        _extract_prefix(loop)
    window = _resume_window(plan, start_step, window)  # chunk -> [1, C, cw, H, W] float32
    if window and not loop.tokens:
        loop.tokens = _tokens_per_chunk(model, plan.chunk_width, next(iter(window.values())).shape)
    for step in plan.steps():
        if step.index < start_step:
            continue
        if step.entering is not None:
            window[step.entering] = _chunk_noise(noise, step.entering, plan.chunk_width)
            if not loop.tokens:
                loop.tokens = _tokens_per_chunk(model, plan.chunk_width, window[step.entering].shape)
        _advance(loop, window, step)
        if callback is not None:
            callback(step)
        if step.finished is not None:
            yield step.finished, window[step.finished].clone()
        for chunk in step.released:
            del window[chunk]
        if on_window is not None:
            on_window(step, window)


def _resume_window(plan: ChunkPlan, start: int, window: dict[int, torch.Tensor] | None) -> dict[int, torch.Tensor]:
    """The window to start from: empty at step 0, else the given latents, checked against the plan."""
    if start == 0 and not window:
        return {}
    if not 0 < start < plan.total_steps:
        raise ValueError(f"start_step must lie in [1, {plan.total_steps}) for this plan, got {start}")
    carried = plan.carried_cache_rows(start)
    if carried:
        raise ValueError(
            f"step {start} is not a resume point: later steps read the K/V rows of "
            f"chunk(s) {list(carried)} written before it; resume at a stage boundary"
        )
    first = next(s for s in plan.steps() if s.index == start)
    live = set(first.call_chunks) - ({first.entering} if first.entering is not None else set())
    got = set(window or {})
    if got != live:
        raise ValueError(f"a window resumed at step {start} must hold chunks {sorted(live)}, got {sorted(got)}")
    return {c: t.float().clone() for c, t in window.items()}


@torch.no_grad()
def _advance(loop: _Loop, window: dict[int, torch.Tensor], step: Step) -> None:
    """One sampler step: velocity of the window's denoising chunks, Euler update in place."""
    x = loop.call_input(window, step)
    times = step_times(step, loop.ts, loop.settings.clean_t)  # [R_call] float32
    if loop.settings.cfg_number == 1:  # distill / fp8 checkpoints: one pass
        v = _distill_velocity(loop, step, x, times)
    else:
        v = _cfg_velocity(loop, step, x, times)
    cw = loop.plan.chunk_width
    skip = 0 if step.extra is None else 1  # the extra clean chunk is not integrated
    for j, (chunk, sigma) in enumerate(zip(step.chunks, step.sigmas)):
        dt = loop.ts[sigma + 1] - loop.ts[sigma]  # float32
        x_c = x[:, :, (j + skip) * cw : (j + skip + 1) * cw]
        window[chunk] = x_c + v[j : j + 1].to(x_c) * dt.to(x_c.device)


def _cfg_velocity(loop: _Loop, step: Step, x: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """3-pass CFG velocity of the denoising chunks: [R, C, cw, H, W] float32."""
    n_extra = len(step.call_chunks) - len(step.chunks)
    scales = cfg_scales(times[n_extra:].tolist(), *_cfg_lists(loop.settings))
    kv = token_pairs(step.kv_ranges, loop.tokens)
    t = times[None]  # [1, R_call]
    write = n_extra  # only the refreshed clean chunk's K/V are kept
    null_kinds = [NULL] * len(step.call_chunks)
    text_kinds = [NULL] * n_extra + [PROMPT] * len(step.chunks)
    v_text = None
    if scales.needs_text:
        out = loop.run_pass(
            x, t, loop.captions.rows(text_kinds, step.call_chunks), False, kv, step.slice_point, 0, step.inner
        )
        v_text = _split_chunks(out, loop.plan.chunk_width)[n_extra:]
    out = loop.run_pass(
        x, t, loop.captions.rows(null_kinds, step.call_chunks), True, kv, step.slice_point, write, step.inner
    )
    v_prev = _split_chunks(out, loop.plan.chunk_width)[n_extra:]
    v_uncond = _uncond_pass(loop, step, x, times, scales, n_extra)
    return combine_cfg(scales, v_prev, v_text, v_uncond)


def _uncond_pass(
    loop: _Loop, step: Step, x: torch.Tensor, times: torch.Tensor, scales: CfgScales, n_extra: int
) -> dict[int, torch.Tensor]:
    """Unconditional pass: each chunk needing it alone as a batch item, no history, no cache."""
    needed = [j for j, need in enumerate(scales.needs_uncond.tolist()) if need]
    if not needed:
        return {}
    chunks = _split_chunks(x, loop.plan.chunk_width)[n_extra:]  # [R, C, cw, H, W]
    xb = chunks[needed]  # [U, C, cw, H, W]
    tb = times[n_extra:][needed][:, None]  # [U, 1]
    caps = loop.captions.rows([NULL] * len(needed), [step.chunks[j] for j in needed])
    kv = chunk_query_pairs(len(needed), loop.tokens)  # each segment sees only itself
    out = loop.run_pass(xb, tb, caps, True, kv, 0, 0, step.inner, use_cache=False)
    return {j: out[i] for i, j in enumerate(needed)}


def _distill_velocity(loop: _Loop, step: Step, x: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """Single-pass velocity of distilled models, with the nearly-clean refinement of chunk a."""
    cw = loop.plan.chunk_width
    n_call = len(step.call_chunks)
    n_extra = n_call - len(step.chunks)
    kinds = [NULL] * n_extra + [PROMPT] * len(step.chunks)
    chunks = list(step.call_chunks)
    kv = token_pairs(step.kv_ranges, loop.tokens)
    refine = nearly_clean(step, loop.ts, loop.settings.distill_nearly_clean_chunk_threshold)
    if refine:
        # Append a copy of the first denoising chunk (same latents, time, caption) that attends
        # only to itself; its key range sits right after the call's last key.
        first = x[:, :, n_extra * cw : (n_extra + 1) * cw]
        x = torch.cat([x, first], dim=2)
        times = torch.cat([times, times[n_extra : n_extra + 1]])
        kinds.append(PROMPT)
        chunks.append(step.chunks[0])
        end = step.slice_point + n_call
        kv = kv + token_pairs([(end, end + 1)], loop.tokens)
    out = loop.run_pass(
        x, times[None], loop.captions.rows(kinds, chunks), False, kv, step.slice_point, n_extra, step.inner
    )
    v = _split_chunks(out, cw)  # [R_call (+1), C, cw, H, W]
    v_den = v[n_extra:n_call].clone()
    if refine:
        v_den[0] = distill_blend(v_den[0], v[n_call], loop.settings.prev_chunks_scale)
    return v_den


@torch.no_grad()
def _extract_prefix(loop: _Loop) -> None:
    """One pass over the whole prefix chunks at clean_t to fill their K/V cache rows (v2v)."""
    call = loop.plan.prefix_call()
    o, cw = len(call.chunks), loop.plan.chunk_width
    x = loop.prefix[:, :, : o * cw]  # as encoded (bf16 from the VAE), like the official call
    t = torch.full((1, o), loop.settings.clean_t, dtype=torch.float32)
    caps = loop.captions.rows([NULL] * o, call.chunks)
    kv = token_pairs(call.kv_ranges, loop.tokens)
    # The cache-writing pass is the text-dropped one for base models (adaLN row 799) and the
    # single conditional pass for distilled models.
    loop.run_pass(x, t, caps, loop.settings.cfg_number == 3, kv, 0, o, 0)


def _split_chunks(v: torch.Tensor, cw: int) -> torch.Tensor:
    """[1, C, R·cw, H, W] -> [R, C, cw, H, W]; a batch-of-chunks [R, C, cw, H, W] passes through."""
    if v.shape[0] != 1 or v.shape[2] == cw:
        return v
    r = v.shape[2] // cw
    return v.reshape(v.shape[1], r, cw, *v.shape[3:]).transpose(0, 1).contiguous()


def _cfg_lists(s: SamplerSettings) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    return s.cfg_t_range, s.prev_chunk_scales, s.text_scales


def _chunk_noise(noise: NoiseSource, chunk: int, cw: int) -> torch.Tensor:
    if callable(noise):
        return noise(chunk).float().clone()
    return noise[:, :, chunk * cw : (chunk + 1) * cw].float().clone()


def _tokens_per_chunk(model: nn.Module, cw: int, latent_shape: torch.Size) -> int:
    """DiT tokens of one chunk of cw frames at the latent size of latent_shape [.., .., T, H, W]."""
    cfg = model.config
    h, w = latent_shape[3], latent_shape[4]
    return (cw // cfg.t_patch_size) * (h // cfg.patch_size) * (w // cfg.patch_size)


def _check_inputs(plan: ChunkPlan, settings: SamplerSettings, prefix: torch.Tensor | None) -> None:
    if plan.num_steps != settings.num_steps or plan.chunk_width != settings.chunk_width:
        raise ValueError("plan and settings disagree on num_steps / chunk_width: build the plan with settings.plan()")
    if settings.cfg_number not in (1, 3) or settings.distill and settings.cfg_number != 1:
        raise ValueError(
            f"cfg_number {settings.cfg_number} is not supported here: base models use 3 CFG passes, "
            "distilled / fp8 models 1"
        )
    got = 0 if prefix is None else prefix.shape[2]
    if got != plan.prefix_frames:
        raise ValueError(f"plan expects {plan.prefix_frames} prefix latent frames, got {got}")
