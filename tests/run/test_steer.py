"""Steering: ``Generation.set_prompt`` changes the prompt of chunks not yet in the window."""

from __future__ import annotations

import threading

import pytest
import torch

from magi.pipeline import MagiPipeline, StepInfo
from tests.helpers import CHUNK

FRAMES = 6 * CHUNK  # six chunks; window 4, two steps per stage: chunk c enters at step 2c


def _latents(chunks) -> list[torch.Tensor]:
    return [c.latent for c in chunks]


def _entering(pipe: MagiPipeline) -> dict[int, int]:
    """Step index at which each chunk enters the window in this test's plan."""
    plan = pipe.stream("t2v", "calm", num_frames=FRAMES).plan
    return {s.entering: s.index for s in plan.steps() if s.entering is not None}


@pytest.fixture(scope="module")
def reference(pipe: MagiPipeline):
    done: dict[tuple[str, ...], list[torch.Tensor]] = {}

    def run(timeline: list[str]) -> list[torch.Tensor]:
        key = tuple(timeline)
        if key not in done:
            done[key] = _latents(pipe.stream("t2v", timeline, num_frames=FRAMES, seed=7))
        return done[key]

    return run


def test_set_prompt_from_the_step_callback(pipe: MagiPipeline, reference) -> None:
    enters = _entering(pipe)
    seen: list[int] = []

    def steer(info: StepInfo) -> None:
        if max(info.chunks) == 2 and not seen:  # chunks 0..2 in the window, 3 enters next
            seen.append(info.step)
            handle.set_prompt(3, "a storm")

    handle = pipe.stream("t2v", "calm", num_frames=FRAMES, seed=7, callback=steer)
    got = _latents(handle)
    assert seen and enters[3] > seen[0]  # chunk 3 had not entered when the edit was made
    assert len(got) == 6
    want = reference(["calm"] * 3 + ["a storm"] * 3)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert not torch.equal(got[-1], reference(["calm"])[-1])  # the edit did something


def test_already_entered_chunks_keep_their_prompt(pipe: MagiPipeline, reference) -> None:
    enters = _entering(pipe)
    handle = pipe.stream("t2v", "calm", num_frames=FRAMES, seed=7)
    got = []
    for chunk in handle:
        got.append(chunk.latent)
        if chunk.index == 1:  # chunk 1 is clean at step 9: chunks 0..4 have entered, 5 has not
            assert enters[4] < 9 < enters[5]
            handle.set_prompt(3, "a storm")  # applies from chunk 5
    want = reference(["calm"] * 5 + ["a storm"])
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_set_prompt_from_another_thread(pipe: MagiPipeline, reference) -> None:
    enters = _entering(pipe)
    asked, done = threading.Event(), threading.Event()

    def steer(info: StepInfo) -> None:
        if max(info.chunks) == 3 and not asked.is_set():  # chunk 4 enters next
            assert info.step < enters[4]
            asked.set()
            assert done.wait(60)

    handle = pipe.stream("t2v", "calm", num_frames=FRAMES, seed=7, callback=steer)

    def server() -> None:
        asked.wait(60)
        handle.set_prompt(4, "a storm")
        done.set()

    thread = threading.Thread(target=server)
    thread.start()
    got = _latents(handle)
    thread.join()
    want = reference(["calm"] * 4 + ["a storm"] * 2)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_set_prompt_before_iterating_and_back_again(pipe: MagiPipeline, reference) -> None:
    handle = pipe.stream("t2v", "calm", num_frames=FRAMES, seed=7)
    handle.set_prompt(0, "a storm")
    handle.set_prompt(2, "calm")  # a text already in the timeline is not encoded again
    got = _latents(handle)
    want = reference(["a storm"] * 2 + ["calm"])
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert handle._run.captions.texts == ["calm", "a storm"]


def test_bad_calls(pipe: MagiPipeline) -> None:
    handle = pipe.stream("t2v", "calm", num_frames=FRAMES, seed=7)
    for from_chunk, text in [(6, "x"), (-1, "x"), (1.5, "x"), (True, "x"), (1, ""), (1, "  "), (1, None), (1, ["x"])]:
        with pytest.raises(ValueError) as info:
            handle.set_prompt(from_chunk, text)
        assert "\n" not in str(info.value)
    handle.close()
    assert list(handle) == []
