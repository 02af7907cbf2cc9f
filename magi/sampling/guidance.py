"""Classifier-free guidance of MAGI-1: 3-pass CFG for base models, nearly-clean blend for distill.

Base models (cfg_number 3) run three passes per step (shared/spec/sampling.md §6):
  1. "text":  prompt captions, history from the KV cache,
  2. "prev":  null captions, history (this pass writes the cache),
  3. "uncond": null captions, no history (each chunk alone).
Per chunk, (p, s) = (prev_chunk_scales[j], text_scales[j]) with j from a step function over
cfg_t_range, and v = (1 − p)·v_uncond + (p − s)·v_prev + s·v_text, evaluated left to right in
float32 in exactly that form (the rearranged form differs by ~1e-7 relative).

A term whose weight is exactly zero is skipped: 0·u + x == x in float32 for finite u, so leaving
the pass out changes no bit of the result.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

CFG_BREAKPOINT_EPS = 1e-7
PREV_CHUNKS_SCALE_ENV = "prev_chunks_scale"
DEFAULT_PREV_CHUNKS_SCALE = 0.7


@dataclass(frozen=True)
class CfgScales:
    """Per-chunk CFG weights of one step: p = prev_chunk_scale, s = text_scale (float32 [R])."""

    prev: torch.Tensor
    text: torch.Tensor

    @property
    def needs_text(self) -> bool:
        """Whether any chunk gives the text pass a non-zero weight s."""
        return bool((self.text != 0).any())

    @property
    def needs_uncond(self) -> torch.Tensor:
        """Bool [R]: chunks whose unconditional weight 1 − p is non-zero."""
        return (1 - self.prev) != 0


def cfg_index(t: float, cfg_t_range: Sequence[float]) -> int:
    """j = max{i : cfg_t_range[i] − 1e-7 < t} (a step function, not an interpolation).

    Args:
        t: chunk time (float32 value widened to a Python float).
        cfg_t_range: ascending breakpoints, first one <= 0.
    """
    hits = [i for i, edge in enumerate(cfg_t_range) if edge - CFG_BREAKPOINT_EPS < t]
    if not hits:
        raise ValueError(f"time {t} lies below cfg_t_range[0] = {cfg_t_range[0]}")
    return hits[-1]


def cfg_scales(
    times: Sequence[float],
    cfg_t_range: Sequence[float],
    prev_chunk_scales: Sequence[float],
    text_scales: Sequence[float],
) -> CfgScales:
    """Look up (p, s) for each denoising chunk of a step from its time.

    Args:
        times: per denoising chunk time (0 noise .. 1 clean).
        cfg_t_range, prev_chunk_scales, text_scales: the runtime config lists (equal lengths).
    """
    if not len(cfg_t_range) == len(prev_chunk_scales) == len(text_scales):
        raise ValueError(
            "cfg_t_range, prev_chunk_scales and text_scales must have equal lengths, got "
            f"{len(cfg_t_range)}, {len(prev_chunk_scales)}, {len(text_scales)}"
        )
    idx = [cfg_index(float(t), cfg_t_range) for t in times]
    prev = torch.tensor([prev_chunk_scales[j] for j in idx], dtype=torch.float32)
    text = torch.tensor([text_scales[j] for j in idx], dtype=torch.float32)
    return CfgScales(prev, text)


def combine_cfg(
    scales: CfgScales,
    v_prev: torch.Tensor,
    v_text: torch.Tensor | None,
    v_uncond: dict[int, torch.Tensor],
) -> torch.Tensor:
    """v = (1 − p)·v_uncond + (p − s)·v_prev + s·v_text per chunk, float32, left to right.

    Args:
        scales: per-chunk (p, s), R chunks.
        v_prev: [R, C, cw, H, W] velocity of the text-dropped pass with history.
        v_text: [R, C, cw, H, W] velocity of the text pass, or None when every s is 0.
        v_uncond: chunk position -> [C, cw, H, W] unconditional velocity; chunks with 1 − p == 0
            may be absent.

    Returns:
        [R, C, cw, H, W] float32 guided velocity.
    """
    out = []
    for j in range(v_prev.shape[0]):
        p, s = scales.prev[j], scales.text[j]
        acc = None
        if (1 - p) != 0:
            if j not in v_uncond:
                raise ValueError(f"chunk {j} has unconditional weight {1 - p} but no uncond velocity")
            acc = (1 - p) * v_uncond[j]
        term = (p - s) * v_prev[j]
        acc = term if acc is None else acc + term
        if s != 0:
            if v_text is None:
                raise ValueError(f"chunk {j} has text weight {s} but the text pass was skipped")
            acc = acc + s * v_text[j]
        out.append(acc)
    return torch.stack(out)


def prev_chunks_scale() -> float:
    """Distill nearly-clean blend weight: env ``prev_chunks_scale`` (default 0.7)."""
    raw = os.environ.get(PREV_CHUNKS_SCALE_ENV)
    if raw is None or raw == "":
        return DEFAULT_PREV_CHUNKS_SCALE
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"env {PREV_CHUNKS_SCALE_ENV}={raw!r} is not a number (use e.g. 0.7)") from None


def distill_blend(v_first: torch.Tensor, v_alone: torch.Tensor, scale: float) -> torch.Tensor:
    """Nearly-clean refinement of distilled models: scale·v_first + (1 − scale)·v_alone.

    Args:
        v_first: velocity of the first denoising chunk computed with history.
        v_alone: velocity of its history-free copy (same latents, time and caption).
        scale: prev_chunks_scale (0.7 by default).
    """
    return v_first * scale + v_alone * (1 - scale)
