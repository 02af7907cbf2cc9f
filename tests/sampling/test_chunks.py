"""The chunk plan: every official DiT call of the five reference runs, plus invariants."""

from __future__ import annotations

import itertools

import pytest
import torch

from magi.sampling.chunks import (
    ChunkPlan,
    nearly_clean,
    official_call_kwargs,
    official_prefix_kwargs,
    step_times,
    token_ranges,
)
from magi.sampling.schedule import time_schedule
from tests.helpers import load_fixture

PREFIX_FRAMES = {
    "t2v_4p5b_base": 0,
    "t2v_24b_base": 0,
    "v2v_4p5b_base": 8,
    "i2v_4p5b_distill": 1,
    "t2v_4p5b_distill_quant": 0,
}
TOKENS = 96  # tiny configs: 6 latent frames x 4 x 4 patches


def _plan_from_meta(meta: dict, prefix_frames: int) -> tuple[ChunkPlan, dict, dict]:
    rc = meta["config_content"]["runtime_config"]
    ec = meta["config_content"]["engine_config"]
    plan = ChunkPlan(
        chunk_num=meta["transport"]["chunk_num"],
        num_steps=rc["num_steps"],
        window_size=rc["window_size"],
        chunk_width=rc["chunk_width"],
        prefix_frames=prefix_frames,
        noise2clean_kvrange=tuple(rc["noise2clean_kvrange"]),
        clean_chunk_kvrange=rc["clean_chunk_kvrange"],
    )
    return plan, rc, ec


@pytest.mark.parametrize("case", sorted(PREFIX_FRAMES))
def test_plan_matches_every_official_call(reference_dir, case: str) -> None:
    _, meta = load_fixture(reference_dir, f"pipeline_{case}")
    plan, rc, ec = _plan_from_meta(meta, PREFIX_FRAMES[case])
    ts = time_schedule(plan.num_steps, ec["shortcut_mode"])
    calls = list(meta["dit_calls"])
    prefix = plan.prefix_call()
    if prefix is not None:
        call = calls.pop(0)
        assert official_prefix_kwargs(plan, ec["shortcut_mode"]) == call["kwargs"]
        assert token_ranges(prefix.kv_ranges, TOKENS).tolist() == call["kv_range"]
        assert call["timestep"] == pytest.approx([rc["clean_t"]] * len(prefix.chunks), abs=1e-7)
    steps = list(plan.steps())
    assert len(steps) == len(calls) == plan.total_steps
    assert meta["transport"]["total_forward_steps"] == plan.total_steps
    for step, call in zip(steps, calls):
        kwargs = official_call_kwargs(plan, step, ts, ec["distill_nearly_clean_chunk_threshold"], ec["shortcut_mode"])
        assert kwargs == call["kwargs"], (case, call["index"])
        # int vs float distill_interval is part of the official record too
        assert type(kwargs["distill_interval"]) is type(call["kwargs"]["distill_interval"])
        assert token_ranges(step.kv_ranges, TOKENS).tolist() == call["kv_range"], call["index"]
        times = step_times(step, ts, rc["clean_t"])
        assert torch.equal(times, torch.tensor(call["timestep"], dtype=torch.float32)), call["index"]


def test_nearly_clean_uses_python_float_comparison() -> None:
    plan = ChunkPlan(chunk_num=1, num_steps=8)
    ts = time_schedule(8)
    step = [s for s in plan.steps() if s.sigmas[0] == 6][0]  # first step of the last stage
    assert float(ts[6]) > 0.3 and not bool(ts[6] > torch.tensor(0.3, dtype=torch.float32))
    assert nearly_clean(step, ts, 0.3)


def test_t2v_example_windows() -> None:
    plan = ChunkPlan(chunk_num=4, num_steps=4, window_size=4)
    windows = [s.chunks for s in plan.steps()]
    assert windows == [(0,), (0, 1), (0, 1, 2), (0, 1, 2, 3), (1, 2, 3), (2, 3), (3,)]
    assert [s.finished for s in plan.steps()] == [None, None, None, 0, 1, 2, 3]


