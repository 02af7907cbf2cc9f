"""Time schedule of the MAGI-1 sampler: knots, shortcut schedule, distill step intervals.

Time runs from 0 (pure noise) to 1 (clean). The schedule is a squared linspace pushed through the
SD3-style shift with shift 3 (shared/spec/sampling.md §3). Bit-level agreement with the official
sampler needs the exact float32 order of operations, so everything here is evaluated in float32 in
one fixed order. All functions are pure and cheap.
"""

from __future__ import annotations

import torch

SHIFT = 3.0
SHORTCUT_STEPS = 12  # the only num_steps that uses the distill shortcut schedule
SHORTCUT_MODES = ("8,16,16", "16,16,8")


def _shortcut_knots(shortcut_mode: str) -> list[float]:
    # Each quarter of s in [0, 1] is split into three steps: 1/8, 1/16, 1/16 ("8,16,16") or
    # 1/16, 1/16, 1/8 ("16,16,8"). The concatenation has 15 values; the first 13 are the knots.
    base = (0.0, 1 / 16, 2 / 16) if shortcut_mode == "16,16,8" else (0.0, 2 / 16, 3 / 16)
    knots = [quarter + b for quarter in (0.0, 0.25, 0.5, 0.75, 1.0) for b in base]
    return knots[: SHORTCUT_STEPS + 1]


def shift_time(s: torch.Tensor, shift: float = SHIFT) -> torch.Tensor:
    """Square and shift raw knots: ts = (1/shift)·u / (1 + (1/shift − 1)·u), u = s².

    Evaluated in s's dtype in exactly this form; the algebraically equal s²/(3 − 2s²) differs by
    one float32 step on several knots.
    """
    u = s * s
    inv = 1.0 / shift
    return inv * u / (1 + (inv - 1) * u)


def time_schedule(num_steps: int, shortcut_mode: str = "8,16,16") -> torch.Tensor:
    """The num_steps + 1 time knots (float32, 0 = noise ... ~1 = clean).

    Args:
        num_steps: number of denoising steps N of one chunk.
        shortcut_mode: "8,16,16" or "16,16,8"; only used when num_steps == 12.

    Returns:
        float32 tensor [N + 1]; the last knot is 1.0000001 (float32 rounding, as official).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps == SHORTCUT_STEPS:
        s = torch.tensor(_shortcut_knots(shortcut_mode), dtype=torch.float32)
    else:
        s = torch.linspace(0, 1, num_steps + 1, dtype=torch.float32)
    return shift_time(s)


def step_intervals(num_steps: int, shortcut_mode: str = "8,16,16") -> list[int]:
    """Per-step interval list of the distill shortcut schedule (length num_steps).

    [2, 1, 1] repeated ([1, 1, 2] for "16,16,8") when num_steps % 3 == 0, else all 1. The value of
    a call is intervals[d] with d the step index inside the current stage.
    """
    if num_steps % 3 != 0:
        return [1] * num_steps
    pattern = [1, 1, 2] if shortcut_mode == "16,16,8" else [2, 1, 1]
    return pattern * (num_steps // 3)


def distill_step_size(num_steps: int, interval: int) -> float:
    """Value d fed to the distill step-size embedding (shared/spec/dit.md §5.1).

    d = 4 / interval · 2 for the 12-step shortcut schedule, else num_steps / 4 · 2 (= N / 2).
    """
    if num_steps == SHORTCUT_STEPS:
        return 4 / interval * 2
    return num_steps / 4 * 2
