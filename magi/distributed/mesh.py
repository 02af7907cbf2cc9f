"""Process layout for multi-GPU inference: the pp x cp mesh, its process groups, fail-fast.

Layout (shared/spec/parallel.md §1, the official "tp-cp-pp-dp" order with tp = dp = 1):
``rank = cp_rank + cp_size * pp_rank``. A context-parallel (CP) group is ``cp_size`` consecutive
ranks; a pipeline (PP) group is the ``pp_size`` ranks that share a ``cp_rank``.

Every rank runs the whole sampler redundantly, so a failure on one rank must stop all of them:
``fail_fast()`` publishes a rank's exception in the rendezvous store and a watchdog thread on every
other rank exits its process with that message within about a second, instead of leaving the peers
blocked in a collective until ``distributed_timeout_minutes``.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from magi.config import EngineConfig, MagiConfig

logger = logging.getLogger(__name__)

_ABORT_KEY = "abort"
_ACK_KEY = "abort_ack"
_POLL_SECONDS = 0.25
_ACK_WAIT_SECONDS = 10.0  # longest wait for every rank to read a failure report

_current_mesh: Mesh | None = None


@dataclass(frozen=True, eq=False)
class Mesh:
    """This process's place in the pp_size x cp_size grid and the groups it talks to.

    ``cp_group`` / ``pp_group`` are None when that dimension has size 1 (no communication).
    ``cp_ranks`` / ``pp_ranks`` are the global ranks of this process's groups, in group order.
    """

    rank: int
    world_size: int
    pp_size: int
    cp_size: int
    device: torch.device
    cp_ranks: tuple[int, ...]
    pp_ranks: tuple[int, ...]
    cp_group: Any = None
    pp_group: Any = None
    timeout: datetime.timedelta = datetime.timedelta(minutes=15)

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.cp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def mesh_groups(pp_size: int, cp_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """Global ranks of every CP group and every PP group (rank = cp_rank + cp_size * pp_rank)."""
    cp_groups = [[cp_size * p + c for c in range(cp_size)] for p in range(pp_size)]
    pp_groups = [[c + cp_size * p for p in range(pp_size)] for c in range(cp_size)]
    return cp_groups, pp_groups


def check_engine_config(engine: EngineConfig, world_size: int) -> None:
    """Validate the parallel fields of engine_config against the world size (one-line errors)."""
    if engine.pp_size < 1 or engine.cp_size < 1:
        raise ValueError(f"engine_config pp_size={engine.pp_size} and cp_size={engine.cp_size} must both be >= 1")
    if engine.cp_size * engine.pp_size != world_size:
        raise ValueError(
            f"engine_config pp_size {engine.pp_size} x cp_size {engine.cp_size} = "
            f"{engine.pp_size * engine.cp_size} but the world size is {world_size}; launch with "
            f"torchrun --nproc_per_node {engine.pp_size * engine.cp_size} (or change the config)"
        )
    strategies = ("none", "cp_ulysses", "cp_shuffle_overlap")
    if engine.cp_strategy not in strategies:
        raise ValueError(f"engine_config cp_strategy {engine.cp_strategy!r} is unknown; use one of {strategies}")
    if engine.cp_strategy == "none" and engine.cp_size != 1:
        raise ValueError(
            f"engine_config cp_strategy 'none' requires cp_size 1 (got {engine.cp_size}); "
            "set cp_strategy to 'cp_ulysses'"
        )


def _device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        # Official: RANK % visible GPUs; LOCAL_RANK is the same on one node and right on several.
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _backend_for(engine: EngineConfig, device: torch.device) -> str:
    # NCCL needs GPUs; on CPU only gloo works, whatever the config names.
    return engine.distributed_backend if device.type == "cuda" else "gloo"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_from_env(engine: EngineConfig, device: torch.device | str | None = None) -> Mesh:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT) and build the mesh.

    Without torchrun (no WORLD_SIZE, or WORLD_SIZE=1) no process group is created and the mesh is
    a single rank; configs asking for pp_size x cp_size > 1 then fail with a one-line error. An
    already initialised default process group (e.g. set up by the caller) is reused.

    Args:
        engine: engine_config; reads pp_size, cp_size, cp_strategy, distributed_backend and
            distributed_timeout_minutes.
        device: override the device (default: cuda:LOCAL_RANK when CUDA is available, else cpu).
    """
    global _current_mesh
    timeout = datetime.timedelta(minutes=engine.distributed_timeout_minutes)
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    check_engine_config(engine, world_size)
    local_rank = _env_int("LOCAL_RANK", rank)
    device = torch.device(device) if device is not None else _device_for(local_rank)
    if device.type == "cuda" and device.index is None:
        device = _device_for(local_rank)  # plain "cuda": one GPU per local rank, not all on GPU 0
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=_backend_for(engine, device), timeout=timeout, rank=rank, world_size=world_size)
    _current_mesh = _build_mesh(rank, world_size, engine, device, timeout)
    if world_size > 1:
        _start_watchdog(rank, world_size)
    return _current_mesh