def _simulate(plan: ChunkPlan) -> None:
    """Walk the plan checking every invariant the sampler relies on."""
    n, o = plan.num_steps, plan.offset
    progress: dict[int, int] = {}
    finished, released, refreshed, entered = [], [], [], []
    cache: list[int] = list(range(o))[-plan.max_cached_chunks() :] if o else []
    for g, step in enumerate(plan.steps()):
        assert step.index == g
        assert 1 <= len(step.chunks) <= plan.window_size
        assert list(step.chunks) == list(range(step.chunks[0], step.chunks[-1] + 1))
        for c, sigma in zip(step.chunks, step.sigmas):
            assert progress.get(c, 0) == sigma  # each chunk advances one knot per step
            progress[c] = sigma + 1
        assert step.sigmas == tuple(sorted(step.sigmas, reverse=True))  # oldest first
        if step.entering is not None:
            entered.append(step.entering)
        # kv ranges: causal, include the chunk itself, reads only chunks still in the cache
        for chunk, (lo, hi) in zip(step.call_chunks, step.kv_ranges):
            assert hi == chunk + 1 and 0 <= lo <= chunk
            for read in range(lo, step.slice_point):
                assert read in cache, (plan, step, read, cache)
        if step.extra is not None:
            assert step.extra == step.chunks[0] - 1 and step.inner == 0
            assert step.extra in finished
            lo = step.extra + 1 - plan.visible_chunks(plan.num_steps)
            assert step.kv_ranges[0] == (max(0, lo), step.extra + 1)
            refreshed.append(step.extra)
            cache = (cache + [step.extra])[-plan.max_cached_chunks() :]
        if step.finished is not None:
            assert progress[step.finished] == n
            finished.append(step.finished)
        released.extend(step.released)
    generated = list(plan.generated_chunks)
    assert finished == generated  # every chunk ends clean exactly once, in order
    assert entered == generated
    assert sorted(released) == generated  # every chunk latent is dropped exactly once
    assert refreshed == generated[:-1]  # every clean chunk but the last refreshes its K/V once
    assert all(progress[c] == n for c in generated)
    assert plan.total_steps == plan.steps_per_stage * (plan.chunk_num + plan.window_size - 1 - o)


@pytest.mark.parametrize(
    "chunks,window,steps,prefix",
    [
        (c, w, s, p)
        for c, w, s, p in itertools.product((1, 2, 3, 5, 9), (1, 2, 4), (4, 8, 12), (0, 1, 6, 8, 13))
        if s % w == 0 and p < c * 6
    ],
)
def test_plan_invariants(chunks: int, window: int, steps: int, prefix: int) -> None:
    ranges = (5, 4, 3, 2) if steps % 4 == 0 else (3, 2)
    _simulate(ChunkPlan(chunks, steps, window, 6, prefix, ranges, 1))


def test_plan_invariants_other_kv_settings() -> None:
    _simulate(ChunkPlan(7, 8, 4, 6, 0, (8, 4), -1))
    _simulate(ChunkPlan(6, 8, 2, 4, 9, (), 1))
    assert ChunkPlan(12, 8, 4, 6, 0, (), 1).max_cached_chunks() == 11


def test_cache_bound_is_small_and_constant() -> None:
    short = ChunkPlan(4, 8).max_cached_chunks()
    assert short == ChunkPlan(400, 8).max_cached_chunks() == 1
    # a long v2v prefix: the first generated chunk sees 4 prefix chunks
    assert ChunkPlan(12, 8, prefix_frames=36).max_cached_chunks() == 4


def test_emit_and_inject_ranges() -> None:
    v2v = ChunkPlan(6, 8, prefix_frames=8)
    assert v2v.offset == 1 and list(v2v.generated_chunks) == [1, 2, 3, 4, 5]
    assert v2v.emit_range(1, skip_prefix=True) == (2, 6)
    assert v2v.emit_range(2, skip_prefix=True) == (0, 6)
    assert v2v.inject_frames(1, 30) == 2 and v2v.inject_frames(2, 24) == 0
    i2v = ChunkPlan(4, 12, prefix_frames=1)
    assert i2v.emit_range(0, skip_prefix=False) == (0, 6)
    assert i2v.inject_frames(0, 24) == 1
    assert i2v.prefix_call() is None and v2v.prefix_call().kv_ranges == ((0, 1),)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"chunk_num": 2, "num_steps": 6, "window_size": 4}, "divisible by window_size"),
        ({"chunk_num": 2, "num_steps": 6, "window_size": 2}, "noise2clean_kvrange"),
        ({"chunk_num": 1, "num_steps": 8, "prefix_frames": 6}, "prefix_frames"),
        ({"chunk_num": 0, "num_steps": 8}, "chunk_num"),
    ],
)
def test_bad_plans_fail_with_clear_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ChunkPlan(**kwargs)
