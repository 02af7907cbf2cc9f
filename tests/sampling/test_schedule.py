"""Time schedule: bit-exact against the official runs, published knot tables, intervals."""

from __future__ import annotations

import pytest
import torch

from magi.sampling.schedule import distill_step_size, shift_time, step_intervals, time_schedule
from tests.helpers import load_fixture

# case -> (num_steps, shortcut_mode)
CASES = {
    "t2v_4p5b_base": (8, "8,16,16"),
    "t2v_24b_base": (8, "8,16,16"),
    "v2v_4p5b_base": (8, "8,16,16"),
    "i2v_4p5b_distill": (12, "8,16,16"),
    "t2v_4p5b_distill_quant": (12, "16,16,8"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_schedule_bit_exact_with_official(reference_dir, case: str) -> None:
    tensors, _ = load_fixture(reference_dir, f"pipeline_{case}")
    steps, mode = CASES[case]
    ts = time_schedule(steps, mode)
    assert ts.dtype == torch.float32
    assert torch.equal(ts, tensors["transport.t_schedule"])  # bit-level, not approximate


@pytest.mark.parametrize("case", sorted(CASES))
def test_intervals_match_official(reference_dir, case: str) -> None:
    tensors, _ = load_fixture(reference_dir, f"pipeline_{case}")
    steps, mode = CASES[case]
    assert step_intervals(steps, mode) == [int(v) for v in tensors["transport.time_interval"]]


def test_published_knots_n32_and_n16() -> None:
    ts32 = time_schedule(32)
    table = {
        4: 0.00526,
        8: 0.02174,
        12: 0.05172,
        16: 0.1,
        20: 0.17606,
        24: 0.3,
        28: 0.52128,
        30: 0.70755,
        31: 0.83565,
        32: 1.0,
    }
    for k, v in table.items():
        assert abs(float(ts32[k]) - v) < 6e-6, k
    ts16 = [
        0,
        0.00131,
        0.00526,
        0.012,
        0.02174,
        0.03482,
        0.05172,
        0.07313,
        0.1,
        0.13366,
        0.17606,
        0.23004,
        0.3,
        0.39302,
        0.52128,
        0.70755,
        1,
    ]
    assert torch.allclose(time_schedule(16).double(), torch.tensor(ts16, dtype=torch.float64), atol=6e-6)


def test_float32_quirks_of_the_official_order() -> None:
    ts = time_schedule(16)
    assert float(ts[-1]) == pytest.approx(1.0000001192092896, abs=0)
    assert float(ts[8]) == pytest.approx(0.10000000894069672, abs=0)
    # The algebraically equal s^2 / (3 - 2 s^2) differs by a float32 ulp on some knot.
    s = torch.linspace(0, 1, 65, dtype=torch.float32)
    other = (s * s) / (3 - 2 * (s * s))
    assert not torch.equal(other, shift_time(s))
    assert torch.allclose(other, shift_time(s), rtol=1e-6, atol=0)


def test_shortcut_schedules() -> None:
    a = time_schedule(12, "8,16,16")
    b = time_schedule(12, "16,16,8")
    s_a = torch.tensor([0, 2, 3, 4, 6, 7, 8, 10, 11, 12, 14, 15, 16], dtype=torch.float32) / 16
    s_b = torch.tensor([0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, 16], dtype=torch.float32) / 16
    assert torch.equal(a, shift_time(s_a)) and torch.equal(b, shift_time(s_b))
    assert step_intervals(12, "8,16,16")[:3] == [2, 1, 1]
    assert step_intervals(12, "16,16,8")[:3] == [1, 1, 2]
    assert step_intervals(16) == [1] * 16


def test_distill_step_size() -> None:
    assert distill_step_size(16, 1) == 8.0
    assert distill_step_size(64, 1) == 32.0
    assert distill_step_size(12, 2) == 4.0
    assert distill_step_size(12, 1) == 8.0


def test_bad_steps() -> None:
    with pytest.raises(ValueError, match="num_steps"):
        time_schedule(0)
