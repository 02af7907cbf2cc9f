"""The distributed serve worker: one worker group of cp_size x pp_size ranks under torchrun.

A config whose engine_config asks for a world W > 1 is served by W worker processes
(``python -m magi.serve.worker`` each, one GPU each on CUDA, gloo on CPU) started by
``python -m magi.serve.ranks --nproc_per_node W -m magi.serve.worker ...``: this module's
launcher, which asks Linux to kill it with its parent (the server, or the Ray replica) and then
runs torchrun's launcher (``torch.distributed.run``) in-process on a free loopback port.

Inside the group rank 0 (the leader) alone talks to the job store and writes the job's files;
the other ranks (followers) run the same generation call with it. ``RankGroup`` carries the
leader's decisions to them as small object broadcasts: every poll of the queue, whether the
group stops (any rank's SIGTERM) and which job runs next; every denoising step, the steering
edits the leader read, so every rank applies an edit at the same step. A stop (SIGTERM, a
cancel) is already taken by every rank at the same step by the library
(``magi.generation.Control`` with ``any_rank``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("magi.serve")

SERVER_PID_ENV = "MAGI_SERVE_PID"  # the pid of the server (or Ray replica) the workers must die with


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def server_pid() -> int | None:
    """The server's pid that the Supervisor put in the environment (None: not set or not a pid)."""
    value = os.environ.get(SERVER_PID_ENV, "")
    return int(value) if value.isdigit() and int(value) > 1 else None


def pid_gone(pid: int | None) -> bool:
    """True when process ``pid`` has exited (a zombie counts as exited); False for None."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:  # Linux: a dead but unreaped server is a zombie
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


class RankGroup:
    """The worker group's control channel: rank 0 decides, every rank receives the same value.

    Objects travel over a gloo group (on CUDA a second, CPU-side group beside NCCL's), so the
    leader's small messages never touch a GPU stream. Every rank must make the same calls in the
    same order, as with any collective.
    """

    def __init__(self, mesh: Any) -> None:
        import torch.distributed as dist

        self.rank, self.world = mesh.rank, mesh.world_size
        self._dist = dist
        cpu = dist.get_backend() == "gloo"
        self.group = None if cpu else dist.new_group(backend="gloo", timeout=mesh.timeout)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def share(self, value: object = None) -> Any:
        """Rank 0's ``value`` on every rank (the other ranks' ``value`` is ignored)."""
        box = [value if self.leader else None]
        self._dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on at least one."""
        import torch

        value = torch.tensor([int(flag)])
        self._dist.all_reduce(value, op=self._dist.ReduceOp.MAX, group=self.group)
        return bool(value.item())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(argv: Sequence[str]) -> int:
    """torchrun with ``argv`` (``--nproc_per_node W -m magi.serve.worker ...``) on a free loopback
    port, dying with the parent; 0 when the group ended or was stopped by a signal, else 1."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    die_with_parent()
    if pid_gone(server_pid()):
        return 1  # the server died while this process started
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's choice, without its banner
    args = ["--nnodes", "1", "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *argv]
    try:
        torchrun(args)
    except SignalException as stop:  # Supervisor.stop: torchrun passed it on and waited for the ranks (<= 30 s)
        log.info("the worker group stopped on %s", signal.Signals(stop.sigval).name)
        return 0
    except ChildFailedError:  # torchrun has logged which rank failed and why
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="magi serve: %(message)s")
    log.setLevel(logging.INFO)
    sys.exit(launch(sys.argv[1:]))
