"""The multi-rank harness of the distributed tests: spawn ``world`` processes on 127.0.0.1 with a
free port, one log file per rank, and the single-thread reference they are compared with."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from magi.config import EngineConfig
from tests.helpers import free_port


@dataclass
class RankResult:
    exitcode: int | None
    log: str


def _rank_entry(fn: Callable, rank: int, world: int, port: int, log: str, args: tuple) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    fn(rank, world, *args)


def run_ranks(
    fn: Callable, world: int, tmp_path: Path, *args: Any, timeout: float = 90.0, entry: Callable = _rank_entry
) -> list[RankResult]:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh processes; kill stragglers after ``timeout``."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    logs = [str(tmp_path / f"rank{r}.log") for r in range(world)]
    procs = [ctx.Process(target=entry, args=(fn, r, world, port, logs[r], args)) for r in range(world)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    return [RankResult(p.exitcode, Path(log).read_text()) for p, log in zip(procs, logs)]


def assert_all_ok(results: list[RankResult]) -> None:
    bad = [(r, res) for r, res in enumerate(results) if res.exitcode != 0]
    detail = "\n".join(f"--- rank {r} exit {res.exitcode}\n{res.log[-3000:]}" for r, res in bad)
    assert not bad, f"ranks failed:\n{detail}"


@contextmanager
def single_thread() -> Iterator[None]:
    """Compute a reference with one intra-op thread, like the ranks (same reduction order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def engine(**fields: Any) -> EngineConfig:
    return EngineConfig(distributed_backend="gloo", distributed_timeout_minutes=1, **fields)
