"""magi.budget: the sizes of a request from its config, and the refusal of what cannot fit."""

from __future__ import annotations

import dataclasses

import pytest

from magi import budget
from magi.config import load_config
from magi.pipeline import chunk_count
from tests.helpers import REPO_ROOT as REPO

GIB = 2**30


def _tiny(**runtime):
    cfg = load_config(REPO / "example/tiny/config.json")
    return cfg.replace(runtime=dataclasses.replace(cfg.runtime, **runtime)) if runtime else cfg


def test_estimate_sizes_the_tiny_t2v_request():
    est = budget.estimate(_tiny(), "t2v", 96, 0)  # 96 frames -> 24 latents -> 4 chunks of 6
    assert (est.chunks, est.generated_chunks, est.latent_channels) == (4, 4, 16)
    assert est.noise_bytes == 16 * 24 * 8 * 8 * 4  # float32 [1, 16, 24, 64/8, 64/8]
    assert est.chunk_latent_bytes == 16 * 6 * 8 * 8 * 4
    assert est.frames_per_chunk == 24 and est.chunk_frame_bytes == 3 * 24 * 64 * 64 * 4
    assert est.chunk_tokens == 6 * 4 * 4  # patch 2: 8 x 8 latent -> 4 x 4 tokens per frame
    assert est.chunk_activation_bytes == 96 * 512 * 4  # ffn_hidden_size 512 is the widest


def test_half_channel_vae_halves_the_latent_channels():
    cfg = _tiny()
    cfg = cfg.replace(model=dataclasses.replace(cfg.model, half_channel_vae=True))
    assert budget.estimate(cfg, "t2v", 96, 0).latent_channels == 8


@pytest.mark.parametrize("compat", ["magi", "official"])
@pytest.mark.parametrize("cw", [1, 2, 6])
@pytest.mark.parametrize("num_frames", [1, 5, 24, 97, 200])
def test_v2v_bounds_cover_every_prefix_length_and_are_reached(compat, cw, num_frames):
    p_max = 13
    est = budget.estimate(_tiny(chunk_width=cw), "v2v", num_frames, p_max, compat=compat)
    totals, generated = [], []
    for p in range(1, p_max + 1):
        n = chunk_count("v2v", num_frames, p, cw, compat=compat, tile_latents=3)
        totals.append(n)
        generated.append(n - p // cw)
    assert max(generated) == est.generated_chunks  # tight: some prefix reaches it
    assert max(totals) <= est.chunks <= max(totals) + 1


@pytest.mark.parametrize(("mode", "p", "chunks"), [("t2v", 0, 4), ("i2v", 1, 4)])
def test_t2v_i2v_counts_are_the_pipelines(mode, p, chunks):
    est = budget.estimate(_tiny(), mode, 96, p)
    assert est.chunks == chunk_count(mode, 96, p, 6, tile_latents=3) == chunks


def test_prefix_upper_bound_is_the_visible_prefix_in_latents():
    cfg = _tiny()  # noise2clean_kvrange max 5: 4 chunks x 6 latents x 4 frames visible
    assert [budget.prefix_frames_upper_bound(cfg, m) for m in ("t2v", "i2v", "v2v")] == [0, 1, 24]
    assert budget.prefix_frames_upper_bound(cfg, "v2v", compat="official") == 8  # its 32 frames


def test_noise_beyond_the_free_temporary_space_is_refused():
    est = budget.estimate(_tiny(), "t2v", 10_000_000, 0)  # 2.5M latent frames: 9.5 GiB of noise
    with pytest.raises(ValueError) as err:
        budget.check_budget(est, 2 * GIB, 64 * GIB, tmp_dir="/scratch", flag_prefix="--")
    assert str(err.value) == (
        "64x64 px, 10000000 frames: the initial noise (416667 chunks) needs 9.5 GiB in TMPDIR "
        "(/scratch: 2.0 GiB free); lower --num_frames or the size"
    )
    with pytest.raises(ValueError) as err:  # a long TMPDIR is elided: the line stays <= 200 characters
        budget.check_budget(est, 2 * GIB, 64 * GIB, tmp_dir="/scratch/" + "t" * 250, flag_prefix="--")
    assert "(/scratch/" not in str(err.value) and "ttt: 2.0 GiB free)" in str(err.value) and len(str(err.value)) < 200
    budget.check_budget(est, 10 * GIB, 64 * GIB)  # fits once there is room


def test_small_noise_stays_in_memory_and_is_checked_against_it():
    est = budget.estimate(_tiny(), "t2v", 96, 0, noise_spill_bytes=10**9)
    budget.check_budget(est, 0, 64 * GIB)  # under the spill threshold: no disk needed
    with pytest.raises(ValueError, match=r"needs 0\.0 GiB in memory"):
        budget.check_budget(
            dataclasses.replace(est, chunk_latent_bytes=0, chunk_frame_bytes=0, chunk_activation_bytes=0), 0, 1000
        )


def test_a_huge_frame_is_refused_for_its_chunk():
    est = budget.estimate(_tiny(video_size_h=100000), "t2v", 96, 0)
    with pytest.raises(ValueError) as err:
        budget.check_budget(est, 1000 * GIB, GIB)
    # 24 frames x 3 x 100000 x 64 float32 = 1.7 GiB decoded (6 x 6250 x 4 tokens x 512: 0.3 GiB)
    assert str(err.value) == (
        "64x100000 px, 96 frames: one chunk (6 latent, 24 video frames) needs 1.7 GiB for its decoded "
        "frames, over this machine's 1.0 GiB; lower the size or runtime_config.chunk_width"
    )
    budget.check_budget(est, 1000 * GIB, 2 * GIB)


def test_an_absurd_chunk_width_is_refused():
    est = budget.estimate(_tiny(chunk_width=1_000_000), "t2v", 96, 0)
    assert est.chunks == 1 and est.frames_per_chunk == 3_999_997  # 1e6 = 3 x 333333 + a lone tile frame
    with pytest.raises(
        ValueError,
        match=r"one chunk \(1000000 latent, 3999997 video frames\) needs 183\.1 GiB for its decoded frames",
    ):
        budget.check_budget(est, 10**15, 64 * GIB)


def test_unknown_machine_numbers_skip_the_checks():
    budget.check_budget(budget.estimate(_tiny(chunk_width=1_000_000), "t2v", 10**9, 0), None, None)


def test_check_request_uses_this_machines_numbers(monkeypatch):
    monkeypatch.setattr(budget, "ram_bytes", lambda: 64 * GIB)
    monkeypatch.setattr(budget, "free_tmp_bytes", lambda folder=None: GIB)
    assert budget.check_request(_tiny(), "v2v", 96, 24).generated_chunks == 5
    with pytest.raises(ValueError, match="the initial noise"):
        budget.check_request(_tiny(), "t2v", 10_000_000, 0)
    budget.check_request(_tiny(), "t2v", 10_000_000, 0, draw_noise=False)  # caller's noise


def test_machine_numbers_are_read():
    assert budget.ram_bytes() > 0 and budget.free_tmp_bytes() >= 0
