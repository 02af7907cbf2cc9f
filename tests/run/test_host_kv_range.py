"""The sampler hands the DiT its kv_range as host int pairs, so the eager forward reads nothing
back from the device for it (a tensor on the GPU meant one device-to-host sync per pass)."""

from __future__ import annotations

import dataclasses

import pytest

from magi.models.dit import DiT
from magi.pipeline import MagiPipeline
from magi.sampling.chunks import token_pairs, token_ranges

CW, TOKENS = 6, 96  # tiny config: latent frames per chunk, tokens per chunk


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, int]]:
    """(kv_range as the DiT received it, latent frames of the call) for every DiT pass."""
    seen: list[tuple[object, int]] = []
    forward = DiT.forward

    def recording(self, x, t, y, y_mask, text_dropped, kv_range, *args, **kwargs):
        seen.append((kv_range, x.shape[2]))
        return forward(self, x, t, y, y_mask, text_dropped, kv_range, *args, **kwargs)

    monkeypatch.setattr(DiT, "forward", recording)
    return seen


def _host_pairs(kv: object) -> bool:
    return isinstance(kv, tuple) and all(
        isinstance(p, tuple) and len(p) == 2 and all(type(v) is int for v in p) for p in kv
    )


def test_token_pairs_equal_the_tensor_ranges() -> None:
    ranges = [(0, 1), (0, 3), (2, 5), (7, 8)]
    assert token_pairs(ranges, TOKENS) == tuple(map(tuple, token_ranges(ranges, TOKENS).tolist()))


def test_base_sampler_passes_host_pairs(pipe: MagiPipeline, recorded: list) -> None:
    list(pipe.stream("t2v", "a dog", num_frames=48, seed=3))
    assert recorded and all(_host_pairs(kv) for kv, _ in recorded)
    # one key range per chunk of the call (3-pass CFG incl. the history-free unconditional pass)
    assert all(len(kv) * CW == frames or frames == CW for kv, frames in recorded)
    assert any(kv == ((0, TOKENS),) for kv, _ in recorded)  # a chunk alone: the unconditional pass


def test_distill_sampler_passes_host_pairs(pipe: MagiPipeline, recorded: list) -> None:
    base = pipe.config
    runtime = dataclasses.replace(base.runtime, num_steps=12, cfg_number=1)
    pipe.config = base.replace(runtime=runtime, engine=dataclasses.replace(base.engine, distill=True))
    try:
        list(pipe.stream("t2v", "a dog", num_frames=48, seed=3))
    finally:
        pipe.config = base
    assert recorded and all(_host_pairs(kv) for kv, _ in recorded)
    # the nearly-clean copy of the first chunk: one more range, right after the call's last key
    calls = [kv for kv, frames in recorded if len(kv) * CW == frames and len(kv) >= 2]
    assert any(kv[-1][1] - kv[-1][0] == TOKENS and kv[-1][0] >= max(hi for _, hi in kv[:-1]) for kv in calls)
