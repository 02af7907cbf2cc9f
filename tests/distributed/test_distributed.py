"""Distributed plumbing on CPU/gloo: mesh layout, collectives, config agreement, fail-fast.

Every multi-rank test spawns its own processes on 127.0.0.1 with a free port (``run_ranks``);
each rank's stdout/stderr goes to a log file that failures print.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from magi.config import MagiConfig
from magi.distributed import mesh as mesh_mod
from magi.distributed.context_parallel import (
    gather_sequence,
    heads_to_sequence,
    sequence_to_heads,
    split_bounds,
    split_sizes,
)
from magi.distributed.mesh import check_engine_config, mesh_groups
from magi.distributed.pipeline_parallel import stage_layers
from tests.distributed.ranks import _rank_entry, assert_all_ok, engine, run_ranks

# ---------------------------------------------------------------------------------------------
# Pure layout


def test_mesh_groups_follow_official_rank_order() -> None:
    cp_groups, pp_groups = mesh_groups(pp_size=2, cp_size=2)
    assert cp_groups == [[0, 1], [2, 3]]
    assert pp_groups == [[0, 2], [1, 3]]
    cp_groups, pp_groups = mesh_groups(pp_size=3, cp_size=1)
    assert cp_groups == [[0], [1], [2]] and pp_groups == [[0, 1, 2]]


def test_split_sizes_give_remainder_to_first_ranks() -> None:
    assert split_sizes(7, 3) == [3, 2, 2]
    assert split_sizes(8, 4) == [2, 2, 2, 2]
    assert split_bounds(7, 3, 1) == (3, 5)
    assert list(stage_layers(3, 2, 0)) == [0, 1] and list(stage_layers(3, 2, 1)) == [2]
    assert list(stage_layers(48, 4, 3)) == list(range(36, 48))
    with pytest.raises(ValueError, match="pp_size 4 exceeds num_layers 3"):
        stage_layers(3, 4, 0)


def test_engine_config_checks_are_one_line() -> None:
    with pytest.raises(ValueError, match=r"pp_size 2 x cp_size 2 = 4 but the world size is 2"):
        check_engine_config(engine(pp_size=2, cp_size=2, cp_strategy="cp_ulysses"), 2)
    with pytest.raises(ValueError, match="cp_strategy 'none' requires cp_size 1"):
        check_engine_config(engine(cp_size=2), 2)
    with pytest.raises(ValueError, match="cp_strategy 'ring'"):
        check_engine_config(engine(cp_strategy="ring"), 1)
    check_engine_config(engine(pp_size=2, cp_size=2, cp_strategy="cp_ulysses"), 4)


def test_single_process_mesh_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    mesh = mesh_mod.init_from_env(engine(), device="cpu")
    assert (mesh.rank, mesh.world_size, mesh.cp_rank, mesh.pp_rank) == (0, 1, 0, 0)
    assert mesh.cp_group is None and mesh.pp_group is None and mesh_mod.is_writer_rank()
    with pytest.raises(ValueError, match="torchrun --nproc_per_node 2"):
        mesh_mod.init_from_env(engine(cp_size=2, cp_strategy="cp_ulysses"), device="cpu")


def test_config_mismatch_message_names_the_field() -> None:
    base = MagiConfig()
    other = base.replace(runtime=dataclasses.replace(base.runtime, seed=7))
    assert mesh_mod.config_digest(base) != mesh_mod.config_digest(other)
    assert mesh_mod.config_digest(base) == mesh_mod.config_digest(dataclasses.replace(base, source="x"))
    flats = [mesh_mod._flat_config(base), mesh_mod._flat_config(other)]
    message = mesh_mod._describe_mismatch(flats)
    assert "rank 1 has runtime_config.seed=7 but rank 0 has 1234" in message


# ---------------------------------------------------------------------------------------------
# Multi-rank


def _layout_and_collectives(rank: int, world: int) -> None:
    import torch.distributed as dist

    mesh = mesh_mod.init_from_env(engine(pp_size=2, cp_size=2, cp_strategy="cp_ulysses"))
    assert (mesh.cp_rank, mesh.pp_rank) == (rank % 2, rank // 2)
    assert mesh_mod.is_writer_rank() == (rank == 0)
    # Group membership seen through the groups themselves.
    for group, expected in ((mesh.cp_group, mesh.cp_ranks), (mesh.pp_group, mesh.pp_ranks)):
        got = [torch.zeros(1) for _ in expected]
        dist.all_gather(got, torch.tensor([float(rank)]), group=group)
        assert [int(g) for g in got] == list(expected), (got, expected)
    mesh_mod.check_same_config(MagiConfig(engine=engine(pp_size=2, cp_size=2)), mesh)
    assert mesh_mod.any_rank(rank == 3, mesh) and not mesh_mod.any_rank(False, mesh)
    shared = mesh_mod.share_from_rank0(lambda: (torch.arange(3) + rank, {"from": rank}), mesh)
    assert torch.equal(shared[0], torch.arange(3)) and shared[1] == {"from": 0}
    for group, size, index in ((mesh.cp_group, 2, mesh.cp_rank), (dist.group.WORLD, world, rank)):
        _check_all_to_all(group, size, index)
    mesh_mod.shutdown()


def _check_all_to_all(group: Any, size: int, index: int) -> None:
    # Full tensor known to all ranks: [B, S, heads, F]; every rank checks its slices.
    batch, seq, per_rank = 2, 7, 3
    full = torch.arange(batch * seq * size * per_rank, dtype=torch.float32)
    full = full.view(batch, seq, size, per_rank)
    sizes = split_sizes(seq, size)
    start, end = split_bounds(seq, size, index)
    local = full[:, start:end]
    gathered = heads_to_sequence(local.clone(), group, sizes)  # [B, S, F] of head group `index`
    assert torch.equal(gathered, full[:, :, index]), "heads_to_sequence"
    back = sequence_to_heads(gathered, group, sizes, index)
    assert torch.equal(back, local), "sequence_to_heads"
    assert torch.equal(gather_sequence(local[:, :, 0], group, sizes), full[:, :, 0]), "gather"


def test_mesh_and_collectives_on_four_ranks(tmp_path: Path) -> None:
    assert_all_ok(run_ranks(_layout_and_collectives, 4, tmp_path))


def _mismatched_config(rank: int, world: int) -> None:
    mesh = mesh_mod.init_from_env(engine(cp_size=2, cp_strategy="cp_ulysses"))
    cfg = MagiConfig(engine=engine(cp_size=2, cp_strategy="cp_ulysses"))
    if rank == 1:
        cfg = cfg.replace(runtime=dataclasses.replace(cfg.runtime, num_steps=12))
    with mesh_mod.fail_fast():
        mesh_mod.check_same_config(cfg, mesh)


def test_mismatched_configs_are_detected_at_start(tmp_path: Path) -> None:
    results = run_ranks(_mismatched_config, 2, tmp_path, timeout=60)
    for res in results:
        assert res.exitcode not in (0, None), res.log
        assert "runtime_config.num_steps=12" in res.log, res.log


def _one_rank_fails(rank: int, world: int, failing: int, guarded: bool) -> None:
    import contextlib

    import torch.distributed as dist

    mesh_mod.init_from_env(engine(cp_size=world, cp_strategy="cp_ulysses"))
    sleeper = (failing + 1) % world
    with mesh_mod.fail_fast() if guarded else contextlib.nullcontext():
        if rank == failing:
            time.sleep(1.0)
            raise RuntimeError("boom from the test")
        if rank == sleeper:
            time.sleep(600)  # long local work: no collective would ever notice the failure
        # The third rank waits for a message from the sleeper (not from the failed rank).
        dist.recv(torch.zeros(1), src=sleeper)


def _uncaught_entry(fn: Callable, rank: int, world: int, port: int, log: str, args: tuple) -> None:
    # multiprocessing catches exceptions itself; re-raise through sys.excepthook as a script would.
    try:
        _rank_entry(fn, rank, world, port, log, args)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        os._exit(1)


@pytest.mark.parametrize(
    "failing,guarded",
    [(1, True), (0, True), (1, False)],
    ids=["worker-fails", "store-host-fails", "uncaught-without-fail_fast"],
)
def test_one_failing_rank_stops_every_rank_quickly(tmp_path: Path, failing: int, guarded: bool) -> None:
    start = time.monotonic()
    entry = _rank_entry if guarded else _uncaught_entry
    results = run_ranks(_one_rank_fails, 3, tmp_path, failing, guarded, timeout=60, entry=entry)
    elapsed = time.monotonic() - start
    for rank, res in enumerate(results):
        assert res.exitcode not in (0, None), f"rank {rank} exit {res.exitcode}:\n{res.log}"
        assert f"rank {failing} failed: RuntimeError: boom from the test" in res.log, res.log
    assert elapsed < 60