def _build_mesh(
    rank: int, world_size: int, engine: EngineConfig, device: torch.device, timeout: datetime.timedelta
) -> Mesh:
    pp_size, cp_size = engine.pp_size, engine.cp_size
    cp_groups, pp_groups = mesh_groups(pp_size, cp_size)
    my_cp, my_pp = cp_groups[rank // cp_size], pp_groups[rank % cp_size]
    cp_group = pp_group = None
    # new_group is collective over the whole world: every rank creates every group, same order.
    if world_size > 1 and cp_size > 1:
        for ranks in cp_groups:
            group = dist.new_group(ranks, timeout=timeout)
            cp_group = group if ranks == my_cp else cp_group
    if world_size > 1 and pp_size > 1:
        for ranks in pp_groups:
            group = dist.new_group(ranks, timeout=timeout)
            pp_group = group if ranks == my_pp else pp_group
    return Mesh(
        rank=rank,
        world_size=world_size,
        pp_size=pp_size,
        cp_size=cp_size,
        device=device,
        cp_ranks=tuple(my_cp),
        pp_ranks=tuple(my_pp),
        cp_group=cp_group,
        pp_group=pp_group,
        timeout=timeout,
    )


def share_from_rank0(compute: Callable[[], Any], mesh: Mesh) -> Any:
    """Run ``compute()`` on global rank 0 only and give its result to every rank.

    For work every rank needs but one rank should do (the T5 prompt encoding: the other ranks
    never load T5). Tensors in the result (nested in tuples / lists / dicts) arrive on the CPU.
    """
    if not mesh.is_distributed:
        return compute()
    box = [_to_cpu(compute()) if mesh.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def any_rank(flag: bool, mesh: Mesh) -> bool:
    """True on every rank when ``flag`` is true on at least one (collective: all ranks call it).

    For decisions that must be the same everywhere, e.g. stopping after a Ctrl-C that reached
    the ranks at different steps (a rank leaving the loop alone would strand the others).
    """
    if not mesh.is_distributed:
        return flag
    value = torch.tensor([int(flag)], device=mesh.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def current_mesh() -> Mesh | None:
    """The mesh built by the last ``init_from_env`` in this process (None before)."""
    return _current_mesh


def is_writer_rank() -> bool:
    """True on the one process that should write files (global rank 0, or no process group)."""
    if _current_mesh is not None:
        return _current_mesh.rank == 0
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# ---------------------------------------------------------------------------------------------
# Config agreement across ranks


def _flat_config(config: MagiConfig) -> dict[str, Any]:
    data = dataclasses.asdict(config)
    data.pop("source", None)  # the file path may differ between nodes; the content may not
    # Official JSON section names, so a mismatch message points at the field in the file.
    return {f"{section}_config.{key}": value for section, fields in data.items() for key, value in fields.items()}


def config_digest(config: MagiConfig) -> str:
    """sha256 of the config's content (the source path excluded)."""
    text = json.dumps(_flat_config(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def check_same_config(config: MagiConfig, mesh: Mesh) -> None:
    """Raise ValueError on every rank if any rank was started with a different config.

    Ranks exchange a hash first; only when hashes differ are the full configs gathered to name
    the first differing fields.
    """
    if not mesh.is_distributed:
        return
    digests: list[Any] = [None] * mesh.world_size
    dist.all_gather_object(digests, config_digest(config))
    if len(set(digests)) == 1:
        return
    flats: list[Any] = [None] * mesh.world_size
    dist.all_gather_object(flats, _flat_config(config))
    raise ValueError(_describe_mismatch(flats))


def _describe_mismatch(flats: list[dict[str, Any]]) -> str:
    base = flats[0]
    for rank, flat in enumerate(flats[1:], start=1):
        diff = sorted(k for k in base.keys() | flat.keys() if base.get(k) != flat.get(k))
        if diff:
            key = diff[0]
            return (
                f"config differs across ranks: rank {rank} has {key}={flat.get(key)!r} but rank 0 "
                f"has {base.get(key)!r} ({len(diff)} field(s) differ); start every rank with the "
                "same config file"
            )
    return "config differs across ranks; start every rank with the same config file"


# ---------------------------------------------------------------------------------------------
# Fail fast: one rank's exception stops every rank


class _Watchdog:
    """Daemon thread polling the rendezvous store for another rank's failure report."""

    def __init__(self, store: Any, rank: int, world_size: int) -> None:
        self.store = store
        self.rank, self.world_size = rank, world_size
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="magi-watchdog", daemon=True)
        self._ack_lock = threading.Lock()
        self._acked = False
        self.seen: str | None = None  # another rank's failure report, once read

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()

    def _run(self) -> None:
        while not self.stopped.wait(_POLL_SECONDS):
            try:
                if not self.store.check([_ABORT_KEY]):
                    continue
                message = self.store.get(_ABORT_KEY).decode(errors="replace")
                if message.startswith(f"rank {self.rank} "):
                    return  # our own report: the main thread is handling it
                self.seen = message
                self.acknowledge_and_wait()
            except Exception as error:  # the store's host died: nothing can complete any more
                if self.stopped.is_set():
                    return
                lost = f"lost contact with the rendezvous store ({type(error).__name__}: {error})"
                message = self.seen or lost
            if self.stopped.is_set():
                return
            _die(f"[magi rank {self.rank}] stopping because {message}")

    def publish(self, message: str) -> str:
        """Record ``message`` unless another rank failed first; returns the failure that counts."""
        first = self.store.compare_set(_ABORT_KEY, "", message)
        return first.decode(errors="replace") if isinstance(first, bytes) else str(first)

    def acknowledge_and_wait(self) -> None:
        """Count this rank as informed (once), then give the others a moment to read the report.

        Nobody leaves before every rank has read it: the store may live in a peer's process, and
        an early exit would also break the collectives of ranks that have not read it yet.
        """
        with self._ack_lock:
            if not self._acked:
                self.store.add(_ACK_KEY, 1)
                self._acked = True
        deadline = time.monotonic() + _ACK_WAIT_SECONDS
        while time.monotonic() < deadline and self.store.add(_ACK_KEY, 0) < self.world_size:
            time.sleep(0.05)


def _die(message: str) -> None:
    logger.error(message)  # (logging's last-resort handler shows it where none is set up)
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: the main thread may be blocked inside a collective that would never return.
    os._exit(1)


_watchdog: _Watchdog | None = None


def _open_store() -> Any | None:
    """A separate client connection to the rendezvous TCPStore (MASTER_ADDR:MASTER_PORT)."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(
        host, int(port), is_master=False, timeout=datetime.timedelta(seconds=30), wait_for_workers=False
    )
    return dist.PrefixStore(f"magi_failfast/{attempt}/", store)


def _start_watchdog(rank: int, world_size: int) -> None:
    global _watchdog
    if _watchdog is not None:
        return
    store = _open_store()
    if store is None:
        logger.warning(
            "[magi] MASTER_ADDR/MASTER_PORT not set: no fail-fast watchdog; a failing rank will "
            "stop its peers only through collective errors or distributed_timeout_minutes"
        )
        return
    _watchdog = _Watchdog(store, rank, world_size)
    _watchdog.start()
    _report_uncaught(rank)


def _report_uncaught(rank: int) -> None:
    """An exception nobody catches also stops the peers (code outside ``fail_fast`` included)."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, tb: Any) -> None:
        previous(kind, error, tb)
        _announce(rank, f"rank {rank} failed: {kind.__name__}: {error}")

    sys.excepthook = hook


def report_failure(message: str) -> str:
    """Tell every other rank to stop with ``message`` and wait briefly until they have read it.

    Returns:
        The failure every rank reports: ``message``, or an earlier one from another rank (then
        this rank's error is most likely a consequence, e.g. a broken connection).
    """
    watchdog = _watchdog
    if watchdog is None:
        return message
    if watchdog.seen is not None:  # another rank failed first; this error is its consequence
        return watchdog.seen
    try:
        first = watchdog.publish(message)
        watchdog.acknowledge_and_wait()
        return first
    except Exception:
        return message  # the peers then fail on the broken collectives / store instead


def _announce(rank: int, message: str) -> None:
    """Print this rank's failure, publish it, and name the root cause if another rank failed first."""
    logger.error("[magi rank %d] %s", rank, message)
    if _current_mesh is not None and _current_mesh.is_distributed:
        first = report_failure(message)
        if first != message:
            logger.error("[magi rank %d] stopping because %s", rank, first)


@contextmanager
def fail_fast(exit_on_error: bool = False) -> Iterator[None]:
    """Run a block so that an exception on this rank stops every rank promptly.

    The exception is printed with its traceback, published to the other ranks (their watchdog
    exits them with status 1 and the message), and re-raised, or with ``exit_on_error`` the process
    exits with status 1 right away (for CLIs: skips process-group teardown that could block).
    In a single process (no mesh, or world size 1) it only re-raises: there is nobody to tell.
    """
    try:
        yield
    except BaseException as error:
        alone = _current_mesh is None or not _current_mesh.is_distributed
        if alone or isinstance(error, SystemExit) and error.code in (0, None):
            raise
        rank = _current_mesh.rank
        traceback.print_exc()
        _announce(rank, f"rank {rank} failed: {type(error).__name__}: {error}")
        if exit_on_error:
            sys.stderr.flush()
            os._exit(1)
        raise


def shutdown() -> None:
    """Leave the process group cleanly: wait for every rank, stop the watchdog, destroy groups."""
    global _watchdog, _current_mesh
    initialized = dist.is_available() and dist.is_initialized()
    if initialized:
        dist.barrier()  # every rank finished its work: a failure can no longer happen
    if _watchdog is not None:
        _watchdog.stop()
        _watchdog = None
    if initialized:
        # Second barrier: nobody exits (taking the store host down) while a peer's watchdog runs.
        dist.barrier()
        dist.destroy_process_group()
    _current_mesh = None
