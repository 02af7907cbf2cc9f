"""CP / PP / CP x PP DiT passes equal the single-process model (tiny random DiT, fp32, gloo).

The tiny model is saved as an official-layout checkpoint so each pipeline stage really loads only
its own layers through ``load_dit(..., layers=...)``. Every rank runs the same calls (with KV-cache
reads and writes, uneven sequence splits, batch 2) and must reproduce the single-process
velocities to rel L2 <= 1e-5.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from magi.config import MagiConfig, ModelConfig
from magi.models.dit import DiT
from magi.models.kv_cache import KVCache
from tests.distributed.ranks import assert_all_ok, engine, run_ranks, single_thread
from tests.helpers import rel_l2

TOL = 1e-5


def tiny_config(ckpt: Path, groups: int = 2, cp: int = 1, pp: int = 1) -> MagiConfig:
    model = ModelConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=groups,
        kv_channels=16,
        params_dtype="torch.float32",
        caption_channels=32,
        caption_max_length=16,
    )
    base = MagiConfig()
    runtime = dataclasses.replace(base.runtime, load=str(ckpt))
    strategy = "cp_ulysses" if cp > 1 else "none"
    return MagiConfig(model=model, runtime=runtime, engine=engine(cp_size=cp, pp_size=pp, cp_strategy=strategy))


def write_checkpoint(cfg: MagiConfig, seed: int = 0) -> None:
    """Random weights (all non-trivial) in the official single-file layout."""
    torch.manual_seed(seed)
    model = DiT(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = Path(cfg.runtime.load) / "inference_weight"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))


def _caption(segments: int, lcap: int, ccap: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randn(segments, lcap, ccap, generator=gen)
    mask = torch.zeros(segments, lcap)
    for i in range(segments):
        mask[i, : 3 + 2 * i] = 1
    return y, mask


def dit_calls(model: torch.nn.Module, cfg: MagiConfig, cache: KVCache | None = None) -> list[torch.Tensor]:
    """A sequence of passes: cache writes, cache reads, batch 2 with and without history."""
    gen = torch.Generator().manual_seed(1)
    lcap, ccap = cfg.model.caption_max_length, cfg.model.caption_channels
    c = 9  # tokens per chunk: one latent frame of 6x6 -> 3x3 patches
    cache = KVCache(max_chunks=8) if cache is None else cache
    outs = []

    def call(chunks: int, batch: int, slice_point: int, kv_range: list[list[int]], write: int, dropped: bool):
        x = torch.randn(batch, 16, chunks, 6, 6, generator=gen)
        t = torch.rand(batch, chunks, generator=gen)
        y, mask = _caption(batch * chunks, lcap, ccap, gen)
        flag = torch.tensor([dropped] * batch)
        kv = torch.tensor(kv_range)
        with torch.no_grad():
            v = model(x, t, y, mask, flag, kv, slice_point=slice_point, kv_cache=cache, cache_write_chunks=write)
        outs.append(v)

    # Chunks 0..2 (27 tokens: uneven split), block-causal, written to the cache.
    call(3, 1, 0, [[0, c], [0, 2 * c], [c, 3 * c]], write=3, dropped=False)
    # Chunks 3..4 read chunks 1..2 from the cache and write themselves.
    call(2, 1, 3, [[c, 4 * c], [2 * c, 5 * c]], write=2, dropped=True)
    # Batch 2 with history: item 0 reads the cache, item 1 sees only its own chunk.
    s = 2 * c
    call(2, 2, 5, [[3 * c, 6 * c], [4 * c, 7 * c], [5 * c + s, 6 * c + s], [6 * c + s, 7 * c + s]], 0, False)
    # Unconditional-style: chunks as batch items, no cache.
    call(1, 3, 0, [[0, c], [c, 2 * c], [2 * c, 3 * c]], write=0, dropped=True)
    return outs


def denoise_runs(model: torch.nn.Module, cfg: MagiConfig) -> dict[str, list[torch.Tensor]]:
    """The whole sampler loop: 3-pass CFG t2v, v2v with a partial prefix chunk, distilled t2v."""
    from magi.sampling.denoise import CaptionTable, SamplerSettings, denoise

    # 3 frames x 9 tokens = 27 tokens per chunk: CP splits are uneven and cut through chunks.
    settings = SamplerSettings(num_steps=4, window_size=2, chunk_width=3)
    gen = torch.Generator().manual_seed(2)
    chunks, lcap, ccap = 3, cfg.model.caption_max_length, cfg.model.caption_channels
    y = torch.randn(2, chunks, lcap, ccap, generator=gen)
    mask = torch.zeros(2, chunks, lcap)
    mask[0, :, :6], mask[1, :, :3] = 1, 1
    noise = torch.randn(1, 16, chunks * 3, 6, 6, generator=gen)
    prefix = torch.randn(1, 16, 4, 6, 6, generator=gen)  # chunk 0 + 1 frame of chunk 1
    captions = CaptionTable(y, mask)
    # Distilled sampling: one pass per step, plus the appended nearly-clean copy of chunk 0.
    distill = dataclasses.replace(settings, distill=True, cfg_number=1)
    runs = {}
    for name, sampler, pre in (("t2v", settings, None), ("v2v", settings, prefix), ("t2v_distill", distill, None)):
        plan = sampler.plan(chunks, 0 if pre is None else pre.shape[2])
        runs[name] = [v for _, v in denoise(model, plan, sampler, captions, noise, prefix=pre)]
    return runs


def _layout_rank(rank: int, world: int, cfgs: list[MagiConfig], out: str) -> None:
    from magi.distributed import fail_fast, init_from_env, shutdown
    from magi.distributed.parallelize import build_parallel_dit

    mesh = init_from_env(cfgs[0].engine)
    with fail_fast():
        results = {}
        for i, cfg in enumerate(cfgs):
            model = build_parallel_dit(cfg, mesh)
            cache = KVCache(max_chunks=8)
            results[f"passes{i}"] = dit_calls(model, cfg, cache)
            # Each rank caches only its own K/V heads (repeated ones when cp > G).
            heads = max(1, cfg.model.num_query_groups // mesh.cp_size)
            assert cache.read(0, 0, 5, "cpu").shape[1:] == (heads, 2 * cfg.model.kv_channels)
            if i == 0:
                results.update(denoise_runs(model, cfg))
        if world == 4:  # the same ranks regrouped as cp 4 > G 2: every K/V head goes to 2 ranks
            cp4 = cfgs[0].replace(engine=engine(cp_size=4, cp_strategy="cp_ulysses"))
            model = build_parallel_dit(cp4, init_from_env(cp4.engine))
            results["cp4_passes0"] = dit_calls(model, cp4)
        torch.save(results, f"{out}.rank{rank}.pt")
    shutdown()


def _reference(cfgs: list[MagiConfig]) -> dict[str, list[torch.Tensor]]:
    from magi.checkpoint import load_dit

    results = {}
    with single_thread():
        for i, cfg in enumerate(cfgs):
            model = load_dit(cfg, "cpu")
            results[f"passes{i}"] = dit_calls(model, cfg)
            if i == 0:
                results.update(denoise_runs(model, cfg))
    return results


# layout -> (cp, pp, K/V groups of each model run in that launch). cp 2 also runs a G = 1 model
# and the 4-rank launch also runs cp 4 with G = 2 (K/V heads repeated across the CP ranks).
LAYOUTS = {"cp2": (2, 1, (2, 1)), "pp2": (1, 2, (2,)), "cp2xpp2": (2, 2, (2,))}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """One launch per layout; returns (layout name, expected, per-rank results)."""
    cp, pp, groups = LAYOUTS[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    cfgs = [tiny_config(tmp / f"ckpt{g}", groups=g, cp=cp, pp=pp) for g in groups]
    for seed, cfg in enumerate(cfgs):
        write_checkpoint(cfg, seed)
    expected = _reference(cfgs)
    out = str(tmp / "out")
    assert_all_ok(run_ranks(_layout_rank, cp * pp, tmp, cfgs, out))
    return request.param, expected, [torch.load(f"{out}.rank{r}.pt") for r in range(cp * pp)]


def _assert_close(layout_run, key_prefix: str) -> None:
    name, expected, ranks = layout_run
    keys = [k for k in expected if k.startswith(key_prefix)]
    assert keys
    for rank, got in enumerate(ranks):
        for key in keys:
            assert len(got[key]) == len(expected[key])
            for i, (a, b) in enumerate(zip(got[key], expected[key])):
                err = rel_l2(a, b)
                assert err <= TOL, f"{name} rank {rank} {key}[{i}]: rel L2 {err:.2e} > {TOL}"


def test_dit_passes_with_kv_cache_equal_single_process(layout_run) -> None:
    _assert_close(layout_run, "passes")


def test_t2v_denoise_loop_equals_single_process(layout_run) -> None:
    _assert_close(layout_run, "t2v")


def test_v2v_denoise_loop_equals_single_process(layout_run) -> None:
    _assert_close(layout_run, "v2v")


def test_distilled_t2v_denoise_loop_equals_single_process(layout_run) -> None:
    _assert_close(layout_run, "t2v_distill")


def _fake_mesh(pp: int, cp: int, rank: int = 0):
    # Layout checks raise before any communication: no process group needed.
    from magi.distributed.mesh import Mesh, mesh_groups

    cp_groups, pp_groups = mesh_groups(pp, cp)
    return Mesh(rank, pp * cp, pp, cp, torch.device("cpu"), tuple(cp_groups[rank // cp]), tuple(pp_groups[rank % cp]))


def test_parallelize_rejects_wrong_models_with_one_line(tmp_path: Path) -> None:
    from magi.distributed.parallelize import parallelize

    cfg = tiny_config(tmp_path, groups=2, cp=1, pp=2)
    with pytest.raises(ValueError, match=r"stage 0 owns layers 0..0 but the model holds \[0, 1\]"):
        parallelize(DiT(cfg.model), _fake_mesh(2, 1), cfg.engine)
    with pytest.raises(ValueError, match="do not match the mesh"):
        parallelize(DiT(cfg.model), _fake_mesh(1, 2), cfg.engine)
    three_heads = dataclasses.replace(cfg.model, num_attention_heads=3, num_query_groups=1)
    engine2 = engine(cp_size=2, cp_strategy="cp_ulysses")
    with pytest.raises(ValueError, match="cp_size 2 must divide num_attention_heads 3"):
        parallelize(DiT(three_heads), _fake_mesh(1, 2), engine2)
    single = parallelize(DiT(cfg.model), _fake_mesh(1, 1), engine())
    with pytest.raises(ValueError, match="already applied"):
        parallelize(single, _fake_mesh(1, 1), engine())


def test_cp4_with_repeated_kv_heads_equals_single_process(layout_run) -> None:
    name, expected, ranks = layout_run
    if name != "cp2xpp2":
        pytest.skip("cp 4 runs inside the 4-rank launch only")
    for rank, got in enumerate(ranks):
        for i, (a, b) in enumerate(zip(got["cp4_passes0"], expected["passes0"])):
            err = rel_l2(a, b)
            assert err <= TOL, f"cp4 rank {rank} call {i}: rel L2 {err:.2e} > {TOL}"
