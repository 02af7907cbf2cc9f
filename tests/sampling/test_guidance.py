"""3-pass CFG weights and combination, distill blend."""

from __future__ import annotations

import pytest
import torch

from magi.sampling.guidance import (
    cfg_index,
    cfg_scales,
    combine_cfg,
    distill_blend,
    prev_chunks_scale,
)
from magi.sampling.schedule import time_schedule

T_RANGE = (0.0, 0.0217, 0.1, 0.3, 0.999)
PREV = (1.5, 1.5, 1.5, 1.0, 1.0)
TEXT = (7.5, 7.5, 7.5, 0.0, 0.0)


def test_step_function_with_breakpoint_eps() -> None:
    ts = time_schedule(32)
    assert cfg_index(0.0, T_RANGE) == 0
    assert cfg_index(float(ts[8]), T_RANGE) == 1  # 0.02174 >= 0.0217
    assert cfg_index(float(ts[16]), T_RANGE) == 2  # float32 0.1
    assert cfg_index(float(ts[24]), T_RANGE) == 3  # float32 0.3: last stage
    assert cfg_index(0.3 - 5e-8, T_RANGE) == 3  # within 1e-7 below the breakpoint
    assert cfg_index(0.3 - 2e-7, T_RANGE) == 2
    assert cfg_index(0.9999, T_RANGE) == 4
    # With ws = 4 the last stage (t >= 0.3) gets p = 1, s = 0
    sc = cfg_scales([float(ts[24]), float(ts[16]), float(ts[0])], T_RANGE, PREV, TEXT)
    assert sc.prev.tolist() == [1.0, 1.5, 1.5] and sc.text.tolist() == [0.0, 7.5, 7.5]
    assert sc.needs_uncond.tolist() == [False, True, True] and sc.needs_text


def _velocities(r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(r, 16, 2, 3, 3, generator=g) * 3 for _ in range(3))


def test_combination_order_is_bit_exact() -> None:
    u, c, f = _velocities(3)
    sc = cfg_scales([0.5, 0.05, 0.0], T_RANGE, PREV, TEXT)
    out = combine_cfg(sc, c, f, {j: u[j] for j in range(3)})
    p = sc.prev.view(-1, 1, 1, 1, 1)
    s = sc.text.view(-1, 1, 1, 1, 1)
    expect = (1 - p) * u + (p - s) * c + s * f
    assert torch.equal(out, expect)
    rearranged = u + p * (c - u) + s * (f - c)
    assert torch.allclose(out, rearranged, rtol=1e-5, atol=1e-5)
    assert not torch.equal(out, rearranged)  # the form matters at the bit level


def test_skipping_zero_weight_passes_changes_no_bit() -> None:
    u, c, f = _velocities(2)
    sc = cfg_scales([0.5, 0.05], T_RANGE, PREV, TEXT)  # chunk 0: p 1, s 0 (no uncond needed)
    full = combine_cfg(sc, c, f, {0: u[0], 1: u[1]})
    skipped = combine_cfg(sc, c, f, {1: u[1]})
    assert torch.equal(full, skipped)
    assert torch.equal(full[0], c[0])
    last = cfg_scales([0.5], T_RANGE, PREV, TEXT)  # only a last-stage chunk: one pass suffices
    assert not last.needs_text
    assert torch.equal(combine_cfg(last, c[:1], None, {}), c[:1])


def test_missing_needed_pass_is_an_error() -> None:
    u, c, f = _velocities(1)
    sc = cfg_scales([0.05], T_RANGE, PREV, TEXT)
    with pytest.raises(ValueError, match="uncond"):
        combine_cfg(sc, c, f, {})
    with pytest.raises(ValueError, match="text pass"):
        combine_cfg(sc, c, None, {0: u[0]})
    with pytest.raises(ValueError, match="equal lengths"):
        cfg_scales([0.1], T_RANGE, PREV[:-1], TEXT)


def test_distill_blend_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    a = torch.tensor([1.0, -2.0, 10.0])
    b = torch.tensor([3.0, 4.0, 0.0])
    assert torch.allclose(distill_blend(a, b, 0.7), torch.tensor([1.6, -0.2, 7.0]), atol=1e-6)
    monkeypatch.delenv("prev_chunks_scale", raising=False)
    assert prev_chunks_scale() == 0.7
    monkeypatch.setenv("prev_chunks_scale", "0.5")
    assert prev_chunks_scale() == 0.5
    monkeypatch.setenv("prev_chunks_scale", "abc")
    with pytest.raises(ValueError, match="prev_chunks_scale"):
        prev_chunks_scale()
