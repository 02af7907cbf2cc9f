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
from tests.conftest import rel_l2
from tests.test_distributed import assert_all_ok, engine, run_ranks

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


def dit_calls(model: torch.nn.Module, cfg: MagiConfig) -> list[torch.Tensor]:
    """A sequence of passes: cache writes, cache reads, batch 2 with and without history."""
    gen = torch.Generator().manual_seed(1)
    lcap, ccap = cfg.model.caption_max_length, cfg.model.caption_channels
    c = 9  # tokens per chunk: one latent frame of 6x6 -> 3x3 patches
    cache = KVCache(max_chunks=8)
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


def _parallel_dit_rank(rank: int, world: int, cfg: MagiConfig, out: str) -> None:
    from magi.distributed import fail_fast, init_from_env, shutdown
    from magi.distributed.parallelize import build_parallel_dit

    mesh = init_from_env(cfg.engine)
    with fail_fast():
        model = build_parallel_dit(cfg, mesh)
        torch.save(dit_calls(model, cfg), f"{out}.rank{rank}.pt")
    shutdown()


def _reference(cfg: MagiConfig) -> list[torch.Tensor]:
    from magi.checkpoint import load_dit

    return dit_calls(load_dit(cfg, "cpu"), cfg)


@pytest.mark.parametrize(
    "cp,pp,groups",
    [(2, 1, 2), (2, 1, 1), (1, 2, 2), (2, 2, 2)],
    ids=["cp2", "cp2-kv-repeat", "pp2", "cp2xpp2"],
)
def test_parallel_dit_passes_equal_single_process(tmp_path: Path, cp: int, pp: int, groups: int) -> None:
    cfg = tiny_config(tmp_path / "ckpt", groups=groups, cp=cp, pp=pp)
    write_checkpoint(cfg)
    expected = _reference(cfg)
    out = str(tmp_path / "out")
    assert_all_ok(run_ranks(_parallel_dit_rank, cp * pp, tmp_path, cfg, out))
    for rank in range(cp * pp):
        got = torch.load(f"{out}.rank{rank}.pt")
        for i, (a, b) in enumerate(zip(got, expected)):
            err = rel_l2(a, b)
            assert err <= TOL, f"rank {rank} call {i}: rel L2 {err:.2e}"
