"""The worker process's keeper: ``magi serve`` and each Ray Serve worker replica run the worker
(``python -m magi.serve.worker``) under a :class:`Supervisor`, which restarts it after a crash and
stops it with SIGTERM (the worker then saves its running job's state) when asked.

A config with a cp_size x pp_size world W > 1 gets a worker group instead: the launcher of
``magi.serve.ranks`` (torchrun, W ranks) runs the same worker command; SIGTERM to the launcher
reaches every rank, and one rank's crash ends the whole group, which is then restarted."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading

from magi.serve.ranks import SERVER_PID_ENV

RESTART_DELAY_S = 1.0
STOP_TIMEOUT_S = 30.0

log = logging.getLogger("magi.serve")


def group_command(cmd: list[str], world: int) -> list[str]:
    """``cmd`` (``python -m magi.serve.worker ARGS``) as a group of ``world`` ranks under the
    launcher of ``magi.serve.ranks`` (torchrun); ``cmd`` itself when ``world`` is 1."""
    if world == 1:
        return list(cmd)
    return [cmd[0], "-m", "magi.serve.ranks", "--nproc_per_node", str(world), *cmd[1:]]


class Supervisor:
    """Runs the worker process (or worker group), restarting it after a crash (non-zero exit) until ``stop()``.

    ``world``: ranks of the worker group (1: one plain process). ``env``: set for the worker on
    top of this process's environment (e.g. CUDA_VISIBLE_DEVICES). The worker also gets this
    process's pid in MAGI_SERVE_PID: it exits once this process is gone.
    """

    def __init__(self, cmd: list[str], *, world: int = 1, env: dict[str, str] | None = None) -> None:
        self.cmd = group_command(cmd, world)
        self.world = world
        self.env = {**os.environ, **(env or {}), SERVER_PID_ENV: str(os.getpid())}
        self._stopping = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="magi-worker-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                if self._stopping.is_set():
                    return
                self._proc = subprocess.Popen(self.cmd, env=self.env)
            status = self._proc.wait()
            if status == 0 or self._stopping.is_set():
                return
            what = "worker" if self.world == 1 else f"worker group ({self.world} ranks)"
            log.warning("the %s exited with status %d; restarting it in %g s", what, status, RESTART_DELAY_S)
            self._stopping.wait(RESTART_DELAY_S)

    def pid(self) -> int | None:
        """The running worker's pid (the launcher's for a worker group; None between restarts)."""
        proc = self._proc
        return None if proc is None or proc.poll() is not None else proc.pid

    def alive(self) -> bool:
        """Whether it still runs or restarts the worker (False once it exited 0 or was stopped)."""
        return self._thread.is_alive()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM the worker (it saves its job's state) and wait up to ``timeout`` s, then kill it."""
        with self._lock:
            self._stopping.set()
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("the worker did not exit within %g s; killing it", timeout)
                proc.kill()
                proc.wait()
        self._thread.join(timeout=5)
